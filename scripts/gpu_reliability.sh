#!/usr/bin/env bash
# The GPU parts of the reliability issue in one go on the GPU machine: every GPU test (the
# 1000-case fuzz, custom ops under torch.compile and CUDA graphs, threads and streams, peers),
# compute-sanitizer memcheck/racecheck/synccheck, and the decode-latency probe.
# Usage: scripts/gpu_reliability.sh OUTDIR
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 || {
  cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
python3 -m pytest -q -m gpu tests -rs --durations=15 2>&1 | tee "$out/pytest_gpu.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
scripts/sanitize.sh "$out/sanitize" || status=1
python3 scripts/probe_decode.py 2>&1 | tee "$out/probe_decode.log"
exit $status
