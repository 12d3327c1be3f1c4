"""The benchmark peers compute the same op: checked against the float64 reference."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tvm_fused.testing.compare import check_run
from tvm_fused.testing.inputs import make_inputs

from .cases import RAGGED

INTERPRETED = textwrap.dedent("""
    import torch
    from tvm_fused.testing.compare import check_run
    from tvm_fused.testing.inputs import make_inputs
    from benchmarks.peers.triton_fused import triton_fused_rope_rmsnorm
    for dtype, interleaved in ((torch.float32, True), (torch.bfloat16, False)):
        inputs = make_inputs([3, 0, 2], [5, 1, 14], num_q_heads=4, page_size=16, dtype=dtype,
                             padding_rows=2)
        before = inputs.clone()
        out = torch.randn_like(inputs.q_rope)
        out_before = out.clone()
        triton_fused_rope_rmsnorm(*inputs.args(), out=out, interleaved=interleaved,
                                  heads_per_program=2)
        report = check_run(before, inputs, out, out_before, interleaved=interleaved)
        assert report.ok, report.summary()
""")


def test_triton_fused_peer_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_triton_fused_peer_on_the_gpu(interleaved):
    from benchmarks.peers.triton_fused import triton_fused_rope_rmsnorm

    inputs = make_inputs(*RAGGED, num_q_heads=128, padding_rows=3, device="cuda")
    before = inputs.clone()
    out = torch.randn_like(inputs.q_rope)
    out_before = out.clone()
    triton_fused_rope_rmsnorm(*inputs.args(), out=out, interleaved=interleaved)
    report = check_run(before, inputs, out, out_before, interleaved=interleaved)
    assert report.ok, report.summary()


@pytest.mark.gpu
def test_liger_peer_on_the_gpu():
    pytest.importorskip("liger_kernel")
    from benchmarks.peers.liger import liger_rope_rmsnorm

    inputs = make_inputs(*RAGGED, num_q_heads=128, padding_rows=3, device="cuda")
    before = inputs.clone()
    out = torch.randn_like(inputs.q_rope)
    out_before = out.clone()
    real_tokens = int(inputs.input_row_offsets[-1])  # the rows past it are padding
    liger_rope_rmsnorm(*inputs.args(), num_tokens=real_tokens, out=out)
    report = check_run(before, inputs, out, out_before, interleaved=False)
    assert report.ok, report.summary()


def test_liger_peer_refuses_interleaved_pairs():
    pytest.importorskip("liger_kernel")
    from benchmarks.peers.liger import liger_rope_rmsnorm

    inputs = make_inputs([1], [3], num_q_heads=2)
    with pytest.raises(ValueError, match="NeoX"):
        liger_rope_rmsnorm(*inputs.args(), num_tokens=1, interleaved=True)


def _check_torch_baseline(fn, device: str, interleaved: bool):
    inputs = make_inputs(*RAGGED, num_q_heads=8, padding_rows=3, device=device)
    before = inputs.clone()
    out = torch.randn_like(inputs.q_rope)
    out_before = out.clone()
    real_tokens = int(inputs.input_row_offsets[-1])  # the rows past it are padding
    fn(*inputs.args(), num_tokens=real_tokens, out=out, interleaved=interleaved)
    report = check_run(before, inputs, out, out_before, interleaved=interleaved)
    assert report.ok, report.summary()


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_torch_eager_baseline(interleaved):
    from benchmarks.peers.torch_eager import torch_fused_rope_rmsnorm

    _check_torch_baseline(torch_fused_rope_rmsnorm, "cpu", interleaved)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_compile_baseline(device):
    """The torch.compile peer compiles (Inductor once refused ``searchsorted`` over a slice
    on CUDA) and stays correct."""
    from benchmarks.peers.torch_eager import torch_fused_rope_rmsnorm

    _check_torch_baseline(torch.compile(torch_fused_rope_rmsnorm, dynamic=True), device, True)
