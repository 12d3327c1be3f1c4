#!/usr/bin/env bash
# The benchmark suite on the GPU machine: installs the Liger peer from a carried wheel, then
# `python -m tvm_fused bench` (tvm_fused.bench.SUITE) into OUTDIR/bench.csv, with a time limit.
# Usage: scripts/gpu_bench.sh OUTDIR [SECONDS]
set -uo pipefail
out=${1:?output directory}; limit=${2:-540}
mkdir -p "$out"
{ python3 -m pip install -q -e . --no-deps --no-build-isolation
  python3 -m pip install -q --no-deps .whl/liger_kernel-*.whl; } >"$out/install.log" 2>&1 || {
  cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
  | tee "$out/gpu.txt"
timeout "$limit" python3 -m tvm_fused bench --csv "$out/bench.csv" 2>&1 | tee "$out/bench.log"
