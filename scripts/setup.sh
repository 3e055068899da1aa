#!/usr/bin/env bash
# Installs what `congeal` needs on a fresh machine and builds it (idempotent).
#   scripts/setup.sh          build the CLI (release)
# Later options (ROS, weights) extend this script.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
cargo build --release --locked --bin congeal
echo "built target/release/congeal"
