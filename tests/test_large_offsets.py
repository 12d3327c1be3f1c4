"""Element offsets past 2^31: a cache tensor of more than 2^31 elements (one tensor for every
layer) whose new rows lie past that offset, and q, ``kv_input`` and ``out`` views whose token
stride takes the last tokens past it (as a full q ``[T, 128, 192]`` does from about 87000
tokens). The op on those views must write the same bits as on compact copies of the same
inputs, which are checked against the float64 reference in the same test.

The far tensors are mostly never touched: on the CPU their pages stay unallocated, on the GPU
they take 5-9 GB."""

import dataclasses

import pytest
import torch

import tvm_fused.api
from tvm_fused import Form
from tvm_fused.dispatch import KERNELS, CallKey
from tvm_fused.testing.compare import check_run
from tvm_fused.testing.inputs import OpInputs, inputs_for

FORMS = {
    "in-place": Form(num_q_heads=16),
    "write-through-fp8": Form(num_q_heads=16, write_through=True, cache_dtype="float8_e4m3fn"),
    "write-through-ds-mla-slots": Form(num_q_heads=16, write_through=True,
                                       cache_format="fp8_ds_mla", addressing="slots"),
}
NEW_TOKENS, CACHE_LENGTHS = [3, 2], [60, 200]
TOKEN_STRIDE = 2**29 + 192  # elements: the fifth token starts past 2^31


def _far_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows [T, ...]`` (last dims as they are) in a view whose token stride is
    ``TOKEN_STRIDE`` elements, its other strides kept: token 4 starts past 2^31."""
    inner = rows.stride()[1:]
    span = 1 + sum((size - 1) * step for size, step in zip(rows.shape[1:], inner, strict=True))
    storage = torch.empty((rows.shape[0] - 1) * TOKEN_STRIDE + span, dtype=rows.dtype,
                          device=rows.device)
    far = storage.as_strided(rows.shape, (TOKEN_STRIDE, *inner))
    far.copy_(rows)
    return far


def _far_cache(cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(far, base)``: a cache of ``base + pages`` pages of more than 2^31 elements before
    page ``base``, the given cache's pages copied to pages ``base..``."""
    page_elements = cache.shape[1] * cache.shape[2]
    base = 2**31 // page_elements + 1
    far = torch.empty((base + cache.shape[0], *cache.shape[1:]), dtype=cache.dtype,
                      device=cache.device)
    far[base:] = cache
    return far, base


def _far(inputs: OpInputs) -> tuple[OpInputs, int]:
    """``inputs`` with their tensors moved past 2^31 elements (``_far_rows``, ``_far_cache``);
    the page table and slots shifted by the far cache's ``base`` pages."""
    cache, base = _far_cache(inputs.k_cache)
    table = torch.where(inputs.lookup_table >= 0, inputs.lookup_table + base,
                        inputs.lookup_table)
    far = dataclasses.replace(inputs, q_rope=_far_rows(inputs.q_rope), k_cache=cache,
                              lookup_table=table)
    if inputs.kv_input is not None:
        far.kv_input = _far_rows(inputs.kv_input)
    if inputs.engine:
        slots = inputs.slot_mapping
        far.slot_mapping = torch.where(slots >= 0, slots + base * cache.shape[1], slots)
    return far, base


def _index_bits_of_calls() -> set[int]:
    """The index arithmetic of the kernels called since ``KERNELS`` was last cleared."""
    return {key[CallKey._fields.index("index_bits")] for key in KERNELS}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(FORMS))
def test_offsets_past_two_to_the_31(name, device):
    """The compact call runs the 32-bit kernel; the far one is refused by it and runs the
    64-bit kernel: same bits."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    compact = inputs_for(FORMS[name], NEW_TOKENS, CACHE_LENGTHS, device=device)
    far, base = _far(compact)
    assert far.q_rope[4].data_ptr() - far.q_rope.data_ptr() >= 2**31 * 2
    assert base * far.k_cache.stride(0) >= 2**31
    before = compact.clone()
    KERNELS.clear()
    out = compact.call(out=torch.empty_like(compact.q_rope))
    assert _index_bits_of_calls() == {32}
    report = check_run(before, compact, out)
    assert report.ok, report.summary()
    far_out = _far_rows(torch.zeros_like(compact.q_rope))
    far.call(out=far_out)
    assert _index_bits_of_calls() == {32, 64}
    assert torch.equal(far_out.view(torch.uint8), out.view(torch.uint8))
    assert torch.equal(far.k_cache[base:].view(torch.uint8), compact.k_cache.view(torch.uint8))


def test_a_32_bit_kernel_refuses_tensors_past_two_to_the_31(monkeypatch):
    """Called with the far tensors (the entry point made not to retry in 64 bits), the
    32-bit kernel's entry refuses them before anything is written: what lets the entry
    points try it first."""
    compact = inputs_for(FORMS["write-through-fp8"], NEW_TOKENS, CACHE_LENGTHS, device="cpu")
    far, base = _far(compact)
    far_out = _far_rows(torch.zeros_like(compact.q_rope))
    monkeypatch.setattr(tvm_fused.api, "INDEX_REFUSAL", "a message no kernel gives")
    KERNELS.clear()
    with pytest.raises(ValueError, match="64-bit indices"):
        far.call(out=far_out)
    assert _index_bits_of_calls() == {32}
    assert not far_out.any()
    assert torch.equal(far.k_cache[base:].view(torch.uint8), compact.k_cache.view(torch.uint8))
    assert torch.equal(far.q_rope, compact.q_rope)
