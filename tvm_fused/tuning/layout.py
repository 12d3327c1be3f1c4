"""Where tuning results live: ``tuning_logs/<gpu slug>/<op key>/`` (installed as
``tvm_fused.tuning_logs``), one folder per GPU model and form."""

from __future__ import annotations

import re
from pathlib import Path

from ..form import Form

CPU_DEVICE = "cpu-llvm"  # the "GPU" name of records tuned on the CPU


def default_logs_dir() -> Path:
    """The committed results: ``tuning_logs/``, installed as ``tvm_fused.tuning_logs``."""
    from .. import tuning_logs

    return Path(tuning_logs.__file__).resolve().parent


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def records_dir(logs_dir: Path, gpu_name: str, form: Form) -> Path:
    """The records folder of ``form`` on ``gpu_name``: named by ``Form.key()``, which covers
    every field of the form."""
    return Path(logs_dir) / gpu_slug(gpu_name) / form.key()
