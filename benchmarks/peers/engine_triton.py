"""vLLM's three MLA-prologue kernels, hand-written in Triton: the engine's sequence as a user
would write it in Triton, kernel for kernel (three launches, no host sync, CUDA-graph
capturable). ``engine_steps`` holds the same steps in plain torch (the reference).

1. ``kv_a_layernorm``: Liger-Kernel's Triton RMSNorm (``rms_norm_forward``, one program per
   row) with ``casting_mode="llama"``: float32 statistics, the normalized value rounded to
   x's dtype BEFORE the product with the weight, the product (in float32) rounded once on
   the store: vLLM's ``rms_norm`` kernel's order, bit for bit. (Liger's ``"gemma"`` mode
   rounds once after the product: SGLang's order.) ``kv_c [T, 512]`` (a column slice of the
   projection output, its row stride kept) -> a new contiguous ``[T, 512]``.
2. ``rotary_embedding_``: vLLM's CUDA ``rotary_embedding`` kernel (``is_neox=False``, GPT-J
   pairs ``(x[2j], x[2j+1])``): one program per token rotates all of q's heads and k's heads
   in place, ``x0' = x0 c - x1 s``, ``x1' = x1 c + x0 s`` in float32, rounded once (nearest
   even) to the tensor's dtype; ``c, s`` from ``cos_sin_cache [max_position, R]`` (bf16 or
   float32: cosines in columns ``[0, R/2)``, sines in ``[R/2, R)``) at ``positions[t]``
   (int64 or int32). ``q_pe [T, H, R]`` (a strided view: ``q[..., 128:]`` of
   ``q [T, H, 192]``), ``k_pe [T, R]`` or ``[T, Hk, R]`` (a strided view of the projection
   output, row stride e.g. 2112) or None; any H (a power-of-two block of heads, masked).
3. ``concat_and_cache_mla``: vLLM's CUDA kernel of that name: one program per token of
   ``slot_mapping`` (``num_tokens = slot_mapping.size(0) <= T``); ``slot = slot_mapping[t]``,
   a negative slot returns at once (in the kernel: no host sync), else
   ``[kv_c[t] | k_pe[t]]`` goes to ``kv_cache[slot // block_size, slot % block_size]``
   (``kv_cache [num_blocks, block_size, 512 + 64]``, any block and entry strides): as is
   for ``kv_cache_dtype="auto"`` (the model dtype), or for ``"fp8"`` (e4m3; ``"fp8_e5m2"``
   too) ``fp8(saturate(float32(v) / scale))``: IEEE division (``div_rn``, as nvcc's default
   ``a / scale``), clamped to the format's finite range (NaN kept: vLLM's ``__NV_SATFINITE``),
   cast to nearest even (``fp_downcast_rounding="rtne"``; on sm_89+ ``cvt.rn.satfinite``).
   An fp8 cache may be passed as uint8 bytes (vLLM's storage): viewed as the fp8 dtype.

``vllm_mla_prologue_triton`` runs the three, with ``engine_steps.vllm_mla_prologue``'s
signature and return value. Numerics on the GPU: Triton (like nvcc) may contract
``x0 c - x1 s`` into an FMA and reduces the sum of squares in its own order, so a rounded
value now and then differs by one step from the torch steps (as vLLM's own kernels do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .engine_steps import FP8_DTYPES, QK_NOPE_HEAD_DIM


@triton.jit
def _rotate_heads(base, head_stride, cos, sin, NUM_HEADS: tl.constexpr,
                  BLOCK_HEADS: tl.constexpr, ROT_DIM: tl.constexpr, HALF: tl.constexpr):
    """Rotate, in place, the GPT-J pairs of ``NUM_HEADS`` rows of ``ROT_DIM`` values at
    ``base + h * head_stride``: float32 math, one rounding to the tensor's dtype."""
    heads = tl.arange(0, BLOCK_HEADS)
    cols = tl.arange(0, ROT_DIM)
    mask = heads[:, None] < NUM_HEADS
    ptrs = base + heads[:, None].to(tl.int64) * head_stride + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # contiguous: vector loads
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_HEADS, HALF, 2)))  # x[2j], x[2j + 1]
    y0 = x0 * cos[None, :] - x1 * sin[None, :]
    y1 = x1 * cos[None, :] + x0 * sin[None, :]
    y = tl.reshape(tl.join(y0, y1), (BLOCK_HEADS, ROT_DIM))
    tl.store(ptrs, y.to(base.dtype.element_ty), mask=mask)  # fp downcast: nearest even


@triton.jit
def _rotate_neox_heads(base, head_stride, cos, sin, NUM_HEADS: tl.constexpr,
                       BLOCK_HEADS: tl.constexpr, HALF: tl.constexpr):
    """Rotate, in place, the NeoX pairs ``(x[j], x[j + HALF])`` of ``NUM_HEADS`` rows at
    ``base + h * head_stride``: float32 math, one rounding to the tensor's dtype."""
    heads = tl.arange(0, BLOCK_HEADS)
    j = tl.arange(0, HALF)
    mask = heads[:, None] < NUM_HEADS
    ptrs = base + heads[:, None].to(tl.int64) * head_stride + j[None, :]
    x0 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    y0 = x0 * cos[None, :] - x1 * sin[None, :]
    y1 = x1 * cos[None, :] + x0 * sin[None, :]
    tl.store(ptrs, y0.to(base.dtype.element_ty), mask=mask)  # fp downcast: nearest even
    tl.store(ptrs + HALF, y1.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(base, head_stride, cos, sin, NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr,
            ROT_DIM: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    if IS_NEOX:
        _rotate_neox_heads(base, head_stride, cos, sin, NUM_HEADS, BLOCK_HEADS, HALF)
    else:
        _rotate_heads(base, head_stride, cos, sin, NUM_HEADS, BLOCK_HEADS, ROT_DIM, HALF)


@triton.jit
def _rotary_kernel(positions_ptr, q_ptr, k_ptr, cos_sin_ptr, q_s0, q_s1, k_s0, k_s1,
                   table_s0, NUM_Q_HEADS: tl.constexpr, BLOCK_Q: tl.constexpr,
                   NUM_K_HEADS: tl.constexpr, BLOCK_K: tl.constexpr, ROT_DIM: tl.constexpr,
                   HALF: tl.constexpr, HAS_KEY: tl.constexpr, IS_NEOX: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, HALF)
    row = cos_sin_ptr + pos * table_s0
    cos = tl.load(row + j).to(tl.float32)
    sin = tl.load(row + HALF + j).to(tl.float32)
    _rotate(q_ptr + token * q_s0, q_s1, cos, sin, NUM_Q_HEADS, BLOCK_Q, ROT_DIM, HALF, IS_NEOX)
    if HAS_KEY:
        _rotate(k_ptr + token * k_s0, k_s1, cos, sin, NUM_K_HEADS, BLOCK_K, ROT_DIM, HALF,
                IS_NEOX)


def _heads_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as ``[T, heads, R]`` (a view: writes reach ``x``), its last dim contiguous."""
    if x.dim() == 2:
        x = x.unsqueeze(1)
    if x.dim() != 3 or (x.shape[-1] > 1 and x.stride(-1) != 1):
        raise ValueError(f"{name}: expected [T, R] or [T, heads, R] with contiguous R, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    return x


def rotary_embedding_(positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor | None,
                      cos_sin_cache: torch.Tensor, is_neox: bool = False) -> None:
    """vLLM's ``rotary_embedding``, in place on ``q_pe [T, H, R]`` and ``k_pe [T, R]`` /
    ``[T, Hk, R]`` (or None): ONE launch, one program per token; GPT-J pairs
    ``(x[2j], x[2j + 1])``, or NeoX pairs ``(x[j], x[j + R/2])`` with ``is_neox``;
    ``positions [T]`` int64/int32, ``cos_sin_cache [max_position, R]`` bf16/float32 with
    the cosines in ``[0, R/2)`` and the sines in ``[R/2, R)``. Strided views are fine (the
    last dim contiguous)."""
    tokens = positions.shape[0]
    q = _heads_view(q_pe, "q_pe")
    k = None if k_pe is None else _heads_view(k_pe, "k_pe")
    rot_dim = cos_sin_cache.shape[-1]
    for name, x in (("q_pe", q), ("k_pe", k)):
        if x is not None and (x.shape[0] != tokens or x.shape[-1] != rot_dim):
            raise ValueError(f"{name}: expected [{tokens}, heads, {rot_dim}], "
                             f"got {tuple(x.shape)}")
    if cos_sin_cache.stride(-1) != 1:
        raise ValueError("cos_sin_cache: its last dim must be contiguous")
    if tokens == 0:
        return
    k_or_q = q if k is None else k
    block_q = triton.next_power_of_2(q.shape[1])
    block_k = triton.next_power_of_2(k_or_q.shape[1])
    num_warps = max(1, min(8, block_q * rot_dim // 256))  # ~8 values a thread
    _rotary_kernel[(tokens,)](
        positions, q, k_or_q, cos_sin_cache, q.stride(0), q.stride(1), k_or_q.stride(0),
        k_or_q.stride(1), cos_sin_cache.stride(0), NUM_Q_HEADS=q.shape[1], BLOCK_Q=block_q,
        NUM_K_HEADS=k_or_q.shape[1], BLOCK_K=block_k, ROT_DIM=rot_dim, HALF=rot_dim // 2,
        HAS_KEY=k is not None, IS_NEOX=is_neox, num_warps=num_warps)


@triton.jit
def _cache_value(x, scale, cache_ptr, QUANTIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
                 CACHE_MAX: tl.constexpr):
    """``x`` as the cache stores it: in the cache's dtype, or
    ``fp8(saturate(float32(x) / scale))`` (nearest even)."""
    dtype = cache_ptr.dtype.element_ty
    if QUANTIZE:  # one return statement: Triton 3.6 types every return of a function alike
        value = x.to(tl.float32)
        if HAS_SCALE:
            value = tl.math.div_rn(value, scale)
        value = tl.clamp(value, -CACHE_MAX, CACHE_MAX, propagate_nan=tl.PropagateNan.ALL)
        stored = value.to(dtype, fp_downcast_rounding="rtne")
    else:
        stored = x.to(dtype)
    return stored


@triton.jit
def _concat_and_cache_kernel(kv_c_ptr, k_pe_ptr, cache_ptr, slots_ptr, scale_ptr, block_size,
                             kv_c_s0, k_pe_s0, cache_s0, cache_s1, KV_DIM: tl.constexpr,
                             BLOCK_KV: tl.constexpr, PE_DIM: tl.constexpr,
                             BLOCK_PE: tl.constexpr, QUANTIZE: tl.constexpr,
                             HAS_SCALE: tl.constexpr, CACHE_MAX: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:  # PAD_SLOT_ID: nothing to write
        return
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr)
    dst = cache_ptr + (slot // block_size) * cache_s0 + (slot % block_size) * cache_s1
    c = tl.arange(0, BLOCK_KV)
    c_mask = c < KV_DIM
    latent = tl.load(kv_c_ptr + token * kv_c_s0 + c, mask=c_mask)
    tl.store(dst + c, _cache_value(latent, scale, cache_ptr, QUANTIZE, HAS_SCALE, CACHE_MAX),
             mask=c_mask)
    r = tl.arange(0, BLOCK_PE)
    r_mask = r < PE_DIM
    rope = tl.load(k_pe_ptr + token * k_pe_s0 + r, mask=r_mask)
    tl.store(dst + KV_DIM + r,
             _cache_value(rope, scale, cache_ptr, QUANTIZE, HAS_SCALE, CACHE_MAX), mask=r_mask)


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, kv_cache_dtype: str = "auto",
                         scale: torch.Tensor | None = None) -> None:
    """vLLM's ``concat_and_cache_mla``, in place on ``kv_cache``: ONE launch, one program per
    token of ``slot_mapping``; the arguments as ``engine_steps.concat_and_cache_mla``'s
    (``kv_c [T, 512]``, ``k_pe [T, 64]`` / ``[T, 1, 64]``, any row strides; ``kv_cache
    [num_blocks, block_size, 576]`` in the model dtype for ``"auto"``, else fp8 or its uint8
    bytes; ``slot_mapping [num_tokens <= T]`` int64/int32, negative: skipped; ``scale`` a
    one-element float32 tensor or None: 1)."""
    num_tokens = slot_mapping.shape[0]
    k_pe = k_pe.reshape(k_pe.shape[0], -1)  # [T, 1, 64] -> [T, 64]: a view
    if kv_cache_dtype == "auto":
        cache, quantize = kv_cache, False
    else:
        fp8 = FP8_DTYPES[kv_cache_dtype]
        cache = kv_cache.view(fp8) if kv_cache.dtype == torch.uint8 else kv_cache
        if cache.dtype != fp8:
            raise ValueError(f"kv_cache: {kv_cache_dtype} wants {fp8} or uint8, "
                             f"got {kv_cache.dtype}")
        quantize = True
    kv_dim, pe_dim = kv_c.shape[-1], k_pe.shape[-1]
    if cache.shape[-1] != kv_dim + pe_dim:
        raise ValueError(f"kv_cache rows hold {cache.shape[-1]} values, not {kv_dim + pe_dim}")
    if any(x.stride(-1) != 1 for x in (kv_c, k_pe, cache)):
        raise ValueError("kv_c, k_pe and kv_cache need a contiguous last dim")
    if num_tokens == 0:
        return
    has_scale = quantize and scale is not None
    _concat_and_cache_kernel[(num_tokens,)](
        kv_c, k_pe, cache, slot_mapping, scale if has_scale else slot_mapping, cache.shape[1],
        kv_c.stride(0), k_pe.stride(0), cache.stride(0), cache.stride(1), KV_DIM=kv_dim,
        BLOCK_KV=triton.next_power_of_2(kv_dim), PE_DIM=pe_dim,
        BLOCK_PE=triton.next_power_of_2(pe_dim), QUANTIZE=quantize, HAS_SCALE=has_scale,
        CACHE_MAX=float(torch.finfo(cache.dtype).max) if quantize else 0.0)


def vllm_mla_chain_triton(q_pe: torch.Tensor, kv_lora: torch.Tensor,
                          cos_sin_cache: torch.Tensor, kv_a_layernorm_weight: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          positions: torch.Tensor, kv_cache_dtype: str = "auto",
                          k_scale: torch.Tensor | None = None, eps: float = 1e-6,
                          is_neox: bool = False, tile_scale: str = "raw"):
    """vLLM's sequence in three Triton launches: Liger's RMSNorm (``"llama"`` casting: vLLM's
    rounding) of ``kv_lora[:, :D]``, ``rotary_embedding_`` on ``q_pe [T, H, R]`` and
    ``kv_lora``'s ``k_pe`` columns (in place), then the cache writer of ``kv_cache_dtype``:
    ``concat_and_cache_mla`` ("auto", "fp8", "fp8_e4m3", "fp8_e5m2" with ``k_scale``) or
    ``ds_mla_chain.concat_and_cache_ds_mla`` ("fp8_ds_mla", with ``tile_scale``; a uint8
    ``[num_pages, page_size, 656]`` cache). ``kv_lora [T, D + R]`` (any row stride).
    Returns ``(q_pe, kv_c_normed [T, D], k_pe [T, R] view)``."""
    from liger_kernel.ops.rms_norm import rms_norm_forward  # the function liger.py uses

    rope_dim = q_pe.shape[-1]
    kv_c, k_pe = kv_lora.split([kv_lora.shape[-1] - rope_dim, rope_dim], dim=-1)
    kv_c_normed = rms_norm_forward(kv_c, kv_a_layernorm_weight, eps, 0.0, "llama", None)[0]
    rotary_embedding_(positions, q_pe, k_pe, cos_sin_cache, is_neox=is_neox)
    if kv_cache_dtype == "fp8_ds_mla":
        from .ds_mla_chain import concat_and_cache_ds_mla  # it imports this module

        concat_and_cache_ds_mla(kv_c_normed, k_pe, kv_cache, slot_mapping, tile_scale)
    else:
        concat_and_cache_mla(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype,
                             k_scale)
    return q_pe, kv_c_normed, k_pe


def vllm_mla_prologue_triton(q: torch.Tensor, kv_lora: torch.Tensor,
                             cos_sin_cache: torch.Tensor, kv_a_layernorm_weight: torch.Tensor,
                             kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             positions: torch.Tensor, kv_cache_dtype: str = "auto",
                             k_scale: torch.Tensor | None = None, eps: float = 1e-6):
    """``vllm_mla_chain_triton`` on ``q[..., 128:]`` of a full MLA ``q [T, H, 192]``.
    Arguments and return value as ``engine_steps.vllm_mla_prologue``: ``(q, kv_c_normed
    [T, 512], k_pe [T, 64] view)``."""
    _, kv_c_normed, k_pe = vllm_mla_chain_triton(
        q[..., QK_NOPE_HEAD_DIM:], kv_lora, cos_sin_cache, kv_a_layernorm_weight, kv_cache,
        slot_mapping, positions, kv_cache_dtype, k_scale, eps)
    return q, kv_c_normed, k_pe
