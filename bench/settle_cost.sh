#!/usr/bin/env bash
# Where the CPU of the order path goes, per component, on this machine.
#
#   bench/settle_cost.sh open RATE SECS     serve --role all, open-loop order_load at RATE/s for
#                                           SECS; CPU from load start until every order settled
#                                           (STATS=run.csv: per-second samples and run.svg, their
#                                           chart; reading them back costs PostgreSQL a little)
#   bench/settle_cost.sh drain ORDERS       each stage on its own: serve --role api takes about
#                                           ORDERS orders (closed loop) with no worker running
#                                           (accept); an order-worker drains them (settle: queue,
#                                           worker, payment, PostgreSQL, ack); a notify-worker
#                                           sends their emails (notify; unpaced unless
#                                           NOTIFY_PACED=1)
#
# Prints the cores each component used and core-µs per order. Release binaries are taken from
# $CARGO_TARGET_DIR (build them with `cargo build --release -p flashsale -p flashsale-bench
# --bins`); FLASHSALE_BIN and ORDER_LOAD_BIN override them. Every process it starts is stopped at
# the end, and the order queues are purged, so nothing is left for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
target="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale-target}/release"
bin="${FLASHSALE_BIN:-$target/flashsale}"
load="${ORDER_LOAD_BIN:-$target/order_load}"
mode="${1:?open|drain}"
export FLASHSALE__LOG__FILTER=warn
# The run's sale and records live under their own prefix, deleted at the end: a sale left
# live would be audited (every record read) for the two hours it runs.
export FLASHSALE__REDIS__KEY_PREFIX=bench-settle:

# The run's order events wait in the outbox (no broker here); they go at exit, so a later
# run (the fault suite reads every unsent row) does not find them.
outbox_start=()
for db in "${dev_shards[@]}"; do
  outbox_start+=("$(psql -h 127.0.0.1 -U postgres -d "$db" -Atqc "SELECT coalesce(max(id), 0) FROM outbox" 2>/dev/null || echo -1)")
done

started=()
# Stops the role the current stage started (the next stage runs without it).
stop_started() {
  kill "${started[0]}"; wait "${started[0]}" 2>/dev/null || true; started=()
}
cleanup() {
  for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  purge_flashsale_queues
  delete_redis_keys 6379 "$FLASHSALE__REDIS__KEY_PREFIX*"
  end_live_sales
  for i in "${!dev_shards[@]}"; do
    [ "${outbox_start[$i]}" -ge 0 ] && psql -h 127.0.0.1 -U postgres -d "${dev_shards[$i]}" -qc \
      "DELETE FROM outbox WHERE id > ${outbox_start[$i]}" || true
  done
}
trap cleanup EXIT

components=(flashsale postgres redis-server beam.smp)
patterns=('^[^ ]*/flashsale serve' '^postgres|/postgres ' '^redis-server 127.0.0.1:6379' 'beam.smp')
snapshot() {
  ticks "${patterns[0]}"; ticks "${patterns[1]}"; ticks "${patterns[2]}" children; ticks "${patterns[3]}"
}
aof_rewrites() { redis-cli info persistence | tr -d '\r' | sed -n 's/^aof_rewrites://p'; }

wait_http() {
  for _ in $(seq 1 100); do curl -fs "$1" >/dev/null && return 0; sleep 0.2; done
  echo "no answer from $1" >&2; exit 1
}

report() { # before-ticks after-ticks seconds orders
  local -a before=($1) after=($2)
  local hz secs=$3 orders=$4 i total=0
  hz=$(getconf CLK_TCK)
  printf '%-13s %8s %12s\n' component cores core-us/order
  for i in "${!components[@]}"; do
    local used=$(( ${after[$i]} - ${before[$i]} ))
    total=$((total + used))
    awk -v c="${components[$i]}" -v t="$used" -v hz="$hz" -v s="$secs" -v n="$orders" \
      'BEGIN { printf "%-13s %8.2f %12.1f\n", c, t / hz / s, t / hz * 1e6 / n }'
  done
  awk -v t="$total" -v hz="$hz" -v s="$secs" -v n="$orders" \
    'BEGIN { printf "%-13s %8.2f %12.1f   (%d orders in %.1f s)\n", "total", t / hz / s, t / hz * 1e6 / n, n, s }'
}

# Waits until the sum of a metric's samples on an ops port reaches a count; prints it.
until_counted() { # port awk-pattern count
  local counted=0
  while [ "$counted" -lt "$3" ]; do
    sleep 0.2
    counted=$(curl -fs "http://127.0.0.1:$1/metrics" | awk "$2 { s += \$2 } END { printf \"%d\", s }")
  done
  echo "$counted"
}

load_cpu() { # orders; the generator's CPU from its subshell's `times` ("0m1.234s 0m0.567s")
  tail -1 /tmp/settle_cost.load_cpu | tr 'ms' '  ' | awk -v n="$1" \
    '{ cpu = $1 * 60 + $2 + $3 * 60 + $4; printf "load generator: %.1f core-s, %.1f core-us per order (not in the total)\n", cpu, cpu * 1e6 / n }'
}

redis_commands() { # orders
  echo "Redis commands (calls, usec per order):"
  redis-cli info commandstats | tr -d '\r' | grep -o 'cmdstat_[a-z|]*:calls=[0-9]*,usec=[0-9]*' |
    awk -F'[_:=,]' -v n="$1" '{ printf "  %-16s calls %8d  %6.1f\n", $2, $4, $6 / n }' |
    sort -k4 -rn | head -10
}

# Machines of one kind differ in speed (2.5x between two sessions' 2-core boxes): the same fixed
# CPU work, alone and two at once, printed with every run so figures compare across machines.
calibrate() {
  local work='s = 0
for i in range(20_000_000): s += i'
  local t0 t1 t2
  t0=$(date +%s.%N); python3 -c "$work"
  t1=$(date +%s.%N); python3 -c "$work" & python3 -c "$work"; wait
  t2=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" -v c="$t2" \
    'BEGIN { printf "machine: 20M Python additions in %.2f s alone, %.2f s two at once\n", b - a, c - b }'
}
calibrate

case "$mode" in
open)
  rate="${2:?rate}" secs="${3:?seconds}"
  "$bin" migrate >/dev/null
  "$bin" serve --role all & started+=($!)
  wait_http http://127.0.0.1:8080/ready
  redis-cli config resetstat >/dev/null
  before=$(snapshot); t0=$(date +%s.%N)
  # The load generator shares the cores; `times` in its subshell reads its CPU once it exited.
  (
    "$load" --config-dir config --env development --stock $((rate * secs * 2)) \
      --duration-secs "$secs" --connections 256 --rate "$rate" ${STATS:+--stats "$STATS"} |
      tee /tmp/settle_cost.out
    times > /tmp/settle_cost.load_cpu
  )
  if [ -n "${STATS:-}" ]; then
    "$target/chart" --out "${STATS%.csv}.svg" --title "order_load --rate $rate, serve --role all" \
      --gauge in_flight --rate sent --rate accepted --rate paid \
      --ms http_p95_ms --ms http_p99_ms --ms paid_p95_ms --ms paid_p99_ms "$STATS"
    echo "chart: ${STATS%.csv}.svg"
  fi
  after=$(snapshot); t1=$(date +%s.%N)
  settled=$(grep -o 'paid [0-9]*' /tmp/settle_cost.out | awk '{print $2}')
  echo "Redis append-only-file rewrites during the run: $(aof_rewrites) (their CPU is in redis-server)"
  report "$before" "$after" "$(echo "$t1 - $t0" | bc)" "$settled"
  load_cpu "$settled"
  redis_commands "$settled"
  ;;
drain)
  orders="${2:?orders}"
  "$bin" migrate >/dev/null
  # No worker runs while the backlog builds, so admission control would hold it at its floor.
  FLASHSALE__ORDERS__ADMISSION__ENABLED=false "$bin" serve --role api & started+=($!)
  wait_http http://127.0.0.1:8080/ready
  # Accept: closed loop until about ORDERS were accepted, without waiting for a worker.
  secs=$(( orders / 8000 + 1 ))
  before=$(snapshot); t0=$(date +%s.%N)
  (
    "$load" --config-dir config --env development --stock $((orders * 4)) \
      --duration-secs "$secs" --connections 256 --drain-timeout-secs 0 | tee /tmp/settle_cost.out
    times > /tmp/settle_cost.load_cpu
  )
  after=$(snapshot); t1=$(date +%s.%N)
  accepted=$(grep -o '^accepted [0-9]*' /tmp/settle_cost.out | awk '{print $2}')
  stop_started
  echo "== accept (serve --role api, closed loop)"
  report "$before" "$after" "$(echo "$t1 - $t0" | bc)" "$accepted"
  load_cpu "$accepted"
  # Settle: one order-worker drains the backlog.
  echo "== settle (serve --role order-worker drains the backlog)"
  redis-cli config resetstat >/dev/null
  before=$(snapshot); t0=$(date +%s.%N)
  FLASHSALE__HTTP__OPS_PORT=9091 "$bin" serve --role order-worker & started+=($!)
  wait_http http://127.0.0.1:9091/health
  settled=$(until_counted 9091 '/^orders_total\{/ && /status="(paid|failed)"/' "$accepted")
  after=$(snapshot); t1=$(date +%s.%N)
  stop_started
  echo "settled $settled of $accepted"
  report "$before" "$after" "$(echo "$t1 - $t0" | bc)" "$settled"
  redis_commands "$settled"
  # Notify: one notify-worker sends the buyers' emails, the simulated provider at no latency
  # and no rate limit: the worker's own cost (a real provider paces it). NOTIFY_PACED=1 keeps
  # the provider's configured limit instead (the cost of waiting for it).
  echo "== notify (serve --role notify-worker sends the settled orders' emails)"
  before=$(snapshot); t0=$(date +%s.%N)
  if [ "${NOTIFY_PACED:-0}" = 1 ]; then
    provider=()
  else
    provider=(FLASHSALE__NOTIFICATIONS__PROVIDERS__EMAIL__LATENCY_MS=0
      FLASHSALE__NOTIFICATIONS__PROVIDERS__EMAIL__PER_SECOND=10000000
      FLASHSALE__NOTIFICATIONS__PROVIDERS__EMAIL__BURST=100000)
  fi
  env FLASHSALE__HTTP__OPS_PORT=9092 "${provider[@]}" \
    "$bin" serve --role notify-worker & started+=($!)
  wait_http http://127.0.0.1:9092/health
  sent=$(until_counted 9092 '/^notifications_total\{/' "$settled")
  after=$(snapshot); t1=$(date +%s.%N)
  report "$before" "$after" "$(echo "$t1 - $t0" | bc)" "$sent"
  ;;
*) echo "usage: $0 open RATE SECS | drain ORDERS" >&2; exit 2 ;;
esac
