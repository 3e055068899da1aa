#!/usr/bin/env bash
# Extra rendered data for measuring outside the dev collections (nothing here goes into the repository):
#   OUT/collections/chairs-heldout   8 chairs that are not in chairs-mixed x 4 images, same template as
#                                     chairs-mixed (Scopia_31), rendered with ../shared/data/tools (seed 2207);
#   OUT/templates/<model>/template.obj  more meshes in the canonical frame: three chairs not in either set
#                                     (Scopia_24 armchair, KatorLegaz_51 dining chair, Scopia_47 office chair)
#                                     and a standing dog (BlendSwap-CC-BY_89 bulldog; the shared dog template
#                                     is a sitting one).
# All models come from the Debian package sweethome3d-furniture (CC0 / CC-BY 3.0); rendering follows
# ../shared/data/tools/README.md (pyrender + OSMesa on the CPU, pinned versions, about 1 min here).
# Then, e.g.:
#   CONGEAL_DATA_DIR=OUT scripts/bench/category.sh config/fast_224.yaml RUN chairs-heldout
#   scripts/bench/templates.sh config/fast_224.yaml OUT/collections/chairs-heldout RUN OUT/templates/Scopia_24/template.obj ...
#   scripts/bench/real.sh config/fast_224.yaml RUN OUT/templates/BlendSwap-CC-BY_89/template.obj
# Usage: scripts/bench/extra_sets.sh [OUT]   (default /tmp/congeal-extra; needs apt for libosmesa6)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/congeal-extra}
TOOLS=${CONGEAL_DATA_DIR:-../shared/data}/tools
if [ ! -f "$TOOLS/render_collection.py" ]; then
  echo "extra_sets.sh: $TOOLS is not here; nothing rendered"
  exit 0
fi
TOOLS=$(cd "$TOOLS" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if ! ldconfig -p 2> /dev/null | grep libOSMesa > /dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -q libosmesa6 > /dev/null
fi
if [ ! -x "$OUT/venv/bin/python" ]; then
  python3 -m venv "$OUT/venv"
  "$OUT/venv/bin/pip" install -q "pyrender==0.1.45" "trimesh==5.2.0" "pillow==13.0.0" "numpy==2.4.6" "scipy==1.17.1" \
    "opencv-python-headless==5.0.0.93" "rtree==1.4.1" "scikit-image==0.26.0"
  "$OUT/venv/bin/pip" install -q --no-deps "PyOpenGL==3.1.7"
fi
PY=$OUT/venv/bin/python
if [ ! -d "$OUT/sh3d" ]; then
  (cd "$OUT" && apt-get download sweethome3d-furniture > /dev/null 2>&1 && dpkg-deb -x sweethome3d-furniture_*_all.deb sh3d)
fi
FURNITURE=$OUT/sh3d/usr/share/sweethome3d/furniture
# The held-out instances (catalogue pack:index), its template, and each extra template with the instance its
# one-image carrier collection shows (any model; only the collection's template.obj is kept).
INSTANCES=(Scopia:92 BlendSwap-CC-BY:123 Scopia:90 BlendSwap-CC-0:93 Scopia:30 KatorLegaz:14 BlendSwap-CC-BY:24 Scopia:25)
HELDOUT_TEMPLATE=Scopia:31
EXTRA=(Scopia:24=Scopia:92 KatorLegaz:51=Scopia:92 Scopia:47=Scopia:92 BlendSwap-CC-BY:89=Scopia:162)
models=("${INSTANCES[@]}" "$HELDOUT_TEMPLATE")
for pair in "${EXTRA[@]}"; do models+=("${pair%%=*}" "${pair#*=}"); done
"$PY" "$TOOLS/sh3d_extract.py" --furniture "$FURNITURE" --out "$OUT/models" $(printf '%s\n' "${models[@]}" | sort -u) > /dev/null
# One spec: the held-out set, and per extra template a one-image collection whose template.obj is that
# model written in the canonical frame (the renderer's own conversion: modelRotation, unit bbox diagonal).
"$PY" - "$OUT/spec.json" "$HELDOUT_TEMPLATE" "${#INSTANCES[@]}" "${INSTANCES[@]}" "${EXTRA[@]}" <<'PY'
import json, sys
folder = lambda m: m.replace(":", "_")            # sh3d_extract.py names a model's folder pack_index
out, template, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
instances, extra = sys.argv[4:4 + count], [e.split("=") for e in sys.argv[4 + count:]]
spec = [{"name": "chairs-heldout", "category": "chair", "kind": "cross", "seed": 2207, "images_per_instance": 4,
         "description": f"{count} chairs not in chairs-mixed x 4 images; template = {folder(template)} (chairs-mixed's template)",
         "instances": [folder(m) for m in instances], "template": folder(template)}]
for t, inst in extra:
    spec.append({"name": f"tpl-{folder(t)}", "category": "template", "kind": "cross", "seed": 1, "images_per_instance": 1,
                 "instances": [folder(inst)], "template": folder(t)})
json.dump(spec, open(out, "w"), indent=1)
PY
mkdir -p "$OUT/render"
PYOPENGL_PLATFORM=osmesa "$PY" "$TOOLS/render_collection.py" "$OUT/spec.json" "$OUT/render" --models "$OUT/models" > "$OUT/render.log"
mkdir -p "$OUT/collections" "$OUT/templates"
rm -rf "$OUT/collections/chairs-heldout"
mv "$OUT/render/chairs-heldout" "$OUT/collections/chairs-heldout"
for d in "$OUT"/render/tpl-*; do
  name=${d##*/tpl-}
  rm -rf "$OUT/templates/$name"
  mkdir -p "$OUT/templates/$name"
  cp "$d"/template.* "$OUT/templates/$name/"
  cp "$d"/template_tex* "$OUT/templates/$name/" 2> /dev/null || true
done
rm -rf "$OUT/render"
echo "extra sets in $OUT: collections/chairs-heldout ($(ls "$OUT/collections/chairs-heldout/rgb" | wc -l) images), templates/{$(ls "$OUT/templates" | paste -sd,)}"
