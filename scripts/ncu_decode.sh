#!/usr/bin/env bash
# Nsight Compute, full set, on the op's decode kernels as scripts/time_revision.py --profile
# launches them (L2 left warm, as in a decode graph; the GPU's normal clocks), and the
# report as text: details (every section), raw metrics (CSV) and per-instruction source
# counters of the SASS (stall samples, bytes per request). h200_ncu_decode.csv was made so.
# Usage: scripts/ncu_decode.sh OUTDIR SCHEDULES HEADS TOKENS [SCHEDULES HEADS TOKENS ...]
#   e.g. scripts/ncu_decode.sh out default,default-P2,triton 128 256 default,triton 16 1
set -uo pipefail
out=${1:?output directory}; shift; mkdir -p "$out"
points=""
while (($# >= 3)); do
  points+="python3 scripts/time_revision.py ncu --profile --schedules $1 --heads $2 $3; "
  shift 3
done
ncu --profile-from-start off --clock-control none --cache-control none --set full \
  --import-source yes -k 'regex:fused_rope_rmsnorm|_fused_kernel' -o "$out/decode" -f \
  bash -c "$points" > "$out/ncu.log" 2>&1
status=$?
ncu -i "$out/decode.ncu-rep" --page details > "$out/details.txt"
ncu -i "$out/decode.ncu-rep" --page raw --csv > "$out/raw.csv"
ncu -i "$out/decode.ncu-rep" --page source --csv --print-source sass > "$out/source.csv"
exit $status
