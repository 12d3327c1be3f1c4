"""GPU and host time of the op in whatever ``tvm_fused`` is importable, for comparing
revisions and schedules in one device call (run it once per revision, alternating, with
PYTHONPATH pointing at each).

Only the public API, ``ScheduleConfig`` and ``make_inputs`` / ``bucket_case`` are used
(``make_inputs`` from where each revision has it), so any revision runs it. For each token
count (the tuning buckets' batches), head count (default 128), case (form and cache; bf16 q)
and schedule: the median of cold-L2 CUDA-event runs; at decode sizes also the GPU time per
call in a graph of 100 calls back to back (the steady state of a decode step) and the host
time of a Python call with ``validate=False``. Schedules are timed in turn at each point, so
drift hits them alike. Prints one JSON line per point and schedule.

Usage: python scripts/time_revision.py LABEL [--schedules S[,S...]] [--heads H[,H...]]
    [--cases CASE[,CASE...]] [TOKENS ...]
(``--schedules``: ``default`` (the schedule decided per bucket) or ``ScheduleConfig`` fields
as letters and values joined by ``-``: ``T`` block_threads, ``X`` norm_threads_per_row,
``V`` vector_bytes, ``R`` rope_vectors_per_thread, ``N`` norm_rows_per_thread, ``U`` unroll,
e.g. ``T256-R2`` (unnamed fields keep their defaults), with ``P1`` for ``pdl=True``
(``default-P1``) and ``P2`` for ``pdl="early-indices"``, or ``triton``, the Triton fused
peer (offsets addressing); ``--cases``: in-place (default), write-through, or an fp8
cache dtype with an optional ``@k_scale``, e.g. ``float8_e4m3fn@0.37``; the write-through
cases need a revision that has the form;
``--slots``: the engine addressing, positions and a slot mapping of the same tokens, for
revisions that have ``fused_rope_rmsnorm_slots``; ``--split-table``: the cos/sin table split,
cosines then sines, likewise; ``--profile``: no timing, each point's call launched once
inside cudaProfilerStart/Stop for ``ncu --profile-from-start off``, labels printed in order)
"""

import argparse
import json
import statistics
import time

import torch

import tvm_fused
from tvm_fused.tuning.buckets import bucket_case

try:
    from tvm_fused.testing.inputs import make_inputs
except ImportError:  # revisions before tvm_fused.testing
    from tvm_fused.inputs import make_inputs

FLUSH = []  # larger than any GPU's L2, allocated on first use (--help needs no GPU)


def cold_us(fn, reps: int) -> float:
    """Median of ``reps`` runs of ``fn`` on a flushed L2, CUDA events, GPU-side spin before
    each so that the host has queued the launch."""
    if not FLUSH:
        FLUSH.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    for _ in range(5):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        FLUSH[0].zero_()
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


def host_us(fn, calls: int = 200, batches: int = 7) -> float:
    """Median over ``batches`` of the mean host time of ``calls`` back-to-back calls.
    (``benchmarks.suite.host_us`` measures the same, but imports this checkout's package,
    which an earlier revision on the path would shadow.)"""
    means = []
    for _ in range(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(means)


def case_inputs(tokens: int, heads: int, case: str):
    """Inputs of ``tokens`` tokens (the tuning bucket's batch) for ``case``: ``in-place``,
    ``write-through`` (bf16 cache) or an fp8 cache dtype, optionally ``@K_SCALE``."""
    options = {}
    if case != "in-place":
        cache, _, scale = case.partition("@")
        options = {"write_through": True}
        if cache != "write-through":
            options.update(cache_dtype=getattr(torch, cache),
                           k_scale=float(scale) if scale else None)
    return make_inputs(*bucket_case(tokens), num_q_heads=heads, device="cuda", **options)


parser = argparse.ArgumentParser()
parser.add_argument("label")
parser.add_argument("tokens", type=int, nargs="*", default=[1, 64, 4096, 32768])
parser.add_argument("--schedules", default="default")
parser.add_argument("--heads", default="128", help="comma-separated head counts")
parser.add_argument("--cases", default="in-place",
                    help="comma-separated: in-place, write-through, an fp8 cache dtype[@k_scale]")
parser.add_argument("--build", action="store_true", help="only build (and cache) the kernels")
parser.add_argument("--slots", action="store_true",
                    help="engine addressing (positions, slot mapping)")
parser.add_argument("--split-table", action="store_true", help="the split cos/sin table")
parser.add_argument("--profile", action="store_true",
                    help="launch each point's call once between cudaProfilerStart and Stop, "
                         "in the order printed, for ncu --profile-from-start off")
args = parser.parse_intermixed_args()
SCHEDULE_FIELDS = {"T": "block_threads", "X": "norm_threads_per_row", "V": "vector_bytes",
                   "R": "rope_vectors_per_thread", "N": "norm_rows_per_thread", "U": "unroll"}


def schedule_option(spec: str) -> dict:
    """The keywords of a ``--schedules`` entry: ``schedule=`` (none for ``default``),
    ``pdl=True`` for a ``P1`` part, ``pdl="early-indices"`` for ``P2``."""
    pdl = {"P1": True, "P2": "early-indices"}
    parts = [part for part in spec.split("-") if part != "default" and part not in pdl]
    options = {"pdl": pdl[part] for part in spec.split("-") if part in pdl}
    if not parts:
        return options
    from tvm_fused.schedules import ScheduleConfig

    fields = {SCHEDULE_FIELDS[part[0]]: int(part[1:]) for part in parts}
    return {**options, "schedule": ScheduleConfig(**fields)}


def entry_for(spec: str, entry):
    """The function a ``--schedules`` entry calls: ``entry``, or for ``triton`` the Triton
    fused peer (offsets addressing; run from the checkout's root)."""
    if spec != "triton":
        return entry
    from benchmarks.peers.triton_fused import triton_fused_rope_rmsnorm

    def call(*args, out, validate, **form):
        triton_fused_rope_rmsnorm(*args, out=out, **{k: v for k, v in form.items()
                                                     if k in ("kv_input", "k_scale")})

    return call


schedules = {spec: {} if spec == "triton" else schedule_option(spec)
             for spec in args.schedules.split(",")}
profiled = []
for tokens in args.tokens:
    for heads in map(int, args.heads.split(",")):
        for case in args.cases.split(","):
            inputs = case_inputs(tokens, heads, case)
            # this revision's OpInputs.latent(); form() in earlier ones
            latent = getattr(inputs, "latent", None) or inputs.form
            form = {} if case == "in-place" else latent()
            entry = tvm_fused.fused_rope_rmsnorm
            if args.split_table:
                from tvm_fused.testing.inputs import with_options

                inputs = with_options(inputs, freqs_layout="split")
                form = {**form, "freqs_layout": "split"}
            if args.slots:
                from tvm_fused.testing.inputs import engine_addressed

                inputs = engine_addressed(inputs)
                entry = tvm_fused.fused_rope_rmsnorm_slots
                form = {**form, "freqs_layout": inputs.freqs_layout}
            out = torch.empty_like(inputs.q_rope)
            for spec, schedule in schedules.items():

                def call(inputs=inputs, out=out, schedule=schedule, form=form,
                         entry=entry_for(spec, entry)):
                    entry(*inputs.args(), out=out, validate=False, **form, **schedule)

                variant = " slots" * args.slots + " split" * args.split_table
                if args.build or args.profile:
                    call()  # builds (and warms) the kernel
                    if args.profile:
                        profiled.append((f"{spec} {heads}h {case}{variant} {tokens}", call))
                    continue
                row = {"label": args.label + variant, "schedule": spec,
                       "gpu": torch.cuda.get_device_name(), "heads": heads, "case": case,
                       "tokens": tokens, "cold_us": cold_us(call, 200 if tokens <= 4096 else 60)}
                if tokens <= 256:
                    row["graph_us_per_call"] = graph_us(call)
                if tokens <= 64:
                    row["host_us"] = host_us(call)
                print(json.dumps(row), flush=True)
if args.profile:
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, call in profiled:
        print("profiled:", label, flush=True)
        call()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
