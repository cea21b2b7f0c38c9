#!/usr/bin/env bash
# The sell-out (real clients following Retry-After until a final answer) on one Redis node and
# on the local 3-node Redis Cluster (`scripts/services.sh` starts it), with each Redis node's
# share of the work: commands from clients, script calls, and CPU seconds.
#
#   bench/cluster_sellout.sh single|cluster [STOCK] [BUYERS] [RATE]
#
# `cluster` runs `serve --role all` with redis.cluster and sales.stock_buckets = $BUCKETS (8).
# Release binaries come from $CARGO_TARGET_DIR (`cargo build --release -p flashsale -p
# flashsale-bench --bins`). Everything it starts, queues, keys and the sale are gone at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
target="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale-target}/release"
bin="${FLASHSALE_BIN:-$target/flashsale}"
load="${ORDER_LOAD_BIN:-$target/order_load}"
mode="${1:?single|cluster}" stock="${2:-5000}" buyers="${3:-50000}" rate="${4:-10000}"
export FLASHSALE__LOG__FILTER=warn
export FLASHSALE__REDIS__KEY_PREFIX="bench-sellout:"
# One buyer per token: the per-user limiter would answer 429 to the load generator otherwise.
export FLASHSALE__RATE_LIMIT__USER_PER_MINUTE=100000000

case "$mode" in
single) ports=(6379); server_env=() ;;
cluster)
  ports=(7101 7102 7103)
  server_env=(FLASHSALE__REDIS__CLUSTER=true
    FLASHSALE__REDIS__URL=redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103
    FLASHSALE__SALES__STOCK_BUCKETS="${BUCKETS:-8}")
  ;;
*) echo "usage: $0 single|cluster [STOCK] [BUYERS] [RATE]" >&2; exit 2 ;;
esac

server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  purge_flashsale_queues
  for port in "${ports[@]}"; do delete_redis_keys "$port" "$FLASHSALE__REDIS__KEY_PREFIX*"; done
  end_live_sales
}
trap cleanup EXIT

info() { # port section field
  redis-cli -p "$1" info "$2" | tr -d '\r' | sed -n "s/^$3://p"
}
cpu_seconds() { # port
  echo "$(info "$1" cpu used_cpu_user) + $(info "$1" cpu used_cpu_sys)" | bc
}
script_calls() { # port
  redis-cli -p "$1" info commandstats | tr -d '\r' |
    sed -n 's/^cmdstat_\(evalsha\|eval\):calls=\([0-9]*\),.*/\2/p' | awk '{ s += $1 } END { print s + 0 }'
}

"$bin" migrate >/dev/null
env "${server_env[@]}" "$bin" serve --role all & server=$!
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:8080/ready >/dev/null && break; sleep 0.2; done

declare -A cpu_before
for port in "${ports[@]}"; do
  redis-cli -p "$port" config resetstat >/dev/null
  cpu_before[$port]=$(cpu_seconds "$port")
done
"$load" --config-dir config --env development --stock "$stock" --buyers "$buyers" \
  --follow-retry --rate "$rate" --connections 256 | tee /tmp/cluster_sellout.out

total=0
for port in "${ports[@]}"; do total=$((total + $(info "$port" stats total_commands_processed))); done
printf '\n%-6s %10s %8s %10s %12s\n' node commands share scripts cpu-seconds
for port in "${ports[@]}"; do
  commands=$(info "$port" stats total_commands_processed)
  printf '%-6s %10d %7.1f%% %10d %12.2f\n' "$port" "$commands" \
    "$(echo "100 * $commands / $total" | bc -l)" "$(script_calls "$port")" \
    "$(echo "$(cpu_seconds "$port") - ${cpu_before[$port]}" | bc)"
done
curl -fs http://127.0.0.1:8080/metrics | grep '^stock_bucket_moves_total' ||
  echo "stock_bucket_moves_total 0"
