"""Built kernels on disk, keyed by everything their code depends on.

A key (``kernel_key``) digests the form, the schedule config, the target, the TVM version and
``source_digest`` of the Python files that shape a kernel (the definition, the passes and
the schedules: the caller names them), read as code: their syntax trees without docstrings,
so that a comment or docstring edit keeps every kernel, and a code change rebuilds them.

The cache (``$TVM_FUSED_CACHE_DIR``, default ``~/.cache/tvm_fused``) holds one shared library
per key in a folder per TVM version and source digest, written to a temporary name and
renamed into place, so concurrent first uses never see a partial file; a file that fails to
load is rebuilt. After each build the cache is pruned: folders of other sources unused for
``STALE_AFTER_DAYS`` go, then the least recently used kernels until the cache holds at most
``$TVM_FUSED_CACHE_MAX_MB`` (default ``DEFAULT_MAX_MB``). Deleting the folder clears it.
"""

from __future__ import annotations

import ast
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
from collections.abc import Callable
from pathlib import Path

import tvm

STALE_AFTER_DAYS = 7
DEFAULT_MAX_MB = 1024
_IN_PROGRESS = ".tmp.so"  # a kernel being written, renamed into place when complete
_building = threading.Lock()


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` with the docstring of every module, class and function removed."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def source_digest(paths: tuple[Path, ...]) -> str:
    """A digest of the code of the Python files ``paths``: their syntax trees without
    docstrings (comments are not in them), in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        tree = _without_docstrings(ast.parse(Path(path).read_text()))
        digest.update(Path(path).name.encode())
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:16]


def kernel_key(form, schedule, target: tvm.target.Target) -> str:
    """A file-name-safe key of one build (``form`` and ``schedule``: dataclasses)."""
    payload = json.dumps({
        "form": dataclasses.asdict(form),
        "schedule": [type(schedule).__name__, dataclasses.asdict(schedule)],
        "target": str(target),
        "tvm": tvm.__version__,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cache_dir() -> Path:
    """Where built kernels are kept between processes."""
    return Path(os.environ.get("TVM_FUSED_CACHE_DIR", Path.home() / ".cache" / "tvm_fused"))


def _stat(path: Path):
    """``path.stat()``, or None if the file is gone: other processes rename their builds into
    place and prune too."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def prune(keep: Path) -> None:
    """Remove what no current source can reach and has not been used for
    ``STALE_AFTER_DAYS`` (other folders, stray files), then the least recently used kernels
    beyond the size cap; ``keep`` stays, and so do other processes' builds in progress
    (``*.tmp.so``). Files that vanish meanwhile are skipped."""
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


def _load(path: Path, name: str):
    try:
        kernel = tvm.runtime.load_module(str(path))[name]
        os.utime(path)  # recently used: the last to be pruned
        return kernel
    except Exception as err:
        warnings.warn(f"tvm_fused: rebuilding unreadable cached kernel {path}: {err}",
                      stacklevel=3)
        return None


def _store(module: tvm.runtime.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=_IN_PROGRESS)
    os.close(fd)
    try:
        module.export_library(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_or_build(name: str, key: str, digest: str,
                  build: Callable[[], tvm.runtime.Module]) -> Callable:
    """The function ``name`` of the kernel ``key`` (of sources ``digest``): loaded from the
    disk cache, else ``build()``, stored and returned."""
    path = cache_dir() / f"tvm{tvm.__version__}-{digest}" / f"{name}-{key}.so"
    with _building:
        kernel = _load(path, name) if path.exists() else None
        if kernel is None:
            module = build()
            _store(module, path)
            prune(keep=path)
            kernel = module[name]
    return kernel
