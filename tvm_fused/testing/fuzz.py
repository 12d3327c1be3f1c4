"""Randomized differential testing of the op against the float64 reference.

Case ``seed`` is fully determined by its seed: batch 1-64 with empty requests, 0-300 new
tokens per request, cache lengths 0-8192 drawn mostly at page boundaries, page sizes 1-256,
1-128 heads, every dtype, strided or contiguous and in-place or separate q, multi-layer cache
views, shuffled page tables, padding rows, interleaved and NeoX pairs, both forms of the op
(in place, or write-through from a column slice of a projection output, with or without
kv_output, into a cache of q's dtype or fp8 e4m3fn/e5m2 with or without k_scale), both
addressings (offsets and a page table, or positions and a slot mapping of int64 or int32,
maybe shorter than the positions), both cos/sin table layouts and both RMSNorm roundings,
and in a third of the cases an index that points nowhere (a page or slot of -1 or past the
cache, a freqs table too short),
which the kernel must skip and count (those cases run unvalidated). A failing case prints a
one-line repro: ``python -m tvm_fused fuzz --seed S --cases 1 --device D``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor

import torch

from .. import form as config
from ..progress import Progress
from ..tokens import locate_tokens
from .compare import CheckReport, run_and_check
from .inputs import OpInputs, engine_addressed, make_inputs, with_options

DTYPES = tuple(getattr(torch, name) for name in config.DTYPES)
# a small grid of shapes keeps the number of distinct kernels (builds) bounded
HEADS = (1, 2, 5, 16, 64, 128)
PAGE_SIZES = (1, 2, 16, 64, 128, 256)
CORRUPTIONS = (None, None, None, None, "no cache row", "page past the cache", "short freqs")
CACHE_DTYPES = (None, None, torch.float8_e4m3fn, torch.float8_e5m2)  # None: q's dtype
K_SCALES = (None, 1.0, 0.25, 3.7)
KV_COLUMNS = ((576, 0), (1536 + 576, 1536), (577, 1), (600, 8))  # (width, start) of the rows


@dataclasses.dataclass(frozen=True)
class FuzzCase:
    """One random case; ``describe()`` is its one-line summary."""

    seed: int
    new_tokens: tuple
    cache_lengths: tuple
    heads: int
    page_size: int
    dtype: torch.dtype
    gamma_dtype: torch.dtype
    freqs_dtype: torch.dtype
    offsets_dtype: torch.dtype
    padding_rows: int
    strided_q: bool
    layers: int
    in_place: bool
    interleaved: bool
    corruption: str | None
    write_through: bool
    cache_dtype: torch.dtype | None
    k_scale: float | None
    kv_columns: tuple
    kv_output: bool
    slots: bool = False  # engine addressing
    index_dtypes: tuple = (torch.int64, torch.int64)
    unslotted: int = 0
    freqs_layout: str = "interleaved"
    norm_rounding: str = "before_gamma"

    def describe(self) -> str:
        form = "in-place cache"
        if self.write_through:
            form = (f"write-through kv_columns={self.kv_columns} kv_output={self.kv_output} "
                    f"cache={str(self.cache_dtype or self.dtype)[6:]} k_scale={self.k_scale}")
        return (f"seed={self.seed} batch={len(self.new_tokens)} tokens={sum(self.new_tokens)} "
                f"heads={self.heads} page={self.page_size} {str(self.dtype)[6:]} "
                f"gamma={str(self.gamma_dtype)[6:]} freqs={str(self.freqs_dtype)[6:]} "
                f"offsets={str(self.offsets_dtype)[6:]} pad={self.padding_rows} "
                f"strided={self.strided_q} layers={self.layers} in_place={self.in_place} "
                f"{'interleaved' if self.interleaved else 'neox'} {form} "
                f"corruption={self.corruption} {self._addressing()} table={self.freqs_layout} "
                f"norm={self.norm_rounding}")

    def _addressing(self) -> str:
        if not self.slots:
            return "offsets"
        positions, slots = (str(d)[6:] for d in self.index_dtypes)
        return f"slots positions={positions} slot_mapping={slots} unslotted={self.unslotted}"


def _cache_length(rng: random.Random, page_size: int) -> int:
    if rng.random() < 0.6:  # at, just before or just after a page boundary
        boundary = page_size * rng.randrange(0, 8192 // page_size + 1)
        return min(8192, max(0, boundary + rng.choice((-1, 0, 1))))
    return rng.randrange(0, 8193)


def random_case(seed: int, max_tokens: int = 300) -> FuzzCase:
    """The case of ``seed`` (deterministic)."""
    rng = random.Random(seed)
    batch = rng.randint(1, 64)
    heads = rng.choice(HEADS)
    budget = max(1, 4096 // heads)  # keep a case's q under ~4k token-heads on the CPU
    new = [0 if rng.random() < 0.2 else rng.randint(1, max_tokens) for _ in range(batch)]
    while sum(new) > budget:
        new[rng.randrange(batch)] //= 2
    page_size = rng.choice(PAGE_SIZES)
    dtype = rng.choice(DTYPES)
    case = dict(
        seed=seed, new_tokens=tuple(new),
        cache_lengths=tuple(_cache_length(rng, page_size) for _ in range(batch)),
        heads=heads, page_size=page_size, dtype=dtype,
        gamma_dtype=rng.choice((dtype, torch.float32)),
        freqs_dtype=rng.choice((torch.float32, torch.float32, torch.bfloat16)),
        offsets_dtype=rng.choice((torch.uint32, torch.int32)),
        padding_rows=rng.choice((0, 0, 1, 7)), strided_q=rng.random() < 0.7,
        layers=rng.choice((1, 1, 3)), in_place=rng.random() < 0.3,
        interleaved=rng.random() < 0.8, corruption=rng.choice(CORRUPTIONS))
    # the form is drawn last, so that the fields above are those of earlier versions
    write_through = rng.random() < 0.5
    cache_dtype = rng.choice(CACHE_DTYPES) if write_through else None
    case.update(write_through=write_through, cache_dtype=cache_dtype,
                k_scale=rng.choice(K_SCALES) if cache_dtype else None,
                kv_columns=rng.choice(KV_COLUMNS), kv_output=rng.random() < 0.5)
    # then the addressing, the table layout and the rounding
    return FuzzCase(**case, slots=rng.random() < 0.5,
                    index_dtypes=rng.choice(((torch.int64,) * 2, (torch.int32,) * 2,
                                             (torch.int64, torch.int32))),
                    unslotted=rng.choice((0, 0, 1, 3)),
                    freqs_layout=rng.choice(("interleaved", "split")),
                    norm_rounding=rng.choice(("before_gamma", "once")))


def _corrupt(inputs: OpInputs, how: str, seed: int) -> None:
    """Point one random new token's index nowhere (SPEC.md): its page to -1 ("no cache row")
    or past the cache, or cut ``freqs_cis`` just before its position."""
    tokens = locate_tokens(inputs.input_row_offsets, inputs.cache_lengths,
                           inputs.lookup_table, inputs.freqs_cis.shape[0],
                           inputs.k_cache.shape[0], inputs.k_cache.shape[1])
    if tokens.pos.numel() == 0:
        return
    rng = random.Random(seed)
    token = rng.randrange(tokens.pos.numel())
    request, pos = int(tokens.request[token]), int(tokens.pos[token])
    if how == "short freqs":
        inputs.freqs_cis = inputs.freqs_cis[:pos].clone()
        return
    page = -1 if how == "no cache row" else inputs.k_cache.shape[0] + rng.randrange(1000)
    inputs.lookup_table[request, pos // inputs.k_cache.shape[1]] = page


def run_case(case: FuzzCase, device: str) -> CheckReport:
    """Run ``case`` on ``device`` and check it (validation on, so that an input the fuzzer
    meant to be valid but is not would raise, unless the case corrupts an index)."""
    inputs = make_inputs(
        list(case.new_tokens), list(case.cache_lengths), num_q_heads=case.heads,
        page_size=case.page_size, dtype=case.dtype, gamma_dtype=case.gamma_dtype,
        freqs_dtype=case.freqs_dtype, offsets_dtype=case.offsets_dtype,
        padding_rows=case.padding_rows, strided_q=case.strided_q, layers=case.layers,
        write_through=case.write_through, cache_dtype=case.cache_dtype, k_scale=case.k_scale,
        kv_columns=case.kv_columns, prefix_pool=3, seed=case.seed, device=device)
    if case.corruption:
        _corrupt(inputs, case.corruption, case.seed)
    inputs = with_options(inputs, freqs_layout=case.freqs_layout,
                          norm_rounding=case.norm_rounding)
    if case.slots:
        inputs = engine_addressed(inputs, unslotted=min(case.unslotted,
                                                        int(inputs.input_row_offsets[-1])),
                                  index_dtypes=case.index_dtypes)
    return run_and_check(inputs, in_place=case.in_place, interleaved=case.interleaved,
                         validate=case.corruption is None, kv_output=case.kv_output)


def repro(case: FuzzCase, device: str) -> str:
    return f"python -m tvm_fused fuzz --seed {case.seed} --cases 1 --device {device}"


def _failure(seed: int, device: str) -> str | None:
    """The repro line of case ``seed`` if it fails, else None."""
    case = random_case(seed)
    report = run_case(case, device)
    return None if report.ok else f"{repro(case, device)}  # {case.describe()}: " \
        f"{report.summary()}"


def fuzz(first_seed: int, cases: int, device: str, log=print, jobs: int = 1) -> list[str]:
    """Run ``cases`` cases from ``first_seed``; return the repro line of each failure.

    Most cases need a kernel of their own (a build: a few seconds with nvcc), so ``jobs > 1``
    runs the cases in that many worker processes, which share the on-disk kernel cache."""
    seeds = range(first_seed, first_seed + cases)
    devices = [device] * cases
    log(f"{cases} cases from seed {first_seed} on {device}, {jobs} process(es); most cases "
        "build a kernel first, so the first ones take a while")
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(
                jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)))
            results = pool.map(_failure, seeds, devices, chunksize=2)
        else:
            results = map(_failure, seeds, devices)
        failures = []
        progress = Progress(cases, "fuzz")
        for failure in results:
            if failure is not None:
                failures.append(failure)
                log(f"FAIL {failure}")
            progress.advance(note=f"{len(failures)} failed")
    log(f"{cases - len(failures)}/{cases} cases passed on {device}")
    return failures
