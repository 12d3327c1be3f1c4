#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck and synccheck over scripts/sanitize_cases.py (GPU).
# Usage: scripts/sanitize.sh OUTDIR
set -uo pipefail
out=${1:?output directory}; mkdir -p "$out"; status=0
for tool in memcheck racecheck synccheck; do
  PYTHONPATH=".:${PYTHONPATH:-}" compute-sanitizer --tool "$tool" --error-exitcode 9 python3 scripts/sanitize_cases.py \
    >"$out/$tool.log" 2>&1 || status=1
  echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$tool.log" | tail -1) (exit ${PIPESTATUS[0]})"
done
exit $status
