"""The op as a user would write it in plain torch: unfused, on the device, no host sync.

This is the baseline the kernel is timed against. It takes the number of real tokens as a
host integer (a serving engine's scheduler knows it), gathers positions with
``searchsorted`` and updates the cache rows with an indexed write.
"""

from __future__ import annotations

import torch

from tvm_fused.testing.reference import rmsnorm, rope


def token_pages(input_row_offsets, lookup_table, cache_lengths, page_size: int,
                num_tokens: int):
    """``(pos, page, slot)``, int64 ``[num_tokens]`` each: every token's position and its
    cache row's physical page and slot in the page."""
    offsets = input_row_offsets.to(torch.int64)
    token = torch.arange(num_tokens, device=offsets.device)
    request = torch.searchsorted(offsets, token, right=True) - 1  # last b: offsets[b] <= token
    pos = cache_lengths.to(torch.int64)[request] + token - offsets[request]
    page = lookup_table[request, pos // page_size].to(torch.int64)
    return pos, page, pos % page_size


def torch_fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
                             cache_lengths, *, num_tokens: int, epsilon: float = 1e-6,
                             out: torch.Tensor | None = None, interleaved: bool = True):
    """Same arguments and effect as ``tvm_fused.fused_rope_rmsnorm`` (float32 math) for the
    first ``num_tokens`` rows; returns ``out``."""
    dtype, kv_norm_dim = q_rope.dtype, gamma.shape[0]
    pos, page, slot = token_pages(input_row_offsets, lookup_table, cache_lengths,
                                  k_cache.shape[1], num_tokens)
    freqs = freqs_cis[pos].float()
    if out is None:
        out = torch.empty_like(q_rope)
    out[:num_tokens] = rope(q_rope[:num_tokens].float(), freqs[:, None], interleaved).to(dtype)
    rows = k_cache[page, slot]
    k_cache[page, slot] = torch.cat((
        rmsnorm(rows[:, :kv_norm_dim], gamma, epsilon, dtype, torch.float32),
        rope(rows[:, kv_norm_dim:].float(), freqs, interleaved).to(dtype)), dim=-1)
    return out
