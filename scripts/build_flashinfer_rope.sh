#!/usr/bin/env bash
# Build FlashInfer's rope module (csrc/rope.cu + its TVM FFI binding, from the
# flashinfer-python 0.7.2.post1 wheel) into one shared library for benchmarks/peers/
# flashinfer_rope.py, on a machine with nvcc and network (the GPU machine has neither need:
# carry the result, e.g. xz-compressed, and point FLASHINFER_ROPE_LIB at it). The wheel's
# headers use cuda::fast_mod_div, newer than nvcc 13.0's CCCL: CCCL's headers come from the
# nvidia-cuda-cccl wheel. About a minute of nvcc.
# Usage: scripts/build_flashinfer_rope.sh OUT.so [ARCH (default 90a)]
set -euo pipefail
out=$(realpath -m "${1:?output library}"); arch=${2:-90a}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
pip download -q --no-deps -d "$work" flashinfer-python==0.7.2.post1 nvidia-cuda-cccl
unzip -q "$work"/flashinfer_python-*.whl 'flashinfer/data/*' -d "$work/fi"
unzip -q "$work"/nvidia_cuda_cccl-*.whl -d "$work/cccl"
data=$work/fi/flashinfer/data
ffi=$(python3 -c "import tvm_ffi.libinfo as l; print(l.find_include_path())")
ffi_lib=$(dirname "$(python3 -c "import tvm_ffi.libinfo as l; print(l.find_libtvm_ffi())")")
nvcc -shared -Xcompiler -fPIC -O3 -std=c++17 --expt-relaxed-constexpr \
  -gencode "arch=compute_$arch,code=sm_$arch" \
  -I "$(dirname "$(find "$work/cccl" -path '*/cuda/cmath' | head -1)")/.." \
  -I "$data/include" -I "$data/csrc" -I "$ffi" \
  -DFLASHINFER_ENABLE_BF16 -DFLASHINFER_ENABLE_F16 -DFLASHINFER_ENABLE_FP8_E4M3 \
  "$data/csrc/rope.cu" "$data/csrc/flashinfer_rope_binding.cu" \
  -L "$ffi_lib" -ltvm_ffi -o "$out" 2> >(grep -v -i warning >&2 || true)
strip "$out"
echo "built $out"
