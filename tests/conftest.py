"""Shared fixtures: an isolated kernel cache, and the GPU marker's skip."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_kernel_cache(tmp_path_factory):
    """Build kernels into a fresh cache directory, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TVM_FUSED_CACHE_DIR", str(tmp_path_factory.mktemp("kernel-cache")))
    yield
    mp.undo()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
