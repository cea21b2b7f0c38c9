#!/usr/bin/env bash
# Runs the whole test suite against the real PostgreSQL, Redis and RabbitMQ on this machine.
# Each test creates its own databases (fst_*) and Redis prefix; leftovers of earlier runs are
# dropped first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale-target}"

bash scripts/services.sh

psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'fst\_%'" |
  while read -r db; do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
  done
redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 't:*' | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 DEL >/dev/null
rm -rf "${TMPDIR:-/tmp}"/flashsale-search-* "${TMPDIR:-/tmp}"/flashsale-cli-*

# Tests wait on I/O far more than on CPU; run more of them than there are cores.
cargo nextest run --no-fail-fast --test-threads "${TEST_THREADS:-6}" "$@"
