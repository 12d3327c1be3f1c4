"""The GPU timeline of a replayed CUDA graph, from CUPTI's kernel records (torch.profiler).

Nsight Systems is not on every GPU machine; torch's profiler records the same kernel
activity (CUPTI), graph replays included. ``replay_kernels`` returns each kernel's start and
duration; ``per_position`` folds a graph of repeated layers into one row per kernel of a
layer: its median duration and its median gap after the kernel before it (negative: it
started before that one ended, as a programmatic dependent launch can).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import tempfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel run: its name, start and duration (µs, the trace's clock)."""

    name: str
    start_us: float
    duration_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.duration_us


@dataclasses.dataclass(frozen=True)
class Position:
    """The ``index``-th kernel of each layer: ``name`` (the first layer's), median
    ``duration_us`` and median ``gap_us`` from the end of the kernel launched before it."""

    index: int
    name: str
    duration_us: float
    gap_us: float


def trace_kernels(trace: dict) -> list[Kernel]:
    """The kernels of a Chrome trace (``torch.profiler``'s export: events of category
    ``kernel``, ``ts`` and ``dur`` in µs), in start order."""
    kernels = [Kernel(e["name"], float(e["ts"]), float(e["dur"]))
               for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]
    return sorted(kernels, key=lambda k: k.start_us)


def per_position(kernels: list[Kernel], layers: int) -> list[Position]:
    """``kernels`` of ``layers`` identical layers folded into one ``Position`` per kernel of
    a layer (the first kernel's gap is measured from the previous layer's last; layer 0's
    first has none and is left out of its median). ``ValueError`` unless the kernels split
    evenly into the layers."""
    if layers < 1 or not kernels or len(kernels) % layers:
        raise ValueError(f"{len(kernels)} kernels do not split into {layers} layers")
    period = len(kernels) // layers
    positions = []
    for index in range(period):
        runs = range(index, len(kernels), period)
        gaps = [kernels[i].start_us - kernels[i - 1].end_us for i in runs if i > 0]
        positions.append(Position(
            index, kernels[index].name,
            statistics.median(kernels[i].duration_us for i in runs),
            statistics.median(gaps) if gaps else float("nan")))
    return positions


def layer_period_us(kernels: list[Kernel], layers: int) -> float:
    """The median time from one layer's first kernel start to the next layer's."""
    period = len(kernels) // layers
    starts = [kernels[i].start_us for i in range(0, len(kernels), period)]
    return statistics.median(b - a for a, b in itertools.pairwise(starts))


def replay_kernels(graph) -> list[Kernel]:
    """The kernels of one replay of ``graph`` (a ``torch.cuda.CUDAGraph``), recorded by
    torch.profiler (CUPTI) after a warm replay."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        return trace_kernels(json.loads(path.read_text()))
