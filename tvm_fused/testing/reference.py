"""An independent torch implementation of SPEC.md, used as the oracle in tests and benchmarks.

It shares no code with the TensorIR definition: positions come from ``repeat_interleave`` on
the host, the math runs in ``compute_dtype`` (float64 by default) and is rounded only where
the spec rounds: once to the output dtype for RoPE; to the gamma dtype before and after the
gamma product, then to the cache dtype, for RMSNorm. Indices that point nowhere follow
SPEC.md: a negative page writes no cache row; a position with no freqs row, a logical page
past the lookup table or a physical page ``>= num_pages`` makes the token an error, which
writes nothing. ``input_row_offsets`` must ascend from 0 (the kernel stays in bounds for any
offsets, but only these have a defined result).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Tokens:
    """Where each real token goes, all int64/bool tensors of ``offsets[-1]`` elements."""

    request: torch.Tensor
    pos: torch.Tensor
    page: torch.Tensor  # physical page (-1 where the token has none to look up)
    q_written: torch.Tensor  # the op writes the token's q row
    row_written: torch.Tensor  # the op writes the token's cache row ``(page, pos % size)``

    @property
    def errors(self) -> int:
        """Tokens the op counts as errors: their q row is not written."""
        return int((~self.q_written).sum())


def locate_tokens(input_row_offsets: torch.Tensor, cache_lengths: torch.Tensor,
                  lookup_table: torch.Tensor, max_seq_len: int, num_pages: int,
                  page_size: int) -> Tokens:
    """Request, position and page of every real token, and what the op writes for it."""
    offsets = input_row_offsets.to(torch.int64).cpu()
    counts = offsets[1:] - offsets[:-1]
    request = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first_token = offsets[:-1][request]
    pos = (cache_lengths.to(torch.int64).cpu()[request] + torch.arange(request.numel())
           - first_token)
    table = lookup_table.to(torch.int64).cpu()
    listed = (pos >= 0) & (pos < max_seq_len) & (pos // page_size < table.shape[1])
    page = torch.full_like(pos, -1)
    page[listed] = table[request[listed], pos[listed] // page_size]
    q_written = listed & (page < num_pages)
    return Tokens(request, pos, page, q_written, q_written & (page >= 0))


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
        ``input_row_offsets[-1]`` are not part of the op; rows of error tokens, which the op
        does not write, hold ``q_rope``'s values).
    k_cache_out : a copy of ``k_cache`` with the new tokens' rows updated.
    """
    tokens = locate_tokens(input_row_offsets, cache_lengths, lookup_table,
                           freqs_cis.shape[0], k_cache.shape[0], k_cache.shape[1])
    n_real = tokens.pos.numel()
    dtype = q_rope.dtype
    kv_norm_dim = gamma.shape[0]
    page_size = k_cache.shape[1]
    q_out = q_rope.cpu()[:n_real].clone()
    written = tokens.q_written
    freqs = freqs_cis.cpu().to(compute_dtype)[tokens.pos[written]]           # [n_written, R]
    q = q_out[written].to(compute_dtype)
    q_out[written] = rope(q, freqs[:, None, :], interleaved).to(dtype)

    k_out = k_cache.cpu().clone()
    row = tokens.row_written
    page, slot = tokens.page[row], tokens.pos[row] % page_size
    rows = k_out[page, slot]                                                 # [n_rows, D + R]
    k_rope = rope(rows[:, kv_norm_dim:].to(compute_dtype), freqs[row[written]],
                  interleaved).to(dtype)
    k_norm = rmsnorm(rows[:, :kv_norm_dim], gamma.cpu(), epsilon, dtype, compute_dtype)
    k_out[page, slot] = torch.cat((k_norm, k_rope), dim=-1)
    return q_out, k_out
