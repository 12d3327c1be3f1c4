"""The fused op as one Triton kernel: the peer a user would write instead of TVM.

One launch: a 1-D grid of token tiles of ``TOKENS_PER_PROGRAM`` (TPP) tokens, each tile
``1 + cdiv(heads, HEADS_PER_PROGRAM)`` programs in a row::

    program p -> tile p // parts, part p % parts
      part 0    the tile's new rows: [TPP, D] latent (RMSNorm) and [TPP, R] rope part,
                from kv_input (write-through) or the cache row (in place), to the cache
                row (fp8: quantized; a negative page or slot: none) and kv_output
      part k    q RoPE of the tile's tokens x head block k - 1: a [TPP, HPP, R] tile, each
                head's rope row loaded whole in 16-byte vectors, GPT-J pairs split off it
                (tl.split, tl.interleave to store), NeoX pairs as its two halves

Each program finds its tokens first: by offsets, their requests by a search of
``input_row_offsets`` that probes ``SEARCH`` entries a round (one round of loads up to 256
requests), then ``cache_lengths`` and the page table; by slots, ``positions`` and
``slot_mapping`` directly. Rows past the real tokens (padding) are neither read nor
written. q and ``kv_input`` loads are issued before the position's, whose latency they
hide. Rows and heads interleave in the grid: no tail of row programs at the end, and a
token's freqs row is still in L2 for its other programs.

``triton.autotune`` picks TPP, HPP and warps per form (the constexprs, the tensors' dtypes)
and token bucket (the next power of two), among 24 tiles pruned to TPP <= bucket and HPP <=
the heads rounded up; the kernel has no loop to pipeline, so stages are no knob. A config's
time is that of 16 calls back to back (a decode step's steady state; past L2's size, the
cold time). Tuning runs the kernel many times: where that changes what it reads (the
in-place cache, q when ``out`` is ``q_rope``) the first call of a key tunes on copies
(``restore_value`` would time its copies along with the kernel), so the call is right.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

SEARCH = tl.constexpr(256)  # offsets probed per round of the request search


def _configs() -> list[triton.Config]:
    """(tokens, heads) tiles of 8 to 64 elements a thread: small tiles for decode, large
    ones for prefill."""
    tiles = {1: ((8, 1), (8, 2), (16, 1), (16, 2), (16, 4), (32, 2), (32, 4), (64, 4),
                 (64, 8), (128, 4), (128, 8)),
             2: ((8, 2), (16, 4), (32, 4), (64, 4), (64, 8), (128, 8)),
             4: ((8, 2), (16, 4), (32, 8), (64, 8)),
             8: ((8, 4), (16, 4), (32, 8))}
    return [triton.Config({"TOKENS_PER_PROGRAM": tokens, "HEADS_PER_PROGRAM": heads},
                          num_warps=warps)
            for tokens, choices in tiles.items() for heads, warps in choices]


def _prune(configs, named_args, **constexprs):
    """Configs whose tiles fit the call: TPP up to the token bucket, HPP up to the heads
    rounded up to a power of two."""
    heads = triton.next_power_of_2(constexprs["NUM_HEADS"])
    return [c for c in configs if c.kwargs["TOKENS_PER_PROGRAM"] <= named_args["token_bucket"]
            and c.kwargs["HEADS_PER_PROGRAM"] <= max(heads, 8)]


SPIN_CYCLES = 2_000_000  # ~1 ms of GPU spinning while the host enqueues the timed calls


def _time_per_call(kernel_call, quantiles, calls: int = 16, reps: int = 8) -> list[float]:
    """The autotuner's measure of a config: GPU ms per call of ``calls`` calls back to back
    (the steady state of a decode step's graph; past L2's size, the cold time), enqueued
    while the GPU spins so that no host time counts; ``quantiles`` over ``reps`` runs."""
    kernel_call()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        for _ in range(calls):
            kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) / calls for start, end in zip(starts, ends))
    return [times[round(q * (reps - 1))] for q in quantiles]


# the form (constexprs; the autotuner adds the tensors' dtypes) and the token bucket
TUNING_KEY = ["NUM_HEADS", "ROPE_DIM", "NORM_DIM", "PAGE_SIZE", "INTERLEAVED", "FREQS_SPLIT",
              "SLOTS", "WRITE_THROUGH", "KV_OUTPUT", "QUANTIZE", "token_bucket"]


@triton.jit
def _request(tokens, offsets_ptr, batch):
    """The request of each of ``tokens`` ``[N]``: the largest ``b <= batch`` with
    ``offsets[b] <= token`` (``batch`` for padding), by rounds of ``SEARCH`` probes that
    narrow ``b``'s range ``SEARCH + 1``-fold; in bounds for any offsets."""
    found = tl.zeros_like(tokens)
    span = batch + 1  # b is in [found, found + span)
    probes = tl.arange(1, SEARCH + 1)
    while span > 1:
        step = (span + SEARCH) // (SEARCH + 1)
        index = found[:, None] + probes[None, :] * step
        inside = index <= batch
        value = tl.load(offsets_ptr + index, mask=inside, other=0)
        below = inside & (value <= tokens[:, None])
        found += step * tl.sum(below.to(tl.int32), axis=1)
        span = step
    return found


@triton.jit
def _position(tokens, ok, request, offsets_ptr, lengths_ptr, positions_ptr,
              SLOTS: tl.constexpr):
    """Each of ``tokens``' position (its freqs row and, by offsets, its cache slot)."""
    if SLOTS:
        pos = tl.load(positions_ptr + tokens, mask=ok, other=0).to(tl.int32)
    else:
        start = tl.load(offsets_ptr + request, mask=ok, other=0)
        pos = tl.load(lengths_ptr + request, mask=ok, other=0) + tokens - start
    return pos


@triton.jit
def _cos_sin(freqs_ptr, pos, ok, TOKENS: tl.constexpr, HALF: tl.constexpr,
             FREQS_SPLIT: tl.constexpr):
    """cos and sin ``[TOKENS, HALF]`` of each token's pairs, from a table of interleaved
    (cos, sin) pairs or of cosines then sines (``FREQS_SPLIT``)."""
    row = freqs_ptr + pos.to(tl.int64)[:, None] * (2 * HALF)
    if FREQS_SPLIT:
        j = tl.arange(0, HALF)[None, :]
        cos = tl.load(row + j, mask=ok[:, None], other=0.0)
        sin = tl.load(row + HALF + j, mask=ok[:, None], other=0.0)
    else:
        pairs = tl.load(row + tl.arange(0, 2 * HALF)[None, :], mask=ok[:, None], other=0.0)
        cos, sin = tl.split(tl.reshape(pairs, (TOKENS, HALF, 2)))
    return cos, sin


@triton.jit
def _load_pairs(src, mask, ROWS: tl.constexpr, COLS: tl.constexpr, HALF: tl.constexpr,
                INTERLEAVED: tl.constexpr):
    """The pairs ``(x0, x1)``, ``[ROWS, COLS, HALF]`` each, of the rope rows starting at
    ``src`` ``[ROWS, COLS, 1]``: GPT-J pairs split off whole rows, NeoX pairs as the two
    halves (16-byte vectors either way; the split costs no instruction)."""
    if INTERLEAVED:
        x = tl.load(src + tl.arange(0, 2 * HALF)[None, None, :], mask=mask)
        x0, x1 = tl.split(tl.reshape(x, (ROWS, COLS, HALF, 2)))
    else:
        j = tl.arange(0, HALF)[None, None, :]
        x0 = tl.load(src + j, mask=mask)
        x1 = tl.load(src + HALF + j, mask=mask)
    return x0, x1


@triton.jit
def _rotate(x0, x1, cos, sin, dtype: tl.constexpr):
    """``(x0 cos - x1 sin, x0 sin + x1 cos)`` in float32, rounded to ``dtype``."""
    x0 = x0.to(tl.float32)
    x1 = x1.to(tl.float32)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    return (x0 * cos - x1 * sin).to(dtype), (x0 * sin + x1 * cos).to(dtype)


@triton.jit
def _store_pairs(dst, y0, y1, mask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store the pairs ``y0``, ``y1`` ``[ROWS, COLS, HALF]`` as the rope rows at ``dst``
    ``[ROWS, COLS, 1]``."""
    if INTERLEAVED:
        tl.store(dst + tl.arange(0, 2 * HALF)[None, None, :], tl.interleave(y0, y1), mask=mask)
    else:
        j = tl.arange(0, HALF)[None, None, :]
        tl.store(dst + j, y0, mask=mask)
        tl.store(dst + HALF + j, y1, mask=mask)


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


@triton.jit
def _q_tile(q_ptr, out_ptr, freqs_ptr, offsets_ptr, lengths_ptr, positions_ptr, tokens, ok,
            request, block, q_s0, q_s1, o_s0, o_s1, NUM_HEADS: tl.constexpr,
            HALF: tl.constexpr, INTERLEAVED: tl.constexpr, FREQS_SPLIT: tl.constexpr,
            SLOTS: tl.constexpr, TPP: tl.constexpr, HPP: tl.constexpr):
    """RoPE of q for ``tokens`` ``[TPP]`` x head block ``block``: q's loads are issued
    before the position's."""
    heads = block * HPP + tl.arange(0, HPP)
    mask = ok[:, None, None]
    if NUM_HEADS % HPP != 0:
        mask = mask & (heads < NUM_HEADS)[None, :, None]
    rows = tokens.to(tl.int64)[:, None, None]
    src = q_ptr + rows * q_s0 + (heads * q_s1)[None, :, None]
    x0, x1 = _load_pairs(src, mask, TPP, HPP, HALF, INTERLEAVED)
    pos = _position(tokens, ok, request, offsets_ptr, lengths_ptr, positions_ptr, SLOTS)
    cos, sin = _cos_sin(freqs_ptr, pos, ok, TPP, HALF, FREQS_SPLIT)
    y0, y1 = _rotate(x0, x1, cos[:, None, :], sin[:, None, :], out_ptr.dtype.element_ty)
    dst = out_ptr + rows * o_s0 + (heads * o_s1)[None, :, None]
    _store_pairs(dst, y0, y1, mask, HALF, INTERLEAVED)


@triton.jit
def _new_rows(k_ptr, freqs_ptr, gamma_ptr, kv_ptr, kvo_ptr, scale_ptr, offsets_ptr,
              lengths_ptr, table_ptr, positions_ptr, slots_ptr, tokens, ok, request, n_slots,
              epsilon, k_s0, k_s1, t_s0, kv_s0, kvo_s0, dtype: tl.constexpr,
              HALF: tl.constexpr, NORM_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
              INTERLEAVED: tl.constexpr, FREQS_SPLIT: tl.constexpr, SLOTS: tl.constexpr,
              WRITE_THROUGH: tl.constexpr, KV_OUTPUT: tl.constexpr, QUANTIZE: tl.constexpr,
              CACHE_MAX: tl.constexpr, TPP: tl.constexpr):
    """RMSNorm of the latent and RoPE of the rope part of the new rows of ``tokens``
    ``[TPP]``, into their cache rows and ``kv_output``: ``kv_input``'s loads are issued
    before the position's, the cache row's as soon as its page is known."""
    c = tl.arange(0, NORM_DIM)[None, :]
    gamma = tl.load(gamma_ptr + c)
    if WRITE_THROUGH:
        src = kv_ptr + tokens.to(tl.int64) * kv_s0
        x = tl.load(src[:, None] + c, mask=ok[:, None], other=0.0)
        x0, x1 = _load_pairs(src[:, None, None] + NORM_DIM, ok[:, None, None], TPP, 1, HALF,
                             INTERLEAVED)
    pos = _position(tokens, ok, request, offsets_ptr, lengths_ptr, positions_ptr, SLOTS)
    if SLOTS:
        slot = tl.load(slots_ptr + tokens, mask=ok & (tokens < n_slots), other=-1).to(tl.int64)
        has_row = ok & (slot >= 0)
        slot = tl.where(has_row, slot, 0)
        page = slot // PAGE_SIZE
        line = slot % PAGE_SIZE
    else:
        page = tl.load(table_ptr + request.to(tl.int64) * t_s0 + pos // PAGE_SIZE, mask=ok,
                       other=-1).to(tl.int64)
        has_row = ok & (page >= 0)
        line = (pos % PAGE_SIZE).to(tl.int64)
    cos, sin = _cos_sin(freqs_ptr, pos, ok, TPP, HALF, FREQS_SPLIT)
    row = k_ptr + page * k_s0 + line * k_s1
    if not WRITE_THROUGH:  # in place: the cache row itself
        x = tl.load(row[:, None] + c, mask=has_row[:, None], other=0.0)
        x0, x1 = _load_pairs(row[:, None, None] + NORM_DIM, has_row[:, None, None], TPP, 1,
                             HALF, INTERLEAVED)
    scale = 1.0
    if QUANTIZE:
        scale = tl.load(scale_ptr)

    y0, y1 = _rotate(x0, x1, cos[:, None, :], sin[:, None, :], dtype)
    _store_pairs(row[:, None, None] + NORM_DIM, _cache_value(y0, scale, k_ptr, QUANTIZE,
                                                             CACHE_MAX),
                 _cache_value(y1, scale, k_ptr, QUANTIZE, CACHE_MAX), has_row[:, None, None],
                 HALF, INTERLEAVED)
    x = x.to(tl.float32)
    rms = tl.rsqrt(tl.sum(x * x, axis=1) / NORM_DIM + epsilon)
    normed = (x * rms[:, None]).to(gamma_ptr.dtype.element_ty)
    y = (normed.to(tl.float32) * gamma.to(tl.float32)).to(gamma_ptr.dtype.element_ty)
    y = y.to(dtype)
    tl.store(row[:, None] + c, _cache_value(y, scale, k_ptr, QUANTIZE, CACHE_MAX),
             mask=has_row[:, None])
    if KV_OUTPUT:
        out_row = kvo_ptr + tokens.to(tl.int64) * kvo_s0
        _store_pairs(out_row[:, None, None] + NORM_DIM, y0, y1, ok[:, None, None], HALF,
                     INTERLEAVED)
        tl.store(out_row[:, None] + c, y, mask=ok[:, None])


@triton.autotune(
    configs=_configs(),
    key=TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_time_per_call,
)
@triton.jit(do_not_specialize=["n_tokens", "batch", "n_slots", "token_bucket", "t_s0"])
def _fused_kernel(q_ptr, out_ptr, k_ptr, freqs_ptr, gamma_ptr, kv_ptr, kvo_ptr, scale_ptr,
                  offsets_ptr, lengths_ptr, table_ptr, positions_ptr, slots_ptr,
                  n_tokens, batch, n_slots, token_bucket, epsilon,
                  q_s0, q_s1, o_s0, o_s1, k_s0, k_s1, t_s0, kv_s0, kvo_s0,
                  NUM_HEADS: tl.constexpr, ROPE_DIM: tl.constexpr, NORM_DIM: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, INTERLEAVED: tl.constexpr,
                  FREQS_SPLIT: tl.constexpr, SLOTS: tl.constexpr,
                  WRITE_THROUGH: tl.constexpr, KV_OUTPUT: tl.constexpr,
                  QUANTIZE: tl.constexpr, CACHE_MAX: tl.constexpr,
                  TOKENS_PER_PROGRAM: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr):
    parts = (NUM_HEADS + HEADS_PER_PROGRAM - 1) // HEADS_PER_PROGRAM + 1
    pid = tl.program_id(0)
    part = pid % parts
    tokens = (pid // parts) * TOKENS_PER_PROGRAM + tl.arange(0, TOKENS_PER_PROGRAM)
    if SLOTS:
        request = tokens
        ok = tokens < n_tokens
    else:
        request = _request(tokens, offsets_ptr, batch)
        ok = (request < batch) & (tokens < n_tokens)
    if part == 0:
        _new_rows(k_ptr, freqs_ptr, gamma_ptr, kv_ptr, kvo_ptr, scale_ptr, offsets_ptr,
                  lengths_ptr, table_ptr, positions_ptr, slots_ptr, tokens, ok, request,
                  n_slots, epsilon, k_s0, k_s1, t_s0, kv_s0, kvo_s0, out_ptr.dtype.element_ty,
                  ROPE_DIM // 2, NORM_DIM, PAGE_SIZE, INTERLEAVED, FREQS_SPLIT, SLOTS,
                  WRITE_THROUGH, KV_OUTPUT, QUANTIZE, CACHE_MAX, TOKENS_PER_PROGRAM)
    else:
        _q_tile(q_ptr, out_ptr, freqs_ptr, offsets_ptr, lengths_ptr, positions_ptr, tokens, ok,
                request, part - 1, q_s0, q_s1, o_s0, o_s1, NUM_HEADS, ROPE_DIM // 2,
                INTERLEAVED, FREQS_SPLIT, SLOTS, TOKENS_PER_PROGRAM, HEADS_PER_PROGRAM)


# the autotuner's keys already tuned, with the device: their calls run the kernel once
_TUNED: set[tuple] = set()


def _autotuned(q_rope: torch.Tensor) -> bool:
    """Whether a call without a fixed tile autotunes: on a GPU (the CPU's Triton
    interpreter runs an untuned tile)."""
    return q_rope.is_cuda


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    """``k_scale`` of fp8 calls that pass none: 1."""
    return torch.ones(1, dtype=torch.float32, device=device)


def _launch(q_rope, out, freqs, gamma, k_cache, kv_input, kv_output, k_scale, indices,
            n_tokens, *, epsilon, interleaved, freqs_layout, slots, heads_per_program,
            tokens_per_program):
    """Launch the kernel on ``n_tokens`` tokens (``indices``: offsets, lengths, table,
    positions, slot mapping; the other addressing's any tensor); returns ``out``."""
    if freqs_layout not in ("interleaved", "split"):
        raise ValueError(f"freqs_layout must be 'interleaved' or 'split', got {freqs_layout!r}")
    quantize = k_cache.dtype != q_rope.dtype
    if quantize and kv_input is None:
        raise ValueError("an fp8 cache needs the write-through form (kv_input)")
    if out is None:
        out = torch.empty_like(q_rope)
    if not n_tokens:
        return out
    heads, rope_dim = q_rope.shape[1:]
    if quantize and k_scale is None:
        k_scale = _unit_scale(q_rope.device)
    # tensors of the other form or addressing are not read: any pointer will do
    rows_in = q_rope if kv_input is None else kv_input
    rows_out = q_rope if kv_output is None else kv_output
    offsets, lengths, table, positions, slot_mapping = indices
    bucket = triton.next_power_of_2(n_tokens)
    constexprs = dict(NUM_HEADS=heads, ROPE_DIM=rope_dim, NORM_DIM=gamma.shape[0],
                      PAGE_SIZE=k_cache.shape[1], INTERLEAVED=interleaved,
                      FREQS_SPLIT=freqs_layout == "split", SLOTS=slots,
                      WRITE_THROUGH=kv_input is not None, KV_OUTPUT=kv_output is not None,
                      QUANTIZE=quantize, CACHE_MAX=torch.finfo(k_cache.dtype).max)
    kernel = _fused_kernel
    if heads_per_program or tokens_per_program or not _autotuned(q_rope):
        kernel = _fused_kernel.fn
        constexprs.update(HEADS_PER_PROGRAM=heads_per_program or 16,
                          TOKENS_PER_PROGRAM=tokens_per_program or 1)
    tensors = (freqs, gamma, rows_in, rows_out, offsets if k_scale is None else k_scale,
               offsets, lengths, table, positions, slot_mapping)

    def grid(meta):
        parts = 1 + triton.cdiv(heads, meta["HEADS_PER_PROGRAM"])
        return (triton.cdiv(n_tokens, meta["TOKENS_PER_PROGRAM"]) * parts,)

    def run(q, o, cache):
        kernel[grid](q, o, cache, *tensors, n_tokens, lengths.shape[0], slot_mapping.shape[0],
                     bucket, epsilon, q.stride(0), q.stride(1), o.stride(0), o.stride(1),
                     cache.stride(0), cache.stride(1), table.stride(0), rows_in.stride(0),
                     rows_out.stride(0), **constexprs)

    shares_q = out.data_ptr() == q_rope.data_ptr()
    if kernel is _fused_kernel and (kv_input is None or shares_q):
        # the first call of a tuning key runs every config: as that changes what the kernel
        # reads (the cache rows in place, q when out is q), on copies first
        key = (*(constexprs[name] for name in TUNING_KEY if name in constexprs), bucket,
               q_rope.device, *(str(t.dtype) for t in (q_rope, out, k_cache, *tensors)))
        if key not in _TUNED:
            q_copy = q_rope.clone() if shares_q else q_rope
            run(q_copy, q_copy if shares_q else out,
                k_cache.clone() if kv_input is None else k_cache)
            _TUNED.add(key)
    run(q_rope, out, k_cache)
    return out


def triton_fused_rope_rmsnorm(
    q_rope: torch.Tensor, input_row_offsets: torch.Tensor, freqs_cis: torch.Tensor,
    gamma: torch.Tensor, k_cache: torch.Tensor, lookup_table: torch.Tensor,
    cache_lengths: torch.Tensor, *, kv_input: torch.Tensor | None = None,
    kv_output: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
    epsilon: float = 1e-6, out: torch.Tensor | None = None, interleaved: bool = True,
    freqs_layout: str = "interleaved", heads_per_program: int | None = None,
    tokens_per_program: int | None = None,
) -> torch.Tensor:
    """Same arguments and effect as ``tvm_fused.fused_rope_rmsnorm`` (the in-place and
    write-through forms, a cache of q's dtype or, write-through, fp8 with ``k_scale``;
    no checks of indices that point nowhere but negative pages, which get no row); returns
    ``out``.

    Parameters
    ----------
    q_rope : ``[n, H, R]`` bf16, fp16 or fp32, last dim contiguous (``out`` likewise).
    input_row_offsets : ``[batch + 1]`` uint32 or int32.
    freqs_cis : ``[P, R]`` fp32 or bf16, contiguous, ``freqs_layout`` "interleaved" (cos,
        sin pairs) or "split" (cosines, then sines).
    gamma : ``[D]``; k_cache : ``[pages, page_size, D + R]`` (last dim contiguous).
    lookup_table : ``[batch, max_pages]`` int32; cache_lengths : ``[batch]`` int32.
    heads_per_program, tokens_per_program : fix the tile (the other 16 heads or 1 token,
        4 warps) instead of autotuning (as on the CPU, in Triton's interpreter). R and D
        are powers of two.
    """
    return _launch(q_rope, out, freqs_cis, gamma, k_cache, kv_input, kv_output, k_scale,
                   (input_row_offsets.view(torch.int32), cache_lengths, lookup_table,
                    cache_lengths, cache_lengths), q_rope.shape[0], epsilon=epsilon,
                   interleaved=interleaved, freqs_layout=freqs_layout, slots=False,
                   heads_per_program=heads_per_program, tokens_per_program=tokens_per_program)


def triton_fused_rope_rmsnorm_slots(
    q_rope: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor, gamma: torch.Tensor, k_cache: torch.Tensor, *,
    kv_input: torch.Tensor | None = None, kv_output: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, epsilon: float = 1e-6,
    out: torch.Tensor | None = None, interleaved: bool = True, freqs_layout: str = "split",
    heads_per_program: int | None = None, tokens_per_program: int | None = None,
) -> torch.Tensor:
    """Same arguments and effect as ``tvm_fused.fused_rope_rmsnorm_slots`` (its forms as for
    ``triton_fused_rope_rmsnorm``): token ``t < len(positions)`` at ``positions[t]``, its
    cache row ``slot_mapping[t]`` (``page * page_size + row``; negative, or ``t`` past
    ``slot_mapping``: none); returns ``out``.

    Parameters
    ----------
    positions : ``[m]`` int64 or int32; slot_mapping : ``[s]`` int64 or int32, ``s <= m``.
    cos_sin_cache : ``[P, R]`` fp32 or bf16, contiguous, ``freqs_layout`` "split" (vLLM's:
        cosines, then sines) or "interleaved".
    Everything else as for ``triton_fused_rope_rmsnorm``.
    """
    return _launch(q_rope, out, cos_sin_cache, gamma, k_cache, kv_input, kv_output, k_scale,
                   (positions, positions, positions, positions, slot_mapping),
                   positions.shape[0], epsilon=epsilon, interleaved=interleaved,
                   freqs_layout=freqs_layout, slots=True, heads_per_program=heads_per_program,
                   tokens_per_program=tokens_per_program)
