#!/usr/bin/env bash
# Tuning on the GPU machine (see README): an RPC tuning demo on every GPU (scripts/tune_rpc.sh),
# then the per-bucket tuning of each plan item; records and work databases go to OUT.
# A plan item is HEADS:TRIALS[:FORM], FORM one of in-place (the default), write-through, fp8
# (write-through into an fp8 e4m3 cache), kv-output, ds-mla (write-through into an fp8_ds_mla
# cache), fp8-query and fp8-query-ds-mla (the whole fp8 attention query, with an fp8 or an
# fp8_ds_mla cache); BUCKETS (comma-separated) limits the
# buckets, as --buckets does.
# With RPC=1 each plan item is tuned through TVM's RPC tracker (scripts/tune_rpc.sh: two
# servers on a single GPU, the fleet's path end to end; its logs under OUT/rpc-HEADS-FORM).
# The tuner's whole output goes to OUT/tune_full.log (its bucket lines also to OUT/tune.log).
# Usage: [BUCKETS=1,64] [RPC=1] scripts/gpu_tune.sh OUT "HEADS:TRIALS[:FORM] ..." [--rpc-demo]
#   (plan may be ""; the tracker needs tornado: carry its wheel in .whl/)
set -uo pipefail
out=${1:?output directory}; plan=${2-}; shift 2
mkdir -p "$out"
python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 || {
  cat "$out/install.log"; exit 1; }
if [ "${1:-}" = "--rpc-demo" ] || [ -n "${RPC:-}" ]; then  # the tracker needs tornado
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/tornado-*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${1:-}" = "--rpc-demo" ]; then
  timeout 300 scripts/tune_rpc.sh "$out/rpc" --heads 16 --buckets 64 --trials 4 \
    --out /tmp/rpc_logs --work-dir /tmp/rpc_work | grep -v "^\s*$" | tail -6 \
    | tee "$out/rpc_tune.log"
  cat /tmp/rpc_logs/*/*/metadata.json >>"$out/rpc_tune.log" 2>/dev/null
fi
fp8_query="--out-dtype float8_e4m3fn --q-nope"
form_flags() {
  case "$1" in
    in-place) ;;
    write-through) echo "--write-through" ;;
    fp8) echo "--write-through --cache-dtype float8_e4m3fn" ;;
    kv-output) echo "--write-through --kv-output" ;;
    ds-mla) echo "--write-through --cache-format fp8_ds_mla" ;;
    fp8-query) echo "--write-through --cache-dtype float8_e4m3fn $fp8_query" ;;
    fp8-query-ds-mla) echo "--write-through --cache-format fp8_ds_mla $fp8_query" ;;
    *) echo "unknown form $1" >&2; return 1 ;;
  esac
}
for item in $plan; do
  IFS=: read -r heads trials form <<<"$item"
  flags=$(form_flags "${form:-in-place}") || exit 2
  start=$(date +%s)
  tuner=(python3 -m tvm_fused tune)
  [ -n "${RPC:-}" ] && tuner=(scripts/tune_rpc.sh "$out/rpc-$heads-${form:-in-place}")
  # shellcheck disable=SC2086  # the form's flags are several words
  "${tuner[@]}" --heads "$heads" --trials "$trials" $flags \
    ${BUCKETS:+--buckets "$BUCKETS"} --out tuning_logs --work-dir /tmp/tuning_work 2>&1 \
    | tee -a "$out/tune_full.log" | grep -E "^\[|records:" | tee -a "$out/tune.log"
  status=${PIPESTATUS[0]}  # the tuner's: a failure shows in tune_full.log (its traceback)
  echo "heads $heads trials $trials ${form:-in-place}: exit $status," \
    "$(( $(date +%s) - start )) s wall" | tee -a "$out/tune.log"
  tar czf "$out/tuning_logs.tgz" tuning_logs
done
