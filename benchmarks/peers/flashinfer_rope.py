"""FlashInfer's fused MLA rope + fp8 quantize + paged-cache append, after an RMSNorm kernel:
the nearest a FlashInfer user gets to the op (FlashInfer does not fuse the norm).

FlashInfer 0.7.2's ``rope_quantize_fp8_append_paged_kv_cache`` (``flashinfer/rope.py``) runs
one kernel, ``RopeQuantizeAppendPagedKVCacheKernel`` (``csrc/rope.cu``, ``pos_enc.cuh``),
that ropes q's and the new row's rope parts, quantizes them and the row's latent part to
fp8, writes q's rope part (fp8 only: the kernel has no bf16 output) and the row into an MLA
cache given as two views, ``ckv_cache [pages, page_size, 512]`` and ``kpe_cache [pages,
page_size, 64]``, which here are views of tvm-fused's ``k_cache [pages, page_size, 576]``.
Its cos/sin table is float32 ``[max_position, rope_dim]``, cosines first. Before it, Liger's
RMSNorm (float32 statistics, the normalized value rounded to bf16 before gamma: tvm-fused's
rounding) normalizes the latent of ``kv_input`` into a bf16 buffer.

The kernel also quantizes a ``q_nope [n, H, 512]`` (the absorbed q of MLA decode), which the
op has no counterpart for, in ``H * 8`` more blocks per group of tokens. With
``real_q_nope=False`` it gets a broadcast of one row (stride 0: no memory traffic, but every
block stores to the same 512 bytes, which serializes in L2 at prefill sizes); with ``True``,
a real bf16 input and fp8 output (``q_nope_bytes`` more bytes moved). Given the fp8
attention query (``query``: ``AttentionQuery``), it writes the whole query, rope and nope
parts, into the column slices of the head-padded buffer: FlashInfer's one launch for the
op's fp8-query form with a per-tensor fp8 cache (FlashInfer writes no fp8_ds_mla rows).

FlashInfer's Python package imports many other libraries (CUTLASS DSL, cuda-python, ...);
only its rope module is needed, so ``scripts/build_flashinfer_rope.sh`` compiles that module's
two sources from the wheel into one shared library (TVM FFI's ABI, as FlashInfer's JIT
does), loaded here with ``tvm_ffi.load_module`` from ``$FLASHINFER_ROPE_LIB``.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import tvm_ffi

from .torch_eager import token_pages

LIB_ENV = "FLASHINFER_ROPE_LIB"
NHD_LAYOUT = 0  # FlashInfer's QKVLayout::kNHD (unused by the MLA path)


@functools.cache
def _module():
    path = os.environ.get(LIB_ENV)
    if not path:
        raise RuntimeError(f"set {LIB_ENV} to the library scripts/build_flashinfer_rope.sh built")
    return tvm_ffi.load_module(path)


def cos_sin_table(freqs_cis: torch.Tensor) -> torch.Tensor:
    """FlashInfer's table from tvm-fused's interleaved ``freqs_cis [P, R]`` (cos, sin pairs):
    float32 ``[P, R]``, the ``R / 2`` cosines then the ``R / 2`` sines."""
    freqs = freqs_cis.float()
    return torch.cat((freqs[:, 0::2], freqs[:, 1::2]), dim=1).contiguous()


class AttentionQuery(NamedTuple):
    """The fp8 attention query of MLA decode that ``FlashInferMLAppend`` may write: ``q_nope
    [n, H, D]`` (q's dtype), the fp8 column slices ``q_nope_out [n, H, D]`` and ``q_rope_out
    [n, H, R]`` of one head-padded ``[n, H_pad, D + R]`` buffer, and its scale (the kernel
    multiplies by ``1 / q_scale``)."""

    q_nope: torch.Tensor
    q_nope_out: torch.Tensor
    q_rope_out: torch.Tensor
    q_scale: float


def mla_rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids,
                          is_neox: bool = True, quantize_dtype=None, quant_scale_q: float = 1.0,
                          quant_scale_kv: float = 1.0, *, q_rope_out, k_rope_out, q_nope_out,
                          k_nope_out, enable_pdl: bool = False):
    """``flashinfer.rope.mla_rope_quantize_fp8`` (same arguments, every output given) from
    the library ``scripts/build_flashinfer_rope.sh`` built: its ``rope_quantize`` kernel."""
    del quantize_dtype  # the outputs' dtype
    _module()["rope_quantize"](q_rope, k_rope, q_nope, k_nope, q_rope_out, k_rope_out,
                               q_nope_out, k_nope_out, cos_sin_cache, pos_ids, quant_scale_q,
                               quant_scale_kv, not is_neox, enable_pdl)
    return q_rope_out, k_rope_out, q_nope_out, k_nope_out


class FlashInferMLAppend:
    """One prepared call: ``__call__()`` normalizes ``kv_input[:, :D]`` and runs FlashInfer's
    kernel, writing ``q_out`` (fp8 ``[n, H, R]``) and the tokens' fp8 cache rows.

    The addressing is computed once, as an engine's scheduler does: each token is given as
    its own one-page "request" (``kv_indptr = arange(n + 1)``, ``kv_indices[i]`` = its
    physical page, ``positions[i]`` = its slot in the page), which FlashInfer's kernel
    resolves with the same per-token reads as a real page list.
    """

    def __init__(self, q_rope, input_row_offsets, freqs_cis, gamma, k_cache, lookup_table,
                 cache_lengths, kv_input, k_scale: float, *, num_tokens: int,
                 epsilon: float = 1e-6, real_q_nope: bool = False,
                 query: AttentionQuery | None = None):
        n, heads, rope_dim = q_rope[:num_tokens].shape
        page_size, norm_dim = k_cache.shape[1], gamma.shape[0]
        pos, page, slot = token_pages(input_row_offsets, lookup_table, cache_lengths,
                                      page_size, num_tokens)
        device = q_rope.device
        self.kv_input, self.gamma, self.epsilon = kv_input[:num_tokens], gamma, epsilon
        self.q_rope = q_rope[:num_tokens]
        if query is not None:  # the whole fp8 attention query, into its column slices
            self.q_nope, self.q_nope_out = query.q_nope[:num_tokens], query.q_nope_out
            self.q_out, self.quant_scale_q = query.q_rope_out, 1.0 / query.q_scale
            self.q_nope_bytes = 0  # the op's bytes count them
        else:
            self.quant_scale_q = 1.0
            self.q_out = torch.empty(n, heads, rope_dim, dtype=k_cache.dtype, device=device)
            rows = n * heads if real_q_nope else 1
            self.q_nope = torch.randn(rows, norm_dim, dtype=q_rope.dtype, device=device
                                      ).expand(n * heads, norm_dim).view(n, heads, -1)
            self.q_nope_out = torch.empty(rows, norm_dim, dtype=k_cache.dtype, device=device
                                          ).expand(n * heads, norm_dim).view(n, heads, -1)
            self.q_nope_bytes = rows * norm_dim * (q_rope.element_size() + 1) * real_q_nope
        self.table = cos_sin_table(freqs_cis)
        self.pos_ids = pos.to(torch.int32)
        self.ckv, self.kpe = k_cache[..., :norm_dim], k_cache[..., norm_dim:]
        self.kv_indices = page.to(torch.int32)
        self.kv_indptr = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.batch_indices = torch.arange(n, dtype=torch.int32, device=device)
        self.positions = slot.to(torch.int32)
        self.none = torch.empty(0, dtype=q_rope.dtype, device=device)
        self.none_cache = torch.empty(0, dtype=k_cache.dtype, device=device)
        self.quant_scale_kv = 1.0 / k_scale
        self.fn = _module()["rope_quantize_append_paged_kv_cache"]
        from liger_kernel.ops.rms_norm import rms_norm_forward  # the norm before the kernel

        self.rms_norm = rms_norm_forward

    def __call__(self) -> None:
        latent = self.kv_input[:, :self.gamma.shape[0]]
        self.append(self.rms_norm(latent, self.gamma, self.epsilon, 0.0, "llama", None)[0])

    def append(self, latent: torch.Tensor) -> None:
        """FlashInfer's kernel alone, with ``latent [n, D]`` (q's dtype) as the rows' latent
        parts."""
        rope = self.kv_input[:, None, latent.shape[1]:]
        self.fn(self.q_rope, rope, self.q_nope, latent[:, None], self.none, self.q_out,
                self.q_nope_out, self.table, self.pos_ids, self.none_cache, self.none_cache,
                self.ckv, self.kpe, self.kv_indices, self.kv_indptr, self.batch_indices,
                self.positions, NHD_LAYOUT, self.ckv.shape[1], self.quant_scale_q,
                self.quant_scale_kv, True, False)
