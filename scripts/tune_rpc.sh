#!/usr/bin/env bash
# Tuning over TVM's RPC on every GPU of this machine: one tracker, one RPC server per GPU
# (each server sees only its own GPU), one tuning run whose candidates are measured on all
# of them at once (`--rpc-workers` = the number of GPUs). The same command on a node of
# eight GPUs measures eight candidates at a time. The tracker needs tornado.
# Usage: scripts/tune_rpc.sh OUT [python -m tvm_fused tune arguments ...]
#   e.g. scripts/tune_rpc.sh out --heads 16 --buckets 64,4096 --trials 32
# Logs (tracker, one per server, the tuning run with its wall time) go to OUT.
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
gpus=$(nvidia-smi -L | grep -c "^GPU")
port=${RPC_PORT:-9190}; key=${RPC_KEY:-gpu}
python3 -m tvm.exec.rpc_tracker --host 127.0.0.1 --port "$port" >"$out/tracker.log" 2>&1 &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
trap 'exit 143' TERM INT  # so that the servers go too
sleep 3
for ((gpu = 0; gpu < gpus; gpu++)); do  # forked sessions cannot initialize CUDA: --no-fork
  CUDA_VISIBLE_DEVICES=$gpu python3 -m tvm.exec.rpc_server --tracker "127.0.0.1:$port" \
    --key "$key" --no-fork >"$out/server$gpu.log" 2>&1 &
  pids+=($!)
done
sleep 5
start=$(date +%s)
python3 -m tvm_fused tune --rpc-tracker "127.0.0.1:$port" --rpc-key "$key" \
  --rpc-workers "$gpus" "$@" 2>&1 | tee "$out/tune.log"
status=${PIPESTATUS[0]}
echo "$gpus GPUs: $(( $(date +%s) - start )) s wall" | tee -a "$out/tune.log"
exit "$status"
