"""Indices that point nowhere (SPEC.md): with every ``validate`` setting, on every device, no
index makes the op read or write outside its tensors.

``validate=True`` (and the default on the CPU) refuses bad contents before anything is
written; otherwise the kernel skips each error token (no row of it written) and counts it,
and a negative page means "no cache row". Every storage carries guards around its tensor
(``inputs.GUARD``), and the checks compare whole storages bit for bit.
"""

import pytest
import torch

from tvm_fused import fused_rope_rmsnorm
from tvm_fused.checking import run_and_check
from tvm_fused.inputs import make_inputs, q_like

from .cases import RAGGED

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
VALIDATE = pytest.mark.parametrize("validate", [True, None, False],
                                   ids=["validate", "default", "unchecked"])
INT32_MAX = 2**31 - 1


def _inputs(device):
    # request 2 writes positions 126-130: logical pages 7 and 8 (page size 16); request 3
    # writes position 0; the lookup table has 10 columns
    return make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, padding_rows=2,
                       device=device)


def _set(name, index, value):
    def corrupt(inputs):
        getattr(inputs, name)[index] = value
    corrupt.__name__ = f"{name}[{index}]={value}"
    return corrupt


def _short_freqs(inputs):
    inputs.freqs_cis = inputs.freqs_cis[:130].clone()  # position 130 has no row


def _empty_freqs(inputs):
    inputs.freqs_cis = inputs.freqs_cis[:0].clone()  # no position has a row


def _narrow_table(inputs):
    inputs.lookup_table = inputs.lookup_table[:, :8]  # logical page 8 is past its width


# (corruption, error tokens it makes): each with a defined result
ERRORS = {
    "page at num_pages": (lambda i: _set("lookup_table", (2, 8), i.k_cache.shape[0])(i), 3),
    "huge page": (_set("lookup_table", (2, 8), INT32_MAX), 3),
    "position at len(freqs_cis)": (_short_freqs, 1),
    "empty freqs table": (_empty_freqs, 16),
    "logical page at the table's width": (_narrow_table, 3),
    "huge cache length": (_set("cache_lengths", 3, INT32_MAX), 1),
    "negative cache length": (_set("cache_lengths", 3, -5), 1),
    "no cache row (page -1)": (_set("lookup_table", (2, 8), -1), 0),
    "no cache row (most negative page)": (_set("lookup_table", (2, 7), -2**31), 0),
}


def _snapshot(inputs):
    return [t.clone() for t in (inputs.q_storage, inputs.cache_storage,
                                inputs.input_row_offsets, inputs.lookup_table,
                                inputs.cache_lengths, inputs.freqs_cis, inputs.gamma)]


def _unchanged(inputs, snapshot):
    return all(torch.equal(a, b) for a, b in zip(_snapshot(inputs), snapshot))


def _refused_on(device, validate) -> bool:
    """Whether the call checks contents (and so raises on bad ones) before launching."""
    return validate is True or (validate is None and device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
@VALIDATE
@pytest.mark.parametrize("case", ERRORS)
def test_bad_index_is_refused_or_skipped_and_counted(device, validate, case):
    corrupt, errors = ERRORS[case]
    inputs = _inputs(device)
    corrupt(inputs)
    if errors and _refused_on(device, validate):
        snapshot = _snapshot(inputs)
        with pytest.raises(ValueError):
            fused_rope_rmsnorm(*inputs.args(), validate=validate)
        assert _unchanged(inputs, snapshot)
        return
    for in_place in (False, True):
        report = run_and_check(inputs.clone(), in_place=in_place, validate=validate)
        assert report.ok and report.errors_expected == errors, report.summary()


def _offsets(values):
    def corrupt(inputs):
        inputs.input_row_offsets = torch.tensor(values, dtype=torch.int64).to(
            inputs.input_row_offsets.dtype).to(inputs.q_rope.device)
    return corrupt


# offsets with no defined result (rows 0..17 real, 2 padding rows): the kernel must still stay
# inside its tensors and leave rows past offsets[-1] alone
MALFORMED = {
    "offsets not from 0": _offsets([2, 3, 3, 8, 9, 16]),
    "offsets decreasing": _offsets([0, 9, 3, 8, 2, 16]),
    "offsets past q's rows": _offsets([0, 3, 3, 8, 9, 4000]),
    "huge offsets": _offsets([0, 3, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]),
    "two tokens on one cache row": lambda i: _set(  # request 4's page 2 is request 0's page 0
        "lookup_table", (4, 2), int(i.lookup_table[0, 0]))(i),
}


def _outside(tensor, storage):
    """Mask of the elements of ``storage`` that ``tensor`` (a view of it) does not cover."""
    mask = torch.ones_like(storage, dtype=torch.bool)
    mask.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()).fill_(False)
    return mask


@pytest.mark.parametrize("device", DEVICES)
@VALIDATE
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_offsets_and_shared_rows_stay_in_bounds(device, validate, case):
    inputs = _inputs(device)
    MALFORMED[case](inputs)
    if _refused_on(device, validate):
        snapshot = _snapshot(inputs)
        with pytest.raises(ValueError):
            fused_rope_rmsnorm(*inputs.args(), validate=validate)
        assert _unchanged(inputs, snapshot)
        return
    before = inputs.clone()
    q = inputs.q_rope
    out_storage, out = q_like(*q.shape, (q.shape[2], 0), q.dtype, torch.Generator())
    out_storage = out_storage.to(device)
    out = out_storage.as_strided(out.shape, out.stride(), out.storage_offset())
    out_before = out_storage.clone()
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    fused_rope_rmsnorm(*inputs.args(), out=out, errors=errors, validate=validate)
    assert torch.equal(inputs.q_storage, before.q_storage)  # read only
    cache_mask = _outside(inputs.k_cache, inputs.cache_storage)  # guards, other layers
    assert torch.equal(inputs.cache_storage[cache_mask], before.cache_storage[cache_mask])
    out_mask = _outside(out, out_storage)
    assert torch.equal(out_storage[out_mask], out_before[out_mask])
    total = int(inputs.input_row_offsets[-1])
    padding = out_before.as_strided(out.shape, out.stride(), out.storage_offset())[total:]
    assert torch.equal(out[total:], padding)  # rows past offsets[-1]: untouched
    assert 0 <= int(errors) <= q.shape[0]
