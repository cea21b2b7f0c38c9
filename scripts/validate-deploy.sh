#!/usr/bin/env bash
# Validates the deployment files offline (no Docker engine or cluster needed): the compose
# file, every Kubernetes manifest (strict schema), YAML style, the Prometheus config and
# alert rules, and that the Grafana dashboards parse. Installs its tools idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[deploy] %s\n' "$*" >&2; }

pip_tool() { # command, package
  command -v "$1" >/dev/null 2>&1 ||
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "$2" >&2
}
apt_tool() { # command, package
  if ! command -v "$1" >/dev/null 2>&1; then
    log "installing $2"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}
pip_tool kubernetes-validate kubernetes-validate
pip_tool yamllint yamllint
apt_tool docker-compose docker-compose
apt_tool promtool prometheus

log "yamllint"
yamllint -s -c .yamllint.yml docker-compose.yml docker-compose.redis-cluster.yml k8s deploy

log "docker-compose config"
docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml -f docker-compose.redis-cluster.yml config -q

log "kubernetes-validate --strict"
# chaos-mesh's Schedule and the data tier's operator resources (CloudNativePG, RabbitMQ,
# Strimzi) are custom resources without a schema here; yamllint covers them.
kubernetes-validate --strict --quiet k8s/*.yaml k8s/data/namespace.yaml k8s/data/redis.yaml

log "every variable the manifests set is read by flashsale"
python3 scripts/k8s_env.py check-vars

log "nginx -t (the compose load balancer, its upstream pointed at this machine)"
apt_tool nginx nginx-light
# The package starts a default server on :80; nothing here needs it.
service nginx stop >/dev/null 2>&1 || true
nginx_dir=$(mktemp -d)
sed -e 's/server api:8080/server 127.0.0.1:8080/' \
  -e "s#/etc/nginx/flashsale-proxy.conf#$PWD/deploy/nginx/proxy.conf#" \
  deploy/nginx/compose.conf >"$nginx_dir/compose.conf"
printf 'pid %s/nginx.pid;\nerror_log stderr;\nevents {}\nhttp { include %s/compose.conf; }\n' \
  "$nginx_dir" "$nginx_dir" >"$nginx_dir/nginx.conf"
nginx -q -t -c "$nginx_dir/nginx.conf" -p "$nginx_dir"
rm -rf "$nginx_dir"

log "promtool"
promtool check config --syntax-only deploy/prometheus/prometheus.yml >/dev/null
promtool check rules deploy/prometheus/alerts.yml >/dev/null

log "grafana dashboards parse"
for f in deploy/grafana/dashboards/*.json; do
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"], sys.argv[1]' "$f"
done
log "deployment files are valid"
