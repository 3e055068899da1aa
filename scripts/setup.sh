#!/usr/bin/env bash
# Installs what `congeal` needs on a fresh machine and builds it (idempotent).
#   scripts/setup.sh          fetch + convert the weights (scripts/setup_weights.sh), build the CLI (release)
#   scripts/setup.sh --ros    also install ROS 2 Jazzy from PyPI wheels into .ros/, build the interface
#                             package congeal_msgs (msg/congeal_msgs; plus vision_msgs and tf2_msgs from
#                             msg/fallback/ where ROS lacks them) and the node target/release/congeal_node;
#                             then `source .ros/env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROS=0
for a in "$@"; do
  case "$a" in
    --ros) ROS=1 ;;
    *) echo "unknown option $a (expected --ros)" >&2; exit 2 ;;
  esac
done
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
# Weights (DINOv2-S/14, U^2-Net-p) from the PyPI packages named in DESIGN.md, converted to safetensors.
bash scripts/setup_weights.sh
if [ "$ROS" = 0 ]; then
  cargo build --release --locked --bin congeal
  echo "built target/release/congeal"
  exit 0
fi

# ROS 2 Jazzy (PyPI wheels) + the fix-ups they need.
bash scripts/setup_ros.sh .ros/jazzy
# Image reading for the rclpy peer tests.
.ros/jazzy/bin/pip install -q --disable-pip-version-check pillow==11.3.0
ROOT=$(pwd)
# Interface packages, all installed into one prefix: congeal_msgs, and vision_msgs / tf2_msgs from
# msg/fallback/ only where the ROS installation lacks them (the PyPI wheels do; a full installation's
# own packages are used as they are).
MSGS_INSTALL=$ROOT/.ros/congeal_msgs
has_ros_package() { [ -f "$ROOT/.ros/jazzy/share/$1/package.xml" ]; } # installed in the ROS prefix (not by us)
PKGS=()
for p in vision_msgs tf2_msgs; do
  if has_ros_package "$p"; then echo "using the installed $p"; else PKGS+=("msg/fallback/$p"); fi
done
PKGS+=(msg/congeal_msgs)
(
  . .ros/jazzy/env.sh
  export AMENT_PREFIX_PATH="$MSGS_INSTALL:$AMENT_PREFIX_PATH"
  for src in "${PKGS[@]}"; do
    name=$(basename "$src")
    cmake -S "$src" -B ".ros/build/$name" -DCMAKE_INSTALL_PREFIX="$MSGS_INSTALL" \
      -DCMAKE_PREFIX_PATH="$MSGS_INSTALL;$ROS_VENV" -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$ROS_VENV/bin/python" >/dev/null
    cmake --build ".ros/build/$name" -j2 >/dev/null
    cmake --install ".ros/build/$name" >/dev/null
  done
)
PYSITE=$(ls -d "$MSGS_INSTALL"/lib/python3*/site-packages 2>/dev/null | head -n1)
cat > .ros/env.sh <<ENV
# source me: ROS 2 Jazzy (PyPI wheels) + congeal_msgs, for congeal_node and its tests
. "$ROOT/.ros/jazzy/env.sh"
export AMENT_PREFIX_PATH="$MSGS_INSTALL:\$AMENT_PREFIX_PATH"
export CMAKE_PREFIX_PATH="$MSGS_INSTALL:$ROOT/.ros/jazzy\${CMAKE_PREFIX_PATH:+:\$CMAKE_PREFIX_PATH}"
export LD_LIBRARY_PATH="$MSGS_INSTALL/lib:\$LD_LIBRARY_PATH"
export PYTHONPATH="$PYSITE\${PYTHONPATH:+:\$PYTHONPATH}"
export IDL_PACKAGE_FILTER="std_msgs;sensor_msgs;geometry_msgs;std_srvs;service_msgs;type_description_interfaces;visualization_msgs;diagnostic_msgs;vision_msgs;tf2_msgs;congeal_msgs"
ENV
(
  . .ros/env.sh
  python -c 'import rclpy, congeal_msgs, vision_msgs.msg, tf2_msgs.msg, diagnostic_msgs.msg; print("rclpy + interfaces OK")'
  cargo build --release --locked --features ros --bins
)
echo "built target/release/congeal and congeal_node (with ROS); source .ros/env.sh to use them"
