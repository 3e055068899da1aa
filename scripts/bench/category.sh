#!/usr/bin/env bash
# Category-level alignment (stage 4b, congeal::category) on and off, side by side: rotation error of the
# poses on rendered collections (median, share < 15 deg, share > 90 deg = flips, raw and after one global
# rotation) and the run time. Poses only (coordinate maps and NOCS outputs off) to keep it short.
# Usage: scripts/bench/category.sh [CONFIG] [OUT] [COLLECTION...]
#   default: config/fast_224.yaml /tmp/congeal-category chairs-mixed duck chair-plaid chair-teak sofa-burlap
set -euo pipefail
cd "$(dirname "$0")/../.."
CFG=${1:-config/fast_224.yaml}
OUT=${2:-/tmp/congeal-category}
shift $(( $# > 2 ? 2 : $# ))
SETS=("$@")
[ ${#SETS[@]} -gt 0 ] || SETS=(chairs-mixed duck chair-plaid chair-teak sofa-burlap)
DATA=${CONGEAL_DATA_DIR:-../shared/data}/collections
B=${CONGEAL_BIN:-target/release/congeal}
[ -x "$B" ] || { echo "$(basename "$0"): no congeal binary at $B (build it: cargo build --release --features ros --bins, or set CONGEAL_BIN)"; exit 1; }
if [ ! -d "$DATA" ]; then
  echo "category.sh: $DATA is not here; nothing measured"
  exit 0
fi
mkdir -p "$OUT"
python3 scripts/bench/poses_config.py "$CFG" "$OUT/on.yaml"
python3 scripts/bench/poses_config.py "$CFG" "$OUT/off.yaml" --category-off
for s in "${SETS[@]}"; do
  for mode in on off; do
    start=$(date +%s)
    $B run "$DATA/$s" --out "$OUT/$s.$mode" --config "$OUT/$mode.yaml" > "$OUT/$s.$mode.log" 2>&1
    echo $(( $(date +%s) - start )) > "$OUT/$s.$mode.seconds"
    $B eval "$DATA/$s" "$OUT/$s.$mode" > "$OUT/$s.$mode.eval.json"
  done
done
python3 - "$OUT" "$CFG" "${SETS[@]}" <<'PY'
import json, sys
out, cfg, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
print(f"category-level alignment on/off, config {cfg} (poses only)")
print("| collection | stage 4b | median deg (raw / aligned) | < 15 deg | > 90 deg | run s (stage 4b s) |")
print("|---|---|---|---|---|---|")
for s in sets:
    for mode in ["off", "on"]:
        p = json.load(open(f"{out}/{s}.{mode}.eval.json"))["poses"]
        raw, al = p["rotation_deg_unaligned"], p["rotation_deg_aligned"]
        per = p["per_image_rotation_deg_unaligned"]
        flips = sum(1 for e in per if e > 90) / len(per)
        secs = float(open(f"{out}/{s}.{mode}.seconds").read())
        stage = json.load(open(f"{out}/{s}.{mode}/result.json"))["timings_s"].get("category", 0.0)
        print(f"| {s} | {mode} | {raw['median']:.1f} / {al['median']:.1f} | {100 * raw['frac_below_15deg']:.0f} % "
              f"| {100 * flips:.0f} % | {secs:.0f} ({stage:.0f}) |")
PY
