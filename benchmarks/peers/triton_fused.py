"""The fused op as one Triton kernel: the peer a user would write instead of TVM.

One program per (token, block of heads); the last block of each token normalizes the new
latent row and rotates its rope part: in place, the cache row itself; write-through, the
token's ``kv_input`` row, written to the cache (quantized if the cache is fp8) and to
``kv_output`` if given. Every program finds its token's request by a binary search of
``input_row_offsets`` and returns at once for padding rows. Heads per program and warps are
autotuned with ``triton.autotune`` per (heads, rope_dim, kv_norm_dim, form, dtypes) and token
count rounded up to a power of two (decode and prefill want different grids).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _cache_value(x, scale, k_ptr, QUANTIZE: tl.constexpr, CACHE_MAX: tl.constexpr):
    """``x`` (q's dtype) as the cache stores it: itself, or ``fp8(clamp(x / scale))``."""
    if QUANTIZE:  # one return statement: Triton 3.6 types every return of a function alike
        value = tl.math.div_rn(x.to(tl.float32), scale)
        value = tl.clamp(value, -CACHE_MAX, CACHE_MAX, propagate_nan=tl.PropagateNan.ALL)
        stored = value.to(k_ptr.dtype.element_ty)
    else:
        stored = x
    return stored


@triton.autotune(
    configs=[triton.Config({"HEADS_PER_PROGRAM": h}, num_warps=w)
             for h in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)],
    key=["NUM_HEADS", "ROPE_DIM", "NORM_DIM", "WRITE_THROUGH", "KV_OUTPUT", "token_bucket"],
    warmup=5, rep=25,  # ms per config: the kernels take microseconds
    restore_value=["k_ptr"],  # autotuning runs the in-place kernel many times: keep the
)                             # cache as it was, so the first (tuning) call is still right
@triton.jit
def _fused_kernel(q_ptr, out_ptr, offsets_ptr, freqs_ptr, gamma_ptr, k_ptr, table_ptr,
                  lengths_ptr, kv_ptr, kvo_ptr, scale_ptr, epsilon, batch, token_bucket,
                  q_s0, q_s1, o_s0, o_s1, k_s0, k_s1, t_s0, kv_s0, kvo_s0,
                  NUM_HEADS: tl.constexpr, ROPE_DIM: tl.constexpr, HALF: tl.constexpr,
                  NORM_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, INTERLEAVED: tl.constexpr,
                  WRITE_THROUGH: tl.constexpr, KV_OUTPUT: tl.constexpr,
                  QUANTIZE: tl.constexpr, CACHE_MAX: tl.constexpr,
                  HEADS_PER_PROGRAM: tl.constexpr):
    token = tl.program_id(0)
    block = tl.program_id(1)
    if token >= tl.load(offsets_ptr + batch).to(tl.int32):
        return
    lo = 0
    hi = batch
    while lo < hi:  # largest b with offsets[b] <= token
        mid = (lo + hi + 1) // 2
        if tl.load(offsets_ptr + mid).to(tl.int32) <= token:
            lo = mid
        else:
            hi = mid - 1
    pos = tl.load(lengths_ptr + lo) + token - tl.load(offsets_ptr + lo).to(tl.int32)
    j = tl.arange(0, HALF)
    cos = tl.load(freqs_ptr + pos * ROPE_DIM + 2 * j).to(tl.float32)
    sin = tl.load(freqs_ptr + pos * ROPE_DIM + 2 * j + 1).to(tl.float32)
    if INTERLEAVED:
        first, second = 2 * j, 2 * j + 1
    else:
        first, second = j, j + HALF
    num_blocks = tl.cdiv(NUM_HEADS, HEADS_PER_PROGRAM)
    dtype = out_ptr.dtype.element_ty
    if block < num_blocks:  # q rope for a block of heads
        heads = block * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
        mask = heads[:, None] < NUM_HEADS
        src = q_ptr + token.to(tl.int64) * q_s0 + heads[:, None].to(tl.int64) * q_s1
        dst = out_ptr + token.to(tl.int64) * o_s0 + heads[:, None].to(tl.int64) * o_s1
        x0 = tl.load(src + first[None, :], mask=mask).to(tl.float32)
        x1 = tl.load(src + second[None, :], mask=mask).to(tl.float32)
        tl.store(dst + first[None, :], (x0 * cos - x1 * sin).to(dtype), mask=mask)
        tl.store(dst + second[None, :], (x0 * sin + x1 * cos).to(dtype), mask=mask)
    else:  # the new row: rope part, then RMSNorm of the latent part
        page = tl.load(table_ptr + lo.to(tl.int64) * t_s0 + pos // PAGE_SIZE)
        row = k_ptr + page.to(tl.int64) * k_s0 + (pos % PAGE_SIZE).to(tl.int64) * k_s1
        new_row = row  # (names apart from the q branch's: Triton 3.6 types a name
        if WRITE_THROUGH:  # assigned in both branches of an if alike)
            new_row = kv_ptr + token.to(tl.int64) * kv_s0
        scale = 1.0
        if QUANTIZE:
            scale = tl.load(scale_ptr)
        k0 = tl.load(new_row + NORM_DIM + first).to(tl.float32)
        k1 = tl.load(new_row + NORM_DIM + second).to(tl.float32)
        roped0 = (k0 * cos - k1 * sin).to(dtype)
        roped1 = (k0 * sin + k1 * cos).to(dtype)
        tl.store(row + NORM_DIM + first, _cache_value(roped0, scale, k_ptr, QUANTIZE, CACHE_MAX))
        tl.store(row + NORM_DIM + second, _cache_value(roped1, scale, k_ptr, QUANTIZE, CACHE_MAX))
        c = tl.arange(0, NORM_DIM)
        x = tl.load(new_row + c).to(tl.float32)
        rms = tl.rsqrt(tl.sum(x * x, axis=0) / NORM_DIM + epsilon)
        gamma = tl.load(gamma_ptr + c)
        normed = (x * rms).to(gamma_ptr.dtype.element_ty)
        y = (normed.to(tl.float32) * gamma.to(tl.float32)).to(gamma_ptr.dtype.element_ty)
        y = y.to(dtype)
        tl.store(row + c, _cache_value(y, scale, k_ptr, QUANTIZE, CACHE_MAX))
        if KV_OUTPUT:
            out_row = kvo_ptr + token.to(tl.int64) * kvo_s0
            tl.store(out_row + NORM_DIM + first, roped0)
            tl.store(out_row + NORM_DIM + second, roped1)
            tl.store(out_row + c, y)


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    """``k_scale`` of fp8 calls that pass none: 1."""
    return torch.ones(1, dtype=torch.float32, device=device)


def triton_fused_rope_rmsnorm(q_rope, input_row_offsets, freqs_cis, gamma, k_cache,
                              lookup_table, cache_lengths, *, kv_input=None, kv_output=None,
                              k_scale=None, epsilon=1e-6, out=None, interleaved=True,
                              heads_per_program=None):
    """Same arguments and effect as ``tvm_fused.fused_rope_rmsnorm`` (both forms; no checks
    of indices that point nowhere); returns ``out``. ``heads_per_program`` fixes that knob
    (4 warps) instead of autotuning."""
    if out is None:
        out = torch.empty_like(q_rope)
    tokens, heads, rope_dim = q_rope.shape
    norm_dim = gamma.shape[0]
    offsets = input_row_offsets.view(torch.int32)
    quantize = k_cache.dtype != q_rope.dtype
    if quantize and k_scale is None:
        k_scale = _unit_scale(q_rope.device)
    # tensors of the other form are not read: any pointer will do
    rows_in = q_rope if kv_input is None else kv_input
    rows_out = q_rope if kv_output is None else kv_output

    def grid(meta):
        return (tokens, triton.cdiv(heads, meta["HEADS_PER_PROGRAM"]) + 1)

    kernel, meta = _fused_kernel, {}
    if heads_per_program is not None:
        kernel, meta = _fused_kernel.fn, {"HEADS_PER_PROGRAM": heads_per_program}
    if tokens:
        kernel[grid](
            q_rope, out, offsets, freqs_cis, gamma, k_cache, lookup_table, cache_lengths,
            rows_in, rows_out, offsets if k_scale is None else k_scale, epsilon,
            cache_lengths.shape[0], triton.next_power_of_2(tokens), q_rope.stride(0),
            q_rope.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
            lookup_table.stride(0), rows_in.stride(0), rows_out.stride(0), NUM_HEADS=heads,
            ROPE_DIM=rope_dim, HALF=rope_dim // 2, NORM_DIM=norm_dim,
            PAGE_SIZE=k_cache.shape[1], INTERLEAVED=interleaved,
            WRITE_THROUGH=kv_input is not None, KV_OUTPUT=kv_output is not None,
            QUANTIZE=quantize, CACHE_MAX=torch.finfo(k_cache.dtype).max, **meta)
    return out
