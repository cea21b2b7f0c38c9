#!/usr/bin/env bash
# The API contract: schemathesis (from PyPI) fuzzes a started server from its own
# /openapi.json and must find no server error, no undocumented status code or content type,
# and no body off its schema. Runs with the development databases, under its own Redis prefix
# and queue prefix, as an admin; leaves no process, key or queue behind.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale-target}"
command -v st >/dev/null ||
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore 'schemathesis>=4.32,<5' >&2

cargo build --quiet --bin flashsale
bin="$CARGO_TARGET_DIR/debug/flashsale"
port=18080
export FLASHSALE_ENV=development FLASHSALE__HTTP__PORT=$port FLASHSALE__HTTP__OPS_PORT=19090 \
  FLASHSALE__REDIS__KEY_PREFIX=contract: FLASHSALE__AMQP__QUEUE_PREFIX=contract. \
  FLASHSALE__LOG__FILTER=error \
  FLASHSALE__RATE_LIMIT__USER_PER_MINUTE=100000000 FLASHSALE__RATE_LIMIT__AUTH_PER_IP_PER_MINUTE=100000000
base="http://127.0.0.1:$port"

"$bin" serve --role api >/dev/null 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  redis-cli --scan --pattern 'contract:*' | xargs -r -n 500 redis-cli del >/dev/null
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep '^contract\.' || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
for _ in $(seq 1 150); do curl -fs "$base/ready" >/dev/null && break; sleep 0.2; done

email="contract-$(date +%s%N)@example.com"
password="contract-password-0123"
curl -fs -X POST "$base/auth/register" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"$password\"}" >/dev/null
"$bin" admin grant "$email" >/dev/null
token=$(curl -fs -X POST "$base/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"$password\"}" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')

# One worker: with two threads, this machine's Python 3.11 now and then fails inside
# hypothesis with "SystemError: AST constructor recursion depth mismatch" (a CPython bug
# with ast.parse on threads, fixed in later 3.11 releases), an error of the tool, not of the API.
st run "$base/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  -H "Authorization: Bearer $token" --max-examples 20 --workers 1 --seed 1
