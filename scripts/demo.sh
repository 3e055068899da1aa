#!/usr/bin/env bash
# Sets up and runs the main job on the shipped demo collection, then evaluates it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out=${1:-runs/demo-duck}
target/release/congeal run demo/duck --out "$out" --config config/fast.yaml
target/release/congeal eval demo/duck "$out" --out "$out/eval.json" > /dev/null
python3 - "$out/eval.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))["poses"]
print(f"rotation error (deg): median {e['rotation_deg_unaligned']['median']:.1f} unaligned, "
      f"{e['rotation_deg_aligned']['median']:.1f} after Sim3 alignment")
PY
echo "open $out/contact_sheet.png to see the canonical shape over every image"
