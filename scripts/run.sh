#!/usr/bin/env bash
# Runs the whole platform on this machine: services up, databases created and migrated,
# API on :8080 with both workers in the same process (`serve --role all`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale-target}"

bash scripts/services.sh
# The `quick` profile: a quick first build (see Cargo.toml); benchmarks build `release`.
cargo build --profile quick --bin flashsale
bin="$CARGO_TARGET_DIR/quick/flashsale"
"$bin" migrate
exec "$bin" serve --role all
