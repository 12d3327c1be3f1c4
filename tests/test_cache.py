"""The kernel cache: a second process loads the built module without compiling; a damaged
file is detected and rebuilt; an edit of code gets a new key, an edit of docstrings not."""

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
from tvm_fused.kernels import kernel, shaping_sources
from tvm_fused.schedules import ScheduleConfig
from tvm_fused.schedules.cpu import CpuScheduleConfig

RUN_ONCE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])  # the package to run: the checkout's, or a copy
    import torch, tvm_fused, tvm_fused.kernels as kernels
    assert kernels.__file__.startswith(sys.argv[2]), kernels.__file__
    assert tvm_fused.schedules.__file__.startswith(sys.argv[2]), tvm_fused.schedules.__file__
    if sys.argv[1] == "forbid-build":
        def refuse(*args, **kwargs):
            raise AssertionError("compiled although the disk cache holds the kernel")
        kernels.compile_module = refuse
    from tvm_fused.testing.compare import run_and_check
    from tvm_fused.testing.inputs import make_inputs
    report = run_and_check(make_inputs([2, 1], [3, 0], num_q_heads=2, page_size=4))
    assert report.ok, report.summary()
""")
REPO = Path(__file__).resolve().parents[1]


def _run(cache_dir, mode, root=REPO):
    env = dict(os.environ, TVM_FUSED_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-c", RUN_ONCE, mode, str(root)], env=env,
                          capture_output=True, text=True, check=False)


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


def test_key_depends_on_form_target_and_schedule():
    target, cpu = as_target(CPU_TARGET), CpuScheduleConfig()
    base = kernel_cache.kernel_key(Form(), cpu, target)
    assert base == kernel_cache.kernel_key(Form(), CpuScheduleConfig(), target)
    assert base != kernel_cache.kernel_key(Form(page_size=64), cpu, target)
    assert base != kernel_cache.kernel_key(Form(norm_rounding="once"), cpu, target)
    assert base != kernel_cache.kernel_key(Form(), CpuScheduleConfig(parallel=False), target)
    assert base != kernel_cache.kernel_key(Form(), ScheduleConfig(), as_target("cuda"))


@pytest.mark.parametrize("text", ["", "not a library"])
def test_load_of_a_broken_file_returns_none(tmp_path, text):
    path = tmp_path / "broken.so"
    path.write_text(text)
    with pytest.warns(UserWarning, match="rebuilding"):
        assert kernel_cache._load(path, "fused_rope_rmsnorm") is None


def _copy_of_the_package(tmp_path) -> Path:
    """A copy of the package with its schedules inside, as a wheel installs them."""
    root = tmp_path / "copy"
    shutil.copytree(REPO / "tvm_fused", root / "tvm_fused",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "schedules", root / "tvm_fused" / "schedules",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tuning_logs", root / "tvm_fused" / "tuning_logs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow
def test_a_docstring_edit_keeps_the_kernels_and_a_schedule_edit_rebuilds(tmp_path):
    """A copy of the package builds its kernel once; after a docstring and a comment edit
    (of the definition and a schedule) a second process loads it without compiling; after
    a change of a schedule's code a third builds a new kernel, under a new source digest."""
    root, cache = _copy_of_the_package(tmp_path), tmp_path / "cache"
    assert _run(cache, "build", root).returncode == 0
    (first,) = cache.glob("*/*.so")
    definition, cpu = root / "tvm_fused/compiler/definition.py", root / "tvm_fused/schedules/cpu.py"
    _edit(definition, "The compute definition of", "The compute definition (edited) of")
    _edit(definition, "# fmt: off", "# fmt: off (edited)")
    _edit(cpu, '"""Knobs of the CPU schedule', '"""(Edited) knobs of the CPU schedule')
    loaded = _run(cache, "forbid-build", root)
    assert loaded.returncode == 0, loaded.stderr
    assert list(cache.glob("*/*.so")) == [first]
    _edit(cpu, "tokens_per_task: int = 4", "tokens_per_task: int = 2")
    assert _run(cache, "forbid-build", root).returncode != 0
    assert _run(cache, "build", root).returncode == 0
    assert len({path.parent for path in cache.glob("*/*.so")}) == 2


def test_the_digest_reads_code_not_docstrings(tmp_path):
    """``source_digest`` of the shaping files: the same after docstring and comment edits,
    another after a change of code."""
    files = [tmp_path / path.name for path in shaping_sources()]
    for source, copy in zip(shaping_sources(), files):
        shutil.copy(source, copy)
    digest = kernel_cache.source_digest.__wrapped__  # uncached: the files change
    before = digest(tuple(files))
    definition = tmp_path / "definition.py"
    _edit(definition, "The compute definition of", "The compute definition (edited) of")
    _edit(definition, "# fmt: off", "# fmt: off (edited)")
    assert digest(tuple(files)) == before
    _edit(tmp_path / "norm.py", "x, y = config.norm_threads_per_row,",
          "x, y = config.norm_threads_per_row + 0,")
    assert digest(tuple(files)) != before


def _kernel(form):
    return kernel(form, as_target(CPU_TARGET), CpuScheduleConfig())


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
    _kernel(Form(num_q_heads=2, page_size=4))
    assert not stale_dir.exists() and not flat.exists()
    assert (recent_dir / "fused_rope_rmsnorm-x.so").exists()

    monkeypatch.setenv("TVM_FUSED_CACHE_MAX_MB", "0")  # room for the newest kernel only
    _kernel(Form(num_q_heads=3, page_size=4))
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

    def glob_with_vanished(self, pattern):  # in the cache, one more entry, gone before its stat
        yield from glob(self, pattern)
        if self.is_relative_to(tmp_path):
            yield self / "fused_rope_rmsnorm-gone.so"

    monkeypatch.setattr(Path, "glob", glob_with_vanished)
    _kernel(Form(num_q_heads=2, page_size=2))
    assert in_progress.exists()
