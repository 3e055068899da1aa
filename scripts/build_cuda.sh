#!/usr/bin/env bash
# Builds congeal with `--features cuda` (candle's CUDA backend) on a machine with no system CUDA
# toolkit: NVIDIA's CUDA 13.4 wheels from PyPI serve as CUDA_HOME, and a stub libcuda.so satisfies the
# linker where no driver is installed (the real driver library is loaded at run time on a GPU machine).
#
#   scripts/build_cuda.sh [--check]      # --check: set up the toolkit and print nvcc's version only
#
# Environment: CUDA_COMPUTE_CAP (default 90 = Hopper H100/H200; 80 = A100, 86 = RTX 30xx/A5000,
# 89 = RTX 40xx/L4), CONGEAL_CUDA_VENV (default .venv-cuda). The first build compiles candle's CUDA
# kernels and takes about 25 min on 2 cores. Run the result with `--device cuda` or `device: cuda`;
# the diffusion models then run in f16.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${CONGEAL_CUDA_VENV:-$ROOT/.venv-cuda}"
CUDA_VER="13.4.*"

if [ ! -x "$VENV/bin/nvcc-ok" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q --no-deps \
    "nvidia-cuda-nvcc==$CUDA_VER" "nvidia-nvvm==$CUDA_VER" "nvidia-cuda-crt==$CUDA_VER" \
    "nvidia-cuda-runtime==$CUDA_VER" "nvidia-cuda-nvrtc==$CUDA_VER" "nvidia-cuda-cccl==13.3.5.0.6" \
    "nvidia-cublas==13.4.3.11" "nvidia-curand==10.4.5.25"
  touch "$VENV/bin/nvcc-ok"
  chmod +x "$VENV/bin/nvcc-ok"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CUDA_HOME="$SITE/nvidia/cu13"
export CUDA_PATH="$CUDA_HOME"
# Unversioned library names for the linker, and lib64 for tools that look there.
for lib in "$CUDA_HOME"/lib/*.so.*; do
  base="${lib%%.so.*}.so"
  [ -e "$base" ] || ln -sf "$(basename "$lib")" "$base"
done
[ -e "$CUDA_HOME/lib64" ] || ln -sf lib "$CUDA_HOME/lib64"
# A stub libcuda.so: candle's cudarc links the driver API directly, so the linker needs every cu*
# symbol; the stub defines each function that cuda.h declares (and the _v2/_v3 names its macros point
# at) as a function that fails. The real driver library replaces it at run time on a GPU machine.
STUB="$VENV/stub"
if [ ! -e "$STUB/libcuda.so" ] || ! grep -q "soname" "$STUB/stub.c" 2>/dev/null; then
  mkdir -p "$STUB"
  python3 - "$CUDA_HOME/include/cuda.h" > "$STUB/stub.c" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
names = set(re.findall(r"CUresult\s+CUDAAPI\s+(cu\w+)\s*\(", src))
names |= set(re.findall(r"#define\s+cu\w+\s+(cu\w+_v\d+)\b", src))
print("/* stub driver API generated from cuda.h (soname libcuda.so.1): every call fails (999 = CUDA_ERROR_UNKNOWN) */")
for n in sorted(names):
    print("int %s(void) { return 999; }" % n)
PY
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$STUB/stub.c"
  ln -sf libcuda.so.1 "$STUB/libcuda.so"
fi
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$STUB:$CUDA_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -2
if [ "${1:-}" = "--check" ]; then
  exit 0
fi
cargo build --release --features cuda --target-dir target/cuda
echo "built target/cuda/release/congeal (CUDA, compute capability $CUDA_COMPUTE_CAP)."
echo "On the GPU machine: LD_LIBRARY_PATH=$CUDA_HOME/lib target/cuda/release/congeal run ... --device cuda"
