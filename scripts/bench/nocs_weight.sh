#!/usr/bin/env bash
# The joint cost's weight (`transfer.nocs_weight`, `congeal transfer --method joint --nocs-weight W`) on real
# and rendered sets side by side: PCK@0.1 for each W on the same runs and pairs: real dogs (articulated), the
# real DTU house (rigid) and the rendered chairs-mixed. W = 0 is plain feature
# matching, i.e. the 2D baseline (Eq. 18). Reuses the runs of the other benches, so it runs only the transfers.
# Usage: scripts/bench/nocs_weight.sh [REAL_OUT] [TRANSFER_OUT] [W...]
#   REAL_OUT: OUT of scripts/bench/real.sh (default /tmp/congeal-real; uses its dogs/ and dtu/ runs and dtu.pairs.json)
#   TRANSFER_OUT: OUT of scripts/bench/transfer.sh (default /tmp/congeal-transfer; uses its run/ and pairs.json)
#   W: default 0 0.05 0.1 0.2 0.3 0.5 1 2
set -euo pipefail
cd "$(dirname "$0")/../.."
REAL_OUT=${1:-/tmp/congeal-real}
TR_OUT=${2:-/tmp/congeal-transfer}
shift $(( $# > 2 ? 2 : $# ))
WEIGHTS=("$@")
[ ${#WEIGHTS[@]} -gt 0 ] || WEIGHTS=(0 0.05 0.1 0.2 0.3 0.5 1 2)
DOGS=../shared/data/real/dogs-dev
DTU=../shared/data/real/dtu-house
CHAIRS=../shared/data/collections/chairs-mixed
B=${CONGEAL_BIN:-target/release/congeal}
[ -x "$B" ] || { echo "$(basename "$0"): no congeal binary at $B (build it: cargo build --release --features ros --bins, or set CONGEAL_BIN)"; exit 1; }
for need in "$REAL_OUT/dogs/result.json" "$REAL_OUT/dtu/result.json" "$REAL_OUT/dtu.pairs.json" "$TR_OUT/run/result.json" "$TR_OUT/pairs.json" "$DOGS/pairs.json"; do
  if [ ! -f "$need" ]; then
    echo "nocs_weight.sh: $need is missing (run scripts/bench/real.sh and scripts/bench/transfer.sh first, with these OUTs)"
    exit 1
  fi
done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
pck() {
  python3 -c '
import json, sys
k = json.load(sys.stdin)["keypoints"]
wide = k.get("pck_wide")
print("%.1f | %s" % (100 * k["pck"], "-" if wide is None else "%.1f" % (100 * wide)))'
}
echo "PCK@0.1 of the joint cost by transfer.nocs_weight (W = 0: the 2D baseline)"
echo "| W | dogs-dev (real, articulated) | dtu-house (real, rigid) | chairs-mixed (rendered) overall | chairs-mixed > 90 deg apart |"
echo "|---|---|---|---|---|"
for w in "${WEIGHTS[@]}"; do
  $B transfer "$REAL_OUT/dogs" --pairs "$DOGS/pairs.json" --out "$OUT/dogs.json" --method joint --nocs-weight "$w" > /dev/null 2>&1
  $B transfer "$REAL_OUT/dtu" --pairs "$REAL_OUT/dtu.pairs.json" --out "$OUT/dtu.json" --method joint --nocs-weight "$w" > /dev/null 2>&1
  $B transfer "$TR_OUT/run" --pairs "$TR_OUT/pairs.json" --out "$OUT/chairs.json" --method joint --nocs-weight "$w" > /dev/null 2>&1
  d=$($B eval "$DOGS" "$REAL_OUT/dogs" --pairs "$OUT/dogs.json" | pck | cut -d'|' -f1)
  t=$($B eval "$DTU" "$REAL_OUT/dtu" --pairs "$OUT/dtu.json" | pck | cut -d'|' -f1)
  c=$($B eval "$CHAIRS" "$TR_OUT/run" --pairs "$OUT/chairs.json" | pck)
  echo "| $w | $d| $t| $c |"
done
