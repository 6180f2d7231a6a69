#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc and link them into a shared object.
# No GPU and no torch needed. Fails loudly (non-zero exit, the compiler's message) on any error or
# warning.
#
#   tools/check_cuda.sh [OUT_DIR]        default OUT_DIR: build/cuda_check
#   BITKERN_CHECK_PYMODULE=1 tools/check_cuda.sh OUT_DIR
#       also builds the pybind11 module _C_cuda (bindings.cpp) into OUT_DIR, importable without torch.
#   NVCC=/path/to/nvcc overrides the compiler.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/csrc/cuda"
OUT="${1:-$ROOT/build/cuda_check}"
NVCC="${NVCC:-nvcc}"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda: nvcc not found (NVCC=$NVCC)" >&2
  exit 127
fi
mkdir -p "$OUT"
echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"

ARCHS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
FLAGS=(-std=c++17 -O3 -Xcompiler -fPIC -Xcompiler -Wall -Werror all-warnings -I"$SRC")

shopt -s nullglob
sources=("$SRC"/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "check_cuda: no .cu files in $SRC" >&2
  exit 1
fi

objects=()
for src in "${sources[@]}"; do
  obj="$OUT/$(basename "${src%.cu}").o"
  echo "check_cuda: nvcc -c $(basename "$src") (sm_80, sm_90)"
  "$NVCC" "${FLAGS[@]}" "${ARCHS[@]}" -c "$src" -o "$obj"
  objects+=("$obj")
done

echo "check_cuda: nvcc -shared -> $OUT/libbitkern_cuda.so"
"$NVCC" -shared "${ARCHS[@]}" "${objects[@]}" -o "$OUT/libbitkern_cuda.so"

# Every launcher of bk_cuda.h must be exported with C linkage.
for sym in bk_cuda_pack_signs bk_cuda_tap_table bk_cuda_mbn_conv bk_cuda_device_count bk_cuda_error_string; do
  if ! nm -D --defined-only "$OUT/libbitkern_cuda.so" | grep -q " T $sym\$"; then
    echo "check_cuda: symbol $sym missing from libbitkern_cuda.so" >&2
    exit 1
  fi
done

if [ "${BITKERN_CHECK_PYMODULE:-0}" = "1" ]; then
  PY="${PYTHON:-python3}"
  PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  PBINC="$("$PY" -c 'import pybind11; print(pybind11.get_include())')"
  SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  echo "check_cuda: pybind11 module -> $OUT/_C_cuda$SUFFIX"
  "$NVCC" -std=c++17 -O2 -Xcompiler -fPIC -Xcompiler -Wall -Werror all-warnings -I"$SRC" -I"$PYINC" -I"$PBINC" \
    -x c++ -c "$SRC/bindings.cpp" -o "$OUT/bindings.o"
  "$NVCC" -shared "${ARCHS[@]}" "${objects[@]}" "$OUT/bindings.o" -o "$OUT/_C_cuda$SUFFIX"
fi
echo "check_cuda: OK"
