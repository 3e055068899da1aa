#!/usr/bin/env bash
# Sets up and runs every test: the format and lint gates, the library/CLI tests and doc examples (one
# release build, tested as built), then the ROS 2 node's rclpy peer tests and the bag round trip
# (ROS 2 Jazzy from PyPI wheels, see setup.sh --ros).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --ros
# Set-up must be idempotent (a user re-runs it): the second run must succeed too (cheap: all cached).
scripts/setup.sh --ros >/dev/null || { echo "scripts/setup.sh --ros failed when run a second time (set-up must be idempotent)" >&2; exit 1; }
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
# Everything builds inside the ROS environment (one set of artifacts for the CLI, the node and the tests).
. .ros/env.sh
# Gates: formatting (rustfmt.toml) and clippy over every target, warnings denied. Clippy runs with
# --release so that it reuses the release build's build-script outputs and proc-macros.
cargo fmt --check
cargo clippy --release --locked --all-targets --features ros -- -D warnings
cargo test --release --locked --features ros -- --test-threads=1
(
  export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$((RANDOM % 100 + 100))}
  passed=0; failed=0
  for t in tests/ros/test_*.py; do
    echo "== $t"
    if timeout 900 python "$t"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
  done
  echo "ros tests: $passed passed, $failed failed"
  [ "$failed" = 0 ]
)
