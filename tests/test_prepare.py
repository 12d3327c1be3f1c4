"""The kernel map and ``prepare``: one entry per form and device, kernels built when first
needed or all at once by ``prepare``, after which a call (captured into a CUDA graph or not)
builds and allocates nothing."""

import pytest
import torch

import tvm_fused
from tvm_fused import dispatch, kernels
from tvm_fused.form import Form
from tvm_fused.testing.compare import check_run, run_and_check
from tvm_fused.testing.inputs import inputs_for

from .cases import RAGGED

FORMS = [Form(num_q_heads=4, page_size=16),
         Form(num_q_heads=4, page_size=16, write_through=True, cache_dtype="float8_e4m3fn"),
         Form(num_q_heads=4, page_size=16, addressing="slots", freqs_layout="split",
              norm_rounding="once", write_through=True, kv_output=True)]


def _refuse_builds(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("built a kernel after prepare")

    monkeypatch.setattr(kernels, "kernel", refuse)


@pytest.mark.parametrize("form", FORMS, ids=lambda form: form.key())
def test_a_call_after_prepare_builds_nothing(form, monkeypatch):
    """``prepare`` makes the form's entry (its key is the one a call computes) with its
    kernels and scratch tensors; the call then adds no entry and builds nothing."""
    tvm_fused.prepare(form, "cpu")
    entries = dict(dispatch.KERNELS)
    _refuse_builds(monkeypatch)
    inputs = inputs_for(form, *RAGGED)
    report = run_and_check(inputs, kv_output=form.kv_output, interleaved=form.interleaved)
    assert report.ok, report.summary()
    assert dispatch.KERNELS == entries


def test_buckets_are_built_when_first_needed(monkeypatch):
    """An entry's kernels are built one bucket at a time, on the first call that needs each
    (on the GPU there are several; on the CPU one)."""
    form = Form(num_q_heads=3, page_size=8)
    entry = dispatch.lookup(dispatch.key_of(form, torch.device("cpu")))
    assert entry.kernels == [None] * len(entry.kernels)
    built = []
    real = kernels.kernel
    monkeypatch.setattr(kernels, "kernel", lambda *args: built.append(args) or real(*args))
    assert run_and_check(inputs_for(form, *RAGGED)).ok
    assert run_and_check(inputs_for(form, [1], [5])).ok
    assert len(built) == 1 and entry.kernels[0] is not None


def test_an_option_the_form_does_not_take_is_refused_before_anything_is_written():
    inputs = inputs_for(Form(num_q_heads=4, page_size=16), *RAGGED)
    before = inputs.clone()
    with pytest.raises(ValueError, match="norm_rounding must be one of"):
        tvm_fused.fused_rope_rmsnorm(*inputs.args(), norm_rounding="twice", validate=False)
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        tvm_fused.fused_rope_rmsnorm(*inputs.args(), interleaved="yes", validate=False)
    assert torch.equal(inputs.cache_storage, before.cache_storage)
    assert torch.equal(inputs.q_storage, before.q_storage)


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS, ids=lambda form: form.key())
def test_a_first_call_captured_after_prepare_replays(form, monkeypatch):
    """An engine's warm-up: ``prepare`` the form, then capture its very first call into a
    CUDA graph (nothing to build or allocate under capture), replay, check."""
    tvm_fused.prepare(form, "cuda")
    _refuse_builds(monkeypatch)
    inputs = inputs_for(form, *RAGGED, device="cuda")
    before = inputs.clone()
    out = torch.empty_like(inputs.q_rope)
    rows = torch.zeros_like(inputs.kv_input) if form.kv_output else None
    rows_before = None if rows is None else rows.clone()
    errors = torch.zeros(1, dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        inputs.call(out=out, kv_output=rows, errors=errors, interleaved=form.interleaved,
                    validate=False)
    graph.replay()
    torch.cuda.synchronize()
    report = check_run(before, inputs, out, errors_counted=int(errors),
                       interleaved=form.interleaved, kv_output=rows,
                       kv_output_storage_before=rows_before)
    assert report.ok, report.summary()


@pytest.mark.gpu
def test_a_first_call_under_capture_without_prepare_is_refused():
    form = Form(num_q_heads=5, page_size=16)  # no other test makes this form
    inputs = inputs_for(form, *RAGGED, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"call tvm_fused\.prepare"), torch.cuda.graph(graph):
        inputs.call(validate=False)
