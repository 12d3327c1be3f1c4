"""The knobs of the GPU block-group schedule, one frozen config, with a default per GPU.

The same ``ScheduleConfig`` drives the hand-written default and every MetaSchedule candidate:
the tuning space samples these fields and calls the same schedule body.
"""

from __future__ import annotations

import dataclasses

import tvm

from tvm_fused.form import ITEMSIZE, Form


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Knobs of the block-group schedule.

    Attributes
    ----------
    block_threads : threads per thread block, in every group (the launch's blockDim).
    norm_threads_per_row : threads that reduce one cache row (``threadIdx.x``); a block
        normalizes ``block_threads / norm_threads_per_row`` rows (``threadIdx.y``). Both rope
        groups use the same ``(x, y)`` thread shape, so no thread of the merged launch idles.
        32 (one warp) reduces with shuffles alone; more threads add a shared-memory step.
    vector_bytes : bytes per global load/store (16: one ``uint4`` per access).
    rope_vectors_per_thread : vectors each rope thread handles, so a block covers that many
        times more heads (q) or tokens (k): fewer, longer blocks. A q thread's are adjacent
        heads of one token, all loaded before the first rotation (that many loads in
        flight); a k thread's are tokens strided by the block's span, one after another.
    norm_rows_per_thread : cache rows each norm thread group normalizes one after another,
        so a norm block covers that many times more tokens.
    unroll : unroll the per-thread element loops explicitly.
    norm_first : order of the block groups in the merged grid: norm, k rope, q rope, count
        (else q rope, k rope, norm, count). The GPU dispatches blocks in grid order, so the
        norm group's blocks, whose chain of dependent steps is the longest (locate, row
        load, reduction, store), start first instead of last.
    grid_blocks : 0, one thread block per chunk of work (a grid that grows with the tokens);
        else a persistent grid: each of the q rope, k rope and norm groups has exactly
        ``grid_blocks`` blocks, and block ``b`` works through chunks ``b, b + grid_blocks,
        ...`` (MAX's ``num_workers``): fewer, longer-lived blocks at prefill, at the cost of
        idle blocks when there are fewer chunks than blocks. Needs one warp per norm row.
    k_rope_in_norm_group : the cache row's rope part is rotated by the norm group's blocks,
        not by a k rope group of its own: each thread group of a norm row also rotates its
        row's rope part (its first ``rope_dim / elements per vector`` threads, a vector
        each), so a block covers the same rows in both and the merged grid has no k rope
        group (``rope_vectors_per_thread`` then applies to q alone).
    nope_vectors_per_thread : adjacent vectors of ``q_nope`` each nope-copy thread moves: it
        issues all their loads before it locates its token (once for all of them), stores
        them as vectors as wide as ``vector_bytes`` allows (two give one 16-byte fp8 store),
        and a block covers that many times more of a token's heads.
    """

    block_threads: int = 128
    norm_threads_per_row: int = 32
    vector_bytes: int = 16
    rope_vectors_per_thread: int = 1
    norm_rows_per_thread: int = 1
    unroll: bool = True
    norm_first: bool = False
    grid_blocks: int = 0
    k_rope_in_norm_group: bool = False
    nope_vectors_per_thread: int = 1

    def __post_init__(self) -> None:
        if self.block_threads % self.norm_threads_per_row:
            raise ValueError("block_threads must be a multiple of norm_threads_per_row")
        if self.norm_threads_per_row % 32 or not 32 <= self.block_threads <= 1024:
            raise ValueError("norm_threads_per_row must be a multiple of 32 and "
                             "block_threads within [32, 1024]")
        if self.vector_bytes not in (4, 8, 16):
            raise ValueError(f"vector_bytes must be 4, 8 or 16, got {self.vector_bytes}")
        if min(self.rope_vectors_per_thread, self.norm_rows_per_thread,
               self.nope_vectors_per_thread) < 1:
            raise ValueError("rope_vectors_per_thread, norm_rows_per_thread and "
                             "nope_vectors_per_thread must be positive")
        if self.grid_blocks < 0:
            raise ValueError(f"grid_blocks must be 0 or positive, got {self.grid_blocks}")
        if self.norm_threads_per_row > 32 and (self.norm_rows_per_thread > 1
                                               or self.grid_blocks):
            # TVM's cross-warp allreduce has no barrier after its shared-memory read, so a
            # thread group repeating it for a second row could overwrite the first row's
            # partial sums while slower warps still read them
            raise ValueError("norm_rows_per_thread > 1 and grid_blocks need "
                             "norm_threads_per_row == 32 (one warp per row)")

    @property
    def norm_rows_per_block(self) -> int:
        """Cache rows one norm block normalizes."""
        return self.block_threads // self.norm_threads_per_row

    def rope_lanes(self, op: Form, prefix: str) -> tuple[int, int, int]:
        """``(vector, elems, lanes)`` of the ``prefix`` ("q" or "k") rope branch: elements per
        vector access, elements per lane (whole pairs), lanes per head (``rope_dim / elems``).
        """
        # the k rope part starts into its row: vectors must divide where
        offset = (op.rope_offset,) if prefix == "k" else ()
        vector = self.vector_elems(op, op.dtype, op.rope_dim // (1 if op.interleaved else 2),
                                   *offset)
        # a lane's elements hold whole pairs: at least one interleaved pair, whose two
        # elements are accessed one by one when the alignment allows no vector (a pair-wide
        # access would be misaligned), or a vector from each half of a NeoX row
        elems = max(vector, 2) if op.interleaved else 2 * vector
        return vector, elems, op.rope_dim // elems

    def q_heads_per_thread(self, op: Form) -> int:
        """The most heads a q rope thread can take while blocks still tile a token's heads
        (0: a block holds whole tokens)."""
        return op.num_q_heads * self.rope_lanes(op, "q")[2] // self.block_threads

    def vector_elems(self, op: Form, dtype: str, *dims: int) -> int:
        """Elements per vector access of ``dtype``: as wide as ``vector_bytes`` and the op's
        alignment allow while dividing every dim in ``dims``."""
        elems = max(min(self.vector_bytes, op.alignment) // ITEMSIZE[dtype], 1)
        while elems > 1 and any(d % elems for d in dims):
            elems //= 2
        return elems


# The hand-written default. Every NVIDIA GPU from sm_70 on gets the same shape: 128-thread
# blocks of four warps, a warp per cache row (shuffle-only reduction, no barrier), 16-byte
# accesses, one vector per q-rope thread (a token's heads spread over the most blocks).
DEFAULT_SCHEDULE = ScheduleConfig()
# Two vectors per q-rope thread (two heads of one token): the thread locates its token once
# for both, which halves the locate's instructions per byte. Measured on an H200 (README,
# "What the index checks cost"): at 128 heads 3% faster than one vector at 4096 and 32768
# tokens and 5% at 1 token, 4-8% slower at 64 and 512 tokens, even at 8. With too few heads
# for two vectors per q thread (16 heads: a token's q rope fills one 128-thread block) only
# the k rope threads take two tokens each, which measured 2-8% slower at 4096 and 32768
# tokens on an H200 in every form (benchmarks/results/h200_schedule_sweep.jsonl).
TWO_VECTORS = ScheduleConfig(rope_vectors_per_thread=2)


def default_for_tokens(tokens: int | None, op: Form) -> ScheduleConfig:
    """The hand-written default for ``op`` and calls of about ``tokens`` tokens (a token
    bucket; None: any count).

    Shape: ``TWO_VECTORS`` from 4096 tokens, and up to 8 without PDL, where a token's q rope
    gives each thread of a block two heads, else ``DEFAULT_SCHEDULE``. With PDL, one vector
    per thread is faster at every decode size: after the wait, the most threads each do the
    least (measured on an H200, 128 heads, 1 token, in a graph of 100 calls: 1.0 vs 1.4 µs
    per call).

    Group order: the norm group first up to 64 tokens, and up to 512 where a token's q rope
    spans several blocks (many heads). Measured on an H200, GPU time per call in a graph of
    100 calls, norm first against q first: 128 heads 3-7% less at 1, 64 and 256 tokens,
    with or without PDL; 16 heads 1% less at 1 and 64 tokens without PDL (the same with),
    but 2% more at 256 without PDL and 29% more with ``pdl="early-indices"``; at 32768
    tokens (cold L2) 1-3% more.

    q_nope runs (an attention query with ``q_nope``): one vector per nope-copy thread up to
    16 tokens, two to 2048, four from 4096. Measured on an H100, 128 heads, fp8 query with an
    fp8 cache, against one vector: 3.42 vs 3.51 µs at 16 tokens (graph of 50 calls), 7.79 vs
    6.73 at 64, 26.7 vs 22.4 at 256; 74% vs 88% of copy bandwidth at 1024 tokens; at 4096
    and 32768 tokens 72% and 74% (one), 88% and 91% (two), 94% and 97% (four).

    Tuning decisions replace it per GPU and bucket where a candidate was measured faster."""
    small = tokens is not None and tokens <= 8 and not op.pdl
    if (tokens is not None and (small or tokens >= 4096)
            and TWO_VECTORS.q_heads_per_thread(op) >= 2):
        shape = TWO_VECTORS
    else:
        shape = DEFAULT_SCHEDULE
    norm_first = tokens is not None and (
        tokens <= 64 or (tokens <= 512 and shape.q_heads_per_thread(op) > 1))
    nope = 1 if tokens is None or tokens <= 16 else 2 if tokens < 4096 else 4
    return dataclasses.replace(shape, norm_first=norm_first,
                               nope_vectors_per_thread=nope if op.q_nope else 1)


def default_schedule_config(target: tvm.target.Target, op: Form,
                            tokens: int | None = None) -> ScheduleConfig:
    """The hand-written default for a CUDA target, ``op`` and calls of about ``tokens``
    tokens (``default_for_tokens``)."""
    if target.kind.name != "cuda":
        raise ValueError(f"the block-group schedule is for CUDA targets, got {target.kind.name}")
    return default_for_tokens(tokens, op)
