"""GPU benchmarks: every provider of the op checked, then timed on the same inputs.

A provider is a function ``(inputs, out) -> None`` doing the whole op. Each is first run on a
scratch copy of the inputs (compiles, autotunes), then checked against the float64 reference
on a fresh copy, then timed with CUDA events on a cold L2 (``timing.time_cuda``): as issued
from Python, and replayed from a captured CUDA graph (decode sizes); the host time of one
Python call is measured too. Rows carry the GPU name and library versions, and the
device-to-device copy bandwidth measured in the same run, so each row states its fraction of
what the memory system delivers.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import tvm

from tvm_fused import OpConfig, fused_rope_rmsnorm
from tvm_fused.schedules.config import DEFAULT_SCHEDULE
from tvm_fused.testing.compare import check_run
from tvm_fused.testing.inputs import OpInputs, make_inputs
from tvm_fused.timing import op_bytes, time_cuda, time_graph
from tvm_fused.tuning import decisions
from tvm_fused.tuning.buckets import bucket_case, nearest_bucket
from tvm_fused.tuning.layout import default_logs_dir

from .peers.torch_eager import torch_fused_rope_rmsnorm

Provider = Callable[[OpInputs, torch.Tensor], None]

DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
DECODE_MAX = 256
CHECK_MAX_TOKENS = 4096  # the float64 reference runs on the CPU: larger checks take minutes
PREFIX_POOL_PAGES = 64  # decode contexts share cached pages: 256 long requests fit in memory
COPY_BYTES = 1 << 30


def sweep_inputs(op: OpConfig, tokens: int, device="cuda") -> OpInputs:
    """Inputs of ``tokens`` tokens: a decode step (one new token for each of ``tokens``
    requests with 1k-4k cached) up to ``DECODE_MAX``, else a prefill of a few requests.
    ``q_rope`` is the rope view ``q[..., 128:]`` of a full MLA q, as in a model."""
    new_tokens, cache_lengths = bucket_case(tokens, decode_max=DECODE_MAX)
    dtype = getattr(torch, op.dtype)
    return make_inputs(new_tokens, cache_lengths, num_q_heads=op.num_q_heads,
                       rope_dim=op.rope_dim, kv_norm_dim=op.kv_norm_dim,
                       page_size=op.page_size, dtype=dtype, gamma_dtype=dtype,
                       prefix_pool=PREFIX_POOL_PAGES, device=device)


def tvm_provider(schedule, interleaved: bool) -> Provider:
    def run(inputs: OpInputs, out: torch.Tensor) -> None:
        fused_rope_rmsnorm(*inputs.args(), out=out, validate=False, schedule=schedule,
                           interleaved=interleaved)

    return run


def _with_token_count(fn, interleaved: bool) -> Provider:
    """A provider from an implementation that takes the real token count from the host."""
    def run(inputs: OpInputs, out: torch.Tensor) -> None:
        fn(*inputs.args(), num_tokens=inputs.q_rope.shape[0], out=out, interleaved=interleaved)

    return run


@functools.cache
def _compiled_torch():
    return torch.compile(torch_fused_rope_rmsnorm, dynamic=True)


def providers(op: OpConfig, tokens: int, names: tuple[str, ...]) -> dict[str, Provider]:
    """The providers in ``names`` that exist for ``op``: "tvm-fused tuned" only with tuning
    decisions for this GPU, "liger" only for NeoX pairs."""
    from .peers.triton_fused import triton_fused_rope_rmsnorm

    interleaved = op.interleaved
    decided = decisions.for_gpu(str(default_logs_dir()), torch.cuda.get_device_name(), op)
    makers = {
        "tvm-fused tuned": lambda: tvm_provider(
            decided[nearest_bucket(tokens, tuple(decided))], interleaved),
        "tvm-fused default": lambda: tvm_provider(DEFAULT_SCHEDULE, interleaved),
        "triton fused": lambda: lambda inputs, out: triton_fused_rope_rmsnorm(
            *inputs.args(), out=out, interleaved=interleaved),
        "liger": lambda: _with_token_count(_liger(), interleaved),
        "torch.compile": lambda: _with_token_count(_compiled_torch(), interleaved),
        "torch eager": lambda: _with_token_count(torch_fused_rope_rmsnorm, interleaved),
    }
    available = {"tvm-fused tuned": bool(decided), "liger": not interleaved}
    return {name: makers[name]() for name in names if available.get(name, True)}


def _liger():
    from .peers.liger import liger_rope_rmsnorm

    return liger_rope_rmsnorm


@dataclasses.dataclass
class Row:
    gpu: str
    provider: str
    pairing: str
    heads: int
    tokens: int
    regime: str
    dtype: str
    median_us: float
    p20_us: float
    p80_us: float
    graph_us: float
    host_us: float
    tb_per_s: float
    copy_fraction: float
    same_bytes_copy_us: float
    checked: bool
    q_error_of_tolerance: float  # worst error / tolerance of the reference check (<= 1)
    norm_error_of_tolerance: float
    date: str
    versions: str


def copy_us(nbytes: int, reps: int) -> float:
    """Median µs of a device-to-device copy moving ``nbytes`` (half read, half written),
    cold L2."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), reps=reps).median_us


def copy_bandwidth(nbytes: int = COPY_BYTES, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in TB/s (bytes read + written), cold L2."""
    return nbytes / copy_us(nbytes, reps) / 1e6


def host_us(fn, calls: int = 50, batches: int = 7) -> float:
    """Host time of one call of ``fn()`` (enqueueing only): the median over ``batches`` of
    the mean over ``calls`` back-to-back calls (the GPU drains between batches)."""
    fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(means)


def _check(name, provider, base: OpInputs, interleaved: bool, tokens: int):
    """Warm ``provider`` up on a scratch copy, then run it on a fresh copy and check it.
    Returns ``(inputs, out, report)``; report is None past ``CHECK_MAX_TOKENS``."""
    provider(base.clone(), torch.empty_like(base.q_rope))
    inputs = base.clone()
    out = torch.randn_like(inputs.q_rope)
    out_before = out.clone()  # out is its whole storage
    provider(inputs, out)
    torch.cuda.synchronize()
    if tokens > CHECK_MAX_TOKENS:
        return inputs, out, None
    report = check_run(base, inputs, out, out_before, interleaved=interleaved)
    if not report.ok:
        raise AssertionError(f"{name} is wrong at {tokens} tokens: {report.summary()}")
    return inputs, out, report


def _graph_us(call, reps: int, log) -> float:
    """Median replay time of ``call`` captured in a CUDA graph; NaN if it cannot be captured."""
    try:
        return time_graph(call, reps=reps).median_us
    except Exception as error:
        log(f"  CUDA graph capture failed: {error!r}"[:500])
        return math.nan


def measure(op: OpConfig, tokens: int, provider_map: dict[str, Provider], copy_tb_s: float,
            failures: list[str], reps: int = 100, log=print) -> list[Row]:
    """Check, then time, each provider on ``sweep_inputs(op, tokens)``; a provider that
    raises or computes a wrong result is logged and appended to ``failures``."""
    gpu = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, tvm {tvm.__version__}, cuda {torch.version.cuda}"
    base = sweep_inputs(op, tokens)
    moved = op_bytes(tokens, op.num_q_heads, op.rope_dim, op.kv_norm_dim, base.q_rope.dtype)
    same_bytes_copy = copy_us(moved, reps)
    decode = tokens <= DECODE_MAX
    rows = []
    for name, provider in provider_map.items():
        try:
            inputs, out, report = _check(name, provider, base, op.interleaved, tokens)
        except Exception as error:
            log(f"{gpu} | {op.num_q_heads:3d} heads | {tokens:6d} tok | {name:<17} FAILED: "
                f"{error!r}"[:2000])
            failures.append(f"{name} at {tokens} tokens, {op.num_q_heads} heads: {error!r}")
            continue

        def call(p=provider, i=inputs, o=out):
            p(i, o)

        timing = time_cuda(call, reps=reps)
        graph_us = _graph_us(call, reps, log) if decode else math.nan
        host = host_us(call) if decode else math.nan
        tb_s = moved / timing.median_us / 1e6
        row = Row(gpu, name, "gptj" if op.interleaved else "neox", op.num_q_heads, tokens,
                  "decode" if decode else "prefill", op.dtype, timing.median_us,
                  timing.p20_us, timing.p80_us, graph_us, host, tb_s, tb_s / copy_tb_s,
                  same_bytes_copy, report is not None,
                  report.q_error if report else math.nan,
                  report.k_norm_error if report else math.nan,
                  datetime.date.today().isoformat(), versions)
        log(f"{gpu} | {row.pairing} {op.num_q_heads:3d} heads | {tokens:6d} tok | {name:<17} "
            f"{row.median_us:9.2f} us (p20 {row.p20_us:.2f}, p80 {row.p80_us:.2f}) graph "
            f"{graph_us:7.2f} us host {host:6.2f} us {tb_s:6.3f} TB/s "
            f"({100 * row.copy_fraction:5.1f}% of copy) checked={row.checked}")
        rows.append(row)
    return rows


def write_csv(rows: list[Row], path: Path) -> None:
    """Append ``rows`` to the CSV at ``path`` (with a header if the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(Row)])
        if new:
            writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)


ALL_PROVIDERS = ("tvm-fused tuned", "tvm-fused default", "triton fused", "liger",
                 "torch.compile", "torch eager")
# (heads, interleaved, token counts, providers): the sweep of the README's performance section
SUITE = (
    (128, True, DECODE_TOKENS + PREFILL_TOKENS, ALL_PROVIDERS),
    (128, False, (1, 64, 256, 4096, 32768),
     ("tvm-fused default", "triton fused", "liger", "torch eager")),
    (16, True, (4096, 32768), ("tvm-fused default", "triton fused")),
    (64, True, (4096, 32768), ("tvm-fused default", "triton fused")),
)


def run_suite(parts, base: OpConfig, csv_path: Path | None, reps: int = 100,
              log=print) -> tuple[list[Row], list[str]]:
    """Measure every part ``(heads, interleaved, token counts, providers)`` of ``parts`` on
    ``base``'s other dims; rows are appended to ``csv_path`` as each token count finishes.
    Returns the rows and the failures (providers that raised or were wrong)."""
    copy_tb_s = copy_bandwidth()
    log(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_tb_s:.3f} TB/s "
        f"({COPY_BYTES >> 20} MiB read + written, cold L2)")
    rows, failures = [], []
    for heads, interleaved, token_counts, names in parts:
        op = dataclasses.replace(base, num_q_heads=heads, interleaved=interleaved)
        for tokens in token_counts:
            measured = measure(op, tokens, providers(op, tokens, names), copy_tb_s, failures,
                               reps, log)
            if csv_path is not None:
                write_csv(measured, csv_path)
            rows += measured
    return rows, failures
