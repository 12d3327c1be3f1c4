"""Where tuning results live: ``tuning_logs/<gpu slug>/<op key>/`` (installed as
``tvm_fused.tuning_logs``), one folder per GPU model and op configuration."""

from __future__ import annotations

import re
from pathlib import Path

from ..compiler.config import OpConfig

CPU_DEVICE = "cpu-llvm"  # the "GPU" name of records tuned on the CPU


def default_logs_dir() -> Path:
    """The committed results: ``tuning_logs/``, installed as ``tvm_fused.tuning_logs``."""
    from .. import tuning_logs

    return Path(tuning_logs.__file__).resolve().parent


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def op_key(op: OpConfig) -> str:
    """The folder of an op: the dims, dtypes, form and launch the best knobs depend on (in
    place: no suffix; write-through: ``-write-through``, then ``-kv-output`` if it writes
    one and the cache dtype if fp8; then ``-pdl`` or ``-pdl-early-indices`` for a PDL launch,
    whose best schedule differs: what follows the wait is all that counts)."""
    pairing = "gptj" if op.interleaved else "neox"
    form = ""
    if op.write_through:
        form = ("-write-through" + ("-kv-output" if op.kv_output else "")
                + (f"-{op.cache_dtype}" if op.cache_dtype else ""))
    if op.pdl:
        form += "-pdl-early-indices" if op.pdl_early_indices else "-pdl"
    return (f"{op.dtype}-h{op.num_q_heads}-r{op.rope_dim}-d{op.kv_norm_dim}-p{op.page_size}-"
            f"{pairing}{form}")


def records_dir(logs_dir: Path, gpu_name: str, op: OpConfig) -> Path:
    return Path(logs_dir) / gpu_slug(gpu_name) / op_key(op)
