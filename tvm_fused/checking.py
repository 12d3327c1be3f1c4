"""Checking a run of the op against the float64 reference, with ulp-based tolerances.

Tolerances follow from the spec's rounding. RoPE rounds once from float32: one ulp of the
output dtype off the float64 result, plus float32 error on the pair's magnitude (cancellation
can make the result itself tiny). RMSNorm rounds to the gamma dtype, multiplies by gamma and
rounds again: the first rounding may flip (one ulp of the normalized value, which gamma turns
into up to two ulps of the product) and the second adds its own, so three ulps; plus the
float32 sum of squares (at most ``kv_norm_dim / 2`` float32 epsilons, relative). Errors are
reported in ulps of the output dtype at the reference value. Everything the op must not touch
is compared bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch

from .api import fused_rope_rmsnorm
from .inputs import OpInputs
from .reference import fused_rope_rmsnorm_reference, token_positions

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
    """Worst errors of one run, in ulps of the output dtype, and the bit-exactness checks."""

    q_ulps: float
    k_rope_ulps: float
    k_norm_ulps: float
    q_within_tolerance: bool
    k_rope_within_tolerance: bool
    k_norm_within_tolerance: bool
    untouched_cache_identical: bool
    untouched_q_identical: bool

    @property
    def ok(self) -> bool:
        return all((self.q_within_tolerance, self.k_rope_within_tolerance,
                    self.k_norm_within_tolerance, self.untouched_cache_identical,
                    self.untouched_q_identical))

    def summary(self) -> str:
        return (f"max error vs float64: q {self.q_ulps:.2f} ulp, k rope {self.k_rope_ulps:.2f} "
                f"ulp, k norm {self.k_norm_ulps:.2f} ulp; untouched cache identical: "
                f"{self.untouched_cache_identical}; untouched q/out rows identical: "
                f"{self.untouched_q_identical} -> {'PASS' if self.ok else 'FAIL'}")


def _score(actual, expected, tol, dtype):
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    if diff.numel() == 0:
        return 0.0, True
    ulps = float((diff / ulp(expected.to(torch.float64), dtype)).max())
    return ulps, bool((diff <= tol).all())


def check_run(before: OpInputs, after: OpInputs, out: torch.Tensor, out_before: torch.Tensor,
              *, in_place: bool = False, epsilon: float = 1e-6,
              interleaved: bool = True) -> CheckReport:
    """Compare a run of the op with the reference.

    ``before`` is a copy of the inputs taken before the call, ``after`` the inputs after it,
    ``out`` the returned q and ``out_before`` a copy of ``out`` before the call (for the
    rows the op must not write); ``in_place`` says ``out`` was ``q_rope``. Everything is
    compared on the CPU.
    """
    before, after = before.to("cpu"), after.to("cpu")
    out, out_before = out.cpu(), out_before.cpu()
    dtype = before.q_rope.dtype
    kv_norm_dim = before.gamma.shape[0]
    ref_q, ref_k = fused_rope_rmsnorm_reference(*before.args(), epsilon=epsilon,
                                                interleaved=interleaved)
    n_real = ref_q.shape[0]

    q_in = before.q_rope[:n_real].to(torch.float64)
    q_tol = ulp(ref_q.to(torch.float64), dtype) + 4 * F32_EPS * _pair_magnitude(q_in, interleaved)
    q_ulps, q_ok = _score(out[:n_real], ref_q, q_tol, dtype)

    request, pos = token_positions(before.input_row_offsets, before.cache_lengths)
    page_size = before.k_cache.shape[1]
    page = before.lookup_table.to(torch.int64)[request, pos // page_size]
    slot = pos % page_size
    rows_in = before.k_cache[page, slot].to(torch.float64)
    rows_out, rows_ref = after.k_cache[page, slot], ref_k[page, slot].to(torch.float64)
    rope_ref = rows_ref[:, kv_norm_dim:]
    rope_tol = ulp(rope_ref, dtype) + 4 * F32_EPS * _pair_magnitude(rows_in[:, kv_norm_dim:],
                                                                   interleaved)
    k_rope_ulps, k_rope_ok = _score(rows_out[:, kv_norm_dim:], rope_ref, rope_tol, dtype)
    norm_ref = rows_ref[:, :kv_norm_dim]
    norm_tol = 3 * ulp(norm_ref, dtype) + norm_ref.abs() * (kv_norm_dim / 2 + 4) * F32_EPS
    k_norm_ulps, k_norm_ok = _score(rows_out[:, :kv_norm_dim], norm_ref, norm_tol, dtype)

    touched = torch.zeros(before.k_cache.shape[:2], dtype=torch.bool)
    touched[page, slot] = True
    cache_same = torch.equal(after.k_cache[~touched], before.k_cache[~touched])
    layer_mask = torch.ones(before.cache_storage.shape[1], dtype=torch.bool)
    layer_mask[before.cache_storage.shape[1] // 2] = False
    cache_same &= torch.equal(after.cache_storage[:, layer_mask],
                              before.cache_storage[:, layer_mask])

    expected_q = before.q_storage.clone()  # q is read-only but for the real rows, in place
    if in_place:
        expected_q.as_strided(before.q_rope.shape, before.q_rope.stride(),
                              before.q_rope.storage_offset())[:n_real] = out[:n_real]
    q_same = torch.equal(after.q_storage, expected_q) and torch.equal(out[n_real:],
                                                                      out_before[n_real:])
    return CheckReport(q_ulps, k_rope_ulps, k_norm_ulps, q_ok, k_rope_ok, k_norm_ok,
                       bool(cache_same), bool(q_same))


def run_and_check(inputs: OpInputs, *, in_place: bool = False, interleaved: bool = True,
                  epsilon: float = 1e-6, validate: bool | None = None,
                  schedule=None) -> CheckReport:
    """Run ``fused_rope_rmsnorm`` on ``inputs`` (updating them) and check the result.

    The output is ``q_rope`` itself if ``in_place``, else a buffer of random values, so that
    rows the op must not write are recognizable. ``schedule`` overrides the GPU schedule.
    """
    before = inputs.clone()
    out = inputs.q_rope if in_place else torch.randn_like(inputs.q_rope)
    out_before = out.clone()
    result = fused_rope_rmsnorm(*inputs.args(), out=out, epsilon=epsilon,
                                interleaved=interleaved, validate=validate, schedule=schedule)
    return check_run(before, inputs, result, out_before, in_place=in_place, epsilon=epsilon,
                     interleaved=interleaved)
