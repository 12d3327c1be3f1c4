"""GPU benchmarks: every provider of the op checked, then timed on the same inputs.

A provider is a function ``(inputs, out) -> None`` doing the whole op. Each is first checked
against the float64 reference on its own copy of the inputs, then timed with CUDA events on a
cold L2 (``timing.time_cuda``). Rows carry the GPU name and library versions, so numbers
from different machines are never mixed up.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
from collections.abc import Callable
from pathlib import Path

import torch
import tvm

from .api import fused_rope_rmsnorm
from .build import cuda_target
from .checking import check_run
from .config import OpConfig
from .inputs import OpInputs
from .schedules import default_schedule_config
from .timing import op_bytes, time_cuda
from .torch_baseline import torch_fused_rope_rmsnorm
from .tuning.records import default_logs_dir, schedule_for
from .tuning.workload import bucket_inputs

Provider = Callable[[OpInputs, torch.Tensor], None]


def tvm_provider(schedule=None) -> Provider:
    def run(inputs: OpInputs, out: torch.Tensor) -> None:
        fused_rope_rmsnorm(*inputs.args(), out=out, validate=False, schedule=schedule)

    return run


def torch_provider(inputs: OpInputs, out: torch.Tensor) -> None:
    torch_fused_rope_rmsnorm(*inputs.args(), num_tokens=inputs.q_rope.shape[0], out=out)


def schedule_providers(op: OpConfig, tokens: int) -> dict[str, Provider]:
    """The tuned schedule of ``tokens``' bucket, the hand-written default, plain torch."""
    gpu = torch.cuda.get_device_name()
    tuned = schedule_for(default_logs_dir(), gpu, op, tokens)
    providers = {"tvm-fused default": tvm_provider(default_schedule_config(cuda_target()))}
    if tuned is not None:
        providers["tvm-fused tuned"] = tvm_provider(tuned)
    providers["torch eager"] = torch_provider
    return providers


@dataclasses.dataclass
class Row:
    gpu: str
    provider: str
    heads: int
    tokens: int
    dtype: str
    median_us: float
    p20_us: float
    p80_us: float
    tb_per_s: float
    max_q_ulp: float
    max_norm_ulp: float
    date: str
    versions: str


def measure(op: OpConfig, tokens: int, providers: dict[str, Provider], reps: int = 100,
            log=print) -> list[Row]:
    """Check, then time, each provider on the bucket inputs of ``tokens`` tokens."""
    gpu = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, tvm {tvm.__version__}, cuda {torch.version.cuda}"
    base = bucket_inputs(op, tokens, device="cuda")
    moved = op_bytes(tokens, op.num_q_heads, op.rope_dim, op.kv_norm_dim, base.q_rope.dtype)
    rows = []
    for name, provider in providers.items():
        inputs = base.clone()
        out = torch.randn_like(inputs.q_rope)
        out_before = out.clone()
        provider(inputs, out)
        torch.cuda.synchronize()
        report = check_run(base, inputs, out, out_before)
        if not report.ok:
            raise AssertionError(f"{name} is wrong at {tokens} tokens: {report.summary()}")
        timing = time_cuda(lambda p=provider, i=inputs, o=out: p(i, o), reps=reps)
        row = Row(gpu, name, op.num_q_heads, tokens, op.dtype, timing.median_us, timing.p20_us,
                  timing.p80_us, moved / timing.median_us / 1e6, report.q_ulps,
                  report.k_norm_ulps, datetime.date.today().isoformat(), versions)
        log(f"{gpu} | {op.num_q_heads:3d} heads | {tokens:6d} tokens | {name:<20} "
            f"{row.median_us:9.2f} us (p20 {row.p20_us:.2f}, p80 {row.p80_us:.2f}) "
            f"{row.tb_per_s:6.3f} TB/s")
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
