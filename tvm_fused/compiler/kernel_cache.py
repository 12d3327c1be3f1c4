"""Built kernels, cached in memory and on disk.

A kernel is keyed by everything its code depends on: the op config, the schedule config, the
target (with its GPU arch), the TVM version and a digest of the Python sources of this
package and of its schedules, wherever the install put them (an editable install leaves
``schedules/`` outside the package folder).
The disk cache (``$TVM_FUSED_CACHE_DIR``, default ``~/.cache/tvm_fused``) holds one shared
library per key in a folder per TVM version and source digest, written to a temporary name
and renamed into place, so concurrent first uses never see a partial file; a file that fails
to load is rebuilt. After each build the cache is pruned: folders of other sources unused
for ``STALE_AFTER_DAYS`` (no current source can reach their kernels) go, then the least
recently used kernels until the cache holds at most ``$TVM_FUSED_CACHE_MAX_MB`` (default
``DEFAULT_MAX_MB``). Deleting the folder clears it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import tvm

from ..schedules import ScheduleConfig
from .build import as_target, build
from .config import OpConfig
from .definition import OP_NAME

_lock = threading.Lock()
_kernels: dict = {}


def source_dirs() -> list[Path]:
    """The folders of the Python sources that decide the generated code: the package's and
    its schedules' (each resolved from the imported module, so any install layout works)."""
    from .. import schedules

    return [Path(__file__).resolve().parents[1], Path(schedules.__file__).resolve().parent]


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """Digest of the sources that decide the generated code."""
    digest = hashlib.sha256()
    for folder in source_dirs():
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


STALE_AFTER_DAYS = 7
DEFAULT_MAX_MB = 1024
_IN_PROGRESS = ".tmp.so"  # a kernel being written, renamed into place when complete


def cache_dir() -> Path:
    """Where built kernels are kept between processes."""
    return Path(os.environ.get("TVM_FUSED_CACHE_DIR", Path.home() / ".cache" / "tvm_fused"))


def _sources_dir() -> Path:
    """The folder of this TVM version and these sources in the cache."""
    return cache_dir() / f"tvm{tvm.__version__}-{source_digest()}"


def _stat(path: Path):
    """``path.stat()``, or None if the file is gone: other processes rename their builds into
    place and prune too."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def prune(keep: Path) -> None:
    """Remove what no current source can reach and has not been used for
    ``STALE_AFTER_DAYS`` (other folders, files of the flat layout of earlier versions), then
    the least recently used kernels beyond the size cap; ``keep`` stays, and so do other
    processes' builds in progress (``*.tmp.so``). Files that vanish meanwhile are skipped."""
    root, now = cache_dir(), time.time()
    for entry in root.iterdir():
        own = _stat(entry)
        if own is None:
            continue
        used = max((s.st_mtime for path in entry.glob("*") if (s := _stat(path))),
                   default=own.st_mtime)  # loads touch their file
        if entry != keep.parent and now - used > STALE_AFTER_DAYS * 86400:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    cap = float(os.environ.get("TVM_FUSED_CACHE_MAX_MB", DEFAULT_MAX_MB)) * 2**20
    kernels = sorted(((s.st_mtime, s.st_size, path) for path in root.glob("*/*.so")
                      if not path.name.endswith(_IN_PROGRESS) and (s := _stat(path))),
                     key=lambda item: item[0])
    total = sum(size for _, size, _ in kernels)
    for _, size, path in kernels:
        if total <= cap:
            break
        if path != keep:
            total -= size
            path.unlink(missing_ok=True)


def kernel_key(op: OpConfig, target: tvm.target.Target, schedule: ScheduleConfig | None) -> str:
    """A file-name-safe key of one build."""
    payload = json.dumps({
        "op": dataclasses.asdict(op),
        "schedule": [type(schedule).__name__, dataclasses.asdict(schedule)] if schedule else None,
        "target": str(target),
        "tvm": tvm.__version__,
        "sources": source_digest(),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _load(path: Path):
    try:
        kernel = tvm.runtime.load_module(str(path))[OP_NAME]
        os.utime(path)  # recently used: the last to be pruned
        return kernel
    except Exception as err:
        warnings.warn(f"tvm_fused: rebuilding unreadable cached kernel {path}: {err}",
                      stacklevel=3)
        return None


def _store(executable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=_IN_PROGRESS)
    os.close(fd)
    try:
        executable.export_library(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def get_kernel(op: OpConfig, target: str | tvm.target.Target,
               schedule: ScheduleConfig | None = None):
    """The callable kernel for ``op`` on ``target``: from memory, else disk, else built."""
    target = as_target(target)
    key = kernel_key(op, target, schedule)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _kernels.get(key)
        if kernel is None:
            path = _sources_dir() / f"{OP_NAME}-{key}.so"
            kernel = _load(path) if path.exists() else None
            if kernel is None:
                executable = build(op, target, schedule)
                _store(executable, path)
                prune(keep=path)
                kernel = executable[OP_NAME]
            _kernels[key] = kernel
    return kernel
