#!/usr/bin/env bash
# GPU and host time of earlier revisions against this checkout's schedules, alternating
# (scripts/time_revision.py), on the GPU machine. An earlier revision is a folder holding its
# tvm_fused package with schedules/ and tuning_logs/ moved inside, e.g.
#   git archive REV tvm_fused schedules tuning_logs | tar -x -C benchmarks/scratch/rev_REV
#   (then mv schedules and tuning_logs into tvm_fused/; carry benchmarks/scratch)
# This checkout is laid out the same way in /tmp/rev_head (no editable install may be active:
# its import hook would shadow PYTHONPATH). Kernels are built in parallel first.
# Usage: scripts/time_revisions.sh OUTFILE SCHEDULES "TOKENS" "OPTIONS" REV_DIR...
#   SCHEDULES: this checkout's schedules, as time_revision.py's --schedules (e.g. default,T256-R2)
#   OPTIONS: more options of time_revision.py for every revision (--heads, --cases), or ""
set -uo pipefail
out=${1:?output file}; schedules=${2:?schedules}; tokens=${3:?token counts}; options=${4?options}
shift 4
head=/tmp/rev_head
rm -rf "$head"; mkdir -p "$head"
cp -r tvm_fused "$head/"; cp -r schedules "$head/tvm_fused/schedules"
cp -r tuning_logs "$head/tvm_fused/tuning_logs"
# shellcheck disable=SC2086  # token counts and options are several words
for rev in "$@"; do  # build (and cache) every kernel before timing, in parallel
  PYTHONPATH="$rev:${PYTHONPATH:-}" python3 scripts/time_revision.py build --build $options $tokens \
    >/dev/null 2>>"$out.stderr" &
done
for s in ${schedules//,/ }; do
  PYTHONPATH="$head:${PYTHONPATH:-}" python3 scripts/time_revision.py build --build --schedules "$s" \
    $options $tokens >/dev/null 2>>"$out.stderr" &
done
wait
for round in 1 2; do
  for rev in "$@"; do
    # shellcheck disable=SC2086
    PYTHONPATH="$rev:${PYTHONPATH:-}" python3 scripts/time_revision.py "$(basename "$rev") r$round" \
      $options $tokens \
      2>>"$out.stderr" | tee -a "$out"
  done
  # shellcheck disable=SC2086
  PYTHONPATH="$head:${PYTHONPATH:-}" python3 scripts/time_revision.py "head r$round" --schedules "$schedules" \
    $options $tokens \
    2>>"$out.stderr" | tee -a "$out"
done
