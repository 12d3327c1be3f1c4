"""vLLM's MLA prologue for ``kv_cache_dtype="fp8_ds_mla"`` (DeepSeek-V3.2's 656-byte cache
row), hand-written in Triton: the engine's three launches, as ``engine_triton`` does for the
plain and fp8 caches (no host sync, CUDA-graph capturable).

1. ``kv_a_layernorm``: Liger-Kernel's Triton RMSNorm with ``casting_mode="llama"`` (the one
   ``engine_triton`` uses): float32 statistics, the normalized value rounded to the latent's
   dtype (here also gamma's: the two must match) BEFORE the product with gamma, the product
   rounded once on the store. ``kv_c = kv_input[:, :D]`` (a column slice, its row stride
   kept) -> a new contiguous ``[T, D]``.
2. ``rotary_emb``: ``engine_triton.rotary_embedding_`` (vLLM's ``rotary_embedding``, GPT-J
   pairs ``(x[2j], x[2j+1])``), or with ``interleaved=False`` its NeoX pairs
   ``(x[j], x[j + R/2])`` (``is_neox=True``, same math): one launch, one program per
   token, in place on ``q_pe [T, H, R]`` and on ``k_pe = kv_input[:, D:]`` (which vLLM's
   in-place kernel thus modifies), float32 math rounded once; ``cos_sin_cache
   [max_position, R]`` (bf16 or float32; cosines in ``[0, R/2)``, sines in ``[R/2, R)``)
   at ``positions[t]``.
3. ``concat_and_cache_ds_mla``: a Triton row writer in the manner of vLLM's CUDA
   ``concat_and_cache_ds_mla_kernel``: one program per token of ``slot_mapping``
   (``num_tokens <= T``); a negative slot returns at once (``PAD_SLOT_ID``); else the row at
   ``kv_cache[slot // page_size, slot % page_size]`` (uint8 ``[num_pages, page_size, 656]``,
   any page and row strides, each row's start 16-byte aligned as vLLM's vector stores need)
   gets, for D = 512, R = 64:

   ========================  =====================================================
   bytes                     content
   ========================  =====================================================
   ``[0, D)``                the normed latent in ``float8_e4m3fn``, 128-value tiles
   ``[D, D + 4 D / 128)``    each tile's float32 scale ``s_i`` (little-endian)
   ``[D + 4 D / 128, +2R)``  the roped ``k_pe`` as is (bf16: 16 bits, not quantized)
   ========================  =====================================================

   ``amax_i`` = the largest ``|v|`` over tile ``i``'s finite values; ``tile_scale="raw"``
   (vLLM's writer): ``s_i = max(amax_i / 448, FLT_MIN)``; ``"pow2"`` (FlashMLA's reference
   quantizer, UE8M0-exact): ``s_i = 2^ceil(log2(max(amax_i / 448, 1e-4)))``, the ceiling
   taken on the float32's bits (exact, where a float32 ``log2`` may round ``k + tiny`` to
   ``k``). Each value is stored as ``e4m3(saturate(v / s_i))``: IEEE float32 division
   (``div_rn``), clamped to +-448, cast to nearest even (``cvt.rn.satfinite`` on sm_89+). A
   NaN or +-inf value is stored as NaN (0x7F) and does not enter ``amax_i``: the SPEC's
   rule; vLLM's kernel takes ``fmaxf`` over ``|v|``, which skips NaN but lets an inf make
   the tile's scale inf (its other values then store 0).

``ds_mla_chain`` runs the three. Numerics on the GPU: as in ``engine_triton``, Triton may
contract the rotary's ``x0 c - x1 s`` into an FMA and reduces the sum of squares in its own
order, so a rounded bf16 value now and then differs by one step from a float64 oracle; the
writer itself is exact (its division is ``div_rn``, its amax a max).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .engine_triton import vllm_mla_chain_triton

TILE = 128  # values per fp8 tile (one float32 scale each)
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
FLT_MIN = 1.1754943508222875e-38  # 2^-126, float32's smallest normal: the raw scale's floor
POW2_FLOOR = 1e-4  # FlashMLA's floor of amax / 448 before the power-of-two ceiling
TILE_SCALES = ("raw", "pow2")


def ds_mla_row_bytes(kv_lora_rank: int = 512, rope_dim: int = 64, rope_itemsize: int = 2
                     ) -> int:
    """Bytes of one ``fp8_ds_mla`` row: ``D`` fp8 values, ``D / 128`` float32 scales, ``R``
    16-bit rope values (656 for DeepSeek-V3.2's 512 + 64)."""
    return kv_lora_rank + 4 * (kv_lora_rank // TILE) + rope_itemsize * rope_dim


@triton.jit
def _ds_mla_row_kernel(kv_c_ptr, k_pe_ptr, cache_ptr, slots_ptr, page_size, kv_c_s0, k_pe_s0,
                       cache_s0, cache_s1, KV_DIM: tl.constexpr, NUM_TILES: tl.constexpr,
                       BLOCK_TILES: tl.constexpr, TILE_SIZE: tl.constexpr,
                       PE_DIM: tl.constexpr, BLOCK_PE: tl.constexpr, POW2: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:  # PAD_SLOT_ID: nothing to write
        return
    row = cache_ptr + (slot // page_size) * cache_s0 + (slot % page_size) * cache_s1
    tiles = tl.arange(0, BLOCK_TILES)
    cols = tiles[:, None] * TILE_SIZE + tl.arange(0, TILE_SIZE)[None, :]  # [tiles, 128]
    in_row = cols < KV_DIM
    x = tl.load(kv_c_ptr + token * kv_c_s0 + cols, mask=in_row, other=0.0).to(tl.float32)
    finite = tl.abs(x) < float("inf")  # false for NaN and +-inf
    amax = tl.max(tl.where(finite, tl.abs(x), 0.0), axis=1)  # [tiles]
    scale = tl.math.div_rn(amax, 448.0)
    if POW2:  # 2^ceil(log2(.)) on the bits: a mantissa other than 0 carries into the exponent
        bits = tl.maximum(scale, 1e-4).to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & -0x800000).to(tl.float32, bitcast=True)
    else:
        scale = tl.maximum(scale, 1.1754943508222875e-38)  # FLT_MIN
    value = tl.math.div_rn(x, scale[:, None])
    value = tl.where(finite, value, float("nan"))
    value = tl.clamp(value, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    fp8 = value.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    tl.store(row + cols, fp8.to(tl.uint8, bitcast=True), mask=in_row)
    scales = (row + KV_DIM).to(tl.pointer_type(tl.float32))
    tl.store(scales + tiles, scale, mask=tiles < NUM_TILES)
    r = tl.arange(0, BLOCK_PE)
    r_mask = r < PE_DIM
    rope = tl.load(k_pe_ptr + token * k_pe_s0 + r, mask=r_mask)
    rope_dst = (row + KV_DIM + 4 * NUM_TILES).to(tl.pointer_type(k_pe_ptr.dtype.element_ty))
    tl.store(rope_dst + r, rope, mask=r_mask)


def concat_and_cache_ds_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, tile_scale: str = "raw") -> None:
    """vLLM's ``concat_and_cache_mla`` for ``kv_cache_dtype="fp8_ds_mla"``, in place on
    ``kv_cache``: ONE launch, one program per token of ``slot_mapping``.

    ``kv_c [T, D]`` (D a multiple of 128) and ``k_pe [T, R]`` (or ``[T, 1, R]``) in the
    model dtype (bf16 for DeepSeek), any row strides, last dim contiguous; ``kv_cache``
    uint8 ``[num_pages, page_size, D + 4 D / 128 + R * itemsize]`` (656 bytes for 512 + 64
    bf16), any page and row strides (rows 4-byte aligned at least; 16 for vLLM's readers);
    ``slot_mapping [num_tokens <= T]`` int64/int32, negative: skipped; ``tile_scale``
    ``"raw"`` or ``"pow2"`` (the module docstring gives the row and the scales)."""
    if tile_scale not in TILE_SCALES:
        raise ValueError(f"tile_scale: one of {TILE_SCALES}, got {tile_scale!r}")
    num_tokens = slot_mapping.shape[0]
    k_pe = k_pe.reshape(k_pe.shape[0], -1)  # [T, 1, R] -> [T, R]: a view
    kv_dim, pe_dim = kv_c.shape[-1], k_pe.shape[-1]
    if kv_dim % TILE:
        raise ValueError(f"kv_c: {kv_dim} columns, not a multiple of {TILE}")
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 3:
        raise ValueError(f"kv_cache: expected uint8 [num_pages, page_size, row bytes], got "
                         f"{kv_cache.dtype} {tuple(kv_cache.shape)}")
    row_bytes = ds_mla_row_bytes(kv_dim, pe_dim, k_pe.element_size())
    if kv_cache.shape[-1] != row_bytes:
        raise ValueError(f"kv_cache rows hold {kv_cache.shape[-1]} bytes, not {row_bytes}")
    if any(x.stride(-1) != 1 for x in (kv_c, k_pe, kv_cache)):
        raise ValueError("kv_c, k_pe and kv_cache need a contiguous last dim")
    if num_tokens == 0:
        return
    num_tiles = kv_dim // TILE
    _ds_mla_row_kernel[(num_tokens,)](
        kv_c, k_pe, kv_cache, slot_mapping, kv_cache.shape[1], kv_c.stride(0),
        k_pe.stride(0), kv_cache.stride(0), kv_cache.stride(1), KV_DIM=kv_dim,
        NUM_TILES=num_tiles, BLOCK_TILES=triton.next_power_of_2(num_tiles), TILE_SIZE=TILE,
        PE_DIM=pe_dim, BLOCK_PE=triton.next_power_of_2(pe_dim), POW2=tile_scale == "pow2",
        num_warps=4)


def ds_mla_chain(q_pe: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 cos_sin_cache: torch.Tensor, gamma: torch.Tensor, kv_input: torch.Tensor,
                 kv_cache_u8: torch.Tensor, epsilon: float, tile_scale: str = "raw",
                 interleaved: bool = True):
    """vLLM's sequence for an ``fp8_ds_mla`` cache in three Triton launches: Liger's RMSNorm
    of ``kv_input[:, :D]``, the rotary of ``q_pe`` and ``kv_input[:, D:]`` (both in place, as
    vLLM does), ``concat_and_cache_ds_mla``.

    ``q_pe [T, H, R]`` (a strided view, e.g. ``q[..., 128:]`` of ``q [T, H, 192]``; last dim
    contiguous), ``positions [T]`` int64/int32, ``slot_mapping [num_tokens <= T]``
    int64/int32 (``page * page_size + row``; negative: no cache row), ``cos_sin_cache
    [max_position, R]`` bf16/float32 (cosines then sines), ``gamma [D]`` in kv_input's
    dtype, ``kv_input [T, D + R]`` (e.g. the last 576 columns of the fused ``q_a | kv_a``
    projection output: any row stride), ``kv_cache_u8`` uint8 ``[num_pages, page_size,
    656]`` (any page stride), ``tile_scale`` ``"raw"`` / ``"pow2"``, ``interleaved``: GPT-J
    pairs (DeepSeek's), else NeoX. Returns ``(q_pe, kv_c_normed [T, D], k_pe)``: q_pe
    itself, the new normed latent, the roped ``kv_input[:, D:]`` view."""
    rope_dim = q_pe.shape[-1]
    if cos_sin_cache.shape[-1] != rope_dim:
        raise ValueError(f"cos_sin_cache: {cos_sin_cache.shape[-1]} columns, q_pe {rope_dim}")
    kv_dim = kv_input.shape[-1] - rope_dim
    if gamma.shape != (kv_dim,) or gamma.dtype != kv_input.dtype:
        raise ValueError(f"gamma: expected [{kv_dim}] {kv_input.dtype} (Liger rounds the "
                         f"normalized value to the latent's dtype), got "
                         f"{tuple(gamma.shape)} {gamma.dtype}")
    return vllm_mla_chain_triton(q_pe, kv_input, cos_sin_cache, gamma, kv_cache_u8,
                                 slot_mapping, positions, "fp8_ds_mla", None, epsilon,
                                 not interleaved, tile_scale)
