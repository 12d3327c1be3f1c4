"""scripts/decode_phases.py (a GPU probe): its rewrites of the generated CUDA, checked on the
CPU: each variant keeps or stops the block groups it names, and nvcc compiles it."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tvm_fused import Form, cuda_source
from tvm_fused.schedules.config import default_for_tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import decode_phases as phases

FORM = Form(num_q_heads=128)


@pytest.fixture(scope="module")
def source():
    return cuda_source(FORM, schedule=default_for_tokens(1, FORM))


def _groups_returning(code: str) -> list[str]:
    tests = list(phases.GROUP_TEST.finditer(code))
    names = phases._group_names(code, tests)
    return [name for test, name in zip(tests, names)
            if code[test.end():].startswith("return;")]


def test_variants_stop_the_groups_they_name(source):
    assert phases._group_names(source, list(phases.GROUP_TEST.finditer(source))) == [
        "norm", "k", "q", "count"]  # the decode default opens the grid with the norm group
    assert _groups_returning(phases.rewrite("base", source)) == []
    assert _groups_returning(phases.rewrite("only-norm", source)) == ["k", "q", "count"]
    assert _groups_returning(phases.rewrite("none", source)) == ["norm", "k", "q", "count"]
    assert _groups_returning(phases.rewrite("cut:q:2", source)) == ["norm", "k", "count"]
    lazy = phases.rewrite("lazy", source)
    assert "__ldg(" in source and "__ldg(" not in lazy
    assert lazy.count("offsets_ptr[") == source.count("offsets_ptr[")
    for point in (1, 2, 3):
        cut = phases.rewrite(f"cut:norm:{point}", source)
        assert cut.count("errors_ptr[0] = 1; } return;") == 1


@pytest.mark.parametrize("variant", ["lazy", "cut:norm:3", "cut:q:1", "bounds:16"])
def test_variants_compile(source, variant, tmp_path):
    """Each variant compiles; ``bounds:16`` to at most 32 registers a thread (16 blocks of
    128 threads an SM), without spilling."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    path = tmp_path / "k.cu"
    path.write_text(phases.rewrite(variant, source))
    result = subprocess.run([nvcc, "-cubin", "-arch=sm_90a", "-Xptxas", "-v", "-o",
                             str(tmp_path / "k.cubin"), str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    if variant == "bounds:16":
        assert "__launch_bounds__(128, 16)" in path.read_text()
        assert int(re.findall(r"Used (\d+) registers", result.stderr)[-1]) <= 32
        assert "0 bytes spill stores" in result.stderr


def test_the_fp8_query_forms_name_their_nope_group():
    """The fp8 query's forms (``fq``, ``fqds``) have a nope group of their own, which
    ``only-nope`` keeps alone; the Triton peer is timed only beside the forms it writes."""
    form = phases.FORMS["fq"]
    code = cuda_source(form, schedule=default_for_tokens(64, form))
    assert sorted(phases._group_names(code, list(phases.GROUP_TEST.finditer(code)))) == [
        "count", "k", "nope", "norm", "q"]
    assert _groups_returning(phases.rewrite("only-nope", code)) and \
        "nope" not in _groups_returning(phases.rewrite("only-nope", code))
    assert phases.TRITON_FORMS == {"ip", "wt", "fp8"} < set(phases.FORMS)


def test_knob_variants_name_a_schedule():
    config = phases.schedule_of("cfg:norm_first=1+grid_blocks=264", FORM, 32768)
    assert config.norm_first is True and config.grid_blocks == 264
    assert phases.schedule_of("base", FORM, 1) is None
    assert re.search("usage", phases.__doc__)


def test_the_empty_peer_takes_the_peers_arguments():
    """The ``triton-empty`` stand-in has the Triton peer's parameters, in order (the peer's
    launch passes them by position)."""
    pytest.importorskip("triton")
    from benchmarks.peers.triton_fused import _fused_kernel

    assert phases._empty_peer_kernel().arg_names == _fused_kernel.fn.arg_names
