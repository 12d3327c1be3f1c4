"""An independent torch implementation of SPEC.md, used as the oracle in tests and benchmarks.

It shares no code with the TensorIR definition: positions come from ``repeat_interleave`` on
the host, the math runs in ``compute_dtype`` (float64 by default) and is rounded only where
the spec rounds: once to the output dtype for RoPE; to the gamma dtype before and after the
gamma product, then to the cache dtype, for RMSNorm.
"""

from __future__ import annotations

import torch


def token_positions(
    input_row_offsets: torch.Tensor, cache_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Request index and cache position of every real token.

    Returns ``(request, pos)``: two int64 tensors of ``offsets[-1]`` elements.
    """
    offsets = input_row_offsets.to(torch.int64).cpu()
    counts = offsets[1:] - offsets[:-1]
    request = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first_token = offsets[:-1][request]
    pos = cache_lengths.to(torch.int64).cpu()[request] + torch.arange(request.numel()) - first_token
    return request, pos


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
            compute_dtype: torch.dtype) -> torch.Tensor:
    """``out_dtype(gamma_dtype(x * rsqrt(mean(x^2) + eps)) * gamma)`` over the last dim."""
    xc = x.to(compute_dtype)
    y = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + epsilon)
    y = y.to(gamma.dtype).to(compute_dtype) * gamma.to(compute_dtype)
    return y.to(gamma.dtype).to(out_dtype)


def fused_rope_rmsnorm_reference(
    q_rope: torch.Tensor,
    input_row_offsets: torch.Tensor,
    freqs_cis: torch.Tensor,
    gamma: torch.Tensor,
    k_cache: torch.Tensor,
    lookup_table: torch.Tensor,
    cache_lengths: torch.Tensor,
    *,
    epsilon: float = 1e-6,
    interleaved: bool = True,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op of SPEC.md, out of place, on the CPU.

    Parameters are those of ``tvm_fused.fused_rope_rmsnorm``; nothing is modified.

    Returns
    -------
    q_out : ``[n_real, H, R]`` in ``q_rope.dtype``: roped q of the real tokens (rows past
        ``input_row_offsets[-1]`` are not part of the op).
    k_cache_out : a copy of ``k_cache`` with the new tokens' rows updated.
    """
    request, pos = token_positions(input_row_offsets, cache_lengths)
    n_real = pos.numel()
    dtype = q_rope.dtype
    kv_norm_dim = gamma.shape[0]
    page_size = k_cache.shape[1]
    freqs = freqs_cis.cpu().to(compute_dtype)[pos]                       # [n_real, R]
    q = q_rope.cpu()[:n_real].to(compute_dtype)
    q_out = rope(q, freqs[:, None, :], interleaved).to(dtype)

    k_out = k_cache.cpu().clone()
    page = lookup_table.cpu().to(torch.int64)[request, pos // page_size]
    slot = pos % page_size
    rows = k_out[page, slot]                                              # [n_real, D + R]
    k_rope = rope(rows[:, kv_norm_dim:].to(compute_dtype), freqs, interleaved).to(dtype)
    k_norm = rmsnorm(rows[:, :kv_norm_dim], gamma.cpu(), epsilon, dtype, compute_dtype)
    k_out[page, slot] = torch.cat((k_norm, k_rope), dim=-1)
    return q_out, k_out
