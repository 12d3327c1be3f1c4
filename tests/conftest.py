"""Shared fixtures: an isolated kernel cache, and the GPU marker's skip."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_kernel_cache(tmp_path_factory):
    """Build kernels into a fresh cache directory, never the user's; pytest-xdist's workers
    share one (the cache is safe across processes), so each kernel is built once per run."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "kernel-cache"
    cache.mkdir(exist_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("TVM_FUSED_CACHE_DIR", str(cache))
    yield
    mp.undo()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
