#!/usr/bin/env bash
# Sets up and runs every test (one release build, tested as built).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
cargo test --release --locked -- --test-threads=1
