#!/usr/bin/env bash
# The GPU checks, in one go on the GPU machine (see README): GPU tests, `python -m tvm_fused
# run` for 16 and 128 heads, timings of each form (in place, write-through into bf16 and fp8
# caches) next to a copy of their bytes, compute-sanitizer.
# Usage: scripts/gpu_session.sh OUTDIR
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 || {
  cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest_gpu.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for heads in 16 128; do
  python3 -m tvm_fused run --heads "$heads" --tokens 1024 2>&1 | tee -a "$out/run.log" || status=1
done
for form in "" "--write-through" "--write-through --cache-dtype float8_e4m3fn"; do
  for tokens in 1 64 1024 4096 32768; do
    # shellcheck disable=SC2086  # the form is several words
    python3 -m tvm_fused run --heads 128 --tokens "$tokens" --reps 100 $form 2>&1 \
      | tee -a "$out/timings.log" | grep -E "^op:|tvm-fused|copy of|check" || status=1
  done
done
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m tvm_fused run --heads 128 \
  --tokens 257 --reps 2 >"$out/memcheck.log" 2>&1 || status=1
tail -3 "$out/memcheck.log"
exit $status
