"""The write-through form (rows from kv_input, the projection output) into caches of q's dtype
and fp8, on the CPU (llvm) and the GPU, against the float64 reference; the fp8 rounding bit
for bit at its edges; the form's argument checks."""

import itertools

import pytest
import torch

from tvm_fused import fused_rope_rmsnorm
from tvm_fused.testing.compare import run_and_check
from tvm_fused.testing.inputs import make_inputs
from tvm_fused.testing.reference import rope

from .cases import DECODE, FORMS, PREFILL, RAGGED, call_with, snapshot, thinned, unchanged

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
WRITE_THROUGH = ("write-through", "fp8-e4m3", "fp8-e5m2-scaled")
SHAPES = [(1, torch.bfloat16, 1), (16, torch.bfloat16, 16), (128, torch.bfloat16, 128),
          (16, torch.float16, 128), (4, torch.float32, 16)]
MATRIX = list(itertools.product(WRITE_THROUGH, SHAPES))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", thinned(range(len(MATRIX)), [
    f"{form}-h{h}-{str(d)[6:]}-ps{p}" for form, (h, d, p) in MATRIX], every=2))
def test_matrix(index, device):
    """Every write-through form over heads, dtypes and page sizes; the other options rotate:
    kv_input a column slice at an aligned or odd offset, kv_output given or not (and a
    column slice), q in place or not, NeoX pairs, padding rows, multi-layer caches."""
    form, (heads, dtype, page_size) = MATRIX[index]
    batch = (RAGGED, DECODE, PREFILL)[index % 3]
    inputs = make_inputs(*batch, num_q_heads=heads, page_size=page_size, dtype=dtype,
                         padding_rows=index % 3, layers=1 + 2 * (index % 2),
                         kv_columns=((2112, 1536), (577, 1), (576, 0))[index % 3],
                         seed=index, device=device, **FORMS[form])
    report = run_and_check(inputs, in_place=index % 4 == 1, interleaved=index % 5 != 2,
                           kv_output=index % 3 != 1,
                           kv_output_columns=(600, 8) if index % 2 else None)
    assert report.ok, report.summary()


def _edge_values(dtype: torch.dtype, limit: float) -> torch.Tensor:
    """bf16 values at the fp8 format's edges: ties to even and their neighbours, both ends of
    the subnormal range, the saturation threshold and beyond, signed zeros, inf and NaN."""
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # the smallest fp8 subnormal
    values = [0.0, -0.0, tiny, tiny / 2, tiny * 1.5, tiny * 2.5, tiny / 4, info.smallest_normal,
              info.smallest_normal * (1 - info.eps / 2), 1 + info.eps / 2, 1 + 1.5 * info.eps,
              3 + 3 * info.eps, limit, limit * 1.03, limit * 1.07, limit * 4, 1e30,
              float("inf"), float("nan")]
    values += [-v for v in values]
    # bf16 neighbours of every value: just off the ties
    as_bf16 = torch.tensor(values).to(torch.bfloat16)
    bits = as_bf16.view(torch.int16)
    return torch.cat((as_bf16, (bits + 1).view(torch.bfloat16), (bits - 1).view(torch.bfloat16)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("k_scale", [None, 1.0, 0.37, 3.0])
def test_fp8_rounding_is_exact_at_the_edges(cache_dtype, k_scale, device):
    """At position 0 the rotation is the identity, so the cache's rope columns hold
    ``fp8(saturate(x / k_scale))`` of chosen bf16 values ``x``: compared bit for bit with
    torch's cast (nearest even; NaN compared as NaN) of the float64 rope of the inputs."""
    limit = torch.finfo(cache_dtype).max
    values = _edge_values(cache_dtype, limit)
    tokens = -(-values.numel() // 64)
    inputs = make_inputs([1] * tokens, [0] * tokens, num_q_heads=1, page_size=1,
                         write_through=True, cache_dtype=cache_dtype, k_scale=k_scale)
    rope_part = torch.zeros(tokens * 64, dtype=torch.bfloat16)
    rope_part[:values.numel()] = values
    inputs.kv_input[:, 512:] = rope_part.view(tokens, 64)
    inputs = inputs.to(device)
    fused_rope_rmsnorm(*inputs.args(), **inputs.latent(), validate=True)

    expected_bf16 = rope(rope_part.view(tokens, 64).to(torch.float64),
                         inputs.freqs_cis[0].cpu().to(torch.float64)).to(torch.bfloat16)
    scale = torch.tensor(1.0 if k_scale is None else k_scale, dtype=torch.float32)
    expected = (expected_bf16.float() / scale).clamp(-limit, limit).to(cache_dtype)
    rows = inputs.k_cache.cpu()[inputs.lookup_table.cpu()[:, 0].long(), 0, 512:]
    nan = expected.float().isnan()
    assert torch.equal(rows.float().isnan(), nan)
    assert torch.equal(rows.view(torch.uint8)[~nan], expected.view(torch.uint8)[~nan])


def test_in_place_form_keeps_working_beside_write_through():
    """Both forms of one shape, one after the other (their kernels differ)."""
    for form in ("in-place", "write-through", "in-place"):
        inputs = make_inputs(*RAGGED, num_q_heads=16, page_size=16, **FORMS[form])
        report = run_and_check(inputs)
        assert report.ok, (form, report.summary())


def _inputs(form="write-through"):
    return make_inputs([2, 0, 3], [5, 1, 127], num_q_heads=4, page_size=16, padding_rows=1,
                       **FORMS[form])


def _rows(inputs, rows=None, dtype=None):
    n = inputs.q_rope.shape[0] if rows is None else rows
    return torch.zeros(n, 576, dtype=dtype or inputs.q_rope.dtype)


BAD_FORMS = {
    "fp8 cache in place": ("in-place", lambda i: {"k_cache": i.k_cache.to(
        torch.float8_e4m3fn)}, TypeError, "an fp8 cache needs kv_input"),
    "kv_output without kv_input": ("in-place", lambda i: {"kv_output": _rows(i)}, ValueError,
                                   "kv_output needs kv_input"),
    "k_scale without kv_input": ("in-place", lambda i: {"k_scale": torch.ones(1)}, ValueError,
                                 "k_scale needs kv_input"),
    "k_scale on a bf16 cache": ("write-through", lambda i: {"k_scale": torch.ones(1)},
                                ValueError, "k_scale applies to an fp8"),
    "k_scale of two": ("fp8-e4m3", lambda i: {"k_scale": torch.ones(2)}, ValueError,
                       "k_scale must be a one-element"),
    "fp16 k_scale": ("fp8-e4m3", lambda i: {"k_scale": torch.ones(1).half()}, TypeError,
                     "k_scale must be a float32"),
    "fp16 cache": ("write-through", lambda i: {"k_cache": i.k_cache.half()}, TypeError,
                   "k_cache must have dtype of q_rope, fp8 or uint8"),
    "kv_input of fp32": ("write-through", lambda i: {"kv_input": i.kv_input.float()},
                         TypeError, "kv_input must have dtype"),
    "kv_input one row short": ("write-through", lambda i: {"kv_input": i.kv_input[:-1]},
                               ValueError, "kv_input must have q_rope's"),
    "kv_input row too short": ("write-through", lambda i: {"kv_input": i.kv_input[:, :-2]},
                               ValueError, "kv_input rows must hold"),
    "kv_input 3-d": ("write-through", lambda i: {"kv_input": i.kv_input[None]}, ValueError,
                     "kv_input must have 2 dims"),
    "kv_input column-major": ("write-through", lambda i: {
        "kv_input": i.kv_input.t().contiguous().t()}, ValueError,
        "kv_input must be contiguous in its last"),
    "kv_output one row more": ("write-through", lambda i: {"kv_output": _rows(i, 7)},
                               ValueError, "kv_output must have q_rope's"),
    "kv_output of fp8": ("fp8-e4m3", lambda i: {"kv_output": _rows(i, dtype=torch.float8_e4m3fn)},
                         TypeError, "kv_output must have dtype"),
    "kv_input on the meta device": ("write-through", lambda i: {
        "kv_input": i.kv_input.to("meta")}, ValueError, "kv_input is on meta"),
}


@pytest.mark.parametrize("validate", [None, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("case", BAD_FORMS)
def test_bad_form_arguments_raise_and_write_nothing(case, validate):
    form, replace, error, match = BAD_FORMS[case]
    inputs = _inputs(form)
    before = snapshot(inputs)
    with pytest.raises(error, match=match):
        call_with(inputs.args(), **{**inputs.latent(), **replace(inputs)}, validate=validate)
    assert unchanged(inputs, before)


def _cache_rows(i):
    n = i.q_rope.shape[0]
    return i.k_cache.reshape(-1)[:n * 576].view(n, 576)


def _out_across_kv_output(i):
    """kv_output and out over one buffer, out's first row on kv_output's last 64 elements."""
    rows = i.q_rope.shape[0] * 576
    buffer = torch.zeros(rows + i.q_rope.numel(), dtype=i.q_rope.dtype)
    return {"kv_output": buffer[:rows].view(-1, 576),
            "out": buffer[rows - 64:][:i.q_rope.numel()].view(i.q_rope.shape)}


OVERLAPS = {
    "kv_output on kv_input": (lambda i: {"kv_output": i.kv_input}, "kv_output overlaps"),
    "kv_output on the cache": (lambda i: {"kv_output": _cache_rows(i)}, "overlaps"),
    "kv_input on the cache": (lambda i: {"kv_input": _cache_rows(i)}, "k_cache overlaps"),
    "out across kv_output": (_out_across_kv_output, "overlaps"),
}


@pytest.mark.parametrize("case", OVERLAPS)
def test_overlaps_with_written_rows_are_refused(case):
    """kv_output is written, like out and the cache: it may share memory with no other
    argument, and kv_input may not sit on the cache."""
    inputs = _inputs()
    replace, match = OVERLAPS[case]
    before = snapshot(inputs)
    with pytest.raises(ValueError, match=match):
        call_with(inputs.args(), **{**inputs.latent(), **replace(inputs)})
    assert unchanged(inputs, before)
