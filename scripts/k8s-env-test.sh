#!/usr/bin/env bash
# The binary started with exactly the environment the Kubernetes files give it (rendered by
# scripts/k8s_env.py: the Secret, the ConfigMap, the container's env), its data-tier hosts
# pointed at this machine, against a PostgreSQL that requires a password: the migrate Job's
# command must migrate through the direct URLs (the PgBouncer port leads nowhere while it
# runs), then the api Deployment's command must become ready and serve. Only the listening
# ports are added (a pod has its own network). Everything it starts or creates goes on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[k8s-env] %s\n' "$*" >&2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale-target}"
bin="${FLASHSALE_BIN:-$CARGO_TARGET_DIR/debug/flashsale}"
[ -x "$bin" ] || cargo build -q --bin flashsale

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$1"; else bash -c "$1"; fi; }

work=$(mktemp -d)
chmod 755 "$work"
# Hex: a URL-safe token may start with '-', which rabbitmqctl reads as an option (1 run in 64).
password=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
pg_port=$(free_port)
redis_port=$(free_port)
pgbin="/usr/lib/postgresql/$(ls /usr/lib/postgresql | sort -V | tail -1)/bin"
server=""
cleanup() {
  # $server is the subshell that runs `run`; the flashsale process is its child.
  if [ -n "$server" ]; then
    pkill -P "$server" 2>/dev/null || true
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  as_postgres "$pgbin/pg_ctl -D $work/pg -m immediate stop" >/dev/null 2>&1 || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rabbitmqctl -q delete_user flashsale >/dev/null 2>&1 || true
  rabbitmqctl -q delete_vhost flashsale >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

log "PostgreSQL with password authentication on :$pg_port"
mkdir "$work/pg"
echo "$password" >"$work/pw"
[ "$(id -u)" = 0 ] && chown postgres "$work/pg" "$work/pw"
as_postgres "$pgbin/initdb -D $work/pg -U postgres -A scram-sha-256 --pwfile=$work/pw" >/dev/null
as_postgres "$pgbin/pg_ctl -D $work/pg -w -l $work/pg/log -o '-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1' start" >/dev/null
PGPASSWORD="$password" psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres \
  -c "CREATE ROLE flashsale LOGIN CREATEDB PASSWORD '$password'"
if psql -h 127.0.0.1 -p "$pg_port" -U flashsale -d postgres -w -c 'SELECT 1' >/dev/null 2>&1; then
  log "PostgreSQL let a client in without a password"
  exit 1
fi

log "Redis on :$redis_port, RabbitMQ vhost and user flashsale"
redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log"
rabbitmqctl -q delete_user flashsale >/dev/null 2>&1 || true
rabbitmqctl -q add_vhost flashsale >/dev/null
rabbitmqctl -q add_user flashsale "$password" >/dev/null
rabbitmqctl -q set_permissions -p flashsale flashsale '.*' '.*' '.*' >/dev/null

run() { # manifest, pgbouncer port, then the command
  local manifest=$1 pgbouncer=$2
  shift 2
  python3 scripts/k8s_env.py render "$manifest" "$work/$manifest" --fill "$password" \
    --host "postgres=$pg_port" --host "pgbouncer=$pgbouncer" --host "redis=$redis_port"
  local vars
  mapfile -t vars <"$work/$manifest/env"
  env -i PATH="$PATH" HOME="$work" "${vars[@]}" \
    FLASHSALE__HTTP__PORT="$http_port" FLASHSALE__HTTP__OPS_PORT="$(free_port)" \
    "$bin" --config-dir "$work/$manifest/config" "$@"
}

http_port=$(free_port)
log "the migrate Job (PgBouncer's port closed)"
run migrate-job.yaml "$(free_port)" migrate >"$work/migrate.log" 2>&1 || {
  cat "$work/migrate.log" >&2
  exit 1
}

log "the api Deployment"
run api.yaml "$pg_port" serve --role api >"$work/api.log" 2>&1 &
server=$!
deadline=$((SECONDS + 60))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/ready")" = 200 ]; do
  if [ $SECONDS -ge $deadline ] || ! kill -0 "$server" 2>/dev/null; then
    log "the api never became ready"
    tail -30 "$work/api.log" >&2
    exit 1
  fi
  sleep 0.2
done
status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/products")
[ "$status" = 200 ] || {
  log "GET /products answered $status"
  tail -30 "$work/api.log" >&2
  exit 1
}
log "migrated and served with the Kubernetes environment"
