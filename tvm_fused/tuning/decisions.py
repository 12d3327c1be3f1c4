"""Tuning decisions: what the runtime builds, per GPU, form and token bucket.

Tuning (``tune.py``) writes ``decisions.json`` next to the compacted MetaSchedule records of
``tuning_logs/<gpu>/<form key>/`` (the records are the evidence; ``records.choose`` turns them
into decisions)::

    {"gpu": "NVIDIA H100 80GB HBM3", "op": {...Form...},
     "buckets": {"1": {...ScheduleConfig...}, "8": {...}, ...}}

The runtime reads only this file: plain JSON, no MetaSchedule, no trace decoding.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from ..form import Form
from ..schedules.config import ScheduleConfig
from .buckets import BUCKETS
from .layout import default_logs_dir, records_dir, user_logs_dir

DECISIONS = "decisions.json"
# records are tuned on 16-byte-aligned tensors; kernels for narrower ones use the default
TUNED_ALIGNMENT = 16


def write(path: Path, gpu_name: str, form: Form, configs: dict) -> None:
    """Write the decisions ``configs`` (bucket -> schedule config) of ``form`` on
    ``gpu_name``."""
    decisions = {"gpu": gpu_name, "op": dataclasses.asdict(form),
                 "buckets": {str(tokens): dataclasses.asdict(config)
                             for tokens, config in sorted(configs.items())}}
    (Path(path) / DECISIONS).write_text(json.dumps(decisions, indent=1) + "\n")


def read(path: Path, config_type: type = ScheduleConfig) -> dict:
    """Bucket -> config (a ``config_type``: the GPU's by default) of a decisions folder."""
    buckets = json.loads((Path(path) / DECISIONS).read_text())["buckets"]
    return {int(tokens): config_type(**fields) for tokens, fields in buckets.items()}


def for_gpu(gpu_name: str, form: Form, logs_dirs: tuple[Path, ...] | None = None
            ) -> dict[int, ScheduleConfig]:
    """Bucket -> config decided for ``form`` on ``gpu_name``, from the first of ``logs_dirs``
    (default: the user's, then the project's) that has decisions for it; empty (with a
    warning) if none has, and for tensors narrower than the tuned alignment. A kernel of
    64-bit indices without decisions of its own takes its 32-bit twin's (the same schedule
    over wider arithmetic)."""
    if form.alignment < TUNED_ALIGNMENT:
        return {}
    twins = (form, dataclasses.replace(form, index_bits=32)) if form.index_bits != 32 else (form,)
    for twin in twins:
        for logs_dir in logs_dirs or (user_logs_dir(), default_logs_dir()):
            path = records_dir(Path(logs_dir), gpu_name, twin)
            if (path / DECISIONS).is_file():
                return read(path)
    warnings.warn(f"tvm_fused: no tuning decisions for {path.parent.name}/{form.key()}; "
                  "using the default schedule", stacklevel=3)
    return {}


def with_defaults(decided: dict, default_for) -> dict:
    """Bucket -> config for every bucket of ``BUCKETS`` and of ``decided``: the decided
    config where there is one, else ``default_for(bucket)`` (the hand-written default), so
    that a tuning of some buckets leaves the others as they were."""
    return {tokens: decided[tokens] if tokens in decided else default_for(tokens)
            for tokens in sorted({*BUCKETS, *decided})}
