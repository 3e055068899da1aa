#!/usr/bin/env bash
# Keypoint transfer on a collection: run, ground-truth pairs from NOCS, 3D transfer (Eq. 17) and the 2D
# DINOv2 baseline (Eq. 18) on the same pairs, PCK@0.1 of both (overall and > 90 deg apart in azimuth).
# Usage: scripts/bench/transfer.sh [COLLECTION] [CONFIG] [OUT]
#   default: ../shared/data/collections/chairs-mixed config/fast_224.yaml /tmp/congeal-transfer
set -euo pipefail
cd "$(dirname "$0")/../.."
C=${1:-../shared/data/collections/chairs-mixed}
CFG=${2:-config/fast_224.yaml}
OUT=${3:-/tmp/congeal-transfer}
B=target/release/congeal
$B bench "$C" --config "$CFG" --eval --out "$OUT/run" > "$OUT.bench.json"
$B pairs "$C" --out "$OUT/pairs.json" --pairs 150 --points 20
$B transfer "$OUT/run" --pairs "$OUT/pairs.json" --out "$OUT/pred3d.json" --method 3d
$B transfer "$OUT/run" --pairs "$OUT/pairs.json" --out "$OUT/pred2d.json" --method 2d
for m in 3d 2d; do
  echo "$m: $($B eval "$C" "$OUT/run" --pairs "$OUT/pred$m.json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keypoints"])')"
done
