"""The op composed from Liger-Kernel's Triton RoPE and RMSNorm: what a user of Liger writes.

Liger rotates NeoX (half-split) pairs only, so this peer takes ``interleaved=False`` calls.
Positions and pages come from torch index math (as in ``torch_baseline``); the new cache
rows are gathered, Liger's RoPE rotates q and the rows' rope parts in one launch, Liger's
RMSNorm (Llama casting: float32 statistics, normalized value rounded before gamma) normalizes
the latent parts, and the rows are scattered back.
"""

from __future__ import annotations

import torch
from liger_kernel.ops.rms_norm import rms_norm_forward
from liger_kernel.ops.rope import rope_forward

from .torch_eager import token_pages


def liger_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
                       cache_lengths, *, num_tokens: int, epsilon: float = 1e-6,
                       out: torch.Tensor | None = None, interleaved: bool = False):
    """Same arguments and effect as ``tvm_fused.fused_rope_rmsnorm`` with NeoX pairs, for the
    first ``num_tokens`` rows of ``q_rope``; returns ``out``."""
    if interleaved:
        raise ValueError("Liger-Kernel's RoPE rotates NeoX (half-split) pairs only")
    kv_norm_dim = gamma.shape[0]
    pos, page, slot = token_pages(input_row_offsets, lookup_table, cache_lengths,
                                  k_cache.shape[1], num_tokens)
    freqs = freqs_cis[pos].float()
    cos, sin = freqs[None, :, 0::2], freqs[None, :, 1::2]  # [1, n, R/2]: not duplicated
    rows = k_cache[page, slot]
    q = q_rope[None, :num_tokens].transpose(1, 2)  # [1, H, n, R]
    k = rows[None, :, None, kv_norm_dim:].transpose(1, 2)  # [1, 1, n, R]
    q_out, k_out, _, _ = rope_forward(q, k, cos, sin, rotary_dim=q_rope.shape[2])
    normed = rms_norm_forward(rows[:, :kv_norm_dim], gamma, epsilon, 0.0, "llama", None)[0]
    if out is None:
        out = torch.empty_like(q_rope)
    out[:num_tokens] = q_out[0].transpose(0, 1)
    k_cache[page, slot] = torch.cat((normed, k_out[0, 0]), dim=-1)
    return out
