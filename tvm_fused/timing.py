"""GPU timing with CUDA events on a cold L2 cache."""

from __future__ import annotations

import dataclasses
import statistics

import torch

from .form import ITEMSIZE, Form

FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100: 50 MiB)
STEADY_CALLS = 50  # calls per graph of a decode step's steady state (a model's layers)


@dataclasses.dataclass
class Timing:
    """Kernel times in microseconds over ``reps`` cold-cache runs."""

    median_us: float
    p20_us: float
    p80_us: float
    reps: int


HOST_LEAD_CYCLES = 2_000_000  # ~1 ms of GPU spinning: the host enqueues fn() meanwhile


def time_cuda(fn, reps: int = 50, warmup: int = 5, cold: bool = True) -> Timing:
    """Time ``fn()``'s GPU work with CUDA events; L2 is flushed before each run (unless not
    ``cold``: then the inputs stay in L2 from the run before).

    Before each start event the GPU spins for about a millisecond, so the host has enqueued
    ``fn()`` by the time the event fires: the interval is GPU time, not Python launch time,
    for a sequence of small kernels too (as if it were captured in a CUDA graph).
    """
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if cold:
            flush.zero_()
        torch.cuda._sleep(HOST_LEAD_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(1000 * s.elapsed_time(e) for s, e in zip(starts, ends))
    quantiles = statistics.quantiles(times, n=5)
    return Timing(statistics.median(times), quantiles[0], quantiles[3], reps)


def capture_graph(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn()`` back to back, after three warm-up calls
    on a side stream (as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def time_graph(fn, reps: int = 50, calls: int = 1) -> Timing:
    """Time replays of ``calls`` calls of ``fn()`` captured back to back in one CUDA graph
    (cold L2), as a serving engine runs decode steps; per replay (divide by ``calls`` for
    the steady-state time per call)."""
    return time_cuda(capture_graph(fn, calls).replay, reps=reps)


def bytes_moved(form: Form, tokens: int) -> int:
    """Bytes a call of ``form`` on ``tokens`` tokens must move: q's rope part read and
    written (in ``out``'s dtype), ``q_nope`` read and written likewise if the form copies it,
    each new row read (from the cache in place, from ``kv_input`` write-through) and written
    to the cache (``cache_row`` elements of its dtype: fp8_ds_mla's 656 bytes) and to
    ``kv_output`` if the form has one, the table row read, and gamma once."""
    size, out_size = ITEMSIZE[form.dtype], ITEMSIZE[form.out_element]
    heads = form.num_q_heads
    row_bytes = (form.row_width * (size + form.kv_output * size)
                 + form.cache_row * ITEMSIZE[form.cache_element])
    query = heads * form.rope_dim * (size + out_size)
    if form.q_nope:
        query += heads * form.kv_norm_dim * (size + out_size)
    per_token = query + row_bytes + form.rope_dim * ITEMSIZE[form.freqs_dtype]
    return tokens * per_token + form.kv_norm_dim * ITEMSIZE[form.gamma_dtype]
