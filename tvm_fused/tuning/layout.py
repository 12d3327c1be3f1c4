"""Where tuning results live: ``<logs dir>/<gpu slug>/<op key>/``, one folder per GPU model
and form. Two logs dirs: the project's committed ``tuning_logs/`` (installed as
``tvm_fused.tuning_logs``, read only) and the user's (``user_logs_dir``), where ``tune``
writes by default and whose decisions the runtime prefers."""

from __future__ import annotations

import re
from pathlib import Path

from ..form import Form

CPU_DEVICE = "cpu-llvm"  # the "GPU" name of records tuned on the CPU


def default_logs_dir() -> Path:
    """The committed results: ``tuning_logs/``, installed as ``tvm_fused.tuning_logs``."""
    from .. import tuning_logs

    return Path(tuning_logs.__file__).resolve().parent


def user_logs_dir() -> Path:
    """The user's tuning results: ``tuning_logs/`` in the kernel cache's folder
    (``$TVM_FUSED_CACHE_DIR``, default ``~/.cache/tvm_fused``)."""
    from ..compiler.kernel_cache import cache_dir

    return cache_dir() / "tuning_logs"


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def records_dir(logs_dir: Path, gpu_name: str, form: Form) -> Path:
    """The records folder of ``form`` on ``gpu_name``: named by ``Form.key()``, which covers
    every field of the form."""
    return Path(logs_dir) / gpu_slug(gpu_name) / form.key()
