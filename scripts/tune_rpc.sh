#!/usr/bin/env bash
# Tuning over TVM's RPC on every GPU of this machine: one tracker, RPC servers that each see
# one GPU (RPC_SERVERS_PER_GPU of them per GPU: 2 where the machine has a single GPU, so
# that the tracker hands the candidates to several servers, the fleet's path; else 1), one
# tuning run whose candidates are measured on all the GPUs at once (`--rpc-workers` = the
# number of GPUs: servers that share a GPU take turns, so no two timings overlap on one).
# The same command on a node of eight GPUs measures eight candidates at a time. The tracker
# needs tornado.
# Usage: scripts/tune_rpc.sh OUT [python -m tvm_fused tune arguments ...]
#   e.g. scripts/tune_rpc.sh out --heads 16 --buckets 64,4096 --trials 32
# Logs (tracker, one per server, the tuning run with its wall time) go to OUT.
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
gpus=$(nvidia-smi -L | grep -c "^GPU")
port=${RPC_PORT:-9190}; key=${RPC_KEY:-gpu}
python3 -m tvm.exec.rpc_tracker --host 127.0.0.1 --port "$port" --port-end $((port + 1)) \
  >"$out/tracker.log" 2>&1 &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
trap 'exit 143' TERM INT  # so that the servers go too
sleep 3
kill -0 "${pids[0]}" 2>/dev/null || { echo "the tracker did not start:"; cat "$out/tracker.log"; exit 1; }
per_gpu=${RPC_SERVERS_PER_GPU:-$(( gpus == 1 ? 2 : 1 ))}
for ((gpu = 0; gpu < gpus; gpu++)); do  # forked sessions cannot initialize CUDA: --no-fork
  for ((server = 0; server < per_gpu; server++)); do
    CUDA_VISIBLE_DEVICES=$gpu python3 -m tvm.exec.rpc_server --tracker "127.0.0.1:$port" \
      --key "$key" --no-fork >"$out/server$gpu-$server.log" 2>&1 &
    pids+=($!)
  done
done
sleep 5
start=$(date +%s)
python3 -m tvm_fused tune --rpc-tracker "127.0.0.1:$port" --rpc-key "$key" \
  --rpc-workers "$gpus" "$@" 2>&1 | tee "$out/tune.log"
status=${PIPESTATUS[0]}
echo "$gpus GPUs, $per_gpu servers each: $(( $(date +%s) - start )) s wall" \
  | tee -a "$out/tune.log"
python3 -m tvm.exec.query_rpc_tracker --host 127.0.0.1 --port "$port" 2>&1 \
  | tee -a "$out/tune.log"  # the servers the tracker saw, and their use
exit "$status"
