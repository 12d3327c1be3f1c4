"""An independent torch implementation of SPEC.md, used as the oracle in tests and benchmarks.

It shares no code with the TensorIR definition: positions and cache rows come from
``tokens.py`` (``repeat_interleave`` on the host, which the argument checks use too), the
math runs in ``compute_dtype`` (float64 by default) and is rounded only where the spec
rounds: once to the output dtype for RoPE; to the gamma dtype before and after the
gamma product, then to q's dtype, for RMSNorm (or once, ``norm_rounding="once"``); an fp8
cache then stores ``fp8(saturate(value / k_scale))`` (torch's cast: nearest even). Both
forms: in place (the new rows are read from the cache) and write-through (from
``kv_input``); both addressings: request offsets, cache lengths and a page table
(``locate_tokens``; ``fused_rope_rmsnorm_reference`` takes that call's arguments), or
positions and a slot mapping (``locate_slots``), either feeding ``reference_outputs``; both
table layouts. Indices that point nowhere
follow SPEC.md: a negative page or slot writes no cache row; a position with no freqs row, a
logical page past the lookup table or a physical page ``>= num_pages`` (a slot ``>= num_pages
* page_size``) makes the token an error, which writes nothing. ``input_row_offsets`` must
ascend from 0 (the kernel stays in bounds for any offsets, but only these have a defined
result).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..tokens import Tokens, locate_tokens


def rope(x: torch.Tensor, freqs: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate pairs of the last dim of ``x`` ``[..., R]`` by ``freqs`` ``[..., R]`` (cos, sin)
    interleaved, broadcast against ``x``); math in the dtype of ``x``."""
    cos, sin = freqs[..., 0::2], freqs[..., 1::2]
    if interleaved:
        x0, x1 = x[..., 0::2], x[..., 1::2]
    else:
        x0, x1 = x.chunk(2, dim=-1)
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    if interleaved:
        return torch.stack((y0, y1), dim=-1).flatten(-2)
    return torch.cat((y0, y1), dim=-1)


def rmsnorm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float, out_dtype: torch.dtype,
            compute_dtype: torch.dtype, rounding: str = "before_gamma") -> torch.Tensor:
    """``out_dtype(gamma_dtype(gamma_dtype(x * rsqrt(mean(x^2) + eps)) * gamma))`` over the last
    dim, or with ``rounding="once"``, ``out_dtype(x * rsqrt(mean(x^2) + eps) * gamma)``."""
    xc = x.to(compute_dtype)
    y = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + epsilon)
    if rounding == "once":
        return (y * gamma.to(compute_dtype)).to(out_dtype)
    y = y.to(gamma.dtype).to(compute_dtype) * gamma.to(compute_dtype)
    return y.to(gamma.dtype).to(out_dtype)


def interleaved_table(table: torch.Tensor, layout: str) -> torch.Tensor:
    """A cos/sin ``table [P, R]`` of ``layout`` ("interleaved" or "split": cosines, then
    sines) as interleaved (cos, sin) pairs."""
    if layout == "interleaved":
        return table
    cos, sin = table.chunk(2, dim=-1)
    return torch.stack((cos, sin), dim=-1).flatten(-2)


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """``dtype(saturate(float32(x) / scale))`` for an fp8 ``dtype``; ``x`` unchanged for any
    other (``scale``: a one-element float32 tensor, ``k_scale`` or ``q_scale``, or None for
    1)."""
    if dtype.itemsize != 1:
        return x.to(dtype)
    limit = torch.finfo(dtype).max
    scale = 1.0 if scale is None else scale.detach().cpu().to(torch.float32).reshape(())
    return (x.to(torch.float32) / scale).clamp(-limit, limit).to(dtype)


DS_MLA_TILE = 128
E4M3_MAX = 448.0


def ds_mla_tile_scales(latent: torch.Tensor, tile_scale: str = "raw") -> torch.Tensor:
    """The float32 scale of each 128-value tile of ``latent [n, D]`` (SPEC.md, "fp8_ds_mla"):
    ``amax / 448`` floored at the smallest normal (``"raw"``), or ``2^ceil(log2(max(amax /
    448, 1e-4)))`` (``"pow2"``, the exponent found in float64, where it is exact); ``amax``
    over the tile's finite values."""
    values = latent.to(torch.float32).reshape(latent.shape[0], -1, DS_MLA_TILE)
    magnitude = torch.where(values.isfinite(), values.abs(), torch.zeros_like(values))
    ratio = magnitude.amax(-1) / torch.tensor(E4M3_MAX, dtype=torch.float32)
    if tile_scale == "raw":
        return ratio.clamp_min(torch.finfo(torch.float32).tiny)
    floored = ratio.clamp_min(torch.tensor(1e-4, dtype=torch.float32)).to(torch.float64)
    return torch.exp2(torch.ceil(torch.log2(floored))).to(torch.float32)


def ds_mla_rows(rows: torch.Tensor, kv_norm_dim: int, tile_scale: str = "raw") -> torch.Tensor:
    """The fp8_ds_mla bytes ``uint8 [n, D + 4 D/128 + 2 R]`` of the rows ``[n, D + R]`` (q's
    16-bit dtype): the latent as e4m3 of ``value / its tile's scale`` (float32 division,
    saturated, nearest even; a non-finite value as the NaN ``0x7F``), the scales as
    little-endian float32, the rope part's own bytes."""
    latent, rope_part = rows[:, :kv_norm_dim], rows[:, kv_norm_dim:]
    scales = ds_mla_tile_scales(latent, tile_scale)
    values = latent.to(torch.float32)
    divided = values / scales.repeat_interleave(DS_MLA_TILE, dim=-1)
    codes = divided.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    codes = torch.where(values.isfinite(), codes, torch.full_like(codes, 0x7F))
    return torch.cat((codes, scales.contiguous().view(torch.uint8),
                      rope_part.contiguous().view(torch.uint8)), dim=-1)


class ReferenceOutputs(NamedTuple):
    """What the op computes, on the CPU.

    q : ``[n_real, H, R]`` q's dtype: roped q of the real tokens (rows past
        ``input_row_offsets[-1]`` are not part of the op; rows of error tokens, which the op
        does not write, hold ``q_rope``'s values).
    k_cache : a copy of ``k_cache`` with the new tokens' rows written.
    rows : ``[n_real, D + R]`` q's dtype: each token's new row before any fp8 rounding (what
        ``kv_output`` receives), zero where the op computes none (error tokens; in place,
        tokens without a cache row).
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    rows: torch.Tensor


def fused_rope_rmsnorm_reference(
    q_rope: torch.Tensor,
    input_row_offsets: torch.Tensor,
    freqs_cis: torch.Tensor,
    gamma: torch.Tensor,
    k_cache: torch.Tensor,
    lookup_table: torch.Tensor,
    cache_lengths: torch.Tensor,
    **options,
) -> ReferenceOutputs:
    """The op of SPEC.md, out of place, on the CPU.

    Parameters are those of ``tvm_fused.fused_rope_rmsnorm``: with ``kv_input``
    (``[n, D + R]``), the write-through form; nothing is modified. ``options``: those of
    ``reference_outputs``.
    """
    tokens = locate_tokens(input_row_offsets, cache_lengths, lookup_table, freqs_cis.shape[0],
                           k_cache.shape[0], k_cache.shape[1])
    return reference_outputs(tokens, q_rope, freqs_cis, gamma, k_cache, **options)


def reference_outputs(
    tokens: Tokens,
    q_rope: torch.Tensor,
    freqs_cis: torch.Tensor,
    gamma: torch.Tensor,
    k_cache: torch.Tensor,
    *,
    kv_input: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    epsilon: float = 1e-6,
    interleaved: bool = True,
    freqs_layout: str = "interleaved",
    norm_rounding: str = "before_gamma",
    cache_format: str = "plain",
    tile_scale: str = "raw",
    compute_dtype: torch.dtype = torch.float64,
) -> ReferenceOutputs:
    """What the op writes for the located ``tokens`` (``kv_input``: the write-through form;
    ``freqs_layout`` of ``freqs_cis``; ``norm_rounding`` as for ``rmsnorm``;
    ``cache_format="fp8_ds_mla"``: a uint8 ``k_cache`` of such rows, with ``tile_scale``).
    ``R`` may be 0."""
    n_real = tokens.pos.numel()
    dtype = q_rope.dtype
    kv_norm_dim = gamma.shape[0]
    freqs = interleaved_table(freqs_cis.cpu(), freqs_layout).to(compute_dtype)
    q_out = q_rope.cpu()[:n_real].clone()
    written = tokens.q_written
    q = q_out[written].to(compute_dtype)
    if q.shape[-1]:
        q_out[written] = rope(q, freqs[tokens.pos[written]][:, None, :], interleaved).to(dtype)

    k_out = k_cache.cpu().clone()
    cached = tokens.row_written
    page, slot = tokens.page[cached], tokens.row[cached]
    if kv_input is None:  # in place: the rows themselves
        computed, source = cached, k_out[page, slot]
    else:
        computed, source = written, kv_input.cpu()[:n_real][written]
    rows = torch.zeros((n_real, source.shape[1]), dtype=dtype)
    rope_part = source[:, kv_norm_dim:].to(compute_dtype)
    if rope_part.shape[-1]:
        rope_part = rope(rope_part, freqs[tokens.pos[computed]], interleaved)
    rows[computed] = torch.cat((
        rmsnorm(source[:, :kv_norm_dim], gamma.cpu(), epsilon, dtype, compute_dtype,
                norm_rounding), rope_part.to(dtype)), dim=-1)
    if cache_format == "fp8_ds_mla":
        k_out[page, slot] = ds_mla_rows(rows[cached], kv_norm_dim, tile_scale)
    else:
        k_out[page, slot] = quantize(rows[cached], k_cache.dtype, k_scale)
    return ReferenceOutputs(q_out, k_out, rows)
