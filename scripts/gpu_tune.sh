#!/usr/bin/env bash
# Tuning on the GPU machine (see README): schedule-variant tests, an RPC tuning demo on every GPU
# (scripts/tune_rpc.sh),
# then the per-bucket tuning of the given head counts; records and work databases go to OUT.
# Usage: scripts/gpu_tune.sh OUT "HEADS:TRIALS ..." [--rpc-demo]   (plan may be "")
set -uo pipefail
out=${1:?output directory}; plan=${2-}; shift 2
mkdir -p "$out"
python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 || {
  cat "$out/install.log"; exit 1; }
if [ "${1:-}" = "--rpc-demo" ]; then  # the tracker needs tornado: carry its wheel in .whl/
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/tornado-*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  timeout 300 scripts/tune_rpc.sh "$out/rpc" --heads 16 --buckets 64 --trials 4 \
    --out /tmp/rpc_logs --work-dir /tmp/rpc_work | grep -v "^\s*$" | tail -6 \
    | tee "$out/rpc_tune.log"
  cat /tmp/rpc_logs/*/*/metadata.json >>"$out/rpc_tune.log" 2>/dev/null
fi
for item in $plan; do
  heads=${item%%:*}; trials=${item##*:}
  start=$(date +%s)
  python3 -m tvm_fused tune --heads "$heads" --trials "$trials" --work-dir /tmp/tuning_work \
    2>&1 | grep -E "^\[|records:" | tee -a "$out/tune.log"
  echo "heads $heads trials $trials: $(( $(date +%s) - start )) s wall" | tee -a "$out/tune.log"
  tar czf "$out/tuning_logs.tgz" tuning_logs
  tar czf "$out/tuning_work.tgz" -C /tmp tuning_work
done
