"""The op as torch custom ops, so it composes with torch.compile and CUDA graphs.

In place (the caller has written the new latent rows into the cache):

- ``torch.ops.tvm_fused.fused_rope_rmsnorm(q_rope, ...) -> q_out``: q out of place (a new
  tensor), ``k_cache`` (and ``errors``, if given) mutated.
- ``torch.ops.tvm_fused.fused_rope_rmsnorm_(q_rope, ...) -> None``: ``q_rope`` and
  ``k_cache`` (and ``errors``) mutated in place.

Write-through (the new rows come from ``kv_input``, the projection output; the cache may be
fp8 with ``k_scale``, or None):

- ``torch.ops.tvm_fused.fused_rope_rmsnorm_write_through(q_rope, kv_input, ...) -> q_out``
- ``torch.ops.tvm_fused.fused_rope_rmsnorm_write_through_(q_rope, kv_input, ...) -> None``
  (``q_rope`` roped in place); both mutate ``k_cache``, ``kv_output`` and ``errors`` (each
  of the last two may be None).

Engine addressing (positions and a slot mapping; vLLM's and SGLang's layer, in one launch):

- ``torch.ops.tvm_fused.fused_rope_rmsnorm_slots_(q_rope, positions, slot_mapping,
  cos_sin_cache, gamma, k_cache, kv_input, k_scale, epsilon, interleaved, freqs_layout,
  norm_rounding, kv_output, errors) -> None``: ``q_rope`` roped in place (vLLM's view of q),
  the new rows written to ``k_cache`` from ``kv_input`` (None: updated in place), and to
  ``kv_output``; mutates ``q_rope``, ``k_cache``, ``kv_output`` and ``errors``.

Every argument is required, the mutable optional tensors (``kv_output``, ``errors``) last:
torch 2.11's custom ops fail on a mutable argument left to its default, and Inductor (torch
2.13) passes a mutable optional tensor last whatever its place in the schema. The ops
declare what they mutate and have fake (meta) implementations, so
``torch.compile(fullgraph=True)`` traces through them; they never validate in Python (no
host sync, no per-call checks: ``validate=False``): the compiled kernel's entry still refuses
malformed and overlapping tensors, and bad indices are skipped and counted in ``errors``.
"""

from __future__ import annotations

import torch

from .api import fused_rope_rmsnorm, fused_rope_rmsnorm_slots


def _new_q(q_rope: torch.Tensor) -> torch.Tensor:
    return torch.empty(q_rope.shape, dtype=q_rope.dtype, device=q_rope.device)


@torch.library.custom_op("tvm_fused::fused_rope_rmsnorm",
                         mutates_args=("k_cache", "errors"))
def fused_rope_rmsnorm_op(
    q_rope: torch.Tensor, input_row_offsets: torch.Tensor, freqs_cis: torch.Tensor,
    gamma: torch.Tensor, k_cache: torch.Tensor, lookup_table: torch.Tensor,
    cache_lengths: torch.Tensor, epsilon: float, interleaved: bool,
    errors: torch.Tensor | None,
) -> torch.Tensor:
    """Roped q as a new contiguous tensor; ``k_cache`` updated in place."""
    return fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache,
                              lookup_table, cache_lengths, epsilon=epsilon, out=_new_q(q_rope),
                              errors=errors, interleaved=interleaved, validate=False)


@fused_rope_rmsnorm_op.register_fake
def _(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table, cache_lengths,
      epsilon, interleaved, errors):
    return _new_q(q_rope)


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


@torch.library.custom_op("tvm_fused::fused_rope_rmsnorm_write_through",
                         mutates_args=("k_cache", "kv_output", "errors"))
def fused_rope_rmsnorm_write_through_op(
    q_rope: torch.Tensor, kv_input: torch.Tensor, input_row_offsets: torch.Tensor,
    freqs_cis: torch.Tensor, gamma: torch.Tensor, k_cache: torch.Tensor,
    lookup_table: torch.Tensor, cache_lengths: torch.Tensor, k_scale: torch.Tensor | None,
    epsilon: float, interleaved: bool, kv_output: torch.Tensor | None,
    errors: torch.Tensor | None,
) -> torch.Tensor:
    """Roped q as a new contiguous tensor; the new rows written to ``k_cache`` (and
    ``kv_output``) from ``kv_input``."""
    return fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache,
                              lookup_table, cache_lengths, kv_input=kv_input,
                              kv_output=kv_output, k_scale=k_scale, epsilon=epsilon,
                              out=_new_q(q_rope), errors=errors, interleaved=interleaved,
                              validate=False)


@fused_rope_rmsnorm_write_through_op.register_fake
def _(q_rope, kv_input, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
      cache_lengths, k_scale, epsilon, interleaved, kv_output, errors):
    return _new_q(q_rope)


@torch.library.custom_op("tvm_fused::fused_rope_rmsnorm_write_through_",
                         mutates_args=("q_rope", "k_cache", "kv_output", "errors"))
def fused_rope_rmsnorm_write_through_inplace_op(
    q_rope: torch.Tensor, kv_input: torch.Tensor, input_row_offsets: torch.Tensor,
    freqs_cis: torch.Tensor, gamma: torch.Tensor, k_cache: torch.Tensor,
    lookup_table: torch.Tensor, cache_lengths: torch.Tensor, k_scale: torch.Tensor | None,
    epsilon: float, interleaved: bool, kv_output: torch.Tensor | None,
    errors: torch.Tensor | None,
) -> None:
    """``q_rope`` roped in place; the new rows written to ``k_cache`` (and ``kv_output``)
    from ``kv_input``."""
    fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
                       cache_lengths, kv_input=kv_input, kv_output=kv_output,
                       k_scale=k_scale, epsilon=epsilon, out=q_rope, errors=errors,
                       interleaved=interleaved, validate=False)


@fused_rope_rmsnorm_write_through_inplace_op.register_fake
def _(q_rope, kv_input, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
      cache_lengths, k_scale, epsilon, interleaved, kv_output, errors):
    return None


@torch.library.custom_op("tvm_fused::fused_rope_rmsnorm_slots_",
                         mutates_args=("q_rope", "k_cache", "kv_output", "errors"))
def fused_rope_rmsnorm_slots_inplace_op(
    q_rope: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor, gamma: torch.Tensor, k_cache: torch.Tensor,
    kv_input: torch.Tensor | None, k_scale: torch.Tensor | None, epsilon: float,
    interleaved: bool, freqs_layout: str, norm_rounding: str, kv_output: torch.Tensor | None,
    errors: torch.Tensor | None,
) -> None:
    """``q_rope`` roped in place; the new rows written to ``k_cache`` (and ``kv_output``)
    from ``kv_input``, or updated in place without it."""
    fused_rope_rmsnorm_slots(q_rope, positions, slot_mapping, cos_sin_cache, gamma, k_cache,
                             kv_input=kv_input, kv_output=kv_output, k_scale=k_scale,
                             epsilon=epsilon, out=q_rope, errors=errors,
                             interleaved=interleaved, freqs_layout=freqs_layout,
                             norm_rounding=norm_rounding, validate=False)


@fused_rope_rmsnorm_slots_inplace_op.register_fake
def _(q_rope, positions, slot_mapping, cos_sin_cache, gamma, k_cache, kv_input, k_scale,
      epsilon, interleaved, freqs_layout, norm_rounding, kv_output, errors):
    return None
