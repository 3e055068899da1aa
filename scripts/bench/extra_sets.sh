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
#   scripts/bench/templates.sh OUT/collections/chairs-heldout RUN OUT/templates/Scopia_24/template.obj ...
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
INSTANCES=(Scopia:92 BlendSwap-CC-BY:123 Scopia:90 BlendSwap-CC-0:93 Scopia:30 KatorLegaz:14 BlendSwap-CC-BY:24 Scopia:25)
TEMPLATES=(Scopia:31 Scopia:24 KatorLegaz:51 Scopia:47 BlendSwap-CC-BY:89)
"$PY" "$TOOLS/sh3d_extract.py" --furniture "$FURNITURE" --out "$OUT/models" "${INSTANCES[@]}" "${TEMPLATES[@]}" Scopia:162 > /dev/null
# One spec: the held-out set, and per extra template a one-image collection whose template.obj is that
# model written in the canonical frame (the renderer's own conversion: modelRotation, unit bbox diagonal).
"$PY" - "$OUT/spec.json" <<'PY'
import json, sys
ids = lambda xs: [x.replace(":", "_") for x in xs]
spec = [{"name": "chairs-heldout", "category": "chair", "kind": "cross", "seed": 2207, "images_per_instance": 4,
         "description": "8 chairs not in chairs-mixed x 4 images; template = Scopia_31 (chairs-mixed's template)",
         "instances": ids("Scopia:92 BlendSwap-CC-BY:123 Scopia:90 BlendSwap-CC-0:93 Scopia:30 KatorLegaz:14 "
                          "BlendSwap-CC-BY:24 Scopia:25".split()),
         "template": "Scopia_31"}]
for t, inst in [("Scopia_24", "Scopia_92"), ("KatorLegaz_51", "Scopia_92"), ("Scopia_47", "Scopia_92"),
                ("BlendSwap-CC-BY_89", "Scopia_162")]:
    spec.append({"name": f"tpl-{t}", "category": "template", "kind": "cross", "seed": 1, "images_per_instance": 1,
                 "instances": [inst], "template": t})
json.dump(spec, open(sys.argv[1], "w"), indent=1)
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
