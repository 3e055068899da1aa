#!/usr/bin/env bash
# Real photographs (../shared/data/real, never copied into the repository), side by side with the baselines:
#   dogs-dev: keypoint transfer PCK@0.1 of the 3D-aware joint cost (features + transfer.nocs_weight x NOCS
#             distance), the canonical shape alone (Eq. 17), 2D DINOv2 matching (Eq. 18) and the
#             "same spot in the bbox" guess, all on the same run and pairs;
#   dtu-house: rotation error (raw and after one global rotation/similarity) with the set's template and K,
#             and keypoint transfer PCK@0.1 of the same four methods on pairs whose ground truth comes from
#             the calibrated cameras (scripts/bench/dtu_pairs.py): a rigid object, photographed for real;
#   then how many dogs face the way their keypoints do, and each method's PCK on the pairs whose two dogs
#   both do (scripts/bench/facing.py).
# Usage: scripts/bench/real.sh [CONFIG] [OUT] [DOG_TEMPLATE]
#   default: config/fast_224.yaml /tmp/congeal-real ../shared/data/real/templates/dog/template.obj
set -euo pipefail
cd "$(dirname "$0")/../.."
CFG=${1:-config/fast_224.yaml}
OUT=${2:-/tmp/congeal-real}
REAL=../shared/data/real
DOG=${3:-$REAL/templates/dog/template.obj}
B=${CONGEAL_BIN:-target/release/congeal}
[ -x "$B" ] || { echo "$(basename "$0"): no congeal binary at $B (build it: cargo build --release --features ros --bins, or set CONGEAL_BIN)"; exit 1; }
if [ ! -d "$REAL/dogs-dev" ] || [ ! -d "$REAL/dtu-house" ]; then
  echo "real.sh: $REAL is not here (the real photographs live in shared/, never in the repository); nothing measured"
  exit 0
fi
mkdir -p "$OUT"
start=$(date +%s)
$B run "$REAL/dogs-dev" --out "$OUT/dogs" --config "$CFG" --template "$DOG" > "$OUT/dogs.log" 2>&1
for m in joint 3d 2d bbox; do
  $B transfer "$OUT/dogs" --pairs "$REAL/dogs-dev/pairs.json" --out "$OUT/dogs.$m.json" --method "$m" > /dev/null 2>> "$OUT/transfer.log"
  $B eval "$REAL/dogs-dev" "$OUT/dogs" --pairs "$OUT/dogs.$m.json" > "$OUT/dogs.$m.eval.json"
done
$B run "$REAL/dtu-house" --out "$OUT/dtu" --config "$CFG" > "$OUT/dtu.log" 2>&1
$B eval "$REAL/dtu-house" "$OUT/dtu" > "$OUT/dtu.eval.json"
# Keypoint transfer on real photographs of a rigid object: ground truth from the calibrated cameras.
python3 scripts/bench/dtu_pairs.py "$REAL/dtu-house" "$OUT/dtu.pairs.json" > /dev/null
for m in joint 3d 2d bbox; do
  $B transfer "$OUT/dtu" --pairs "$OUT/dtu.pairs.json" --out "$OUT/dtu.$m.json" --method "$m" > /dev/null 2>> "$OUT/transfer.log"
  $B eval "$REAL/dtu-house" "$OUT/dtu" --pairs "$OUT/dtu.$m.json" > "$OUT/dtu.$m.eval.json"
done
python3 - "$OUT" "$CFG" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
out, cfg, secs = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"real photographs, config {cfg} ({secs} s)")
print("| dogs-dev (PCK@0.1, 132 pairs) | value |")
print("|---|---|")
names = {"joint": "3D-aware joint (features + NOCS)", "3d": "3D, canonical shape alone (Eq. 17)",
         "2d": "2D DINOv2 (Eq. 18)", "bbox": "same spot in the bbox"}
for m in ["joint", "3d", "2d", "bbox"]:
    k = json.load(open(f"{out}/dogs.{m}.eval.json"))["keypoints"]
    print(f"| {names[m]} | {100 * k['pck']:.1f} |")
def curve(prefix, label):
    # PCK at each threshold: a method below the bbox guess even at coarse thresholds misses whole parts,
    # not the precise spot.
    alphas = [c["alpha"] for c in json.load(open(f"{out}/{prefix}.joint.eval.json"))["keypoints"]["curve"]]
    print(f"| {label}: PCK at alpha | " + " | ".join(f"{a:g}" for a in alphas) + " |")
    print("|---" * (len(alphas) + 1) + "|")
    for m in ["joint", "3d", "2d", "bbox"]:
        c = json.load(open(f"{out}/{prefix}.{m}.eval.json"))["keypoints"]["curve"]
        print(f"| {names[m]} | " + " | ".join(f"{100 * x['pck']:.1f}" for x in c) + " |")
curve("dogs", "dogs-dev")
p = json.load(open(f"{out}/dtu.eval.json"))["poses"]
r = json.load(open(f"{out}/dtu/result.json"))
cut = sum(1 for i in r["images"] if i.get("mask_touches_border"))
print(f"| dtu-house ({len(r['images'])} images, {cut} cut by the frame) | median deg | < 15 deg | > 90 deg |")
print("|---|---|---|---|")
for key, label in [("rotation_deg_unaligned", "raw"), ("rotation_deg_aligned", "one global similarity removed")]:
    per = p[f"per_image_{key}"]
    flips = sum(1 for e in per if e > 90) / len(per)
    s = p[key]
    print(f"| {label} | {s['median']:.1f} | {100 * s['frac_below_15deg']:.0f} % | {100 * flips:.0f} % |")
k = json.load(open(f"{out}/dtu.joint.eval.json"))["keypoints"]
print(f"| dtu-house keypoint transfer (PCK@0.1, {k['pairs']} pairs, {k['points']} points; scripts/bench/dtu_pairs.py) | value |")
print("|---|---|")
for m in ["joint", "3d", "2d", "bbox"]:
    k = json.load(open(f"{out}/dtu.{m}.eval.json"))["keypoints"]
    print(f"| {names[m]} | {100 * k['pck']:.1f} |")
curve("dtu", "dtu-house")
pairs = json.load(open(f"{out}/dtu.pairs.json"))
bins = [(0, 20), (20, 40), (40, 60), (60, 180)]
print("| dtu-house transfer by the angle between the two cameras (points) | " + " | ".join(f"{a}-{b} deg" for a, b in bins) + " |")
print("|---" * (len(bins) + 1) + "|")
for m in ["joint", "3d", "2d", "bbox"]:
    pred = json.load(open(f"{out}/dtu.{m}.json"))
    hit = {b: [0, 0] for b in bins}
    for pair, pr in zip(pairs, pred):
        b = next(x for x in bins if x[0] <= pair["angle_deg"] < x[1])
        for q, g in zip(pr["pred"], pair["gt"]):
            hit[b][1] += 1
            hit[b][0] += q is not None and ((q[0] - g[0]) ** 2 + (q[1] - g[1]) ** 2) ** 0.5 <= pair["radius"]
    print(f"| {names[m]} | " + " | ".join(f"{100 * h / max(n, 1):.1f} ({n})" for h, n in hit.values()) + " |")
PY
echo
python3 scripts/bench/facing.py "$OUT/dogs" "$REAL/dogs-dev/pairs.json" \
  --pred joint="$OUT/dogs.joint.json" 3d="$OUT/dogs.3d.json" 2d="$OUT/dogs.2d.json" bbox="$OUT/dogs.bbox.json" | sed -n '/checked images face/,$p'
