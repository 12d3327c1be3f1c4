"""The engines' chain for the fp8 attention query of MLA decode, as separate launches.

With an fp8 cache, an fp8 MLA decode kernel reads an fp8 query ``[T, H_pad, D + R]``: the
absorbed ``ql_nope = q_nope @ W_UK`` (``[T, H, D]``, a batched matmul's output, often the
transposed view of an ``[H, T, D]`` tensor) followed by the roped rope part, quantized with
one per-tensor descale. vLLM builds it in two steps after the matmul:

1. ``rotary_emb``: in place on ``q_pe [T, H, R]`` (float32 math, rounded once to q's dtype);
2. ``mla_decode_concat_quant_fp8`` (``_DecodeConcatQuantFP8``): ``torch.cat((ql_nope,
   q_pe), -1)`` then a static per-tensor fp8 quantization, which vLLM leaves to
   ``torch.compile``: Inductor fuses the cat, the scaling and the cast into one kernel.

``fp8_query_chain`` is both in plain torch (``engine_steps.rotary_gptj_split_cache`` for the
rotary), meant to run under ``torch.compile`` (``compiled_fp8_query_chain``: the token count
dynamic, as in vLLM, or ``dynamic=True``; the rotary then fuses too, which vLLM's custom
rotary op does not); ``triton_rope_fp8_query_chain`` is vLLM's split: the Triton rotary of
``engine_triton`` (one launch), then the compiled concat + quantize.

The quantization is the SPEC's: ``out = fp8(saturate(v / q_scale))`` (float32 division,
clamp to the format's finite range, nearest even, NaN kept) with ``v`` the value in q's
dtype; vLLM's ``QuantFP8.forward_native`` multiplies by ``q_scale.reciprocal()`` instead
(``reciprocal=True``: the same bytes wherever ``1 / q_scale`` is exact, e.g. a power of
two). The result goes to ``out[:T, :H]`` of a head-padded buffer; its heads ``H..H_pad`` and
rows past ``T`` are not touched.

``FlashInferFp8Query`` is FlashInfer's fused kernel for the same query,
``flashinfer.rope.mla_rope_quantize_fp8`` (rotary + fp8 quantization of q's rope and nope
parts in one launch, writing strided outputs), called as vLLM's Q-only path does: with
zero ``k_rope [T, R]`` / ``k_nope [T, D]`` inputs whose outputs are ignored. Its scale is a
multiplier (``quant_scale_q = 1 / q_scale``, read on the host once, when the call is
prepared) and its table float32.
"""

from __future__ import annotations

import os

import torch

from .engine_steps import compiled, rotary_gptj_split_cache


class FlashInferUnavailable(ImportError):
    """FlashInfer (``flashinfer.rope.mla_rope_quantize_fp8``) cannot be imported: the
    FlashInfer fp8-query peer is skipped (the message says why)."""


def _check_shapes(q_nope: torch.Tensor, q_pe: torch.Tensor, out: torch.Tensor) -> None:
    tokens, heads, kv_dim = q_nope.shape
    if q_pe.dim() != 3 or q_pe.shape[:2] != (tokens, heads):
        raise ValueError(f"q_pe: expected [{tokens}, {heads}, R], got {tuple(q_pe.shape)}")
    width = kv_dim + q_pe.shape[-1]
    if out.dim() != 3 or out.shape[0] < tokens or out.shape[1] < heads or out.shape[2] != width:
        raise ValueError(f"out: expected [>= {tokens}, >= {heads}, {width}], got "
                         f"{tuple(out.shape)}")


def concat_quant_fp8(q_nope: torch.Tensor, q_pe: torch.Tensor, q_scale: torch.Tensor,
                     out: torch.Tensor, reciprocal: bool = False) -> torch.Tensor:
    """vLLM's ``mla_decode_concat_quant_fp8``: ``out[:T, :H] = fp8(saturate(cat(q_nope,
    q_pe) / q_scale))``.

    ``q_nope [T, H, D]`` and ``q_pe [T, H, R]`` in q's dtype (any strides), ``q_scale`` a
    one-element float32 tensor (the descale), ``out [>= T, >= H, D + R]`` float8_e4m3fn or
    float8_e5m2 (any strides); ``reciprocal``: multiply by ``1 / q_scale`` (vLLM's native
    quantizer) instead of dividing. Returns ``out``."""
    _check_shapes(q_nope, q_pe, out)
    tokens, heads = q_pe.shape[:2]
    values = torch.cat((q_nope, q_pe), dim=-1).float()
    values = values * q_scale.reciprocal() if reciprocal else values / q_scale
    limit = torch.finfo(out.dtype).max
    out[:tokens, :heads] = values.clamp(-limit, limit).to(out.dtype)  # clamp keeps NaN
    return out


def fp8_query_chain(q_nope: torch.Tensor, q_pe: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, q_scale: torch.Tensor, out: torch.Tensor,
                    interleaved: bool = True, reciprocal: bool = False) -> torch.Tensor:
    """The fp8 attention query in plain torch: the rotary of ``q_pe`` (in place, as vLLM's
    kernel does), then ``concat_quant_fp8``.

    ``q_nope [T, H, D]`` (the absorbed ``ql_nope``, q's dtype, any strides: e.g. the
    ``transpose(0, 1)`` of an ``[H, T, D]`` matmul output), ``q_pe [T, H, R]`` (q's dtype,
    any strides: e.g. ``q[..., 128:]``; roped in place), ``positions [T]`` int64/int32,
    ``cos_sin_cache [max_position, R]`` bf16/float32 (cosines then sines), ``q_scale`` a
    one-element float32 tensor, ``out [>= T, >= H_pad, D + R]`` fp8; ``interleaved``: GPT-J
    pairs (DeepSeek's), else NeoX. Returns ``out``."""
    q_pe.copy_(rotary_gptj_split_cache(positions, q_pe, cos_sin_cache,
                                       is_neox=not interleaved))
    return concat_quant_fp8(q_nope, q_pe, q_scale, out, reciprocal)


def _compile(fn, dynamic: bool | str, tokens: tuple):
    """``fn`` compiled (made once per ``fn`` and ``dynamic``, exact casts: Inductor keeps
    the rounding of the roped value to q's dtype before the division, as the definition has
    it). ``dynamic="tokens"``: dim 0 of the ``tokens`` tensors is marked dynamic, every other
    size and stride static, as vLLM compiles (the token count of its model graph, and
    ``dynamic_arg_dims`` of ``mla_decode_concat_quant_fp8``); ``True``:
    ``torch.compile(dynamic=True)``, every size and stride symbolic, which gave Inductor
    kernels 5 to 6 times slower on an H100 (8192 tokens, 128 heads: 3.3 to 4.9 ms against
    0.61 ms with static heads and widths)."""
    if dynamic != "tokens":
        return compiled(fn, dynamic=dynamic)
    for x in tokens:
        torch._dynamo.maybe_mark_dynamic(x, 0)
    return compiled(fn)


def compiled_fp8_query_chain(q_nope: torch.Tensor, q_pe: torch.Tensor,
                             positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                             q_scale: torch.Tensor, out: torch.Tensor, interleaved: bool = True,
                             reciprocal: bool = False, dynamic: bool | str = "tokens"
                             ) -> torch.Tensor:
    """``fp8_query_chain`` under ``torch.compile``, compiled on the first call and kept:
    the token count dynamic (``dynamic="tokens"``, vLLM's setting) or every size
    (``dynamic=True``). Arguments and return value as ``fp8_query_chain``'s."""
    fn = _compile(fp8_query_chain, dynamic, (q_nope, q_pe, positions, out))
    return fn(q_nope, q_pe, positions, cos_sin_cache, q_scale, out, interleaved, reciprocal)


def compiled_concat_quant_fp8(q_nope: torch.Tensor, q_pe: torch.Tensor, q_scale: torch.Tensor,
                              out: torch.Tensor, reciprocal: bool = False,
                              dynamic: bool | str = "tokens") -> torch.Tensor:
    """``concat_quant_fp8`` under ``torch.compile`` (``dynamic`` as for
    ``compiled_fp8_query_chain``): the Inductor kernel vLLM runs for
    ``mla_decode_concat_quant_fp8``. Returns ``out``."""
    fn = _compile(concat_quant_fp8, dynamic, (q_nope, q_pe, out))
    return fn(q_nope, q_pe, q_scale, out, reciprocal)


def triton_rope_fp8_query_chain(q_nope: torch.Tensor, q_pe: torch.Tensor,
                                positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                q_scale: torch.Tensor, out: torch.Tensor,
                                reciprocal: bool = False) -> torch.Tensor:
    """vLLM's two launches: ``engine_triton.rotary_embedding_`` on ``q_pe`` (in place, GPT-J
    pairs; Triton), then ``compiled_concat_quant_fp8``. Arguments as ``fp8_query_chain``'s.
    Returns ``out``."""
    from .engine_triton import rotary_embedding_  # imports Triton

    rotary_embedding_(positions, q_pe, None, cos_sin_cache)
    return compiled_concat_quant_fp8(q_nope, q_pe, q_scale, out, reciprocal)


def _mla_rope_quantize_fp8():
    """FlashInfer's ``mla_rope_quantize_fp8``: the package's, else the rope library of
    ``$FLASHINFER_ROPE_LIB`` (``flashinfer_rope.mla_rope_quantize_fp8``), else
    ``FlashInferUnavailable``."""
    from .flashinfer_rope import LIB_ENV

    try:
        from flashinfer.rope import mla_rope_quantize_fp8
    except ImportError as error:  # flashinfer absent, or one of the libraries it imports
        if os.environ.get(LIB_ENV):
            from .flashinfer_rope import mla_rope_quantize_fp8
            return mla_rope_quantize_fp8
        raise FlashInferUnavailable(
            f"FlashInfer's mla_rope_quantize_fp8 is unavailable ({error}): install "
            f"flashinfer-python on a CUDA machine, or set {LIB_ENV} to the library "
            f"scripts/build_flashinfer_rope.sh builds, to time this peer") from error
    return mla_rope_quantize_fp8


class FlashInferFp8Query:
    """One prepared call of FlashInfer's ``mla_rope_quantize_fp8`` building the fp8 query:
    ``__call__()`` ropes ``q_pe`` (not in place) and writes ``out[:T, :H, D:]`` and
    ``out[:T, :H, :D]`` (strided views of the padded buffer, which the kernel accepts).

    Arguments as ``fp8_query_chain``'s (``q_scale`` a one-element tensor or a float); the
    table is converted to float32 and ``1 / q_scale`` read once, here, as an engine does
    when it builds the layer. Raises ``FlashInferUnavailable`` (an ``ImportError``) without
    FlashInfer."""

    def __init__(self, q_nope: torch.Tensor, q_pe: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, q_scale: torch.Tensor | float,
                 out: torch.Tensor, interleaved: bool = True):
        self.fn = _mla_rope_quantize_fp8()
        _check_shapes(q_nope, q_pe, out)
        tokens, heads, kv_dim = q_nope.shape
        rope_dim, device = q_pe.shape[-1], q_pe.device
        self.q_nope, self.q_pe, self.positions = q_nope, q_pe, positions
        self.table = cos_sin_cache.float().contiguous()
        self.is_neox = not interleaved
        self.quant_scale_q = 1.0 / float(q_scale)
        self.q_nope_out = out[:tokens, :heads, :kv_dim]
        self.q_rope_out = out[:tokens, :heads, kv_dim:]
        # vLLM's Q-only call: zero K inputs of the same tokens, their outputs ignored
        self.k_rope = torch.zeros(tokens, rope_dim, dtype=q_pe.dtype, device=device)
        self.k_nope = torch.zeros(tokens, kv_dim, dtype=q_pe.dtype, device=device)
        self.k_rope_out = torch.empty(tokens, rope_dim, dtype=out.dtype, device=device)
        self.k_nope_out = torch.empty(tokens, kv_dim, dtype=out.dtype, device=device)
        self.out = out

    def __call__(self) -> torch.Tensor:
        self.fn(self.q_pe, self.k_rope, self.q_nope, self.k_nope, self.table, self.positions,
                is_neox=self.is_neox, quantize_dtype=self.out.dtype,
                quant_scale_q=self.quant_scale_q, quant_scale_kv=1.0,
                q_rope_out=self.q_rope_out, k_rope_out=self.k_rope_out,
                q_nope_out=self.q_nope_out, k_nope_out=self.k_nope_out)
        return self.out


def flashinfer_fp8_query(q_nope: torch.Tensor, q_pe: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, q_scale: torch.Tensor | float,
                         out: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """``FlashInferFp8Query`` prepared and called once. Returns ``out``."""
    return FlashInferFp8Query(q_nope, q_pe, positions, cos_sin_cache, q_scale, out,
                              interleaved)()
