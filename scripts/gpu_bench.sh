#!/usr/bin/env bash
# The benchmark suite on the GPU machine: installs the Liger peer from a carried wheel, then
# `python -m benchmarks suite` (benchmarks.suite.SUITE) into OUTDIR/bench.csv within SECONDS,
# then the decode probe (scripts/probe_decode.py) and Nsight Compute on the kernels
# (scripts/ncu_kernels.sh): about two more minutes.
# Usage: scripts/gpu_bench.sh OUTDIR [SECONDS]
set -uo pipefail
out=${1:?output directory}; limit=${2:-420}
mkdir -p "$out"
{ python3 -m pip install -q -e . --no-deps --no-build-isolation
  python3 -m pip install -q --no-deps .whl/liger_kernel-*.whl; } >"$out/install.log" 2>&1 || {
  cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
  | tee "$out/gpu.txt"
timeout "$limit" python3 -m benchmarks suite --csv "$out/bench.csv" 2>&1 | tee "$out/bench.log"
PYTHONPATH=".:${PYTHONPATH:-}" timeout 60 python3 scripts/probe_decode.py 2>&1 | tee "$out/probe_decode.log"
timeout 100 scripts/ncu_kernels.sh "$out/ncu"
