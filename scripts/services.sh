#!/usr/bin/env bash
# Makes sure what flashsale needs on this machine is present and running: PostgreSQL, Redis,
# RabbitMQ, and the Rust tools the checks use. Idempotent: running it again changes nothing.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

wait_for() { # name, check command...
  local name=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "$name did not come up"; return 1
}

apt_install() { # packages...
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

command -v psql >/dev/null || apt_install postgresql postgresql-client
command -v redis-server >/dev/null || apt_install redis-server
command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server

if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start || true
  wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432 -q
fi

# Redis keeps an append-only file (fsync every second), so a restart keeps the sales it held.
# Correctness does not depend on it: a sale Redis lost is rebuilt from PostgreSQL. The file is
# rewritten only past 1 GB and five times its last rewritten size: a rewrite forks and
# serializes the whole dataset, and at Redis's defaults (64 MB, twice) a sale's first minutes
# rewrote it every few seconds, a fifth of a core on the 2-core box (bench/RESULTS.md).
redis_aof=(appendfsync everysec auto-aof-rewrite-percentage 400 auto-aof-rewrite-min-size 1gb)
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly yes \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis redis-cli -h 127.0.0.1 -p 6379 ping
fi
if [ "$(redis-cli -h 127.0.0.1 -p 6379 config get appendonly | tail -n 1)" != "yes" ]; then
  log "turning on Redis's append-only file"
  redis-cli -h 127.0.0.1 -p 6379 config set appendonly yes >/dev/null
fi
redis-cli -h 127.0.0.1 -p 6379 config set "${redis_aof[@]}" >/dev/null

# A local 3-node Redis Cluster (no replicas) for the cluster tests and benchmarks. A node
# restarted with its nodes.conf rejoins by itself; fresh nodes are reset and joined anew.
cluster_ports=(7101 7102 7103)
for port in "${cluster_ports[@]}"; do
  if ! redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
    log "starting Redis Cluster node $port"
    dir=/var/lib/redis-cluster/$port
    mkdir -p "$dir"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-node-timeout 5000 --save "" --appendonly no \
      --dir "$dir" --logfile "$dir/redis.log"
    wait_for "Redis Cluster node $port" redis-cli -h 127.0.0.1 -p "$port" ping
  fi
done
cluster_info() { # field
  redis-cli -h 127.0.0.1 -p "${cluster_ports[0]}" cluster info | tr -d '\r' | sed -n "s/^$1://p"
}
cluster_ok() { [ "$(cluster_info cluster_state)" = ok ]; }
if ! cluster_ok && [ "$(cluster_info cluster_known_nodes)" = 1 ]; then
  log "creating the Redis Cluster"
  for port in "${cluster_ports[@]}"; do
    redis-cli -h 127.0.0.1 -p "$port" flushall >/dev/null
    redis-cli -h 127.0.0.1 -p "$port" cluster reset hard >/dev/null
  done
  redis-cli --cluster create "${cluster_ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
fi
wait_for "Redis Cluster" cluster_ok

amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_up; then
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for RabbitMQ amqp_up
fi

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  log "adding rustfmt and clippy"
  rustup component add rustfmt clippy
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
log "PostgreSQL, Redis (and a local Redis Cluster) and RabbitMQ are up"
