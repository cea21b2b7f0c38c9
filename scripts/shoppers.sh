#!/usr/bin/env bash
# Many shoppers on one box: N `serve --role api` processes behind nginx (from Debian's
# packages, configured like the k8s ingress: keep-alive, SSE unbuffered with long timeouts,
# the client address passed on), an order-worker and a notify-worker, and client processes
# (bench/src/bin/shoppers.rs, at most 18,000 connections each: the file limit is 20,000 per
# process) that together hold SHOPPERS connections while a flash sale of STOCK units sells
# out to them.
#
#   SHOPPERS=200000 APIS=12 STOCK=20000 MODE=push|poll bash scripts/shoppers.sh
#
# RESTART_LB_AT=S stops nginx S seconds into the sale (every connection through it drops)
# and starts it again: the shoppers' reconnection storm.
#
# Reports (and appends to OUT/report.txt): every outcome, oversold (paid beyond the stock),
# memory per connection of the API processes and of nginx at the peak, the CPU of each
# component from the sale's start to the last shopper's answer, and that time; OUT/run.svg is the
# run's chart. Everything it starts is stopped at the end, and its queues, keys and sale are
# removed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

shoppers="${SHOPPERS:-200000}"
apis="${APIS:-12}"
stock="${STOCK:-20000}"
mode="${MODE:-push}"
arrive="${ARRIVE_SECS:-60}"
restart_lb_at="${RESTART_LB_AT:-}"
per_client="${PER_CLIENT:-18000}"
# The payment gateway's latency per charge batch: what paces the sale (bench/RESULTS.md).
payment_ms="${PAYMENT_LATENCY_MS:-1000}"
batch="${BATCH_SIZE:-150}"
out="${OUT:-target/shoppers-$mode-$shoppers}"
target_dir="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale-target}"
bin="$target_dir/release"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

command -v nginx >/dev/null || {
  echo "[shoppers] installing nginx"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null
  # The package starts a default server on :80; this script runs its own.
  service nginx stop >/dev/null 2>&1 || true
}
cargo build -q --release -p flashsale -p flashsale-bench --bins

export FLASHSALE_ENV=development FLASHSALE__LOG__FILTER=warn
export FLASHSALE__REDIS__KEY_PREFIX=bench-shoppers:
export FLASHSALE__ORDERS__PAYMENT__LATENCY_MS="$payment_ms" FLASHSALE__ORDERS__BATCH_SIZE="$batch"
export FLASHSALE__HTTP__TRUSTED_PROXIES=127.0.0.1/32
export FLASHSALE__HTTP__WORKERS=1
# nginx times slow clients out (client_header_timeout); with the box's two cores crushed by
# the crowd's arrival, a request head nginx already sent can wait past actix's 5 s to be
# read, and a 408 there is no client's fault (seen: thousands at 200,000 shoppers).
export FLASHSALE__HTTP__CLIENT_REQUEST_TIMEOUT_MS=60000
export FLASHSALE__ORDERS__PUSH__MAX_STREAMS=19000
# A shopper retries for the whole sale; the per-user attempt limit is for abuse, not for it.
export FLASHSALE__ORDERS__FLASH_SALE_ATTEMPTS_PER_MINUTE=1000
ulimit -n 20000

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$out/nginx.pid" ] && kill "$(cat "$out/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$out"/search-*
  purge_flashsale_queues
  delete_redis_keys 6379 "$FLASHSALE__REDIS__KEY_PREFIX*"
  end_live_sales
}
trap cleanup EXIT

"$bin/flashsale" migrate >/dev/null
upstreams=""
# PostgreSQL here takes 100 connections: each API process gets one per database (its reads
# of orders are few: a stream reads its order when woken), the order-worker six.
for i in $(seq 1 "$apis"); do
  FLASHSALE__HTTP__PORT=$((18080 + i)) FLASHSALE__HTTP__OPS_PORT=$((19090 + i)) \
    FLASHSALE__DATABASE__POOL_MAX_SIZE=1 FLASHSALE__SEARCH__INDEX_DIR="$out/search-$i" \
    "$bin/flashsale" serve --role api >"$out/api-$i.log" 2>&1 &
  pids+=($!)
  upstreams+="    server 127.0.0.1:$((18080 + i)) max_fails=0;"$'\n'
done
FLASHSALE__HTTP__OPS_PORT=19190 FLASHSALE__DATABASE__POOL_MAX_SIZE=6 \
  "$bin/flashsale" serve --role order-worker >"$out/order-worker.log" 2>&1 &
pids+=($!)
FLASHSALE__HTTP__OPS_PORT=19191 FLASHSALE__DATABASE__POOL_MAX_SIZE=1 \
  "$bin/flashsale" serve --role notify-worker >"$out/notify-worker.log" 2>&1 &
pids+=($!)

# Each proxied shopper holds two of a worker's connections (and descriptors).
workers=$(( (shoppers * 2) / 19000 + 1 ))
cat >"$out/nginx.conf" <<EOF
worker_processes $workers;
worker_rlimit_nofile 20000;
pid $out/nginx.pid;
error_log $out/nginx-error.log warn;
events { worker_connections 19500; multi_accept on; }
http {
  access_log off;
  upstream flashsale {
    least_conn;
$upstreams    keepalive 256;
  }
  server {
    listen 127.0.0.1:8000 reuseport backlog=65535;
    keepalive_timeout 650s;
    keepalive_requests 100000;
    location / {
      include $PWD/deploy/nginx/proxy.conf;
    }
  }
}
EOF
nginx -c "$out/nginx.conf" -p "$out"
for i in $(seq 1 "$apis"); do
  for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$((18080 + i))/ready" >/dev/null && break; sleep 0.2; done
  curl -fs "http://127.0.0.1:$((18080 + i))/ready" >/dev/null || { echo "API $i never ready" >&2; exit 1; }
done
product=$("$bin/shoppers" --target 127.0.0.1:8000 --create-sale "$stock")
echo "[shoppers] $shoppers shoppers ($mode), $apis API processes, $workers nginx workers, sale $product of $stock units"

rss_kib() { # summed resident memory of the processes matching $1
  local total=0 pid kib
  for pid in $(pgrep -f "$1" || true); do
    kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kib:-0}))
  done
  echo "$total"
}
names=(api nginx order-worker notify-worker postgres redis rabbitmq clients)
patterns=('flashsale serve --role api' 'nginx: worker' 'role order-worker' 'role notify-worker' '^postgres|/postgres ' '^redis-server' 'beam.smp' "$bin/shoppers")
cpu() { for p in "${patterns[@]}"; do ticks "$p"; done; }

api_idle=$(rss_kib 'flashsale serve --role api')
nginx_idle=$(rss_kib 'nginx: worker')
clients=$(( (shoppers + per_client - 1) / per_client ))
start_at=$(( $(date +%s%3N) + 10000 + clients * 1500 ))
for c in $(seq 0 $((clients - 1))); do
  n=$(( c == clients - 1 ? shoppers - c * per_client : per_client ))
  "$bin/shoppers" --target 127.0.0.1:8000 --product "$product" --shoppers "$n" --mode "$mode" \
    --source $((2 + c * 2)) --per-source 9000 --arrive-secs "$arrive" --start-at-ms "$start_at" \
    --stats "$out/client-$c.csv" >"$out/client-$c.json" 2>"$out/client-$c.err" &
  pids+=($!)
done
client_pids=("${pids[@]: -$clients}")
while [ "$(date +%s%3N)" -lt "$start_at" ]; do sleep 0.2; done
before=($(cpu))
started=$(date +%s.%N)
subscribed() { # event streams open over every API process
  local total=0 i n
  for i in $(seq 1 "$apis"); do
    n=$(curl -s "http://127.0.0.1:$((18080 + i))/metrics" | awk '/^sse_streams_open / {print int($2)}')
    total=$((total + ${n:-0}))
  done
  echo "$total"
}
answered() { # shoppers with an outcome, over every client's last sample
  local total=0 f n
  for f in "$out"/client-*.csv; do
    n=$(tail -n 1 "$f" 2>/dev/null | cut -d, -f4)
    [[ "$n" =~ ^[0-9]+$ ]] && total=$((total + n))
  done
  echo "$total"
}
peak_open=0 peak_api=0 peak_nginx=0 peak_subscribed=0 after=() restarted=""
echo "second,connections,subscribed,api_rss_mib,nginx_rss_mib" >"$out/server.csv"
while kill -0 "${client_pids[@]}" 2>/dev/null; do
  now=$(echo "$(date +%s.%N) - $started" | bc)
  second=$(printf '%.0f' "$now")
  if [ -n "$restart_lb_at" ] && [ -z "$restarted" ] && [ "$second" -ge "$restart_lb_at" ]; then
    echo "[shoppers] restarting nginx at $second s: every connection drops"
    kill -TERM "$(cat "$out/nginx.pid")"
    while pgrep -f "nginx -c $out/nginx.conf" >/dev/null; do sleep 0.1; done
    nginx -c "$out/nginx.conf" -p "$out"
    restarted=$second
  fi
  if [ ${#after[@]} -eq 0 ] && [ "$(answered)" -ge "$shoppers" ]; then
    # Everyone has an answer: the sale is over (the clients linger a moment).
    after=($(cpu))
    elapsed=$now
  fi
  open=$(ss -Htn state established '( sport = :8000 )' | wc -l)
  streams=$(subscribed)
  api=$(rss_kib 'flashsale serve --role api'); ngx=$(rss_kib 'nginx: worker')
  echo "$second,$open,$streams,$((api / 1024)),$((ngx / 1024))" >>"$out/server.csv"
  if [ "$open" -gt "$peak_open" ]; then peak_open=$open peak_api=$api peak_nginx=$ngx; fi
  if [ "$streams" -gt "$peak_subscribed" ]; then peak_subscribed=$streams; fi
  sleep 1
done
if [ ${#after[@]} -eq 0 ]; then
  after=($(cpu))
  elapsed=$(echo "$(date +%s.%N) - $started" | bc)
fi
wait "${client_pids[@]}" || true

paid_in_db=0
for db in "${dev_shards[@]}"; do
  n=$(psql -h 127.0.0.1 -U postgres -d "$db" -Atqc \
    "SELECT count(*) FROM orders o JOIN order_items i ON i.order_id = o.id WHERE i.product_id = '$product' AND o.status = 'paid'")
  paid_in_db=$((paid_in_db + n))
done
hz=$(getconf CLK_TCK)
{
  echo "== $(date -u +%FT%TZ) $shoppers shoppers, mode $mode, $apis API processes, nginx $workers workers, stock $stock, payment latency ${payment_ms} ms per batch of $batch${restarted:+, nginx restarted at $restarted s}"
  python3 - "$out" "$paid_in_db" "$stock" <<'PY'
import glob, json, sys
out, paid_db, stock = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
runs = [json.loads(open(f).read()) for f in sorted(glob.glob(f"{out}/client-*.json")) if open(f).read().strip()]
total = {k: sum(r[k] for r in runs) for k in ("shoppers", "paid", "failed", "sold_out", "other", "unanswered", "requests", "pushed_events", "reconnects")}
total["last_answer_s"] = max(r["last_answer_ms"] for r in runs) / 1000
total["answer_p95_s"] = max(r["answer_ms_p95"] for r in runs) / 1000
total["paid_in_db"] = paid_db
total["oversold"] = max(0, paid_db - stock)
print(json.dumps(total))
PY
  echo "peak connections through nginx: $peak_open, of them subscribed to an event stream at the peak of streams: $peak_subscribed"
  echo "memory per connection: API $(( (peak_api - api_idle) * 1024 / (peak_open > 0 ? peak_open : 1) )) B, nginx $(( (peak_nginx - nginx_idle) * 1024 / (peak_open > 0 ? peak_open : 1) )) B (API RSS $((peak_api / 1024)) MiB, nginx $((peak_nginx / 1024)) MiB)"
  printf "CPU over %.0f s (cores):" "$elapsed"
  for i in "${!names[@]}"; do
    printf " %s %.2f" "${names[$i]}" "$(echo "(${after[$i]} - ${before[$i]}) / $hz / $elapsed" | bc -l)"
  done
  echo
} | tee -a "$out/report.txt"
"$bin/chart" --out "$out/run.svg" --title "$shoppers shoppers ($mode)" \
  --gauge open --rate requests --rate answered --rate paid "$out"/client-*.csv
"$bin/chart" --out "$out/server.svg" --title "through nginx" \
  --gauge connections --gauge subscribed --gauge api_rss_mib --gauge nginx_rss_mib "$out/server.csv"
echo "[shoppers] charts: $out/run.svg $out/server.svg"
