#!/usr/bin/env bash
# Live tracking (the ROS node's `track` mode, same tracker and re-initialisation) on a rendered orbit:
# 640x480, 3 deg of azimuth per frame, a 120 deg teleport of the camera at frame 30. Prints the rotation
# error against the ground truth (median, p95, frames > 15 deg outside the 3 frames after the jump), the
# latency per tracked frame (median, p95) and each re-initialisation's time; per-frame JSON in OUT.
# Usage: scripts/bench/track.sh [TEMPLATE] [CONFIG] [OUT]
#   default: demo/duck/template.obj config/fast.yaml /tmp/congeal-track.json
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${1:-demo/duck/template.obj}
CFG=${2:-config/fast.yaml}
OUT=${3:-/tmp/congeal-track.json}
RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2} target/release/congeal bench-track "$T" --config "$CFG" \
  --frames 60 --jumps 30 --width 640 --height 480 --out "$OUT"
