"""Tuning decisions: what the runtime builds, per GPU, op configuration and token bucket.

Tuning (``tune.py``) writes ``decisions.json`` next to the compacted MetaSchedule records of
``tuning_logs/<gpu>/<op key>/`` (the records are the evidence; ``records.choose`` turns them
into decisions)::

    {"gpu": "NVIDIA H100 80GB HBM3", "op": {...OpConfig...},
     "buckets": {"1": {...ScheduleConfig...}, "8": {...}, ...}}

The runtime reads only this file: plain JSON, no MetaSchedule, no trace decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

from ..compiler.config import OpConfig
from ..schedules.config import ScheduleConfig
from .buckets import BUCKETS
from .layout import op_key, records_dir

DECISIONS = "decisions.json"
# records are tuned on 16-byte-aligned tensors; kernels for narrower ones use the default
TUNED_ALIGNMENT = 16


def write(path: Path, gpu_name: str, op: OpConfig, configs: dict) -> None:
    """Write the decisions ``configs`` (bucket -> schedule config) of ``op`` on
    ``gpu_name``."""
    decisions = {"gpu": gpu_name, "op": dataclasses.asdict(op),
                 "buckets": {str(tokens): dataclasses.asdict(config)
                             for tokens, config in sorted(configs.items())}}
    (Path(path) / DECISIONS).write_text(json.dumps(decisions, indent=1) + "\n")


def read(path: Path, config_type: type = ScheduleConfig) -> dict:
    """Bucket -> config (a ``config_type``: the GPU's by default) of a decisions folder."""
    buckets = json.loads((Path(path) / DECISIONS).read_text())["buckets"]
    return {int(tokens): config_type(**fields) for tokens, fields in buckets.items()}


_untuned_gpus: set[str] = set()  # folders of GPUs without any decisions, warned about once


@functools.cache
def for_gpu(logs_dir: str, gpu_name: str, op: OpConfig) -> dict[int, ScheduleConfig]:
    """Bucket -> config decided for ``op`` on ``gpu_name``; empty if there are none (with one
    warning for a GPU that has no decisions at all, else one per op), or if ``op`` is for
    tensors narrower than the tuned alignment."""
    if op.alignment < TUNED_ALIGNMENT:
        return {}
    path = records_dir(Path(logs_dir), gpu_name, op)
    if (path / DECISIONS).is_file():
        return read(path)
    gpu = path.parent
    if not gpu.is_dir():
        if str(gpu) not in _untuned_gpus:
            _untuned_gpus.add(str(gpu))
            warnings.warn(f"tvm_fused: no tuning decisions for {gpu.name}; every op uses "
                          "the default schedule", stacklevel=3)
    else:
        warnings.warn(f"tvm_fused: no tuning decisions for {gpu.name}/{op_key(op)}; "
                      "using the default schedule", stacklevel=3)
    return {}


def with_defaults(decided: dict, default_for) -> dict:
    """Bucket -> config for every bucket of ``BUCKETS`` and of ``decided``: the decided
    config where there is one, else ``default_for(bucket)`` (the hand-written default), so
    that a tuning of some buckets leaves the others as they were."""
    return {tokens: decided[tokens] if tokens in decided else default_for(tokens)
            for tokens in sorted({*BUCKETS, *decided})}
