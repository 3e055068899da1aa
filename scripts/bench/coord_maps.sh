#!/usr/bin/env bash
# Coordinate-map timing at the paper's settings (4000 AdamW iterations, 32x32 warp, 224-px DINOv2 input);
# silhouette pose init so the run spends its time on the stage measured. Prints the per-stage seconds.
# Usage: scripts/bench/coord_maps.sh [COLLECTION] (default ../shared/data/collections/duck)
set -euo pipefail
cd "$(dirname "$0")/../.."
C=${1:-../shared/data/collections/duck}
CFG=$(mktemp --suffix .yaml)
{ grep -v '^coord_maps:\|^  iterations: 1000' config/fast_224.yaml | sed 's/^  top_k: 3/  top_k: 3\n  score: iou/'; printf 'coord_maps:\n  iterations: 4000\n  grid: 32\n'; } > "$CFG"
target/release/congeal bench "$C" --config "$CFG" | python3 -c '
import json, sys
d = json.load(sys.stdin); t = d["timings_s"]; n = d["images"]
print(f"{n} images: optimise {t[\"coord_maps_optimise\"]:.1f} s ({t[\"coord_maps_optimise\"]/n:.2f} s/image), renders+features {t[\"coord_maps_renders_features\"]/n:.2f} s/image")'
rm -f "$CFG"
