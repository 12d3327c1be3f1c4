"""Edge cases run under compute-sanitizer by scripts/sanitize.sh (GPU), with the default
settings (no content validation on the GPU): no tokens, one token, far more tokens than one
wave of blocks, page size 1, padding rows, in place, NeoX, schedules with shared-memory row
reductions, odd strides, the write-through form into bf16 and fp8 caches (kv_input at odd
columns too), engine addressing (positions and slots, split table, tokens without a slot)
in every form, and every index that points nowhere in each form and addressing
(tests/cases.py). Run from the repository root; ``--slots`` runs only the engine-addressed
cases."""

import sys

import torch

from tests.cases import BAD_INDICES, BAD_SLOTS, FORMS, MALFORMED, RAGGED, bad_index_inputs
from tvm_fused import fused_rope_rmsnorm
from tvm_fused.schedules import ScheduleConfig
from tvm_fused.testing.compare import run_and_check
from tvm_fused.testing.inputs import engine_addressed, make_inputs, with_options

CASES = [
    {"new": [0], "cached": [5]},
    {"new": [1], "cached": [0]},
    {"new": [1], "cached": [127], "page_size": 1},
    {"new": [3000, 0, 2000], "cached": [0, 9, 4000], "padding_rows": 5},
    {"new": [7, 1, 0, 9], "cached": [15, 16, 1, 255], "page_size": 1, "in_place": True},
    {"new": [5, 6], "cached": [100, 3], "heads": 1, "interleaved": False},
    {"new": [40, 3], "cached": [7, 300], "schedule": ScheduleConfig(
        block_threads=128, norm_threads_per_row=32, norm_rows_per_thread=4)},
    {"new": [40, 3], "cached": [7, 300], "schedule": ScheduleConfig(
        block_threads=256, norm_threads_per_row=128)},
    {"new": RAGGED[0], "cached": RAGGED[1], "heads": 4, "page_size": 16,
     "q_columns": (65, 1), "row_width": 577, "dtype": torch.float16},
    {"new": RAGGED[0], "cached": RAGGED[1], "heads": 4, "page_size": 16,
     "q_columns": (67, 3), "row_width": 581, "in_place": True},
    {"new": [3000, 0, 2000], "cached": [0, 9, 4000], "padding_rows": 5,
     "form": "write-through"},
    {"new": RAGGED[0], "cached": RAGGED[1], "heads": 4, "page_size": 16,
     "kv_columns": (577, 1), "form": "write-through"},
    {"new": [3000, 1, 7], "cached": [0, 9, 4000], "form": "fp8-e4m3"},
    {"new": RAGGED[0], "cached": RAGGED[1], "heads": 16, "page_size": 1,
     "kv_columns": (600, 16), "interleaved": False, "form": "fp8-e5m2-scaled"},
    {"new": [3000, 0, 2000], "cached": [0, 9, 4000], "padding_rows": 5, "slots": True},
    {"new": RAGGED[0], "cached": RAGGED[1], "heads": 16, "page_size": 1, "slots": True,
     "interleaved": False, "form": "fp8-e4m3"},
    {"new": RAGGED[0], "cached": RAGGED[1], "heads": 4, "page_size": 16, "slots": True,
     "kv_columns": (577, 1), "form": "write-through", "in_place": True},
]

SLOTS_ONLY = "--slots" in sys.argv[1:]
failed = 0
for case in CASES:
    if SLOTS_ONLY and not case.get("slots"):
        continue
    inputs = make_inputs(case["new"], case["cached"], num_q_heads=case.get("heads", 128),
                         page_size=case.get("page_size", 128),
                         padding_rows=case.get("padding_rows", 0),
                         q_columns=case.get("q_columns"), row_width=case.get("row_width"),
                         dtype=case.get("dtype", torch.bfloat16),
                         kv_columns=case.get("kv_columns"), device="cuda",
                         **FORMS[case.get("form", "in-place")])
    if case.get("slots"):
        inputs = engine_addressed(with_options(inputs, freqs_layout="split"), unslotted=3)
    report = run_and_check(inputs, in_place=case.get("in_place", False),
                           interleaved=case.get("interleaved", True),
                           schedule=case.get("schedule"))
    print(("ok  " if report.ok else "FAIL"), case, report.summary())
    failed += not report.ok
for form in ("in-place", "fp8-e5m2-scaled"):
    for name, (corrupt, errors) in ({} if SLOTS_ONLY else BAD_INDICES).items():
        inputs = bad_index_inputs("cuda", form)
        corrupt(inputs)
        report = run_and_check(inputs)
        ok = report.ok and report.errors_expected == errors
        print(("ok  " if ok else "FAIL"), form, name, report.summary())
        failed += not ok
    for name, (corrupt, errors) in BAD_SLOTS.items():
        inputs = engine_addressed(bad_index_inputs("cuda", form))
        corrupt(inputs)
        report = run_and_check(inputs)
        ok = report.ok and report.errors_expected == errors
        print(("ok  " if ok else "FAIL"), form, "slots:", name, report.summary())
        failed += not ok
    for name, corrupt in ({} if SLOTS_ONLY else MALFORMED).items():  # memcheck judges
        inputs = bad_index_inputs("cuda", form)
        corrupt(inputs)
        fused_rope_rmsnorm(*inputs.args(), **inputs.latent())
        torch.cuda.synchronize()
        print("ran ", form, name)
sys.exit(1 if failed else 0)
