"""The op as a user would write it in plain torch: unfused, on the device, no host sync.

This is the baseline the kernel is timed against. It takes the number of real tokens as a
host integer (a serving engine's scheduler knows it), gathers positions with
``searchsorted`` and updates the cache rows with an indexed write.
"""

from __future__ import annotations

import torch

from .reference import rmsnorm, rope


def torch_fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
                             cache_lengths, *, num_tokens: int, epsilon: float = 1e-6,
                             out: torch.Tensor | None = None, interleaved: bool = True):
    """Same arguments and effect as ``tvm_fused.fused_rope_rmsnorm`` (float32 math) for the
    first ``num_tokens`` rows; returns ``out``."""
    device, dtype = q_rope.device, q_rope.dtype
    kv_norm_dim, page_size = gamma.shape[0], k_cache.shape[1]
    offsets = input_row_offsets.to(torch.int64)
    token = torch.arange(num_tokens, device=device)
    request = torch.searchsorted(offsets[1:], token, right=True)
    pos = cache_lengths.to(torch.int64)[request] + token - offsets[request]
    freqs = freqs_cis[pos].float()
    if out is None:
        out = torch.empty_like(q_rope)
    out[:num_tokens] = rope(q_rope[:num_tokens].float(), freqs[:, None], interleaved).to(dtype)
    page = lookup_table[request, pos // page_size].to(torch.int64)
    slot = pos % page_size
    rows = k_cache[page, slot]
    k_cache[page, slot] = torch.cat((
        rmsnorm(rows[:, :kv_norm_dim], gamma, epsilon, dtype, torch.float32),
        rope(rows[:, kv_norm_dim:].float(), freqs, interleaved).to(dtype)), dim=-1)
    return out
