"""The op as torch custom ops, so it composes with torch.compile and CUDA graphs.

- ``torch.ops.tvm_fused.fused_rope_rmsnorm(q_rope, ...) -> q_out``: out of place for q
  (a new tensor), ``k_cache`` (and ``errors``, if given) mutated.
- ``torch.ops.tvm_fused.fused_rope_rmsnorm_(q_rope, ...) -> None``: ``q_rope`` and
  ``k_cache`` (and ``errors``) mutated in place.

Every argument is required, ``errors`` (a one-element int32 tensor, or None) last: torch
2.11's custom ops fail on a mutable argument left to its default, and Inductor (torch 2.13)
passes a mutable optional tensor last whatever its place in the schema. Both declare what
they mutate and have fake (meta) implementations, so
``torch.compile(fullgraph=True)`` traces through them; they never validate in Python (no
host sync, no per-call checks: ``validate=False``): the compiled kernel's entry still refuses
malformed tensors, and bad indices are skipped and counted in ``errors``.
"""

from __future__ import annotations

import torch

from .api import fused_rope_rmsnorm


@torch.library.custom_op("tvm_fused::fused_rope_rmsnorm",
                         mutates_args=("k_cache", "errors"))
def fused_rope_rmsnorm_op(
    q_rope: torch.Tensor, input_row_offsets: torch.Tensor, freqs_cis: torch.Tensor,
    gamma: torch.Tensor, k_cache: torch.Tensor, lookup_table: torch.Tensor,
    cache_lengths: torch.Tensor, epsilon: float, interleaved: bool,
    errors: torch.Tensor | None,
) -> torch.Tensor:
    """Roped q as a new contiguous tensor; ``k_cache`` updated in place."""
    out = torch.empty(q_rope.shape, dtype=q_rope.dtype, device=q_rope.device)
    return fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache,
                              lookup_table, cache_lengths, epsilon=epsilon, out=out,
                              errors=errors, interleaved=interleaved, validate=False)


@fused_rope_rmsnorm_op.register_fake
def _(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table, cache_lengths,
      epsilon, interleaved, errors):
    return torch.empty(q_rope.shape, dtype=q_rope.dtype, device=q_rope.device)


@torch.library.custom_op("tvm_fused::fused_rope_rmsnorm_",
                         mutates_args=("q_rope", "k_cache", "errors"))
def fused_rope_rmsnorm_inplace_op(
    q_rope: torch.Tensor, input_row_offsets: torch.Tensor, freqs_cis: torch.Tensor,
    gamma: torch.Tensor, k_cache: torch.Tensor, lookup_table: torch.Tensor,
    cache_lengths: torch.Tensor, epsilon: float, interleaved: bool,
    errors: torch.Tensor | None,
) -> None:
    """``q_rope`` and ``k_cache`` updated in place."""
    fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
                       cache_lengths, epsilon=epsilon, out=q_rope, errors=errors,
                       interleaved=interleaved, validate=False)


@fused_rope_rmsnorm_inplace_op.register_fake
def _(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table, cache_lengths,
      epsilon, interleaved, errors):
    return None
