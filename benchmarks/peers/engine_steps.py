"""The three steps a serving engine runs today before MLA attention, in plain torch.

A DeepSeek-V2/V3 attention layer, after its ``q_b_proj`` and ``kv_a_proj_with_mqa``
projections and before attention, runs three kernels on the latent path. Here each is written
from the engine's definition (no code of ``tvm_fused``: tests use these as references), on
any device, ``torch.compile``-able, with no host sync (CUDA-graph capturable).

vLLM (``DeepseekV2MLAAttention`` / ``MLAAttention``):

1. ``kv_a_layernorm`` (``RMSNorm``): float32 statistics, the normalized value rounded to the
   model dtype BEFORE the product with the weight, the product rounded again (HF order):
   ``vllm_rms_norm``.
2. ``rotary_emb`` (DeepSeek's, ``is_neox_style=False``: GPT-J pairs ``(x[2j], x[2j+1])``),
   vLLM's CUDA kernel ``rotary_embedding``: ``cos_sin_cache [max_position, R]`` (the model
   dtype, or float32) with the cosines in columns ``[0, R/2)`` and the sines in ``[R/2, R)``;
   ``x' = x0 c - x1 s``, ``y' = x1 c + x0 s`` in float32, rounded once; in place on
   ``q[..., 128:]`` and on ``k_pe`` (a view of the projection output, which it thus modifies):
   ``rotary_gptj_split_cache``.
3. ``concat_and_cache_mla``: the row ``[kv_c_normed | k_pe]`` of each of the first
   ``slot_mapping.size(0)`` tokens to ``kv_cache[slot // block_size, slot % block_size]``;
   a negative slot (``PAD_SLOT_ID = -1``) writes nothing; an fp8 cache (``"fp8"``: e4m3)
   stores ``fp8(saturate(float32(v) / k_scale))``: ``concat_and_cache_mla``.

SGLang (``DeepseekV2AttentionMLA``) differs:

- its RMSNorm (``sgl_kernel.rmsnorm`` and ``RMSNorm.forward_native``) rounds ONCE:
  ``(x32 * rsqrt(mean(x32^2) + eps) * float(weight)).to(x.dtype)``: ``sglang_rms_norm``;
  on bf16 inputs some elements differ from vLLM's by an ulp or two;
- its rotary is the same float32 math on the same split cos/sin table (float32 for the
  sgl-kernel path; FlashInfer's kernel underneath), so ``rotary_gptj_split_cache`` serves both;
- its latent cache is ``kv_buffer [size + page_size, 1, 576]`` indexed by ``out_cache_loc``
  (int64 token slots, page size 1: a token's row is ``kv_buffer[loc]``); CUDA-graph padding
  tokens write to the reserved slot 0 (never a negative slot), so there is no "write
  nothing" case and ``loc`` covers every row;
- an fp8 cache is written as ``value.to(float8_e4m3fn)`` (torch's cast: nearest even; in
  recent torch overflow saturates to +-448, older releases gave NaN past 464) with no scale,
  stored as uint8 bytes: ``set_mla_kv_buffer``.

Both engines run the rotary on every row of q (``positions`` has q's rows); vLLM's
``concat_and_cache_mla`` writes only the first ``slot_mapping.size(0)`` tokens.

Numerics: the CUDA kernels may contract ``x0 c - x1 s`` into an FMA and reduce the sum of
squares in another order than torch, so a few rounded values (about 1 in 10^5 bf16 cache
bytes on an H200) differ by one step between implementations of the same definition. vLLM's
rotary kernel computes in float32 since it took the table's dtype as a template parameter of
its own; older releases computed in the tensor dtype (a rounding per product). Under
``torch.compile``, inductor drops the rounding of vLLM's RMSNorm before the weight unless
``emulate_precision_casts`` is set (``compiled`` sets it).
"""

from __future__ import annotations

import functools

import torch

KV_LORA_RANK = 512  # DeepSeek-V2/V3: the latent (normed) part of a cache row
ROPE_DIM = 64  # the rope part of a cache row and of each q head
QK_NOPE_HEAD_DIM = 128  # q's per-head columns before its rope part
FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2}


def cos_sin_cache(max_position: int, rotary_dim: int = ROPE_DIM, base: float = 10000.0,
                  dtype: torch.dtype = torch.bfloat16, device=None) -> torch.Tensor:
    """vLLM's / SGLang's table ``[max_position, rotary_dim]``: row ``p`` holds
    ``cos(p * theta_j)`` in column ``j`` and ``sin(p * theta_j)`` in ``rotary_dim / 2 + j``,
    ``theta_j = base ** (-2j / rotary_dim)``, computed in float32, cast to ``dtype``."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                           device=device) / rotary_dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float32, device=device),
                         inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


def vllm_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """vLLM's ``RMSNorm`` (HF order): ``x [..., D]`` (any row stride, last dim contiguous),
    ``weight [D]`` in x's dtype; float32 statistics, the normalized value rounded to x's
    dtype, then multiplied by ``weight`` (rounded again). Returns a new ``[..., D]``."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32.to(x.dtype) * weight


def sglang_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SGLang's ``RMSNorm`` (``sgl_kernel.rmsnorm``): as ``vllm_rms_norm`` but rounded once,
    after the product with ``float32(weight)``. Returns a new ``[..., D]`` in x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def rotary_gptj_split_cache(positions: torch.Tensor, x: torch.Tensor,
                            cos_sin_cache: torch.Tensor, is_neox: bool = False
                            ) -> torch.Tensor:
    """Rotary embedding as vLLM's CUDA kernel computes it: ``x [T, ..., R]`` (any leading
    dims after the token dim, any strides), ``positions [T]`` int64/int32,
    ``cos_sin_cache [max_position, R]`` (bf16 or fp32; cosines in ``[0, R/2)``, sines in
    ``[R/2, R)``). Pair ``j`` is ``(x[2j], x[2j+1])`` (GPT-J, DeepSeek), or with ``is_neox``
    ``(x[j], x[j + R/2])``: ``x0' = x0 c - x1 s``, ``x1' = x1 c + x0 s`` with ``c, s`` the
    table's values as float32, in float32, rounded once. Returns a new tensor in x's dtype
    (the engines write it back in place)."""
    half = x.shape[-1] // 2
    table = cos_sin_cache[positions].float()  # [T, R]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = table[:, :half].reshape(shape), table[:, half:].reshape(shape)
    x32 = x.float()
    x0, x1 = (x32[..., :half], x32[..., half:]) if is_neox else (x32[..., 0::2], x32[..., 1::2])
    y0, y1 = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    y = torch.cat((y0, y1), -1) if is_neox else torch.stack((y0, y1), -1).flatten(-2)
    return y.to(x.dtype)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """``x`` as raw bytes (its last dim times its item size), for bit-exact copies."""
    return x.view(torch.uint8)


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, kv_cache_dtype: str = "auto",
                         scale: torch.Tensor | None = None) -> None:
    """vLLM's ``concat_and_cache_mla``, in place on ``kv_cache``.

    ``kv_c [T, 512]``, ``k_pe [T, 64]`` (or ``[T, 1, 64]``) in the model dtype, any row
    strides; ``kv_cache [num_blocks, block_size, 576]``: the model dtype for
    ``kv_cache_dtype="auto"``, else uint8 bytes (vLLM's storage) or their fp8 view;
    ``slot_mapping [num_tokens]`` int64/int32, ``num_tokens <= T`` (rows past it: CUDA-graph
    padding, not written); ``scale``: one-element float32 tensor (``layer._k_scale``), used
    for fp8 only (None: 1). Token ``t`` with ``slot_mapping[t] >= 0`` gets row
    ``[kv_c[t] | k_pe[t]]`` at ``kv_cache[slot // block_size, slot % block_size]``,
    converted for fp8 as ``fp8(saturate(float32(v) / scale))``; negative slots write nothing.

    No host sync: tokens with a negative slot are sent to the first valid token's slot with
    that token's row (an identical duplicate write), or, with no valid token, to row
    ``(0, 0)`` with its own bytes.
    """
    num_tokens, block_size = slot_mapping.shape[0], kv_cache.shape[1]
    rows = torch.cat((kv_c[:num_tokens], k_pe[:num_tokens].reshape(num_tokens, -1)), -1)
    if kv_cache_dtype == "auto":
        cache = kv_cache
        rows = rows.to(cache.dtype)
    else:
        fp8 = FP8_DTYPES[kv_cache_dtype]
        cache = kv_cache.view(fp8) if kv_cache.dtype == torch.uint8 else kv_cache
        values = rows.float() if scale is None else rows.float() / scale
        limit = torch.finfo(fp8).max
        rows = values.clamp(-limit, limit).to(fp8)  # clamp keeps NaN
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    anchor = valid.to(torch.uint8).argmax(0, keepdim=True)  # [1]: first valid token, or 0
    has_valid = valid[anchor]
    new_rows = _bytes(rows)
    fallback = torch.where(has_valid[:, None], new_rows[anchor], _bytes(cache[0, :1]))
    slots = torch.where(valid, slots, torch.where(has_valid, slots[anchor], 0))
    new_rows = torch.where(valid[:, None], new_rows, fallback)
    _bytes(cache)[slots // block_size, slots % block_size] = new_rows


def set_mla_kv_buffer(kv_buffer: torch.Tensor, loc: torch.Tensor, k_nope: torch.Tensor,
                      k_rope: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """SGLang's ``MLATokenToKVPool.set_mla_kv_buffer``, in place on ``kv_buffer``.

    ``kv_buffer [size + page_size, 1, 576]`` (page size 1; slot 0 is reserved: padding
    tokens write there), in the cache dtype or uint8 bytes (then ``dtype``, default
    ``float8_e4m3fn``, is the logical one); ``loc [T]`` int64 slots; ``k_nope [T, 512]``,
    ``k_rope [T, 64]`` (or with a head dim of 1). ``kv_buffer[loc[t]] = [k_nope[t] |
    k_rope[t]].to(dtype)``: no scale, torch's cast."""
    if dtype is None:
        dtype = torch.float8_e4m3fn if kv_buffer.dtype == torch.uint8 else kv_buffer.dtype
    n = loc.shape[0]
    rows = torch.cat((k_nope[:n].reshape(n, -1), k_rope[:n].reshape(n, -1)), -1).to(dtype)
    _bytes(kv_buffer)[loc] = _bytes(rows).reshape(n, 1, -1)


def vllm_mla_prologue(q: torch.Tensor, kv_lora: torch.Tensor, cos_sin_cache: torch.Tensor,
                      kv_a_layernorm_weight: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, positions: torch.Tensor,
                      kv_cache_dtype: str = "auto", k_scale: torch.Tensor | None = None,
                      eps: float = 1e-6):
    """vLLM's sequence: ``kv_a_layernorm``, ``rotary_emb``, ``concat_and_cache_mla``.

    ``q [T, H, 192]`` (``q_b_proj``'s output per head; its rope columns ``[128, 192)`` are
    roped in place), ``kv_lora [T, 576]`` (``fused_qkv[:, 1536:]``: ``kv_c | k_pe``; its
    ``k_pe`` columns are roped in place, as vLLM's in-place kernel does on that view),
    ``positions [T]``, ``slot_mapping [num_tokens <= T]`` int64/int32, the rest as for
    ``concat_and_cache_mla`` and ``rotary_gptj_split_cache`` (GPT-J pairs). Returns
    ``(q, kv_c_normed, k_pe)``: q itself, the new ``[T, 512]`` normed latent, the roped
    ``k_pe`` view ``[T, 64]``."""
    kv_c, k_pe = kv_lora.split([KV_LORA_RANK, kv_lora.shape[-1] - KV_LORA_RANK], dim=-1)
    kv_c_normed = vllm_rms_norm(kv_c, kv_a_layernorm_weight, eps)
    q_pe = q[..., QK_NOPE_HEAD_DIM:]
    q_pe.copy_(rotary_gptj_split_cache(positions, q_pe, cos_sin_cache))
    k_pe.copy_(rotary_gptj_split_cache(positions, k_pe, cos_sin_cache))
    concat_and_cache_mla(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale)
    return q, kv_c_normed, k_pe


def sglang_mla_prologue(q: torch.Tensor, latent_cache: torch.Tensor,
                        cos_sin_cache: torch.Tensor, kv_a_layernorm_weight: torch.Tensor,
                        kv_buffer: torch.Tensor, out_cache_loc: torch.Tensor,
                        positions: torch.Tensor, eps: float = 1e-6):
    """SGLang's sequence: ``kv_a_layernorm`` (rounded once), ``rotary_emb``,
    ``set_mla_kv_buffer``.

    ``q [T, H, 192]``, ``latent_cache [T, 576]`` (the latent columns of
    ``fused_qkv_a_proj_with_mqa``'s output; its rope columns are roped in place),
    ``cos_sin_cache [max_position, 64]`` (float32 in SGLang), ``kv_buffer [size + 1, 1, 576]``
    (uint8 bytes of an fp8 cache, or the cache dtype), ``out_cache_loc [T]`` int64 (padding
    tokens: 0), ``positions [T]``. Returns ``(q, k_nope, k_pe)``: q itself (rope columns
    roped in place), the new normed ``[T, 512]``, the roped ``k_pe`` view ``[T, 64]``."""
    k_nope = sglang_rms_norm(latent_cache[..., :KV_LORA_RANK], kv_a_layernorm_weight, eps)
    k_pe = latent_cache[..., KV_LORA_RANK:]
    q_pe = q[..., QK_NOPE_HEAD_DIM:]
    q_pe.copy_(rotary_gptj_split_cache(positions, q_pe, cos_sin_cache))
    k_pe.copy_(rotary_gptj_split_cache(positions, k_pe, cos_sin_cache))
    set_mla_kv_buffer(kv_buffer, out_cache_loc, k_nope, k_pe)
    return q, k_nope, k_pe


@functools.cache
def compiled(fn, dynamic: bool | None = None, exact_casts: bool = True):
    """``torch.compile(fn, dynamic=dynamic)``, made on first use and kept (one per
    arguments). Inductor computes chains of bf16 ops in float32 and by default drops a
    rounding to bf16 that is followed by more math: vLLM's RMSNorm, compiled so, rounds once
    (SGLang's result). With ``exact_casts`` (``emulate_precision_casts``) it keeps every
    rounding of the definition and matches the eager functions bit for bit."""
    options = {"emulate_precision_casts": True} if exact_casts else None
    return torch.compile(fn, dynamic=dynamic, options=options)


def compiled_vllm_mla_prologue(*args, **kwargs):
    """``vllm_mla_prologue`` under ``torch.compile`` (compiled on the first call, exact
    casts)."""
    return compiled(vllm_mla_prologue)(*args, **kwargs)


def compiled_sglang_mla_prologue(*args, **kwargs):
    """``sglang_mla_prologue`` under ``torch.compile`` (compiled on the first call, exact
    casts)."""
    return compiled(sglang_mla_prologue)(*args, **kwargs)
