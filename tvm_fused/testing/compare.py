"""Checking a run of the op against the float64 reference.

Each written value gets a tolerance that follows from the spec's rounding. RoPE rounds once
from float32: one ulp of the output dtype off the float64 result, plus float32 error on the
pair's magnitude (cancellation can make the result itself tiny). RMSNorm rounds to the gamma
dtype, multiplies by gamma and rounds again: the first rounding may flip (one ulp of the
normalized value, which gamma turns into up to two ulps of the product) and the second adds
its own, so three ulps; plus the float32 sum of squares (at most ``kv_norm_dim / 2`` float32
epsilons, relative). A report gives, per output, the worst error as a share of its tolerance
(at most 1 passes), which stays meaningful where a value is near zero and ulps are not.
Everything the op must not touch is compared bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch

from ..api import fused_rope_rmsnorm
from .inputs import OpInputs, q_like
from .reference import fused_rope_rmsnorm_reference, locate_tokens

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
    tolerance, the bit-exactness of everything else, and the error count."""

    q_error: float
    k_rope_error: float
    k_norm_error: float
    untouched_cache_identical: bool
    untouched_q_identical: bool
    errors_counted: int
    errors_expected: int

    @property
    def ok(self) -> bool:
        return (max(self.q_error, self.k_rope_error, self.k_norm_error) <= 1
                and self.untouched_cache_identical and self.untouched_q_identical
                and self.errors_counted == self.errors_expected)

    def summary(self) -> str:
        return (f"worst error / tolerance: q {self.q_error:.2f}, k rope {self.k_rope_error:.2f}"
                f", k norm {self.k_norm_error:.2f}; untouched cache identical: "
                f"{self.untouched_cache_identical}; untouched q/out rows identical: "
                f"{self.untouched_q_identical}; error tokens counted "
                f"{self.errors_counted} of {self.errors_expected} -> "
                f"{'PASS' if self.ok else 'FAIL'}")


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


def check_run(before: OpInputs, after: OpInputs, out: torch.Tensor,
              out_storage_before: torch.Tensor | None = None, *, in_place: bool = False,
              epsilon: float = 1e-6, interleaved: bool = True,
              errors_counted: int | None = None) -> CheckReport:
    """Compare a run of the op with the reference.

    ``before`` is a copy of the inputs taken before the call, ``after`` the inputs after it,
    ``out`` the returned q (``after.q_rope`` if ``in_place``) and ``out_storage_before`` a
    copy of ``whole_storage(out)`` taken before an out-of-place call (or of ``out`` itself,
    if that is its whole storage; None if the op made ``out``: it has no rows to keep);
    ``errors_counted`` what the op added to its error counter (None: not counted). Written
    rows are compared with the float64 reference; every other element of every storage
    (padding and error rows, other layers, row padding, the guards around each tensor) must
    be bit-identical to before. Compared on the CPU.
    """
    out_storage = whole_storage(out).cpu()
    out = _view(out, out_storage)
    before, after = before.to("cpu"), after.to("cpu")
    dtype = before.q_rope.dtype
    kv_norm_dim = before.gamma.shape[0]
    page_size = before.k_cache.shape[1]
    ref_q, ref_k = fused_rope_rmsnorm_reference(*before.args(), epsilon=epsilon,
                                                interleaved=interleaved)
    tokens = locate_tokens(before.input_row_offsets, before.cache_lengths,
                           before.lookup_table, before.freqs_cis.shape[0],
                           before.k_cache.shape[0], page_size)
    written = torch.nonzero(tokens.q_written).flatten()

    q_in = before.q_rope[written].to(torch.float64)
    q_ref = ref_q[written].to(torch.float64)
    q_tol = ulp(q_ref, dtype) + 4 * F32_EPS * _pair_magnitude(q_in, interleaved)
    q_error = _score(out[written], q_ref, q_tol)

    row = tokens.row_written
    page, slot = tokens.page[row], tokens.pos[row] % page_size
    rows_in = before.k_cache[page, slot].to(torch.float64)
    rows_out, rows_ref = after.k_cache[page, slot], ref_k[page, slot].to(torch.float64)
    rope_ref = rows_ref[:, kv_norm_dim:]
    rope_tol = ulp(rope_ref, dtype) + 4 * F32_EPS * _pair_magnitude(rows_in[:, kv_norm_dim:],
                                                                   interleaved)
    k_rope_error = _score(rows_out[:, kv_norm_dim:], rope_ref, rope_tol)
    norm_ref = rows_ref[:, :kv_norm_dim]
    norm_tol = 3 * ulp(norm_ref, dtype) + norm_ref.abs() * (kv_norm_dim / 2 + 4) * F32_EPS
    k_norm_error = _score(rows_out[:, :kv_norm_dim], norm_ref, norm_tol)

    # everything but the written rows, bit for bit: each storage as it was, with the written
    # rows taken from the run (their values are checked above)
    expected_cache = before.cache_storage.clone()
    _view(before.k_cache, expected_cache)[page, slot] = rows_out
    cache_same = torch.equal(after.cache_storage, expected_cache)
    expected_q = before.q_storage.clone()
    if in_place:
        _view(before.q_rope, expected_q)[written] = out[written]
    q_same = torch.equal(after.q_storage, expected_q)
    if not in_place and out_storage_before is not None:
        expected_out = whole_storage(out_storage_before.to("cpu", copy=True))
        _view(out, expected_out)[written] = out[written]
        q_same &= torch.equal(out_storage, expected_out)
    counted = tokens.errors if errors_counted is None else errors_counted
    return CheckReport(q_error, k_rope_error, k_norm_error, bool(cache_same), bool(q_same),
                       counted, tokens.errors)


def run_and_check(inputs: OpInputs, *, in_place: bool = False, interleaved: bool = True,
                  epsilon: float = 1e-6, validate: bool | None = None, schedule=None,
                  out_columns: tuple[int, int] | None = None) -> CheckReport:
    """Run ``fused_rope_rmsnorm`` on ``inputs`` (updating them) and check the result.

    The output is ``q_rope`` itself if ``in_place``, else random values inside guards of
    their own, so that rows the op must not write are recognizable: columns ``(width,
    start)`` of a wider tensor if ``out_columns`` says so. The op's error counter must count
    the reference's error tokens. ``schedule`` overrides the GPU schedule.
    """
    before = inputs.clone()
    q = inputs.q_rope
    if in_place:
        out = q
    else:
        storage, out = q_like(*q.shape, out_columns or (q.shape[2], 0), q.dtype,
                              torch.Generator().manual_seed(1))
        out = _view(out, storage.to(q.device))
    out_storage_before = whole_storage(out).clone()
    errors = torch.zeros(1, dtype=torch.int32, device=inputs.q_rope.device)
    result = fused_rope_rmsnorm(*inputs.args(), out=out, errors=errors, epsilon=epsilon,
                                interleaved=interleaved, validate=validate, schedule=schedule)
    return check_run(before, inputs, result, out_storage_before, in_place=in_place,
                     epsilon=epsilon, interleaved=interleaved, errors_counted=int(errors.item()))
