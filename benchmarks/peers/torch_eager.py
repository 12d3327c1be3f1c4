"""The op as a user would write it in plain torch: unfused, on the device, no host sync.

These are the baselines the kernel is timed against, eager and under ``torch.compile``.
In place: the number of real tokens comes from the host (a serving engine's scheduler knows
it), positions are gathered with ``searchsorted`` and the cache rows updated with an indexed
write. Write-through: what a vLLM model runs, composed in torch: each token's position and
cache slot come precomputed (vLLM's ``positions`` and ``slot_mapping``), then RMSNorm of the
latent, rotary of q and of k's rope part, and the cache write of ``[normed | roped k]``
(``concat_and_cache_mla``), quantized when the cache is fp8.
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


def slot_mapping(input_row_offsets, lookup_table, cache_lengths, page_size: int,
                 num_tokens: int):
    """``(positions, slots)``, int64 ``[num_tokens]`` each: every token's position (its freqs
    row) and its cache row as ``page * page_size + slot in the page`` (vLLM's
    ``slot_mapping``)."""
    pos, page, slot = token_pages(input_row_offsets, lookup_table, cache_lengths, page_size,
                                  num_tokens)
    return pos, page * page_size + slot


def write_cache_rows(k_cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``k_cache[slot // page_size, slot % page_size] = rows`` for every slot: ``k_cache``
    ``[pages, page_size, D + R]``, ``slots`` int64 ``[n]`` (non-negative), ``rows [n, D + R]``
    in the cache's dtype."""
    page_size = k_cache.shape[1]
    k_cache[slots // page_size, slots % page_size] = rows


def to_cache_dtype(rows: torch.Tensor, cache_dtype: torch.dtype,
                   k_scale: torch.Tensor | None) -> torch.Tensor:
    """``rows`` as a cache of ``cache_dtype`` stores them: unchanged in their own dtype; for
    fp8, ``fp8(clamp(float32(rows) / k_scale, -max, max))`` (vLLM's quantization;
    ``k_scale``: a one-element float32 tensor on the rows' device, None for 1)."""
    if cache_dtype == rows.dtype:
        return rows
    limit = torch.finfo(cache_dtype).max
    values = rows.float() if k_scale is None else rows.float() / k_scale
    return values.clamp(-limit, limit).to(cache_dtype)


def new_rows(latent: torch.Tensor, freqs: torch.Tensor, gamma: torch.Tensor, epsilon: float,
             interleaved: bool) -> torch.Tensor:
    """``[rmsnorm(latent[:, :D]) | rope(latent[:, D:])]``, ``[n, D + R]`` in the latent's
    dtype: RMSNorm in HF order (float32 statistics, rounded to gamma's dtype before the
    product), rotary in float32 by ``freqs [n, R]`` (float32 (cos, sin) pairs)."""
    dtype, kv_norm_dim = latent.dtype, gamma.shape[0]
    return torch.cat((
        rmsnorm(latent[:, :kv_norm_dim], gamma, epsilon, dtype, torch.float32),
        rope(latent[:, kv_norm_dim:].float(), freqs, interleaved).to(dtype)), dim=-1)


def _rope_q(q_rope: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor | None,
            interleaved: bool) -> torch.Tensor:
    """``out[:n] = rope(q_rope[:n])`` for ``freqs [n, R]`` (float32), in q's dtype;
    ``out`` (``[T, H, R]``, made if None) is returned."""
    if out is None:
        out = torch.empty_like(q_rope)
    n = freqs.shape[0]
    out[:n] = rope(q_rope[:n].float(), freqs[:, None], interleaved).to(q_rope.dtype)
    return out


def torch_fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
                             cache_lengths, *, num_tokens: int, epsilon: float = 1e-6,
                             out: torch.Tensor | None = None, interleaved: bool = True):
    """Same arguments and effect as ``tvm_fused.fused_rope_rmsnorm`` in place (float32 math)
    for the first ``num_tokens`` rows; returns ``out``."""
    pos, page, slot = token_pages(input_row_offsets, lookup_table, cache_lengths,
                                  k_cache.shape[1], num_tokens)
    freqs = freqs_cis[pos].float()
    out = _rope_q(q_rope, freqs, out, interleaved)
    k_cache[page, slot] = new_rows(k_cache[page, slot], freqs, gamma, epsilon, interleaved)
    return out


def torch_write_through(q_rope, positions, slots, freqs_cis, gamma, kv_input, k_cache, *,
                        k_scale: torch.Tensor | None = None, epsilon: float = 1e-6,
                        out: torch.Tensor | None = None, kv_output: torch.Tensor | None = None,
                        interleaved: bool = True):
    """The write-through op as vLLM composes it, for the first ``n = len(positions)`` tokens:
    ``out[:n]`` = roped q, the cache row at each of ``slots`` = ``[normed latent | roped k]``
    of ``kv_input[:n]`` (quantized by ``to_cache_dtype`` for an fp8 cache), and the same rows
    (q's dtype) in ``kv_output[:n]`` if given. ``positions``, ``slots``: int64 ``[n]`` from
    ``slot_mapping``; the other tensors as for ``tvm_fused.fused_rope_rmsnorm``. Returns
    ``out``."""
    freqs = freqs_cis[positions].float()
    out = _rope_q(q_rope, freqs, out, interleaved)
    rows = new_rows(kv_input[:positions.shape[0]], freqs, gamma, epsilon, interleaved)
    if kv_output is not None:
        kv_output[:positions.shape[0]] = rows
    write_cache_rows(k_cache, slots, to_cache_dtype(rows, k_cache.dtype, k_scale))
    return out
