#!/usr/bin/env bash
# Keypoint transfer on a collection: run, ground-truth pairs from NOCS, then on the same pairs the 3D-aware
# joint cost (default), 3D transfer (Eq. 17), the 2D DINOv2 baseline (Eq. 18) and the same spot in the bbox,
# PCK@0.1 of each (overall and > 90 deg apart in azimuth).
# Usage: scripts/bench/transfer.sh [COLLECTION] [CONFIG] [OUT]
#   default: ../shared/data/collections/chairs-mixed config/fast_224.yaml /tmp/congeal-transfer
set -euo pipefail
cd "$(dirname "$0")/../.."
C=${1:-../shared/data/collections/chairs-mixed}
CFG=${2:-config/fast_224.yaml}
OUT=${3:-/tmp/congeal-transfer}
B=${CONGEAL_BIN:-target/release/congeal}
[ -x "$B" ] || { echo "$(basename "$0"): no congeal binary at $B (build it: cargo build --release --features ros --bins, or set CONGEAL_BIN)"; exit 1; }
$B bench "$C" --config "$CFG" --eval --out "$OUT/run" > "$OUT.bench.json"
$B pairs "$C" --out "$OUT/pairs.json" --pairs 150 --points 20
for m in joint 3d 2d bbox; do
  $B transfer "$OUT/run" --pairs "$OUT/pairs.json" --out "$OUT/pred$m.json" --method "$m"
done
for m in joint 3d 2d bbox; do
  echo "$m: $($B eval "$C" "$OUT/run" --pairs "$OUT/pred$m.json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keypoints"])')"
done
