"""GPU time of the op in whatever ``tvm_fused`` is importable, for comparing two revisions in
one device call (run it once per revision, alternating, with PYTHONPATH pointing at each).

Only the public API and ``make_inputs`` / ``bucket_case`` are used (``make_inputs`` from
where each revision has it), so any revision runs it.
For each token count (128 heads, bf16, the tuning buckets' batches): the median of cold-L2
CUDA-event runs, and at decode sizes the GPU time per call in a graph of 100 calls back to
back (the steady state of a decode step). Prints one JSON line per token count.

Usage: python scripts/time_revision.py LABEL [--items N] [TOKENS ...]
(``--items``: the schedule's ``rope_vectors_per_thread``, else the default schedule)
"""

import argparse
import json
import statistics

import torch

import tvm_fused
from tvm_fused.tuning.buckets import bucket_case

try:
    from tvm_fused.testing.inputs import make_inputs
except ImportError:  # revisions before tvm_fused.testing
    from tvm_fused.inputs import make_inputs

FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def cold_us(fn, reps: int) -> float:
    """Median of ``reps`` runs of ``fn`` on a flushed L2, CUDA events, GPU-side spin before
    each so that the host has queued the launch."""
    for _ in range(5):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        FLUSH.zero_()
        torch.cuda._sleep(2_000_000)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(1000 * s.elapsed_time(e) for s, e in events)


def graph_us(fn, calls: int = 100, reps: int = 20) -> float:
    """GPU time per call of ``calls`` calls of ``fn`` captured back to back in one graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cold_us(graph.replay, reps) / calls


parser = argparse.ArgumentParser()
parser.add_argument("label")
parser.add_argument("tokens", type=int, nargs="*", default=[1, 64, 4096, 32768])
parser.add_argument("--items", type=int)
args = parser.parse_intermixed_args()
schedule = None
if args.items:
    from tvm_fused.schedules import ScheduleConfig

    schedule = ScheduleConfig(rope_vectors_per_thread=args.items)
for tokens in args.tokens:
    inputs = make_inputs(*bucket_case(tokens), num_q_heads=128, device="cuda")
    out = torch.empty_like(inputs.q_rope)

    def call(inputs=inputs, out=out):
        tvm_fused.fused_rope_rmsnorm(*inputs.args(), out=out, validate=False, schedule=schedule)

    row = {"label": args.label, "gpu": torch.cuda.get_device_name(), "tokens": tokens,
           "cold_us": cold_us(call, 200 if tokens <= 4096 else 60)}
    if tokens <= 256:
        row["graph_us_per_call"] = graph_us(call)
    print(json.dumps(row), flush=True)
