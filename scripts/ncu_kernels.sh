#!/usr/bin/env bash
# Nsight Compute on the kernels of scripts/ncu_kernels.py: GPU duration of each launch on a
# flushed cache at the GPU's normal clocks, DRAM bytes and throughput, achieved occupancy.
# Usage: scripts/ncu_kernels.sh OUTDIR
set -uo pipefail
out=${1:?output directory}; mkdir -p "$out"
ncu --profile-from-start off --clock-control none --cache-control all \
  -k 'regex:fused_rope_rmsnorm|_fused_kernel|spin_kernel' \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size \
  --csv env PYTHONPATH=".:${PYTHONPATH:-}" python3 scripts/ncu_kernels.py >"$out/ncu.csv" 2>"$out/ncu.err"
status=$?
python3 scripts/ncu_summary.py "$out/ncu.csv" "$out/ncu_summary.csv"
exit $status
