#!/usr/bin/env bash
# The whole test suite: unit, in-process integration, and end-to-end tests
# with real software (Debian's docker-registry as upstream; skopeo, dockerd,
# containerd and podman as clients; the engine tests need root; Garage as the
# S3 server and nginx as the balancer of the replica tests; chromium, driven
# by Playwright from npm, for the status page; debootstrap for the runtime
# base of the container image test).
# Installs the real parts when they are missing: Debian's packages (needs root
# or sudo) and Garage from crates.io (built once, about 8 minutes on 2 cores,
# then reused from ~/.cargo/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

# package -> a file it provides
declare -A needs=(
  [docker-registry]=/usr/bin/docker-registry
  [skopeo]=/usr/bin/skopeo
  [busybox-static]=/bin/busybox
  [docker.io]=/usr/sbin/dockerd
  [containerd]=/usr/bin/containerd
  [podman]=/usr/bin/podman
  [nginx-light]=/usr/sbin/nginx
  [debootstrap]=/usr/sbin/debootstrap
  [binutils]=/usr/bin/strip
  [iproute2]=/usr/sbin/ip
  [chromium]=/usr/bin/chromium
  [nodejs]=/usr/bin/node
  [npm]=/usr/bin/npm
)
missing=()
for pkg in "${!needs[@]}"; do
  [ -e "${needs[$pkg]}" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]} from Debian"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "test.sh: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "test.sh: cargo not found (install Rust with rustup)" >&2; exit 1; }
# Garage: the real S3 server of tests/e2e_replicas.rs.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v garage >/dev/null; then
  echo "test.sh: building Garage (the S3 server of the replica tests) from crates.io, once"
  cargo install --locked --quiet garage
fi
# Playwright (playwright-core: no browser download; it drives Debian's
# chromium) for tests/e2e_ui.rs, pinned by tests/ui/package-lock.json.
if [ ! -d tests/ui/node_modules/playwright-core ]; then
  echo "test.sh: installing tests/ui's npm packages"
  npm ci --prefix tests/ui --no-audit --no-fund --loglevel=error
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
# The deployment files, with the tools that know their formats.
if [ $# -eq 0 ]; then
  bash scripts/check-deploy.sh || status=1
fi
exit "$status"
