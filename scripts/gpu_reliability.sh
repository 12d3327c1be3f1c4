#!/usr/bin/env bash
# Every GPU test on the GPU machine, then the GPU fuzz and compute-sanitizer, each step with a
# time limit so that together they fit one 10-minute device call: the GPU tests but the fuzz
# (custom ops under torch.compile and CUDA graphs, threads and streams, peers, kernels) over
# 12 pytest-xdist workers, as many of 1000 fuzz cases as 170 s allow over 16 worker processes
# (an H200 host did 570), memcheck/racecheck/synccheck over scripts/sanitize_cases.py.
# Wheels the GPU machine lacks (pytest-xdist, execnet, liger-kernel) come from a carried .whl/.
# Usage: scripts/gpu_reliability.sh OUTDIR
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
{ python3 -m pip install -q -e . --no-deps --no-build-isolation
  python3 -m pip install -q --no-index --no-deps --target /tmp/wheels .whl/*.whl; } \
  >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
export PYTHONPATH="/tmp/wheels:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
timeout 270 python3 -m pytest -v -n 12 --tb=short -m gpu tests \
  --deselect tests/test_fuzz.py::test_fuzz_gpu -rs >"$out/pytest_gpu.log" 2>&1
[ $? -eq 0 ] || status=1
grep -E "FAILED|ERROR|passed|failed" "$out/pytest_gpu.log" | tail -30
timeout 170 python3 -m tvm_fused fuzz --seed 100000 --cases 1000 --device cuda --jobs 16 2>&1 \
  | tee "$out/fuzz_gpu.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 110 scripts/sanitize.sh "$out/sanitize" || status=1
exit $status
