"""The kernel cache: a second process loads the built module without compiling; a damaged
file is detected and rebuilt; an edited schedule or definition gets a new key."""

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tvm_fused import Form
from tvm_fused.compiler import kernel_cache
from tvm_fused.compiler.build import CPU_TARGET, as_target

RUN_ONCE = textwrap.dedent("""
    import sys, torch, tvm_fused, tvm_fused.compiler.kernel_cache as cache
    if sys.argv[1] == "forbid-build":
        def refuse(*args, **kwargs):
            raise AssertionError("compiled although the disk cache holds the kernel")
        cache.build = refuse
    from tvm_fused.testing.compare import run_and_check
    from tvm_fused.testing.inputs import make_inputs
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
    assert len(list(tmp_path.glob("*/*.so"))) == 1
    second = _run(tmp_path, "forbid-build")
    assert second.returncode == 0, second.stderr


def test_truncated_cache_file_is_rebuilt_with_a_warning(tmp_path):
    assert _run(tmp_path, "build").returncode == 0
    (library,) = tmp_path.glob("*/*.so")
    library.write_bytes(library.read_bytes()[:100])
    rerun = _run(tmp_path, "build")
    assert rerun.returncode == 0, rerun.stderr
    assert "rebuilding unreadable cached kernel" in rerun.stderr
    assert library.stat().st_size > 100


def test_key_depends_on_config_target_and_schedule():
    target = as_target(CPU_TARGET)
    base = kernel_cache.kernel_key(Form(), target, None)
    assert base == kernel_cache.kernel_key(Form(), target, None)
    assert base != kernel_cache.kernel_key(Form(page_size=64), target, None)
    assert base != kernel_cache.kernel_key(Form(), as_target("cuda"), None)


@pytest.mark.parametrize("text", ["", "not a library"])
def test_load_of_a_broken_file_returns_none(tmp_path, text):
    path = tmp_path / "broken.so"
    path.write_text(text)
    with pytest.warns(UserWarning, match="rebuilding"):
        assert kernel_cache._load(path) is None


DIGEST = textwrap.dedent("""
    import importlib.abc, importlib.util, sys
    from pathlib import Path
    root, layout = Path(sys.argv[1]), sys.argv[2]
    sys.path.insert(0, str(root))
    if layout == "editable":  # schedules/ beside the package, mapped in as setuptools does
        class Schedules(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name != "tvm_fused.schedules":
                    return None
                return importlib.util.spec_from_file_location(
                    name, root / "schedules" / "__init__.py",
                    submodule_search_locations=[str(root / "schedules")])
        sys.meta_path.insert(0, Schedules())
    from tvm_fused.compiler import kernel_cache as cache
    assert all(str(d).startswith(str(root)) for d in cache.source_dirs()), cache.source_dirs()
    print(cache.source_digest())
""")


@pytest.mark.parametrize("layout", ["editable", "installed"])
@pytest.mark.parametrize("edited", ["schedules/norm.py", "tvm_fused/compiler/definition.py"])
def test_editing_a_source_changes_the_kernel_key(tmp_path, layout, edited):
    """A copy of the package in either install layout (``schedules/`` beside the package, as
    the README's editable install leaves it, or inside it): editing a schedule or the
    definition changes the source digest that keys every cached kernel."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "tvm_fused", tmp_path / "tvm_fused",
                    ignore=shutil.ignore_patterns("__pycache__"))
    schedules = tmp_path / ("schedules" if layout == "editable" else "tvm_fused/schedules")
    shutil.copytree(repo / "schedules", schedules, ignore=shutil.ignore_patterns("__pycache__"))

    def digest():
        run = subprocess.run([sys.executable, "-c", DIGEST, str(tmp_path), layout],
                             capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    before = digest()
    path = (schedules / Path(edited).name) if edited.startswith("schedules") else \
        tmp_path / edited
    path.write_text(path.read_text() + "\n# edited\n")
    assert digest() != before


def test_stale_kernels_are_pruned_and_the_cache_is_capped(tmp_path, monkeypatch):
    """A build prunes what no current source reaches (other source folders and files of the
    flat layout, unused for a week) and then the least recently used kernels beyond the cap;
    recent kernels of other sources and the one just built stay."""
    monkeypatch.setenv("TVM_FUSED_CACHE_DIR", str(tmp_path))
    week_ago = time.time() - 8 * 86400
    stale_dir, recent_dir = tmp_path / "tvm0.1-old", tmp_path / "tvm0.1-other"
    for folder in (stale_dir, recent_dir):
        folder.mkdir()
        (folder / "fused_rope_rmsnorm-x.so").write_bytes(b"x" * 1000)
    flat = tmp_path / "fused_rope_rmsnorm-flat.so"
    flat.write_bytes(b"x")
    for path in (stale_dir / "fused_rope_rmsnorm-x.so", stale_dir, flat):
        os.utime(path, (week_ago, week_ago))
    kernel_cache.get_kernel(Form(num_q_heads=2, page_size=4), CPU_TARGET)
    assert not stale_dir.exists() and not flat.exists()
    assert (recent_dir / "fused_rope_rmsnorm-x.so").exists()

    monkeypatch.setenv("TVM_FUSED_CACHE_MAX_MB", "0")  # room for the newest kernel only
    kernel_cache.get_kernel(Form(num_q_heads=3, page_size=4), CPU_TARGET)
    assert len(list(tmp_path.glob("*/*.so"))) == 1


def test_pruning_leaves_other_processes_alone(tmp_path, monkeypatch):
    """Another process's build in progress (its temporary file) survives a prune over the
    cap, and files that vanish while a prune lists them (renamed into place, or pruned by
    another process) do not fail the call (seen with 16 fuzz processes on the GPU)."""
    monkeypatch.setenv("TVM_FUSED_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TVM_FUSED_CACHE_MAX_MB", "0")
    other = tmp_path / "tvm0.1-other"
    other.mkdir()
    in_progress = other / "fused_rope_rmsnorm-y1234.tmp.so"
    in_progress.write_bytes(b"x" * 1000)
    glob = Path.glob

    def glob_with_vanished(self, pattern):  # one more entry, gone before its stat
        yield from glob(self, pattern)
        yield self / "fused_rope_rmsnorm-gone.so"

    monkeypatch.setattr(Path, "glob", glob_with_vanished)
    kernel_cache.get_kernel(Form(num_q_heads=2, page_size=2), CPU_TARGET)
    assert in_progress.exists()
