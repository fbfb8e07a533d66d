#!/usr/bin/env bash
# hoard measured beside its peers in one run (the machine is shared and noisy:
# the ratios printed are what counts). All servers on 127.0.0.1; every load
# is bounded in count and time.
#
#   scripts/bench.sh [--quick] [--size MiB] [--runs N]
#   HOARD_BIN=path/to/hoard scripts/bench.sh ...   (that binary, no build)
#
# 1. cached blob, 1 client and 32 clients: hoard vs nginx (sendfile, same
#    file), distribution (its filesystem store), distribution proxy (cached)
# 2. cold blob through hoard vs direct from the upstream vs distribution proxy,
#    and nginx as a plain relay (no cache, no hash: the floor for any proxy
#    on this machine): time to first byte and total
# 3. manifest by digest: requests/s and p99 with wrk, hoard vs distribution
# 4. thundering herd: HERD clients on one cold blob: upstream GETs and time,
#    hoard vs distribution proxy
# 5. peak RSS (VmHWM) of every server
# 6. the shared bucket (issue 13; needs `garage`, which scripts/test.sh builds):
#    a cached blob through a replica from the bucket and then from its local
#    tier vs the fs backend, a herd spread over three replicas (upstream GETs,
#    seconds), and redirect mode (bytes straight from Garage)
# 7. lazy pulling and resume (issue 14): the last 4 KiB of a cold 64 MiB blob
#    through an nginx relay limited to 16 MiB/s, through hoard vs straight
#    from the relay; and the bytes upstream sends when hoard's download of a
#    blob is cut once at 25% (scripts/cut-relay.py) vs the blob's size; a
#    whole cold pull through a relay limited to 32 MiB/s (an internet link),
#    through hoard vs straight from the relay
# 8. where pulls spend time (issue 16): cached 64 KiB and 1 MiB blobs at 32,
#    256 and 1000 connections with wrk, hoard vs nginx (sendfile, same bytes)
#    vs distribution, with errors and CPU per GiB (/proc/PID/stat) of each;
#    CPU per GiB served for hoard, nginx (proxy_cache, relay) and
#    distribution's proxy, cached and cold; the first hit after a download
#    vs later hits; the cold path vs one sha256 pass (openssl) over the same
#    bytes; 100 concurrent cold pulls of distinct 16 MiB blobs by slow
#    readers (a fresh hoard: its peak RSS is that load's)
# Writes target/bench/results.json. --quick (CI) uses small sizes and fails
# only if hoard's herd made more than one upstream GET.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=256
runs=3
herd=100
wrk_secs=5
clients=32
quick=false
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) size_mib=16; runs=1; herd=20; wrk_secs=1; clients=8; quick=true; shift ;;
    --size) size_mib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--quick] [--size MiB] [--runs N]" >&2; exit 2 ;;
  esac
done

for tool in docker-registry nginx wrk curl python3 sha256sum openssl; do
  command -v "$tool" >/dev/null || {
    echo "bench.sh: $tool missing (apt-get install docker-registry nginx-light wrk curl python3)" >&2
    exit 1
  }
done

# HOARD_BIN measures a given build (say, before and after a change);
# otherwise the release build of this checkout.
if [ -n "${HOARD_BIN:-}" ]; then
  hoard_bin=$HOARD_BIN
else
  cargo build --release --locked -q
  hoard_bin=${CARGO_TARGET_DIR:-target}/release/hoard
fi
work=$(mktemp -d)
pids=()
cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  [ -f "$work/slow.pid" ] && kill "$(cat "$work/slow.pid")" 2>/dev/null || true
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done
  echo "bench.sh: $1 did not come up" >&2; exit 1
}
registry_config() { # name port extra-yaml
  cat > "$work/$1.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/$1
http:
  addr: 127.0.0.1:$2
log:
  level: error
  accesslog:
    disabled: false
$3
YAML
}

# Upstream: distribution with its filesystem store.
up_port=$(free_port)
registry_config upstream "$up_port" ""
docker-registry serve "$work/upstream.yml" >"$work/upstream.log" 2>&1 &
up_pid=$!; pids+=($up_pid)
upstream="http://127.0.0.1:$up_port"
wait_http "$upstream/v2/"

push_blob() { # file -> digest
  local file=$1 digest location
  digest="sha256:$(sha256sum "$file" | cut -d' ' -f1)"
  location=$(curl -s -D - -o /dev/null -X POST "$upstream/v2/library/bench/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
  case "$location" in /*) location="$upstream$location" ;; esac
  curl -s -f -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$file" "$location&digest=$digest"
  echo "$digest"
}
# Blobs: one cached everywhere, one cold per run for hoard and for the proxy,
# one for each herd.
count=$((1 + 2 * runs + 2 + 1))
echo "bench: pushing $count blobs of $size_mib MiB"
digests=()
for _ in $(seq "$count"); do
  head -c "$((size_mib * 1024 * 1024))" /dev/urandom >"$work/blob"
  digests+=("$(push_blob "$work/blob")")
done
rm -f "$work/blob"
cached=${digests[0]}
# Small cached blobs (section 8): a config-sized and a thin-layer-sized one.
declare -A small_bytes=([64k]=65536 [1m]=1048576) small
for sz in 64k 1m; do
  head -c "${small_bytes[$sz]}" /dev/urandom >"$work/blob"
  small[$sz]=$(push_blob "$work/blob")
done
rm -f "$work/blob"
# A small manifest for the manifest benchmark.
echo '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$work/config.json"
config_digest=$(push_blob "$work/config.json")
config_size=$(stat -c %s "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[]}' \
  "$config_digest" "$config_size" >"$work/manifest.json"
manifest_digest="sha256:$(sha256sum "$work/manifest.json" | cut -d' ' -f1)"
curl -s -f -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary "@$work/manifest.json" "$upstream/v2/library/bench/manifests/v1"

# distribution in proxy mode, in front of the same upstream.
px_port=$(free_port)
registry_config proxy "$px_port" "proxy:
  remoteurl: $upstream"
docker-registry serve "$work/proxy.yml" >"$work/proxy.log" 2>&1 &
px_pid=$!; pids+=($px_pid)
proxy="http://127.0.0.1:$px_port"
wait_http "$proxy/v2/"

# nginx serving the cached blob's file from distribution's store (sendfile);
# its workers may run as nobody, so they need to read it.
chmod 755 "$work"
chmod -R a+rX "$work/upstream"
ng_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx.conf" <<NGINX
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx/error.log;
worker_rlimit_nofile 8192;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  proxy_cache_path $work/nginx/cache keys_zone=blobs:10m;
  tcp_nopush on;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:$ng_port;
    location = /blob { alias $work/upstream/docker/registry/v2/blobs/sha256/${cached:7:2}/${cached:7}/data; }
    location = /blob-64k { alias $work/upstream/docker/registry/v2/blobs/sha256/${small[64k]:7:2}/${small[64k]:7}/data; }
    location = /blob-1m { alias $work/upstream/docker/registry/v2/blobs/sha256/${small[1m]:7:2}/${small[1m]:7}/data; }
    # A caching proxy: nginx's own cache in front of the upstream.
    location /cache/ { proxy_pass $upstream/; proxy_cache blobs; proxy_cache_valid 200 1h; proxy_http_version 1.1; }
    # A plain relay (no cache, no hashing): the floor for any proxy here.
    location /v2/ { proxy_pass $upstream; proxy_buffering off; proxy_http_version 1.1; }
  }
}
NGINX
nginx -p "$work/nginx" -c "$work/nginx.conf"
nginx_url="http://127.0.0.1:$ng_port/blob"
relay="http://127.0.0.1:$ng_port"
wait_http "$nginx_url"

# hoard.
hd_port=$(free_port)
HOARD_LOG=warn "$hoard_bin" serve --listen "127.0.0.1:$hd_port" --data-dir "$work/hoard" \
  --upstream "docker.io=$upstream" >"$work/hoard.log" 2>&1 &
hd_pid=$!; pids+=($hd_pid)
mirror="http://127.0.0.1:$hd_port"
wait_http "$mirror/healthz"

path="/v2/library/bench/blobs"
fetch() { curl -s -f -o /dev/null --max-time 300 -w '%{time_total} %{time_starttransfer}\n' "$1"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mibps() { awk -v b="$1" -v s="$2" 'BEGIN {printf "%.0f", b / 1048576 / s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
bytes=$((size_mib * 1024 * 1024))
# N concurrent GETs of a URL; waits for those clients only (not the servers).
parallel_get() {
  local n=$1 url=$2 cpids=()
  for _ in $(seq "$n"); do
    curl -s -o /dev/null --max-time 300 "$url" &
    cpids+=($!)
  done
  wait "${cpids[@]}" || true
}
# Waits (at most 20 s) until a server has stored a blob file of full size,
# then flushes dirty pages, so one measurement's writes do not slow the next.
settle() { # file [size]
  for _ in $(seq 200); do
    [ "$(stat -c %s "$1" 2>/dev/null || echo 0)" = "${2:-$bytes}" ] && break
    sleep 0.1
  done
  sync
}
upstream_gets() { grep -c "\"GET $path/$1" "$work/upstream.log" || true; }
# CPU (user + system, clock ticks) the processes used so far: /proc/PID/stat
# fields 14 and 15, counted after the ") " that ends the command name.
clk_tck=$(getconf CLK_TCK)
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$pid/stat")))
  done
  echo "$total"
}
nginx_pids() { echo "$(cat "$work/nginx.pid") $(pgrep -P "$(cat "$work/nginx.pid")" | tr '\n' ' ')"; }
# CPU seconds per GiB: ticks bytes.
per_gib() { awk -v t="$1" -v b="$2" -v hz="$clk_tck" 'BEGIN {if (b > 0) printf "%.2f", t / hz / (b / 1073741824); else print "-"}'; }

# Warm the cached blob into hoard and the proxy.
fetch "$mirror$path/$cached" >/dev/null
fetch "$proxy$path/$cached" >/dev/null
settle "$work/hoard/blobs/sha256/${cached:7:2}/${cached:7}"
settle "$work/proxy/docker/registry/v2/blobs/sha256/${cached:7:2}/${cached:7}/data"
# One read more: hoard writes downloads around the page cache, so without
# it a single run (--runs 1) of row 1 measured hoard's first hit after a
# download against the others' page cache. The first hit has its own row.
fetch "$mirror$path/$cached" >/dev/null

# Where each server serves the cached blob.
cached_url() {
  case $1 in
    hoard) echo "$mirror$path/$cached" ;; nginx) echo "$nginx_url" ;;
    distribution) echo "$upstream$path/$cached" ;; proxy) echo "$proxy$path/$cached" ;;
  esac
}

# 1. cached blob, one client.
declare -A one
for name in hoard nginx distribution proxy; do
  url=$(cached_url "$name")
  t=$(for _ in $(seq "$runs"); do fetch "$url"; done | cut -d' ' -f1 | median)
  one[$name]=$(mibps "$bytes" "$t")
done
# 1b. cached blob, $clients clients at once: aggregate MiB/s.
declare -A many
for name in hoard nginx distribution proxy; do
  url=$(cached_url "$name")
  t=$(for _ in $(seq "$runs"); do
    start=$(date +%s.%N)
    parallel_get "$clients" "$url"
    echo "$(date +%s.%N) - $start" | bc
  done | median)
  many[$name]=$(mibps "$((bytes * clients))" "$t")
done

# 2. cold: hoard and proxy each get fresh blobs; direct reads the same ones.
: >"$work/cold_hoard"; : >"$work/cold_proxy"; : >"$work/cold_direct"; : >"$work/cold_relay"
# CPU ticks of each server on the cold path (section 8).
declare -A cold_cpu=([hoard]=0 [relay]=0 [proxy]=0)
for i in $(seq 1 "$runs"); do
  hoard_blob=${digests[$i]}
  proxy_blob=${digests[$((runs + i))]}
  fetch "$upstream$path/$hoard_blob" >>"$work/cold_direct"
  t0=$(cpu_ticks $(nginx_pids))
  fetch "$relay$path/$hoard_blob" >>"$work/cold_relay"
  cold_cpu[relay]=$((cold_cpu[relay] + $(cpu_ticks $(nginx_pids)) - t0))
  t0=$(cpu_ticks "$hd_pid")
  fetch "$mirror$path/$hoard_blob" >>"$work/cold_hoard"
  settle "$work/hoard/blobs/sha256/${hoard_blob:7:2}/${hoard_blob:7}"
  cold_cpu[hoard]=$((cold_cpu[hoard] + $(cpu_ticks "$hd_pid") - t0))
  t0=$(cpu_ticks "$px_pid")
  fetch "$proxy$path/$proxy_blob" >>"$work/cold_proxy"
  # distribution's proxy fetches the blob a second time in the background to
  # store it: let that finish before the next measurement.
  settle "$work/proxy/docker/registry/v2/blobs/sha256/${proxy_blob:7:2}/${proxy_blob:7}/data"
  cold_cpu[proxy]=$((cold_cpu[proxy] + $(cpu_ticks "$px_pid") - t0))
done
# The floor: one sha256 pass over the same bytes (a cached file) by OpenSSL.
floor_file=$work/upstream/docker/registry/v2/blobs/sha256/${digests[1]:7:2}/${digests[1]:7}/data
openssl dgst -sha256 "$floor_file" >/dev/null
floor_secs=$( { TIMEFORMAT='%3U %3S'; time openssl dgst -sha256 "$floor_file" >/dev/null; } 2>&1 | awk '{print $1 + $2}')
# The first hit after a download (nothing of it in the page cache: hoard
# writes downloads around it) vs later hits of the same blob.
first_blob=${digests[1]}
t0=$(cpu_ticks "$hd_pid")
fetch "$mirror$path/$first_blob" >/dev/null
first_hit_cpu=$(($(cpu_ticks "$hd_pid") - t0))
t0=$(cpu_ticks "$hd_pid")
for _ in $(seq "$runs"); do fetch "$mirror$path/$first_blob" >/dev/null; done
later_hit_cpu=$(($(cpu_ticks "$hd_pid") - t0))
# The machine's own ratio for the same thing: a file of the same size
# written around the page cache (as hoard writes downloads), read by `cat`
# for the first time and then again. In a VM the first read also pays for
# the guest touching never-used memory for the page cache, whoever reads.
dd if="$floor_file" of="$work/direct-ref" bs=1M oflag=direct status=none
sync
cpu_of() { { TIMEFORMAT='%3U %3S'; time "$@" >/dev/null; } 2>&1 | awk '{print $1 + $2}'; }
ref_first_secs=$(cpu_of cat "$work/direct-ref")
ref_later_secs=$(for _ in $(seq "$runs"); do cpu_of cat "$work/direct-ref"; done | awk '{s += $1} END {print s}')
rm -f "$work/direct-ref"
declare -A cold_total cold_ttfb
for name in direct relay hoard proxy; do
  cold_total[$name]=$(cut -d' ' -f1 "$work/cold_$name" | median)
  cold_ttfb[$name]=$(cut -d' ' -f2 "$work/cold_$name" | median)
done

# 3. manifest by digest, wrk at 32 connections.
wrk_run() { wrk -t2 -c32 -d"${wrk_secs}s" --latency "$1" 2>/dev/null; }
declare -A rps p99
for name in hoard distribution; do
  base=$([ "$name" = hoard ] && echo "$mirror" || echo "$upstream")
  url="$base/v2/library/bench/manifests/$manifest_digest"
  curl -s -f -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$url"
  out=$(wrk_run "$url")
  rps[$name]=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99[$name]=$(echo "$out" | awk '$1 == "99%" {print $2}')
done

# 4. thundering herd on a cold blob.
declare -A herd_gets herd_secs
herd_hoard=${digests[$((2 * runs + 1))]}
herd_proxy=${digests[$((2 * runs + 2))]}
for name in hoard proxy; do
  base=$([ "$name" = hoard ] && echo "$mirror" || echo "$proxy")
  blob=$([ "$name" = hoard ] && echo "$herd_hoard" || echo "$herd_proxy")
  start=$(date +%s.%N)
  parallel_get "$herd" "$base$path/$blob"
  herd_secs[$name]=$(echo "$(date +%s.%N) - $start" | bc)
  if [ "$name" = hoard ]; then
    settle "$work/hoard/blobs/sha256/${blob:7:2}/${blob:7}"
  else
    settle "$work/proxy/docker/registry/v2/blobs/sha256/${blob:7:2}/${blob:7}/data"
  fi
  herd_gets[$name]=$(upstream_gets "$blob")
done

# hoard's peak RSS over sections 1-4 (later sections run other hoards,
# and section 8's thousand connections are a row of their own).
rss_hoard_before_8=$(awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/$hd_pid/status")

# 8. Small and medium cached blobs with wrk (issue 16): requests/s, errors
# and CPU per GiB served of each server, measured around the same run.
small_file() { # server size -> the server's stored file of a small blob
  local d=${small[$2]}
  case $1 in
    hoard) echo "$work/hoard/blobs/sha256/${d:7:2}/${d:7}" ;;
    proxy) echo "$work/proxy/docker/registry/v2/blobs/sha256/${d:7:2}/${d:7}/data" ;;
  esac
}
small_url() { # server size
  case $1 in
    hoard) echo "$mirror$path/${small[$2]}" ;; nginx) echo "http://127.0.0.1:$ng_port/blob-$2" ;;
    distribution) echo "$upstream$path/${small[$2]}" ;; proxy) echo "$proxy$path/${small[$2]}" ;;
    nginx-cache) echo "$relay/cache$path/${small[$2]}" ;;
  esac
}
server_pids() {
  case $1 in
    hoard) echo "$hd_pid" ;; nginx | nginx-cache) nginx_pids ;;
    distribution) echo "$up_pid" ;; proxy) echo "$px_pid" ;;
  esac
}
for sz in 64k 1m; do
  for name in hoard proxy nginx-cache; do
    fetch "$(small_url "$name" "$sz")" >/dev/null
  done
  settle "$(small_file hoard "$sz")" "${small_bytes[$sz]}"
  settle "$(small_file proxy "$sz")" "${small_bytes[$sz]}"
  # Later hits are what this row measures: one more read puts the blob in
  # the page cache for every server alike.
  for name in hoard proxy nginx-cache nginx distribution; do
    fetch "$(small_url "$name" "$sz")" >/dev/null
  done
done
declare -A wrk_rps wrk_err wrk_cpu
for sz in 64k 1m; do
  for conns in 32 256 1000; do
    names="hoard nginx distribution"
    [ "$sz" = 1m ] && [ "$conns" = 32 ] && names="$names nginx-cache proxy"
    for name in $names; do
      pids_now=$(server_pids "$name")
      t0=$(cpu_ticks $pids_now)
      out=$(wrk -t2 -c"$conns" -d"${wrk_secs}s" --timeout 10s "$(small_url "$name" "$sz")" 2>&1 || true)
      ticks=$(($(cpu_ticks $pids_now) - t0))
      key=$name/$sz/$conns
      wrk_rps[$key]=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
      wrk_err[$key]=$(echo "$out" | awk '/Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} /Non-2xx/ {n += $5} END {print n + 0}')
      requests=$(echo "$out" | awk '/requests in/ {print $1}')
      wrk_cpu[$key]=$(per_gib "$ticks" "$(( ${requests:-0} * small_bytes[$sz] ))")
    done
  done
done
rss_hoard_wrk=$(awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/$hd_pid/status")

# 8b. Many distinct cold downloads at once, read slowly: a fresh hoard (so
# its peak RSS is this load's) in front of the fast upstream.
budget_n=100; budget_mib=16; budget_rate=2M
$quick && { budget_n=10; budget_mib=4; budget_rate=1M; }
head -c "$((budget_mib * 1024 * 1024))" /dev/urandom >"$work/blob"
budget=()
for i in $(seq "$budget_n"); do
  # Distinct blobs for little random data: a counter over the first bytes.
  printf '%08d' "$i" | dd of="$work/blob" bs=8 count=1 conv=notrunc status=none
  budget+=("$(push_blob "$work/blob")")
done
rm -f "$work/blob"
bd_port=$(free_port)
HOARD_LOG=warn "$hoard_bin" serve --listen "127.0.0.1:$bd_port" --data-dir "$work/budget" \
  --upstream "docker.io=$upstream" >"$work/budget.log" 2>&1 &
bd_pid=$!; pids+=($bd_pid)
wait_http "http://127.0.0.1:$bd_port/healthz"
start=$(date +%s.%N)
bpids=()
for d in "${budget[@]}"; do
  curl -s -f -o /dev/null --max-time 300 --limit-rate "$budget_rate" -w '%{size_download}\n' \
    "http://127.0.0.1:$bd_port$path/$d" >>"$work/budget.sizes" &
  bpids+=($!)
done
wait "${bpids[@]}" || true
budget_secs=$(echo "$(date +%s.%N) - $start" | bc)
budget_ok=$(grep -cx "$((budget_mib * 1024 * 1024))" "$work/budget.sizes" || true)
rss_budget=$(awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/$bd_pid/status")

# 5. peak RSS.
# 6. The shared bucket: Garage, three replicas, a fresh one, a redirecting one.
fleet_ran=false
export PATH="$HOME/.cargo/bin:$PATH"
if command -v garage >/dev/null; then
  fleet_ran=true
  g_rpc=$(free_port); g_s3=$(free_port); g_admin=$(free_port)
  mkdir -p "$work/garage"
  cat >"$work/garage/garage.toml" <<GARAGE
metadata_dir = "$work/garage/meta"
data_dir = "$work/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$g_rpc"
rpc_public_addr = "127.0.0.1:$g_rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$g_s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$g_admin"
admin_token = "bench"
GARAGE
  garage -c "$work/garage/garage.toml" server >"$work/garage.log" 2>&1 &
  pids+=($!)
  admin="http://127.0.0.1:$g_admin/v2"
  wait_http "$admin/GetClusterHealth"
  gcall() { curl -s -f -H 'Authorization: Bearer bench' -H 'Content-Type: application/json' -X POST -d "$2" "$admin/$1"; }
  json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
  node=$(curl -s -f -H 'Authorization: Bearer bench' "$admin/GetClusterStatus" | json '["nodes"][0]["id"]')
  gcall UpdateClusterLayout "{\"roles\":[{\"id\":\"$node\",\"zone\":\"dc1\",\"capacity\":100000000000,\"tags\":[]}]}" >/dev/null
  gcall ApplyClusterLayout '{"version":1}' >/dev/null
  bucket_id=$(gcall CreateBucket '{"globalAlias":"hoard"}' | json '["id"]')
  gcall CreateKey '{"name":"hoard"}' >"$work/key.json"
  export AWS_ACCESS_KEY_ID=$(json '["accessKeyId"]' <"$work/key.json")
  export AWS_SECRET_ACCESS_KEY=$(json '["secretAccessKey"]' <"$work/key.json")
  gcall AllowBucketKey "{\"bucketId\":\"$bucket_id\",\"accessKeyId\":\"$AWS_ACCESS_KEY_ID\",\"permissions\":{\"read\":true,\"write\":true,\"owner\":true}}" >/dev/null
  s3_args=(--s3-endpoint "http://127.0.0.1:$g_s3" --s3-bucket hoard --s3-region garage --upstream "docker.io=$upstream")
  r_ports=($(free_port) $(free_port) $(free_port))
  peers=()
  for p in "${r_ports[@]}"; do peers+=(--peer "http://127.0.0.1:$p"); done
  for i in 0 1 2; do
    HOARD_LOG=warn "$hoard_bin" serve --listen "127.0.0.1:${r_ports[$i]}" --data-dir "$work/replica$i" \
      "${s3_args[@]}" "${peers[@]}" --advertise "http://127.0.0.1:${r_ports[$i]}" >"$work/replica$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${r_ports[@]}"; do wait_http "http://127.0.0.1:$p/healthz"; done
  # The cached blob into the bucket through the fleet, then a replica with
  # an empty disk reads it: first from the bucket, then from its own disk.
  fetch "http://127.0.0.1:${r_ports[0]}$path/$cached" >/dev/null
  for _ in $(seq 600); do
    curl -s "http://127.0.0.1:${r_ports[0]}/metrics" "http://127.0.0.1:${r_ports[1]}/metrics" "http://127.0.0.1:${r_ports[2]}/metrics" \
      | grep -q '^hoard_bucket_uploads_total{result="ok"} [1-9]' && break
    sleep 0.1
  done
  fresh_port=$(free_port)
  HOARD_LOG=warn "$hoard_bin" serve --listen "127.0.0.1:$fresh_port" --data-dir "$work/fresh" \
    "${s3_args[@]}" >"$work/fresh.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$fresh_port/healthz"
  t=$(fetch "http://127.0.0.1:$fresh_port$path/$cached" | cut -d' ' -f1)
  from_bucket=$(mibps "$bytes" "$t")
  settle "$work/fresh/blobs/sha256/${cached:7:2}/${cached:7}"
  t=$(for _ in $(seq "$runs"); do fetch "http://127.0.0.1:$fresh_port$path/$cached"; done | cut -d' ' -f1 | median)
  local_tier=$(mibps "$bytes" "$t")
  # Redirect mode: the bytes come from Garage.
  printf '[store.s3]\nredirect = true\n' >"$work/redirect.toml"
  rd_port=$(free_port)
  HOARD_LOG=warn "$hoard_bin" serve --config "$work/redirect.toml" --listen "127.0.0.1:$rd_port" \
    --data-dir "$work/redirect" "${s3_args[@]}" >"$work/redirect.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$rd_port/healthz"
  t=$(for _ in $(seq "$runs"); do curl -s -f -L -o /dev/null --max-time 300 -w '%{time_total}\n' "http://127.0.0.1:$rd_port$path/$cached"; done | median)
  redirect_mibps=$(mibps "$bytes" "$t")
  # A herd on a cold blob, spread round-robin over the three replicas.
  fleet_blob=${digests[$((2 * runs + 3))]}
  start=$(date +%s.%N)
  hpids=()
  for i in $(seq "$herd"); do
    curl -s -o /dev/null --max-time 300 "http://127.0.0.1:${r_ports[$((i % 3))]}$path/$fleet_blob" &
    hpids+=($!)
  done
  wait "${hpids[@]}" || true
  fleet_herd_secs=$(echo "$(date +%s.%N) - $start" | bc)
  fleet_herd_gets=$(upstream_gets "$fleet_blob")
fi

# 7. Lazy pulling and resume.
lazy_mib=64; $quick && lazy_mib=16
lazy_bytes=$((lazy_mib * 1024 * 1024))
lazy=()
for _ in $(seq "$((runs + 2))"); do
  head -c "$lazy_bytes" /dev/urandom >"$work/blob"
  lazy+=("$(push_blob "$work/blob")")
done
rm -f "$work/blob"
slow_port=$(free_port); link_port=$(free_port)
cat >"$work/slow.conf" <<NGINX
worker_processes 1;
pid $work/slow.pid;
error_log $work/nginx/slow-error.log;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  # An internet link: 16 MiB/s per connection (buffered, so limit_rate applies).
  server { listen 127.0.0.1:$slow_port; location /v2/ { proxy_pass $upstream; proxy_http_version 1.1; limit_rate 16m; } }
  # A faster link, 32 MiB/s, for a whole cold pull.
  server { listen 127.0.0.1:$link_port; location /v2/ { proxy_pass $upstream; proxy_http_version 1.1; limit_rate 32m; } }
}
NGINX
nginx -p "$work/nginx" -c "$work/slow.conf"
slow="http://127.0.0.1:$slow_port"
wait_http "$slow/v2/"
lz_port=$(free_port)
HOARD_LOG=warn "$hoard_bin" serve --listen "127.0.0.1:$lz_port" --data-dir "$work/lazy" \
  --upstream "docker.io=$slow" >"$work/lazy.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$lz_port/healthz"
tail_get() { curl -s -f -o /dev/null --max-time 300 -H 'Range: bytes=-4096' -w '%{time_total}\n' "$1"; }
: >"$work/tail_hoard"; : >"$work/tail_direct"
for i in $(seq 1 "$runs"); do
  blob=${lazy[$i]}
  # Direct first: hoard's background download would slow a direct read
  # measured while it runs.
  tail_get "$slow$path/$blob" >>"$work/tail_direct"
  tail_get "http://127.0.0.1:$lz_port$path/$blob" >>"$work/tail_hoard"
  # The background download of the whole blob: let it end before the next.
  for _ in $(seq 600); do
    [ "$(stat -c %s "$work/lazy/blobs/sha256/${blob:7:2}/${blob:7}" 2>/dev/null || echo 0)" = "$lazy_bytes" ] && break
    sleep 0.1
  done
done
tail_hoard=$(median <"$work/tail_hoard"); tail_direct=$(median <"$work/tail_direct")
# A whole cold pull through the 32 MiB/s link: straight from it, then
# through a hoard whose upstream it is (a blob of its own, not yet cached).
link="http://127.0.0.1:$link_port"
ln_port=$(free_port)
HOARD_LOG=warn "$hoard_bin" serve --listen "127.0.0.1:$ln_port" --data-dir "$work/link" \
  --upstream "docker.io=$link" >"$work/link-hoard.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$ln_port/healthz"
link_blob=${lazy[$((runs + 1))]}
link_direct=$(fetch "$link$path/$link_blob" | cut -d' ' -f1)
link_hoard=$(fetch "http://127.0.0.1:$ln_port$path/$link_blob" | cut -d' ' -f1)
kill "$(cat "$work/slow.pid")" 2>/dev/null || true
# A download cut once at 25%: what upstream sends in all.
python3 scripts/cut-relay.py "$upstream" 0.25 >"$work/cut.port" 2>"$work/cut.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/cut.port" ] && break; sleep 0.05; done
cut="http://127.0.0.1:$(head -1 "$work/cut.port")"
ct_port=$(free_port)
HOARD_LOG=warn "$hoard_bin" serve --listen "127.0.0.1:$ct_port" --data-dir "$work/cut" \
  --upstream "docker.io=$cut" >"$work/cut-hoard.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$ct_port/healthz"
blob=${lazy[0]}
got=$(curl -s -f --max-time 300 "http://127.0.0.1:$ct_port$path/$blob" | sha256sum | cut -d' ' -f1)
[ "sha256:$got" = "$blob" ] || { echo "bench.sh: the cut-and-resumed blob came out wrong" >&2; exit 1; }
cut_sent=$(curl -s -f "$cut/_relayed$path/$blob")
cut_ratio=$(ratio "$cut_sent" "$lazy_bytes")

rss() { awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }
nginx_rss=0
for pid in $(pgrep -P "$(cat "$work/nginx.pid")") "$(cat "$work/nginx.pid")"; do
  r=$(rss "$pid"); [ "$r" -gt "$nginx_rss" ] && nginx_rss=$r
done
rss_hoard=$rss_hoard_before_8; rss_up=$(rss "$up_pid"); rss_proxy=$(rss "$px_pid")

printf '\nhoard benchmark: %d MiB blobs, median of %d runs, %s cores, %s\n' "$size_mib" "$runs" "$(nproc)" "$(date -u +%FT%TZ)"
printf '\n1. cached blob, MiB/s          1 client   %d clients\n' "$clients"
for name in hoard nginx distribution proxy; do
  printf '   %-26s %9s %11s\n' "$name" "${one[$name]}" "${many[$name]}"
done
printf '   hoard / nginx              %9s %11s\n' "$(ratio "${one[hoard]}" "${one[nginx]}")" "$(ratio "${many[hoard]}" "${many[nginx]}")"
printf '\n2. cold blob                 total s    TTFB ms   total vs direct   TTFB vs direct\n'
for name in direct relay hoard proxy; do
  label=$name; [ "$name" = relay ] && label="nginx relay (no cache)"
  printf '   %-24s %8.3f %10.1f %17s %16s\n' "$label" "${cold_total[$name]}" "$(echo "${cold_ttfb[$name]} * 1000" | bc)" \
    "$(ratio "${cold_total[$name]}" "${cold_total[direct]}")" "$(ratio "${cold_ttfb[$name]}" "${cold_ttfb[direct]}")"
done
printf '\n3. manifest by digest (32 connections)   req/s       p99\n'
for name in hoard distribution; do
  printf '   %-36s %8s %9s\n' "$name" "${rps[$name]}" "${p99[$name]}"
done
printf '   hoard / distribution                 %8s\n' "$(ratio "${rps[hoard]}" "${rps[distribution]}")"
printf '\n4. herd of %d on a cold blob          upstream GETs   seconds\n' "$herd"
for name in hoard proxy; do
  printf '   %-36s %13s %9.2f\n' "$name" "${herd_gets[$name]}" "${herd_secs[$name]}"
done
printf '\n5. peak RSS MiB: hoard %s (sections 1-4), distribution %s, distribution proxy %s, nginx (largest process) %s\n' \
  "$rss_hoard" "$rss_up" "$rss_proxy" "$nginx_rss"

if $fleet_ran; then
  printf '\n6. shared bucket (Garage on this machine)        MiB/s   vs fs backend\n'
  printf '   %-44s %6s %15s\n' "fs backend (1. hoard, 1 client)" "${one[hoard]}" "1.00"
  printf '   %-44s %6s %15s\n' "empty replica, first read (from the bucket)" "$from_bucket" "$(ratio "$from_bucket" "${one[hoard]}")"
  printf '   %-44s %6s %15s\n' "same replica, next reads (local tier)" "$local_tier" "$(ratio "$local_tier" "${one[hoard]}")"
  printf '   %-44s %6s %15s\n' "redirect mode (client reads Garage)" "$redirect_mibps" "$(ratio "$redirect_mibps" "${one[hoard]}")"
  printf '   herd of %d over 3 replicas on a cold blob: %s upstream GETs, %.2f s\n' "$herd" "$fleet_herd_gets" "$fleet_herd_secs"
else
  printf '\n6. shared bucket: skipped (garage not installed: scripts/test.sh builds it)\n'
  from_bucket=0; local_tier=0; redirect_mibps=0; fleet_herd_gets=0; fleet_herd_secs=0
fi

printf '\n7. lazy pulling and resume (%d MiB blobs)\n' "$lazy_mib"
printf '   cold tail range (4 KiB) via a 16 MiB/s relay: direct %.1f ms, through hoard %.1f ms, hoard / direct %s\n' \
  "$(echo "$tail_direct * 1000" | bc)" "$(echo "$tail_hoard * 1000" | bc)" "$(ratio "$tail_hoard" "$tail_direct")"
printf '   download cut once at 25%%: upstream sent %s bytes for %s, %s x the blob\n' "$cut_sent" "$lazy_bytes" "$cut_ratio"
printf '   whole cold pull via a 32 MiB/s link: direct %.2f s, through hoard %.2f s, hoard / direct %s\n' \
  "$link_direct" "$link_hoard" "$(ratio "$link_hoard" "$link_direct")"

printf '\n8. cached small blobs (wrk, %d s each)      req/s   errors   CPU-s/GiB   hoard / nginx\n' "$wrk_secs"
for sz in 64k 1m; do
  for conns in 32 256 1000; do
    names="hoard nginx distribution"
    [ "$sz" = 1m ] && [ "$conns" = 32 ] && names="$names nginx-cache proxy"
    for name in $names; do
      key=$name/$sz/$conns
      label="$sz, $conns conns, $name"
      [ "$name" = nginx ] && label="$label (sendfile)"
      [ "$name" = nginx-cache ] && label="$sz, $conns conns, nginx proxy_cache"
      [ "$name" = proxy ] && label="$sz, $conns conns, distribution proxy"
      r=""; [ "$name" = hoard ] && r=$(ratio "${wrk_rps[$key]}" "${wrk_rps[nginx/$sz/$conns]}")
      printf '   %-40s %8s %8s %11s %15s\n' "$label" "${wrk_rps[$key]:-0}" "${wrk_err[$key]}" "${wrk_cpu[$key]}" "$r"
    done
  done
done
printf '   hoard peak RSS after 1000 connections: %s MiB\n' "$rss_hoard_wrk"
cold_gib=$((bytes * runs))
cpu_cold_hoard=$(per_gib "${cold_cpu[hoard]}" "$cold_gib")
cpu_floor=$(awk -v s="$floor_secs" -v b="$bytes" 'BEGIN {printf "%.2f", s / (b / 1073741824)}')
cpu_first=$(per_gib "$first_hit_cpu" "$bytes")
cpu_later=$(per_gib "$later_hit_cpu" "$((bytes * runs))")
printf '   CPU-s per GiB served, cold %d MiB blob: hoard %s, nginx relay %s, distribution proxy %s\n' "$size_mib" \
  "$cpu_cold_hoard" "$(per_gib "${cold_cpu[relay]}" "$cold_gib")" "$(per_gib "${cold_cpu[proxy]}" "$cold_gib")"
printf '   cold path vs one sha256 pass (openssl, %s CPU-s/GiB): %s x\n' "$cpu_floor" "$(ratio "$cpu_cold_hoard" "$cpu_floor")"
printf '   first hit after a download vs later hits: %s vs %s CPU-s/GiB, %s x\n' "$cpu_first" "$cpu_later" "$(ratio "$cpu_first" "$cpu_later")"
ref_first=$(awk -v s="$ref_first_secs" -v b="$bytes" 'BEGIN {printf "%.2f", s / (b / 1073741824)}')
ref_later=$(awk -v s="$ref_later_secs" -v b="$((bytes * runs))" 'BEGIN {printf "%.2f", s / (b / 1073741824)}')
printf '   the same for cat on a file written with O_DIRECT (this machine): %s vs %s CPU-s/GiB, %s x\n' \
  "$ref_first" "$ref_later" "$(ratio "$ref_first" "$ref_later")"
printf '   %d distinct cold %d MiB blobs at once, readers at %s/s: %d/%d complete in %.1f s, peak RSS %s MiB\n' \
  "$budget_n" "$budget_mib" "$budget_rate" "$budget_ok" "$budget_n" "$budget_secs" "$rss_budget"

mkdir -p target/bench
cat > target/bench/results.json <<JSON
{"size_mib": $size_mib, "runs": $runs, "clients": $clients, "herd": $herd,
 "cached_mibps_1": {"hoard": ${one[hoard]}, "nginx": ${one[nginx]}, "distribution": ${one[distribution]}, "proxy": ${one[proxy]}},
 "cached_mibps_many": {"hoard": ${many[hoard]}, "nginx": ${many[nginx]}, "distribution": ${many[distribution]}, "proxy": ${many[proxy]}},
 "cold_total_s": {"direct": ${cold_total[direct]}, "nginx_relay": ${cold_total[relay]}, "hoard": ${cold_total[hoard]}, "proxy": ${cold_total[proxy]}},
 "cold_ttfb_s": {"direct": ${cold_ttfb[direct]}, "nginx_relay": ${cold_ttfb[relay]}, "hoard": ${cold_ttfb[hoard]}, "proxy": ${cold_ttfb[proxy]}},
 "manifest_rps": {"hoard": ${rps[hoard]:-0}, "distribution": ${rps[distribution]:-0}},
 "manifest_p99": {"hoard": "${p99[hoard]}", "distribution": "${p99[distribution]}"},
 "herd_upstream_gets": {"hoard": ${herd_gets[hoard]}, "proxy": ${herd_gets[proxy]}},
 "peak_rss_mib": {"hoard": $rss_hoard, "distribution": $rss_up, "proxy": $rss_proxy, "nginx": $nginx_rss},
 "bucket_mibps": {"from_bucket": $from_bucket, "local_tier": $local_tier, "redirect": $redirect_mibps},
 "fleet_herd": {"upstream_gets": $fleet_herd_gets, "seconds": $fleet_herd_secs},
 "lazy": {"blob_mib": $lazy_mib, "tail_range_s": {"direct": $tail_direct, "hoard": $tail_hoard}, "cut_once_upstream_bytes_ratio": $cut_ratio,
          "link_32mibps_pull_s": {"direct": $link_direct, "hoard": $link_hoard}},
 "small_blobs": {$(for k in "${!wrk_rps[@]}"; do printf '"%s": {"rps": %s, "errors": %s, "cpu_s_per_gib": "%s"}, ' "$k" "${wrk_rps[$k]:-0}" "${wrk_err[$k]}" "${wrk_cpu[$k]}"; done | sed 's/, $//')},
 "cpu_s_per_gib": {"cold_hoard": "$cpu_cold_hoard", "cold_nginx_relay": "$(per_gib "${cold_cpu[relay]}" "$cold_gib")",
   "cold_proxy": "$(per_gib "${cold_cpu[proxy]}" "$cold_gib")", "sha256_floor": "$cpu_floor",
   "first_hit": "$cpu_first", "later_hits": "$cpu_later",
   "cat_first_read": "$ref_first", "cat_later_reads": "$ref_later"},
 "distinct_cold": {"count": $budget_n, "blob_mib": $budget_mib, "complete": $budget_ok, "seconds": $budget_secs, "peak_rss_mib": $rss_budget}}
JSON
echo "wrote target/bench/results.json"
if [ "${herd_gets[hoard]}" != 1 ]; then
  echo "bench.sh: hoard's herd made ${herd_gets[hoard]} upstream GETs, expected 1" >&2
  exit 1
fi
if $fleet_ran && [ "$fleet_herd_gets" != 1 ]; then
  echo "bench.sh: the fleet's herd made $fleet_herd_gets upstream GETs, expected 1" >&2
  exit 1
fi
