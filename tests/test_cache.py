"""The kernel cache: a second process loads the built module without compiling; a damaged
file is detected and rebuilt."""

import os
import subprocess
import sys
import textwrap

import pytest

from tvm_fused import OpConfig
from tvm_fused import cache as kernel_cache
from tvm_fused.build import CPU_TARGET, as_target

RUN_ONCE = textwrap.dedent("""
    import sys, torch, tvm_fused, tvm_fused.cache as cache
    if sys.argv[1] == "forbid-build":
        def refuse(*args, **kwargs):
            raise AssertionError("compiled although the disk cache holds the kernel")
        cache.build = refuse
    from tvm_fused.checking import run_and_check
    from tvm_fused.inputs import make_inputs
    report = run_and_check(make_inputs([2, 1], [3, 0], num_q_heads=2, page_size=4))
    assert report.ok, report.summary()
""")


def _run(cache_dir, mode):
    env = dict(os.environ, TVM_FUSED_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-c", RUN_ONCE, mode], env=env, capture_output=True,
                          text=True, check=False)


def test_second_process_loads_without_compiling(tmp_path):
    first = _run(tmp_path, "build")
    assert first.returncode == 0, first.stderr
    assert len(list(tmp_path.glob("*.so"))) == 1
    second = _run(tmp_path, "forbid-build")
    assert second.returncode == 0, second.stderr


def test_truncated_cache_file_is_rebuilt_with_a_warning(tmp_path):
    assert _run(tmp_path, "build").returncode == 0
    (library,) = tmp_path.glob("*.so")
    library.write_bytes(library.read_bytes()[:100])
    rerun = _run(tmp_path, "build")
    assert rerun.returncode == 0, rerun.stderr
    assert "rebuilding unreadable cached kernel" in rerun.stderr
    assert library.stat().st_size > 100


def test_key_depends_on_config_target_and_schedule():
    target = as_target(CPU_TARGET)
    base = kernel_cache.kernel_key(OpConfig(), target, None)
    assert base == kernel_cache.kernel_key(OpConfig(), target, None)
    assert base != kernel_cache.kernel_key(OpConfig(page_size=64), target, None)
    assert base != kernel_cache.kernel_key(OpConfig(), as_target("cuda"), None)


@pytest.mark.parametrize("text", ["", "not a library"])
def test_load_of_a_broken_file_returns_none(tmp_path, text):
    path = tmp_path / "broken.so"
    path.write_text(text)
    with pytest.warns(UserWarning, match="rebuilding"):
        assert kernel_cache._load(path) is None
