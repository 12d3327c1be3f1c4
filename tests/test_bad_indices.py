"""Indices that point nowhere (SPEC.md): with every ``validate`` setting, on every device, no
index makes the op read or write outside its tensors.

``validate=True`` (and the default on the CPU) refuses bad contents before anything is
written; otherwise the kernel skips each error token (no row of it written) and counts it,
and a negative page means "no cache row". Every storage carries guards around its tensor
(``tvm_fused.testing.inputs.GUARD``), and the checks compare whole storages bit for bit.
"""

import pytest
import torch

from tvm_fused import fused_rope_rmsnorm
from tvm_fused.testing.compare import run_and_check
from tvm_fused.testing.inputs import q_like

from .cases import BAD_INDICES, MALFORMED, bad_index_inputs, snapshot, unchanged

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
VALIDATE = pytest.mark.parametrize("validate", [True, None, False],
                                   ids=["validate", "default", "unchecked"])
FORM = pytest.mark.parametrize("form", ["in-place", "write-through", "fp8-e5m2-scaled"])


def _refused_on(device, validate) -> bool:
    """Whether the call checks contents (and so raises on bad ones) before launching."""
    return validate is True or (validate is None and device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
@FORM
@VALIDATE
@pytest.mark.parametrize("case", BAD_INDICES)
def test_bad_index_is_refused_or_skipped_and_counted(device, form, validate, case):
    corrupt, errors = BAD_INDICES[case]
    inputs = bad_index_inputs(device, form)
    corrupt(inputs)
    if errors and _refused_on(device, validate):
        before = snapshot(inputs)
        with pytest.raises(ValueError):
            fused_rope_rmsnorm(*inputs.args(), **inputs.latent(), validate=validate)
        assert unchanged(inputs, before)
        return
    for in_place in (False, True):
        report = run_and_check(inputs.clone(), in_place=in_place, validate=validate)
        assert report.ok and report.errors_expected == errors, report.summary()


def _outside(tensor, storage):
    """Mask of the elements of ``storage`` that ``tensor`` (a view of it) does not cover."""
    mask = torch.ones_like(storage, dtype=torch.bool)
    mask.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()).fill_(False)
    return mask


@pytest.mark.parametrize("device", DEVICES)
@FORM
@VALIDATE
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_offsets_and_shared_rows_stay_in_bounds(device, form, validate, case):
    inputs = bad_index_inputs(device, form)
    MALFORMED[case](inputs)
    if _refused_on(device, validate):
        before = snapshot(inputs)
        with pytest.raises(ValueError):
            fused_rope_rmsnorm(*inputs.args(), **inputs.latent(), validate=validate)
        assert unchanged(inputs, before)
        return
    before = inputs.clone()
    q = inputs.q_rope
    out_storage, out = q_like(*q.shape, (q.shape[2], 0), q.dtype, torch.Generator())
    out_storage = out_storage.to(device)
    out = out_storage.as_strided(out.shape, out.stride(), out.storage_offset())
    out_before = out_storage.clone()
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    fused_rope_rmsnorm(*inputs.args(), **inputs.latent(), out=out, errors=errors,
                       validate=validate)
    assert torch.equal(inputs.q_storage, before.q_storage)  # read only
    if inputs.kv_input is not None:
        assert torch.equal(inputs.kv_storage, before.kv_storage)
    cache_mask = _outside(inputs.k_cache, inputs.cache_storage)  # guards, other layers
    assert torch.equal(inputs.cache_storage[cache_mask], before.cache_storage[cache_mask])
    out_mask = _outside(out, out_storage)
    assert torch.equal(out_storage[out_mask], out_before[out_mask])
    total = int(inputs.input_row_offsets[-1])
    padding = out_before.as_strided(out.shape, out.stride(), out.storage_offset())[total:]
    assert torch.equal(out[total:], padding)  # rows past offsets[-1]: untouched
    assert 0 <= int(errors) <= q.shape[0]
