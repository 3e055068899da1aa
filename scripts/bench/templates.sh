#!/usr/bin/env bash
# Several templates of one category (issue 12's "several templates" candidate), measured before building it:
# the collection is registered once with its own template.obj and once with each TEMPLATE (poses only,
# stage 4b as configured), then per image one run's pose is picked by rules that need no ground truth:
#   max IoU        the template whose refined silhouette fits best;
#   relative IoU   the same after subtracting each template's median IoU over the collection (a thin chair
#                  never reaches a bulky one's IoU);
#   consensus 30   the pose that most templates agree with (within 30 deg, weighted by IoU);
# next to each template alone and the oracle (the best template per image, from the ground truth).
# Usage: scripts/bench/templates.sh CONFIG COLLECTION OUT TEMPLATE...
#   e.g. scripts/bench/templates.sh config/fast_224.yaml ../shared/data/collections/chairs-mixed /tmp/tpl \
#        /tmp/congeal-extra/templates/{Scopia_24,KatorLegaz_51,Scopia_47}/template.obj   (extra_sets.sh makes them)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 4 ]; then
  echo "usage: $0 CONFIG COLLECTION OUT TEMPLATE..." >&2
  exit 2
fi
CFG=$1
SET=$2
OUT=$3
shift 3
B=${CONGEAL_BIN:-target/release/congeal}
[ -x "$B" ] || { echo "$(basename "$0"): no congeal binary at $B (build it: cargo build --release --features ros --bins, or set CONGEAL_BIN)"; exit 1; }
mkdir -p "$OUT"
python3 scripts/bench/poses_config.py "$CFG" "$OUT/poses.yaml"
names=(own)
$B run "$SET" --out "$OUT/own" --config "$OUT/poses.yaml" > "$OUT/own.log" 2>&1
$B eval "$SET" "$OUT/own" > "$OUT/own.eval.json"
k=0
for t in "$@"; do
  k=$((k + 1))
  name="t$k-$(basename "$(dirname "$t")")"
  names+=("$name")
  $B run "$SET" --out "$OUT/$name" --config "$OUT/poses.yaml" --template "$t" > "$OUT/$name.log" 2>&1
  $B eval "$SET" "$OUT/$name" > "$OUT/$name.eval.json"
done
python3 - "$OUT" "$SET" "${names[@]}" <<'PY'
import json, math, sys
out, coll, names = sys.argv[1], sys.argv[2], sys.argv[3:]
err, iou, rot = {}, {}, {}
for n in names:
    err[n] = json.load(open(f"{out}/{n}.eval.json"))["poses"]["per_image_rotation_deg_unaligned"]
    images = json.load(open(f"{out}/{n}/result.json"))["images"]
    iou[n] = [im["score"] for im in images]
    rot[n] = [[row[:3] for row in im["camera_from_object"][:3]] for im in images]
count = len(err[names[0]])
if any(len(err[n]) != count for n in names):
    sys.exit("templates.sh: the runs registered different numbers of images")

def angle(a, b):
    trace = sum(a[i][j] * b[i][j] for i in range(3) for j in range(3))
    return math.degrees(math.acos(max(-1.0, min(1.0, (trace - 1) / 2))))

def median(xs):
    s = sorted(xs)
    return 0.5 * (s[(len(s) - 1) // 2] + s[len(s) // 2])

def row(label, errors, picks=None):
    below = 100 * sum(e < 15 for e in errors) / len(errors)
    flips = 100 * sum(e > 90 for e in errors) / len(errors)
    chosen = "" if picks is None else " ".join(str(picks.count(n)) for n in names)
    print(f"| {label} | {median(errors):.1f} | {below:.0f} % | {flips:.0f} % | {chosen} |")

print(f"several templates on {coll}: rotation error (raw deg) per rule; picks per run in the order {', '.join(names)}")
print("| run / rule | median deg | < 15 deg | > 90 deg | picks |")
print("|---|---|---|---|---|")
for n in names:
    row(n, err[n])
picked = lambda picks: [err[n][i] for i, n in enumerate(picks)]
by_iou = [max(names, key=lambda n: iou[n][i]) for i in range(count)]
row("max IoU", picked(by_iou), by_iou)
med = {n: median(iou[n]) for n in names}
by_rel = [max(names, key=lambda n: iou[n][i] - med[n]) for i in range(count)]
row("relative IoU", picked(by_rel), by_rel)
by_vote = [max(names, key=lambda a: sum(iou[b][i] for b in names if angle(rot[a][i], rot[b][i]) < 30) + 1e-3 * iou[a][i])
           for i in range(count)]
row("consensus 30", picked(by_vote), by_vote)
oracle = [min(names, key=lambda n: err[n][i]) for i in range(count)]
row("oracle (ground truth)", picked(oracle), oracle)
PY
