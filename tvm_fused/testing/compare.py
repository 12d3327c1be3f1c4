"""Checking a run of the op against the float64 reference.

Each written value gets a tolerance that follows from the spec's rounding. RoPE rounds once
from float32: one ulp of the output dtype off the float64 result, plus float32 error on the
pair's magnitude (cancellation can make the result itself tiny). RMSNorm rounds to the gamma
dtype, multiplies by gamma and rounds again: the first rounding may flip (one ulp of the
normalized value, which gamma turns into up to two ulps of the product) and the second adds
its own, so three ulps (of the gamma dtype where it is the coarser); plus the float32 sum of
squares (at most ``kv_norm_dim / 2`` float32 epsilons, relative). A report gives, per
output, the worst error as a share of its tolerance (at most 1 passes), which stays
meaningful where a value is near zero and ulps are not.
An fp8 cache value must be the fp8 rounding of a value within tolerance (the rounding is
monotonic, so it lies between the roundings of the tolerance interval's ends), and exactly
the rounding of the op's own value where ``kv_output`` shows it. Everything the op must not
touch is compared bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch

from ..tokens import locate_slots, locate_tokens
from .inputs import OpInputs, guarded, rows_like
from .reference import ds_mla_rows, quantize, reference_outputs

F32_EPS = 2.0**-24


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at ``|x|`` (float64), floored at the smallest normal."""
    info = torch.finfo(dtype)
    mag = x.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def _pair_magnitude(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """|x0| + |x1| of each element's rope pair, laid out like ``x``."""
    a = x.abs()
    if interleaved:
        mag = a[..., 0::2] + a[..., 1::2]
        return mag.repeat_interleave(2, dim=-1)
    first, second = a.chunk(2, dim=-1)
    return (first + second).repeat(*([1] * (a.dim() - 1)), 2)


@dataclasses.dataclass
class CheckReport:
    """One run against the reference: the worst error of each output as a share of its
    tolerance (k rope and k norm: the new rows, in the cache and in ``kv_output``), fp8
    values off their bounds, the bit-exactness of everything else, and the error count."""

    q_error: float
    k_rope_error: float
    k_norm_error: float
    fp8_mismatches: int
    untouched_cache_identical: bool
    untouched_q_identical: bool
    untouched_rows_identical: bool
    errors_counted: int
    errors_expected: int

    @property
    def ok(self) -> bool:
        return (max(self.q_error, self.k_rope_error, self.k_norm_error) <= 1
                and self.fp8_mismatches == 0 and self.untouched_cache_identical
                and self.untouched_q_identical and self.untouched_rows_identical
                and self.errors_counted == self.errors_expected)

    def summary(self) -> str:
        return (f"worst error / tolerance: q {self.q_error:.2f}, k rope {self.k_rope_error:.2f}"
                f", k norm {self.k_norm_error:.2f}; fp8 values off: {self.fp8_mismatches}; "
                f"untouched cache identical: {self.untouched_cache_identical}; untouched "
                f"q/out rows identical: {self.untouched_q_identical}; kv_input and untouched "
                f"kv_output rows identical: {self.untouched_rows_identical}; error tokens "
                f"counted {self.errors_counted} of {self.errors_expected} -> "
                f"{'PASS' if self.ok else 'FAIL'}")


def agreement(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """``(share of bit-identical values, most ulps apart)`` of two tensors of one float dtype
    (the ulps counted on the sign-magnitude bit patterns: adjacent values are 1 apart)."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[actual.element_size()]
    a, b = (t.contiguous().view(bits).to(torch.int64) for t in (actual, expected))
    sign = 1 << (8 * actual.element_size() - 1)
    a, b = (torch.where(v < 0, -(v + sign), v) for v in (a, b))  # monotonic in the value
    if a.numel() == 0:
        return 1.0, 0
    return float((a == b).double().mean()), int((a - b).abs().max())


def _score(actual, expected, tol) -> float:
    """The worst ``|actual - expected| / tol`` (0 for no values)."""
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    return float((diff / tol).max()) if diff.numel() else 0.0


def _view(tensor: torch.Tensor, storage: torch.Tensor) -> torch.Tensor:
    """``tensor``'s view of ``storage`` (a copy of the storage it views)."""
    return storage.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())


def whole_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage ``tensor`` views, as a flat tensor of its dtype."""
    return tensor.new_empty(0).set_(tensor.untyped_storage())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two flat storages hold the same bytes (NaN payloads included)."""
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _storage_as_expected(after: torch.Tensor, before: torch.Tensor, view: torch.Tensor,
                         index, written: torch.Tensor) -> bool:
    """``after`` (a flat storage) equals ``before`` with ``view``'s rows ``index`` set to
    ``written``: the op wrote those rows and nothing else."""
    expected = whole_storage(before.clone())
    _view(view, expected)[index] = written
    return _same_bits(after, expected)


class _RowTolerance:
    """Tolerances of new latent rows ``[m, D + R]`` (float64), from the rows they came from."""

    def __init__(self, kv_norm_dim: int, dtype: torch.dtype, interleaved: bool,
                 gamma_dtype: torch.dtype, norm_rounding: str = "before_gamma"):
        self.kv_norm_dim, self.dtype, self.interleaved = kv_norm_dim, dtype, interleaved
        # the normalized value and its product with gamma are rounded to gamma's dtype first:
        # where that is the coarser one (bf16 gamma, fp16 or fp32 rows), its ulps count;
        # rounded once, the product is one ulp of the output dtype off
        self.norm_ulps, self.norm_dtype = (3, max(dtype, gamma_dtype,
                                                  key=lambda t: torch.finfo(t).eps))
        if norm_rounding == "once":
            self.norm_ulps, self.norm_dtype = 1, dtype

    def __call__(self, reference: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        d = self.kv_norm_dim
        rope = ulp(reference[:, d:], self.dtype) + 4 * F32_EPS * _pair_magnitude(
            source[:, d:], self.interleaved)
        norm = (self.norm_ulps * ulp(reference[:, :d], self.norm_dtype)
                + reference[:, :d].abs() * (d / 2 + 4) * F32_EPS)
        return torch.cat((norm, rope), dim=-1)

    def scores(self, actual, reference, tol) -> tuple[float, float]:
        """(rope, norm) worst error / tolerance of ``actual`` rows."""
        d = self.kv_norm_dim
        return (_score(actual[:, d:], reference[:, d:], tol[:, d:]),
                _score(actual[:, :d], reference[:, :d], tol[:, :d]))


def _fp8_mismatches(actual: torch.Tensor, reference: torch.Tensor, tol: torch.Tensor,
                    k_scale, own_values: torch.Tensor | None) -> int:
    """fp8 values outside ``[q(reference - tol), q(reference + tol)]`` (q: the cache's
    rounding), or, where ``own_values`` (the op's values before the rounding) are known,
    not exactly their rounding."""
    dtype = actual.dtype
    low = quantize(reference - tol, dtype, k_scale).to(torch.float64)
    high = quantize(reference + tol, dtype, k_scale).to(torch.float64)
    value = actual.to(torch.float64)
    off = ~((low <= value) & (value <= high))
    if own_values is not None:
        exact = quantize(own_values, dtype, k_scale).view(torch.uint8)
        off |= exact != actual.view(torch.uint8)
    return int(off.sum())


def _ds_mla_mismatches(actual: torch.Tensor, reference: torch.Tensor, tol: torch.Tensor,
                       before: OpInputs, own_values: torch.Tensor | None) -> int:
    """Bytes of fp8_ds_mla rows ``actual [m, 656]`` off: where ``own_values`` (the op's rows
    before quantizing) are known, every byte not exactly their quantization; else the rope
    part and each decoded latent value (``e4m3 * scale``) farther from the ``reference`` rows
    than their tolerance plus half an e4m3 step (``before``: the inputs, for the dims, q's
    dtype and the tile scales' rule)."""
    d = before.gamma.shape[0]
    if own_values is not None:
        return int((actual != ds_mla_rows(own_values, d, before.tile_scale)).sum())
    tiles = d // 128
    rope = actual[:, d + 4 * tiles:].contiguous().view(before.q_rope.dtype)
    scales = actual[:, d:d + 4 * tiles].contiguous().view(torch.float32)
    decoded = (actual[:, :d].contiguous().view(torch.float8_e4m3fn).to(torch.float64)
               * scales.repeat_interleave(128, dim=-1).to(torch.float64))
    expected = reference.to(torch.float64)
    latent_tol = tol[:, :d] + expected[:, :d].abs() * 2.0**-4 + scales.repeat_interleave(
        128, dim=-1).to(torch.float64) * 2.0**-10
    off = (decoded - expected[:, :d]).abs() > latent_tol
    off |= decoded.isnan() != expected[:, :d].isnan()
    rope_off = (rope.to(torch.float64) - expected[:, d:]).abs() > tol[:, d:]
    return int(off.sum() + rope_off.sum())


def located(inputs: OpInputs):
    """The reference's tokens of ``inputs``, by their addressing (on the CPU)."""
    num_pages, page_size = inputs.k_cache.shape[:2]
    if inputs.engine:
        return locate_slots(inputs.positions, inputs.slot_mapping, inputs.freqs_cis.shape[0],
                            num_pages, page_size)
    return locate_tokens(inputs.input_row_offsets, inputs.cache_lengths, inputs.lookup_table,
                         inputs.freqs_cis.shape[0], num_pages, page_size)


def check_run(before: OpInputs, after: OpInputs, out: torch.Tensor,
              out_storage_before: torch.Tensor | None = None, *, in_place: bool = False,
              epsilon: float = 1e-6, interleaved: bool = True,
              errors_counted: int | None = None, kv_output: torch.Tensor | None = None,
              kv_output_storage_before: torch.Tensor | None = None,
              q_nope_out: torch.Tensor | None = None,
              q_scale: torch.Tensor | None = None) -> CheckReport:
    """Compare a run of the op with the reference.

    ``before`` is a copy of the inputs taken before the call, ``after`` the inputs after it,
    ``out`` the returned q (``after.q_rope`` if ``in_place``) and ``out_storage_before`` a
    copy of ``whole_storage(out)`` taken before an out-of-place call (or of ``out`` itself,
    if that is its whole storage; None if the op made ``out``: it has no rows to keep);
    ``errors_counted`` what the op added to its error counter (None: not counted);
    ``kv_output`` the write-through call's ``kv_output`` and ``kv_output_storage_before`` a
    copy of its whole storage before the call; ``q_nope_out`` the call's (in ``out``'s
    storage, whose copy ``out_storage_before`` is) and ``q_scale`` its fp8 query's scale.
    Written rows are compared with the float64 reference (an fp8 ``out``: the fp8 rounding
    of a value within tolerance; ``q_nope_out``: exactly ``q_nope``, quantized alike); every
    other element of every storage (padding and error rows, other layers, row padding,
    padded heads, the guards around each tensor, all of ``kv_input``) must be bit-identical
    to before. Compared on the CPU.
    """
    out_storage = whole_storage(out).cpu()
    out = _view(out, out_storage)
    before, after = before.to("cpu"), after.to("cpu")
    dtype = before.q_rope.dtype
    kv_norm_dim = before.gamma.shape[0]
    tokens = located(before)
    reference = reference_outputs(tokens, before.q_rope, before.freqs_cis, before.gamma,
                                  before.k_cache, **before.latent(), **before.options(),
                                  epsilon=epsilon, interleaved=interleaved)
    written = torch.nonzero(tokens.q_written).flatten()

    q_in = before.q_rope[written].to(torch.float64)
    q_ref = reference.q[written].to(torch.float64)
    q_tol = ulp(q_ref, dtype) + 4 * F32_EPS * _pair_magnitude(q_in, interleaved)
    fp8_mismatches = 0
    if out.dtype == dtype:
        q_error = _score(out[written], q_ref, q_tol)
    else:  # an fp8 query
        q_error = 0.0
        fp8_mismatches += _fp8_mismatches(out[written], q_ref, q_tol, q_scale, None)
    if q_nope_out is not None:
        q_nope_out = _view(q_nope_out, out_storage)
        expected = quantize(before.q_nope[written], out.dtype, q_scale)
        fp8_mismatches += int((q_nope_out[written].view(torch.uint8)
                               != expected.view(torch.uint8)).sum())

    # the new rows: where they came from, the reference's values and their tolerances
    cached = tokens.row_written
    page, slot = tokens.page[cached], tokens.row[cached]
    n_real = tokens.pos.numel()
    if before.kv_input is None:
        source = torch.zeros(reference.rows.shape, dtype=torch.float64)
        source[cached] = before.k_cache[page, slot].to(torch.float64)
    else:
        source = before.kv_input[:n_real].to(torch.float64)
    rows_ref = reference.rows.to(torch.float64)
    row_tol = _RowTolerance(kv_norm_dim, dtype, interleaved, before.gamma.dtype,
                            before.norm_rounding)
    tol = row_tol(rows_ref, source)

    rope_error = norm_error = 0.0
    cache_rows = after.k_cache[page, slot]
    if after.k_cache.dtype == dtype:
        rope_error, norm_error = row_tol.scores(cache_rows, rows_ref[cached], tol[cached])
    own_values = None
    rows_same = True
    if kv_output is not None:
        kv_output_storage = whole_storage(kv_output).cpu()
        kv_output = _view(kv_output, kv_output_storage)
        rope, norm = row_tol.scores(kv_output[written], rows_ref[written], tol[written])
        rope_error, norm_error = max(rope_error, rope), max(norm_error, norm)
        own_values = kv_output[:n_real][cached]
        rows_same = _storage_as_expected(kv_output_storage, kv_output_storage_before.cpu(),
                                         kv_output, written, kv_output[written])
    if before.cache_format == "fp8_ds_mla":
        fp8_mismatches += _ds_mla_mismatches(cache_rows, rows_ref[cached], tol[cached],
                                             before, own_values)
    elif after.k_cache.dtype != dtype:
        fp8_mismatches += _fp8_mismatches(cache_rows, rows_ref[cached], tol[cached],
                                          before.k_scale, own_values)
    if before.kv_input is not None:
        rows_same &= _same_bits(after.kv_storage, before.kv_storage)

    # everything but the written rows, bit for bit: each storage as it was, with the written
    # rows taken from the run (their values are checked above)
    cache_same = _storage_as_expected(after.cache_storage, before.cache_storage,
                                      before.k_cache, (page, slot), cache_rows)
    if in_place:
        q_same = _storage_as_expected(after.q_storage, before.q_storage, before.q_rope,
                                      written, out[written])
    else:  # q is read only
        q_same = _same_bits(after.q_storage, before.q_storage)
        if out_storage_before is not None:
            expected = whole_storage(out_storage_before.cpu().clone())
            _view(out, expected)[written] = out[written]
            if q_nope_out is not None:
                _view(q_nope_out, expected)[written] = q_nope_out[written]
            q_same &= _same_bits(out_storage, expected)
        if before.q_nope is not None:
            q_same &= torch.equal(after.q_nope, before.q_nope)
    counted = tokens.errors if errors_counted is None else errors_counted
    return CheckReport(q_error, rope_error, norm_error, fp8_mismatches, cache_same, q_same,
                       rows_same, counted, tokens.errors)


def query_buffer(inputs: OpInputs, out_dtype: torch.dtype, out_columns, gen):
    """``(out, q_nope_out)`` of random values (bytes, for fp8) inside guards: with
    ``inputs.q_nope``, the two column slices of a head-padded attention query ``[n, H + 2, D
    + R]`` (an fp8 decode kernel's input); else ``out`` alone, columns ``out_columns =
    (width, start)`` of a ``[n, H, width]`` tensor, and None."""
    q = inputs.q_rope
    n, heads, rope_dim = q.shape
    nope = 0 if inputs.q_nope is None else inputs.q_nope.shape[2]
    width, start = (nope + rope_dim, nope) if nope else out_columns or (rope_dim, 0)
    padded = heads + 2 if nope else heads
    fp8 = out_dtype.itemsize == 1
    storage, whole = guarded((n, padded, width), torch.uint8 if fp8 else out_dtype, gen)
    if fp8:
        storage, whole = storage.view(out_dtype), whole.view(out_dtype)
    whole = _view(whole, storage.to(q.device))
    out = whole[:, :heads, start:start + rope_dim]
    return out, (whole[:, :heads, :nope] if nope else None)


def run_and_check(inputs: OpInputs, *, in_place: bool = False, interleaved: bool = True,
                  epsilon: float = 1e-6, validate: bool | None = None, schedule=None,
                  pdl: bool | str = False,
                  out_columns: tuple[int, int] | None = None, kv_output: bool = True,
                  kv_output_columns: tuple[int, int] | None = None,
                  out_dtype: torch.dtype | None = None,
                  q_scale: float | None = None) -> CheckReport:
    """Run the op (``inputs.call``) on ``inputs`` (updating them) and check the result.

    The output is ``q_rope`` itself if ``in_place``, else random values inside guards of
    their own, so that rows the op must not write are recognizable: columns ``(width,
    start)`` of a wider tensor if ``out_columns`` says so. Write-through inputs get a
    ``kv_output`` made the same way (``kv_output_columns``), unless ``kv_output`` is False.
    With ``inputs.q_nope``, ``out`` and ``q_nope_out`` are the column slices of one
    head-padded attention query. ``out_dtype`` (default q's) may be fp8, with ``q_scale``.
    The op's error counter must count the reference's error tokens. ``schedule`` overrides
    the GPU schedule, ``pdl`` the launch.
    """
    before = inputs.clone()
    q = inputs.q_rope
    gen = torch.Generator().manual_seed(1)
    q_nope_out = None
    if in_place:
        out = q
    else:
        out, q_nope_out = query_buffer(inputs, out_dtype or q.dtype, out_columns, gen)
    out_storage_before = whole_storage(out).clone()
    scale = None if q_scale is None else torch.tensor([q_scale], device=q.device)
    rows = rows_storage_before = None
    if inputs.kv_input is not None and kv_output:
        n, width = inputs.kv_input.shape
        storage, rows = rows_like(n, width, kv_output_columns or (width, 0), q.dtype, gen)
        rows = _view(rows, storage.to(q.device))
        rows_storage_before = whole_storage(rows).clone()
    errors = torch.zeros(1, dtype=torch.int32, device=inputs.q_rope.device)
    query = {} if inputs.q_nope is None else {"q_nope": inputs.q_nope,
                                              "q_nope_out": q_nope_out}
    result = inputs.call(kv_output=rows, out=out, errors=errors, epsilon=epsilon,
                         interleaved=interleaved, validate=validate, schedule=schedule, pdl=pdl,
                         q_scale=scale, **query)
    return check_run(before, inputs, result, out_storage_before, in_place=in_place,
                     epsilon=epsilon, interleaved=interleaved, errors_counted=int(errors.item()),
                     kv_output=rows, kv_output_storage_before=rows_storage_before,
                     q_nope_out=q_nope_out, q_scale=scale)
