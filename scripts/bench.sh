#!/usr/bin/env bash
# Blob throughput of the running daemon beside its upstream, in one run:
# distribution (Debian's docker-registry) serves as the upstream and as the
# reference. The machine is shared and noisy: the ratios printed are what counts.
#
#   scripts/bench.sh [--size MiB] [--runs N]
#
# Measures, each as the median of N runs:
#   upstream direct   GET from distribution's filesystem store
#   hoard cold        GET of a blob hoard does not have (fetch + verify + store + serve)
#   hoard cached      GET of a blob already in hoard's store
#   disk write        dd of the same size with fsync into the same file system:
#                     the bound for any cache's cold path once the page cache
#                     stops absorbing writes
# and hoard's peak RSS (VmHWM) over the whole run. Writes target/bench/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=200
runs=3
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size_mib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--size MiB] [--runs N]" >&2; exit 2 ;;
  esac
done

for tool in docker-registry curl python3; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool missing (apt-get install docker-registry curl python3)" >&2; exit 1; }
done

cargo build --release --locked -q
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done
  echo "bench.sh: $1 did not come up" >&2; exit 1
}

reg_port=$(free_port)
cat > "$work/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$reg_port
log:
  level: error
  accesslog:
    disabled: true
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
upstream="http://127.0.0.1:$reg_port"
wait_http "$upstream/v2/"

# One blob for the cached case and one per cold run, each pushed upstream.
push_blob() {
  local file=$1 digest location
  digest="sha256:$(sha256sum "$file" | cut -d' ' -f1)"
  location=$(curl -s -D - -o /dev/null -X POST "$upstream/v2/library/bench/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
  case "$location" in /*) location="$upstream$location" ;; esac
  curl -s -f -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
    --data-binary "@$file" "$location&digest=$digest"
  echo "$digest"
}
echo "bench: pushing $((runs + 1)) blobs of $size_mib MiB to distribution"
digests=()
for i in $(seq 0 "$runs"); do
  head -c "$((size_mib * 1024 * 1024))" /dev/urandom >"$work/blob"
  digests+=("$(push_blob "$work/blob")")
done
rm -f "$work/blob"

hoard_port=$(free_port)
HOARD_LOG=warn ./target/release/hoard serve --listen "127.0.0.1:$hoard_port" --data-dir "$work/hoard" \
  --upstream "docker.io=$upstream" >"$work/hoard.log" 2>&1 &
hoard_pid=$!
pids+=($hoard_pid)
mirror="http://127.0.0.1:$hoard_port"
wait_http "$mirror/healthz"

# "seconds ttfb_seconds bytes" of one GET.
fetch() { curl -s -f -o /dev/null --max-time 300 -w '%{time_total} %{time_starttransfer} %{size_download}\n' "$1"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mibps() { awk -v b="$1" -v s="$2" 'BEGIN {printf "%.0f", b / 1048576 / s}'; }

path="/v2/library/bench/blobs"
cached=${digests[0]}
fetch "$mirror$path/$cached" >/dev/null  # fill the cache

: >"$work/direct"; : >"$work/cold"; : >"$work/cached"; : >"$work/disk"
for i in $(seq 1 "$runs"); do
  fetch "$upstream$path/${digests[$i]}" >>"$work/direct"
  fetch "$mirror$path/${digests[$i]}" >>"$work/cold"
  fetch "$mirror$path/$cached" >>"$work/cached"
done
for i in $(seq 1 "$runs"); do
  dd if=/dev/zero of="$work/dd" bs=1M count="$size_mib" conv=fsync 2>&1 \
    | awk '/copied/ {for (i = 1; i <= NF; i++) if ($i == "s,") print $(i-1)}' >>"$work/disk"
  rm -f "$work/dd"
done
t_disk=$(median <"$work/disk")
bytes=$((size_mib * 1024 * 1024))
t_direct=$(cut -d' ' -f1 "$work/direct" | median)
t_cold=$(cut -d' ' -f1 "$work/cold" | median)
t_cached=$(cut -d' ' -f1 "$work/cached" | median)
ttfb_direct=$(cut -d' ' -f2 "$work/direct" | median)
ttfb_cold=$(cut -d' ' -f2 "$work/cold" | median)
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$hoard_pid/status")
upstream_gets=$(curl -s "$mirror/metrics" | awk '/^hoard_upstream_requests_total\{.*method="GET".*status="200"/ {s += $2} END {print s+0}')

r_direct=$(mibps "$bytes" "$t_direct")
r_cold=$(mibps "$bytes" "$t_cold")
r_cached=$(mibps "$bytes" "$t_cached")
r_disk=$(mibps "$bytes" "$t_disk")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

printf '\nblob GET, %d MiB, median of %d runs, %s\n' "$size_mib" "$runs" "$(nproc) cores"
printf '%-26s %10s %10s %12s\n' case MiB/s 'TTFB ms' 'vs upstream'
printf '%-26s %10s %10.1f %12s\n' 'upstream direct' "$r_direct" "$(awk -v t="$ttfb_direct" 'BEGIN{print t*1000}')" 1.00
printf '%-26s %10s %10.1f %12s\n' 'hoard cold (miss)' "$r_cold" "$(awk -v t="$ttfb_cold" 'BEGIN{print t*1000}')" "$(ratio "$r_cold" "$r_direct")"
printf '%-26s %10s %10s %12s\n' 'hoard cached (hit)' "$r_cached" - "$(ratio "$r_cached" "$r_direct")"
printf '%-26s %10s %10s %12s\n' 'disk write (dd, fsync)' "$r_disk" - "$(ratio "$r_disk" "$r_direct")"
printf 'hoard cold / disk write: %s\n' "$(ratio "$r_cold" "$r_disk")"
printf 'hoard peak RSS: %d MiB; upstream GETs by hoard: %d (expected %d)\n' "$((rss_kib / 1024))" "$upstream_gets" "$((runs + 1))"

mkdir -p target/bench
cat > target/bench/results.json <<JSON
{"size_mib": $size_mib, "runs": $runs,
 "upstream_direct_mibps": $r_direct, "disk_write_mibps": $r_disk, "hoard_cold_mibps": $r_cold, "hoard_cached_mibps": $r_cached,
 "upstream_ttfb_s": $ttfb_direct, "hoard_cold_ttfb_s": $ttfb_cold,
 "hoard_peak_rss_kib": $rss_kib, "hoard_upstream_gets": $upstream_gets}
JSON
echo "wrote target/bench/results.json"
