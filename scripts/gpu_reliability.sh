#!/usr/bin/env bash
# The GPU parts of the reliability issue in one go on the GPU machine: compute-sanitizer
# memcheck/racecheck/synccheck, every GPU test but the fuzz (custom ops under torch.compile
# and CUDA graphs, threads and streams, peers, kernels), the 1000-case fuzz over 16 worker
# processes (about 4 cases a second on an H100 host). Each step has a time limit; together
# they fit one 10-minute device call.
# Usage: scripts/gpu_reliability.sh OUTDIR
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
{ python3 -m pip install -q -e . --no-deps --no-build-isolation
  python3 -m pip install -q --no-deps .whl/liger_kernel-*.whl; } >"$out/install.log" 2>&1 || {
  cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
timeout 90 scripts/sanitize.sh "$out/sanitize" || status=1
timeout 180 python3 -m pytest -q -m gpu tests --deselect tests/test_fuzz.py::test_fuzz_gpu -rs \
  --durations=10 2>&1 | tee "$out/pytest_gpu.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 300 python3 -m tvm_fused fuzz --seed 100000 --cases 1000 --device cuda --jobs 16 2>&1 \
  | tee "$out/fuzz_gpu.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
