"""The formats of SPEC.md's later sections against the float64 reference, on the CPU through
llvm and on a GPU: DeepSeek-V3.2's fp8_ds_mla cache row, the fp8 attention query (``out`` in
fp8 with ``q_scale``, ``q_nope`` / ``q_nope_out`` into a head-padded buffer), ``rope_dim`` 0
and any head count.

Values are checked two ways: the bf16 values the op computes (``kv_output``, a bf16 ``out``)
within the spec's rounding of the float64 reference (three bf16 ulps), and every fp8 byte,
scale and row byte exactly as the spec's quantization of the op's own bf16 values (the
quantization of a value within tolerance could round either way; of the op's own value it
has one answer). Everything the op must not touch is compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from tvm_fused import Form, fused_rope_rmsnorm, fused_rope_rmsnorm_slots
from tvm_fused.schedules import ScheduleConfig
from tvm_fused.testing.compare import check_run, run_and_check, ulp, whole_storage
from tvm_fused.testing.inputs import inputs_for, rope_freqs, split_table
from tvm_fused.testing.reference import (
    ds_mla_rows,
    ds_mla_tile_scales,
    quantize,
    reference_outputs,
)
from tvm_fused.tokens import locate_slots, locate_tokens

from .cases import thinned

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
BF16 = torch.bfloat16
D, R = 512, 64
ROW = D + 4 * D // 128 + 2 * R  # 656 bytes
PAGE, PAGES = 8, 6
TOKENS = 5
H_PAD = 8


def _random_bytes(shape, gen) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


class Case:
    """One call's inputs for ``heads`` heads and ``rope_dim``: a full q ``[T, H, D + R]``
    (its nope and rope column slices), the latent rows as a column slice of a projection
    output, a cache of random bytes (pages padded by 16 bytes for fp8_ds_mla), both
    addressings of the same tokens (slot -1 for token 2; offsets: requests of 2 and 3 new
    tokens)."""

    def __init__(self, device, heads=4, rope_dim=R, ds_mla=True, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.heads, self.rope_dim = heads, rope_dim
        self.q = torch.randn(TOKENS + 1, heads, D + rope_dim, generator=gen).to(BF16)
        projection = (torch.randn(TOKENS + 1, 1536 + D + rope_dim, generator=gen) * 2).to(BF16)
        self.kv_input = projection[:, 1536:]
        self.kv_input[1, 7] = float("nan")  # a NaN in the latent: its row's tiles are NaN
        self.kv_input[3, 128:256] = 0  # a zero tile... normalized, still zero
        self.gamma = (1 + 0.1 * torch.randn(D, generator=gen)).to(BF16)
        self.freqs = rope_freqs(128, rope_dim)
        width = ROW - 2 * R + 2 * rope_dim if ds_mla else D + rope_dim
        storage = _random_bytes((PAGES, PAGE, width + 16), gen) if ds_mla else (
            torch.randn(PAGES, PAGE, width, generator=gen).to(BF16))
        self.k_cache = storage[:, :, :width] if ds_mla else storage
        # slots: token t at position positions[t], row slots[t]
        self.positions = torch.tensor([5, 6, 17, 18, 19, 0])[:TOKENS]
        self.slots = torch.tensor([0 * PAGE + 5, 0 * PAGE + 6, -1, 3 * PAGE + 2,
                                   3 * PAGE + 3])
        # offsets: request 0 (2 new tokens after 5), request 1 (3 after 17), pages 0 and 3
        self.offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
        self.lengths = torch.tensor([5, 17], dtype=torch.int32)
        self.table = torch.tensor([[0, 1, 2], [4, 5, 3]], dtype=torch.int32)
        for name in ("q", "kv_input", "gamma", "freqs", "k_cache", "positions", "slots",
                     "offsets", "lengths", "table"):
            setattr(self, name, getattr(self, name).to(device))

    def call(self, addressing, **options):
        """The op on these inputs (copies of the written tensors: ``self`` stays as made)."""
        q_rope = self.q[..., D:]
        if addressing == "slots":
            return fused_rope_rmsnorm_slots(q_rope, self.positions, self.slots,
                                            split_table(self.freqs), self.gamma,
                                            options.pop("k_cache"), kv_input=self.kv_input,
                                            validate=True, **options)
        return fused_rope_rmsnorm(q_rope, self.offsets, self.freqs, self.gamma,
                                  options.pop("k_cache"), self.table, self.lengths,
                                  kv_input=self.kv_input, validate=True, **options)

    def tokens(self, addressing):
        num_pages, page = self.k_cache.shape[:2]
        if addressing == "slots":
            return locate_slots(self.positions.cpu(), self.slots.cpu(), 128, num_pages, page)
        return locate_tokens(self.offsets.cpu(), self.lengths.cpu(), self.table.cpu(), 128,
                             num_pages, page)

    def reference(self, addressing, tile_scale="raw"):
        return reference_outputs(self.tokens(addressing), self.q[..., D:].cpu(),
                                 self.freqs.cpu(), self.gamma.cpu(), self.k_cache.cpu(),
                                 kv_input=self.kv_input.cpu(), tile_scale=tile_scale,
                                 cache_format="fp8_ds_mla" if self.k_cache.dtype == torch.uint8
                                 else "plain")


def _assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within three bf16 ulps of the float64 reference (NaN where it is NaN)."""
    actual, expected = actual.cpu().double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan())
    finite = expected.isfinite()
    error = (actual - expected).abs()[finite]
    assert bool((error <= 3 * ulp(expected[finite], BF16)).all()), float(error.max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("addressing", ["slots", "offsets"])
@pytest.mark.parametrize("tile_scale", ["raw", "pow2"])
def test_ds_mla_rows_are_the_specs_bytes(device, addressing, tile_scale):
    _assert_ds_mla_rows(device, addressing, tile_scale)


def _assert_ds_mla_rows(device, addressing, tile_scale, schedule=None):
    case = Case(device)
    k_cache = case.k_cache.clone()
    storage_before = k_cache.cpu().clone()
    kv_output = torch.zeros(TOKENS + 1, D + R, dtype=BF16, device=device)
    case.call(addressing, k_cache=k_cache, kv_output=kv_output, cache_format="fp8_ds_mla",
              tile_scale=tile_scale, schedule=schedule)
    tokens = case.tokens(addressing)
    reference = case.reference(addressing, tile_scale)
    _assert_close_bf16(kv_output[:TOKENS], reference.rows)
    cache = k_cache.cpu()
    written = tokens.row_written
    page, row = tokens.page[written], tokens.row[written]
    # every byte of a written row: the spec's quantization of the op's own values
    expected = ds_mla_rows(kv_output[:TOKENS].cpu()[written], D, tile_scale)
    assert torch.equal(cache[page, row], expected)
    # the NaN token's tiles are NaN bytes; the zero tile's scale is the floor, its bytes 0
    nan_token = torch.nonzero(written).flatten().tolist().index(1)
    assert bool((cache[page, row][nan_token, :D] & 0x7F).eq(0x7F).all())
    zero_token = torch.nonzero(written).flatten().tolist().index(3)
    scales = cache[page, row][:, D:D + 16].contiguous().view(torch.float32)
    floor = torch.finfo(torch.float32).tiny if tile_scale == "raw" else 2.0**-13
    assert float(scales[zero_token, 1]) == floor
    assert bool(cache[page, row][zero_token, 128:256].eq(0).all())
    # nothing else: other rows, the token without a slot, the pages' padding
    untouched = torch.ones(PAGES, PAGE, dtype=torch.bool)
    untouched[page, row] = False
    assert torch.equal(cache[untouched], storage_before[untouched])


@pytest.mark.parametrize("device", DEVICES)
def test_ds_mla_pages_padding_and_the_rows_of_other_tokens_stay(device):
    """The 16 bytes past each page's rows (FlashMLA pads pages) keep their bytes."""
    case = Case(device)
    storage = case.k_cache.clone()  # a fresh padded storage, as the case makes it
    padded = torch.empty(PAGES, PAGE, ROW + 16, dtype=torch.uint8, device=device)
    padded.copy_(torch.cat((storage, torch.full((PAGES, PAGE, 16), 0xA5, dtype=torch.uint8,
                                                device=device)), dim=-1))
    view = padded[:, :, :ROW]
    case.call("slots", k_cache=view, cache_format="fp8_ds_mla")
    assert bool(padded[:, :, ROW:].eq(0xA5).all())


def test_ds_mla_tile_scales_follow_the_spec():
    """The reference's scales: raw amax / 448 floored at FLT_MIN; pow2 rounded up."""
    latent = torch.zeros(1, 512)
    latent[0, :128] = 448.0 * 3  # raw 3.0; pow2 4.0
    latent[0, 128:256] = float("inf")  # not finite: ignored, the tile is empty
    latent[0, 256] = 448.0 * 2.0**-3  # exactly a power of two
    raw = ds_mla_tile_scales(latent, "raw")[0].tolist()
    pow2 = ds_mla_tile_scales(latent, "pow2")[0].tolist()
    tiny = torch.finfo(torch.float32).tiny
    assert raw == [3.0, tiny, 2.0**-3, tiny]
    assert pow2 == [4.0, 2.0**-13, 2.0**-3, 2.0**-13]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("addressing", ["slots", "offsets"])
@pytest.mark.parametrize("cache", ["bfloat16", "float8_e4m3fn", "fp8_ds_mla"])
@pytest.mark.parametrize("out_dtype", thinned([torch.float8_e4m3fn, BF16], ["fp8", "bf16"],
                                              every=2))
def test_one_launch_writes_the_whole_attention_query(device, addressing, cache, out_dtype):
    """``out`` and ``q_nope_out`` as the two column slices of a head-padded ``[T, H_pad, D +
    R]`` buffer: the roped q and ``q_nope``, fp8 with ``q_scale`` (exactly the quantization
    of the op's own bf16 q) or bf16 (vLLM's concatenated query); padded heads, the padding
    row and error-free rows' other bytes untouched."""
    _assert_whole_query(device, addressing, cache, out_dtype)


def _assert_whole_query(device, addressing, cache, out_dtype, schedule=None):
    ds_mla = cache == "fp8_ds_mla"
    case = Case(device, ds_mla=ds_mla)
    cache_options = ({"cache_format": "fp8_ds_mla"} if ds_mla else {})
    k_cache = case.k_cache.clone()
    if cache == "float8_e4m3fn":
        k_cache = torch.zeros(PAGES, PAGE, D + R, dtype=torch.float8_e4m3fn, device=device)
    cache_options["schedule"] = schedule
    roped = case.call(addressing, k_cache=k_cache.clone(), **cache_options)  # a bf16 q
    buffer = torch.randn(TOKENS + 1, H_PAD, D + R, device=device).to(out_dtype)
    before = buffer.cpu().clone()
    q_nope = case.q[..., :D].transpose(0, 1).contiguous().transpose(0, 1)  # [H, T, D] view
    fp8 = out_dtype != BF16
    q_scale = torch.tensor([0.25], device=device) if fp8 else None
    case.call(addressing, k_cache=k_cache, out=buffer[:, :case.heads, D:], q_nope=q_nope,
              q_nope_out=buffer[:, :case.heads, :D], q_scale=q_scale, **cache_options)
    _assert_close_bf16(roped[:TOKENS], case.reference(addressing).q)
    result = buffer.cpu()
    written = slice(0, TOKENS)
    expected_rope = quantize(roped[written].cpu(), out_dtype, q_scale)
    expected_nope = quantize(q_nope[written].cpu(), out_dtype, q_scale)
    assert torch.equal(result[written, :case.heads, D:].view(torch.uint8) if fp8 else
                       result[written, :case.heads, D:], expected_rope.view(torch.uint8)
                       if fp8 else expected_rope)
    assert torch.equal(result[written, :case.heads, :D].view(torch.uint8) if fp8 else
                       result[written, :case.heads, :D], expected_nope.view(torch.uint8)
                       if fp8 else expected_nope)
    as_bytes = (lambda t: t.view(torch.uint8)) if fp8 else (lambda t: t)
    assert torch.equal(as_bytes(result[:, case.heads:]), as_bytes(before[:, case.heads:]))
    assert torch.equal(as_bytes(result[TOKENS:]), as_bytes(before[TOKENS:]))


OTHER_SCHEDULES = {  # runs of q_nope vectors, away from the default
    "nope-runs": ScheduleConfig(nope_vectors_per_thread=2, norm_first=True),
    "persistent-nope-runs": ScheduleConfig(grid_blocks=3, rope_vectors_per_thread=2,
                                           nope_vectors_per_thread=4),
    "wide-blocks-long-runs": ScheduleConfig(block_threads=256, nope_vectors_per_thread=8,
                                            norm_threads_per_row=64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", OTHER_SCHEDULES.values(), ids=OTHER_SCHEDULES)
@pytest.mark.parametrize("addressing", ["slots", "offsets"])
def test_other_schedules_write_the_specs_bytes(schedule, addressing):
    """Runs of several q_nope vectors per thread (blocks that span tokens, persistent
    grids; two-warp norm rows) give the spec's fp8_ds_mla rows and the whole query too."""
    _assert_ds_mla_rows("cuda", addressing, "pow2", schedule)
    _assert_whole_query("cuda", addressing, "fp8_ds_mla", torch.float8_e4m3fn, schedule)
    _assert_whole_query("cuda", addressing, "bfloat16", BF16, schedule)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("write_through", [True, False])
def test_rope_dim_zero_is_the_norm_and_the_cache_write(device, write_through):
    """NoPE MLA: no rope columns; the op norms the latent rows (from ``kv_input`` or in
    place) and copies ``q_nope``."""
    case = Case(device, rope_dim=0, ds_mla=False)
    k_cache = case.k_cache.clone()
    if not write_through:  # the caller wrote the new rows first
        tokens = case.tokens("slots")
        k_cache.view(-1, D)[case.slots[tokens.row_written]] = case.kv_input[
            :TOKENS][tokens.row_written.to(device)]
    before = k_cache.cpu().clone()
    q_nope_out = torch.zeros(TOKENS + 1, case.heads, D, dtype=BF16, device=device)
    q_rope = case.q[..., D:]
    fused_rope_rmsnorm_slots(q_rope, case.positions, case.slots, split_table(case.freqs),
                             case.gamma, k_cache,
                             kv_input=case.kv_input if write_through else None,
                             q_nope=case.q[..., :D], q_nope_out=q_nope_out, validate=True)
    tokens = case.tokens("slots")
    reference = reference_outputs(tokens, q_rope.cpu(), case.freqs.cpu(), case.gamma.cpu(),
                                  before, kv_input=case.kv_input.cpu() if write_through
                                  else None)
    written = tokens.row_written
    page, row = tokens.page[written], tokens.row[written]
    _assert_close_bf16(k_cache.cpu()[page, row], reference.k_cache[page, row])
    untouched = torch.ones(PAGES, PAGE, dtype=torch.bool)
    untouched[page, row] = False
    assert torch.equal(k_cache.cpu()[untouched], before[untouched])
    assert torch.equal(q_nope_out[:TOKENS].cpu(), case.q[:TOKENS, :, :D].cpu())
    assert bool(q_nope_out[TOKENS:].eq(0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", thinned([6, 8, 12, 16, 96, 128], every=2))
def test_any_head_count(device, heads):
    """Every head count engines run, in place and write-through with an fp8 query."""
    case = Case(device, heads=heads, ds_mla=False)
    k_cache = case.k_cache.clone()
    out = torch.empty(TOKENS + 1, heads, R, dtype=BF16, device=device)
    case.call("slots", k_cache=k_cache, out=out)
    reference = case.reference("slots")
    _assert_close_bf16(out[:TOKENS], reference.q)
    tokens = case.tokens("slots")
    page, row = tokens.page[tokens.row_written], tokens.row[tokens.row_written]
    _assert_close_bf16(k_cache.cpu()[page, row], reference.k_cache[page, row])


@pytest.mark.parametrize("change, message", [
    (lambda c, k: {"kv_input": None, "k_cache": k}, "needs the write-through form"),
    (lambda c, k: {"k_cache": k, "k_scale": torch.ones(1)}, "no k_scale"),
    (lambda c, k: {"k_cache": k[:, :, :-2]}, "656 bytes"),
    (lambda c, k: {"k_cache": k.view(torch.bfloat16)}, "must be uint8 exactly"),
])
def test_ds_mla_misuse_is_named(change, message):
    case = Case("cpu")
    k_cache = case.k_cache.clone()
    before = k_cache.clone()
    options = change(case, k_cache)
    with pytest.raises((ValueError, TypeError), match=message):
        if "kv_input" in options:
            fused_rope_rmsnorm_slots(case.q[..., D:], case.positions, case.slots,
                                     split_table(case.freqs), case.gamma,
                                     options["k_cache"], cache_format="fp8_ds_mla",
                                     validate=True)
        else:
            case.call("slots", cache_format="fp8_ds_mla", **options)
    assert torch.equal(k_cache, before)


def test_ds_mla_refuses_a_float32_q():
    case = Case("cpu")
    with pytest.raises(ValueError, match="bfloat16 or float16 q"):
        fused_rope_rmsnorm_slots(case.q[..., D:].float(), case.positions, case.slots,
                                 split_table(case.freqs), case.gamma, case.k_cache.clone(),
                                 kv_input=case.kv_input.float(), cache_format="fp8_ds_mla")


@pytest.mark.parametrize("options, message", [
    ({"q_scale": torch.ones(1)}, "q_scale applies to an fp8 out only"),
    ({"q_nope": "nope"}, "q_nope and q_nope_out go together"),
    ({"out": "fp8", "q_scale": torch.tensor([float("inf")])}, "q_scale must be finite"),
    ({"out": "fp8", "q_scale": torch.tensor([0.0])}, "q_scale must be finite and positive"),
    ({"q_nope": "nope", "q_nope_out": "short"}, "q_nope_out must have shape"),
])
def test_query_misuse_is_named(options, message):
    case = Case("cpu", ds_mla=False)
    values = {"fp8": torch.zeros(TOKENS + 1, case.heads, R, dtype=torch.float8_e4m3fn),
              "nope": case.q[..., :D], "short": torch.zeros(TOKENS + 1, case.heads, D - 2,
                                                               dtype=BF16)}
    options = {name: values.get(value, value) if isinstance(value, str) else value
               for name, value in options.items()}
    k_cache = case.k_cache.clone()
    with pytest.raises(ValueError, match=message):
        case.call("slots", k_cache=k_cache, **options)
    assert torch.equal(k_cache, case.k_cache)


FORMS = {
    "ds-mla-offsets": Form(num_q_heads=4, page_size=16, write_through=True,
                           cache_format="fp8_ds_mla"),
    "ds-mla-pow2-slots-no-kv-output": Form(num_q_heads=4, page_size=16, write_through=True,
                                           cache_format="fp8_ds_mla", tile_scale="pow2",
                                           addressing="slots", freqs_layout="split"),
    "fp8-query-ds-mla": Form(num_q_heads=12, page_size=16, write_through=True,
                             cache_format="fp8_ds_mla", out_dtype="float8_e4m3fn",
                             q_nope=True, addressing="slots"),
    "e5m2-query-fp8-cache": Form(num_q_heads=8, page_size=16, write_through=True,
                                 cache_dtype="float8_e4m3fn", out_dtype="float8_e5m2",
                                 q_nope=True),
    "bf16-query-in-place": Form(num_q_heads=6, page_size=16, q_nope=True),
    "nope-mla": Form(num_q_heads=16, page_size=16, rope_dim=0, write_through=True,
                     q_nope=True, addressing="slots"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", thinned(list(FORMS), list(FORMS), every=2))
def test_each_form_against_the_reference(device, name):
    """Each new form from its description (``inputs_for``, ``run_and_check``, what ``python
    -m tvm_fused run`` does): decode and prefill requests, guards around every tensor, a
    head-padded query buffer with ``q_nope``."""
    form = FORMS[name]
    inputs = inputs_for(form, [3, 1, 0, 17], [5, 40, 3, 0], padding_rows=2, device=device)
    out_dtype = getattr(torch, form.out_element)
    report = run_and_check(inputs, out_dtype=out_dtype, kv_output="no-kv-output" not in name,
                           q_scale=0.375 if form.out_dtype else None, validate=True)
    assert report.ok, report.summary()


@pytest.mark.parametrize("where", ["latent byte", "scale byte", "rope byte", "q_nope_out"])
def test_the_check_sees_one_wrong_byte(where):
    """``check_run`` fails a run whose written rows are one byte off, in each part."""
    form = FORMS["fp8-query-ds-mla"]
    inputs = inputs_for(form, [2, 1], [5, 40])
    before = inputs.clone()
    kv_output = torch.zeros(inputs.kv_input.shape, dtype=BF16)
    buffer = torch.zeros(3, form.num_q_heads + 2, D + R, dtype=torch.float8_e4m3fn)
    out, q_nope_out = buffer[:, :form.num_q_heads, D:], buffer[:, :form.num_q_heads, :D]
    storage_before = whole_storage(out).clone()
    inputs.call(kv_output=kv_output, out=out, q_nope=inputs.q_nope, q_nope_out=q_nope_out)
    slot = int(inputs.slot_mapping[0])
    row = inputs.k_cache[slot // form.page_size, slot % form.page_size]
    column = {"latent byte": 5, "scale byte": D + 2, "rope byte": ROW - 1}.get(where)
    if column is None:
        q_nope_out.view(torch.uint8)[0, 0, 3] ^= 1
    else:
        row[column] ^= 1
    report = check_run(before, inputs, out, storage_before, kv_output=kv_output,
                       kv_output_storage_before=torch.zeros_like(kv_output),
                       q_nope_out=q_nope_out)
    assert report.fp8_mismatches == 1 and not report.ok, report.summary()
