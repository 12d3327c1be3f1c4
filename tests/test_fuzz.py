"""Randomized differential testing (see ``tvm_fused.testing.fuzz``): a few hundred cases on the CPU,
a thousand on the GPU (all but the first CPU chunk marked slow). A failure lists one-line
repros."""

import os

import pytest

from tvm_fused.testing.fuzz import CACHE_DTYPES, CORRUPTIONS, fuzz, random_case

CHUNK = 5
CPU_CASES = 200
GPU_CASES = 1000
GPU_FIRST_SEED = 100_000


@pytest.mark.parametrize("start", [0, *(pytest.param(start, marks=pytest.mark.slow)
                                         for start in range(CHUNK, CPU_CASES, CHUNK))])
def test_fuzz_cpu(start):
    failures = fuzz(start, CHUNK, "cpu", log=lambda _: None)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.slow
def test_fuzz_gpu():
    """A thousand cases, in parallel processes (most cases build a kernel of their own)."""
    failures = fuzz(GPU_FIRST_SEED, GPU_CASES, "cuda", log=lambda _: None,
                    jobs=min(16, os.cpu_count() or 1))
    assert not failures, "\n".join(failures)


def test_fuzz_in_worker_processes():
    """``jobs > 1`` runs the cases in worker processes, with the same verdicts."""
    assert fuzz(CPU_CASES, 4, "cpu", log=lambda _: None, jobs=2) == []


def test_cases_are_reproducible_and_varied():
    assert random_case(7) == random_case(7)
    cases = [random_case(seed) for seed in range(300)]
    assert {c.page_size for c in cases} >= {1, 256} and {c.heads for c in cases} >= {1, 128}
    assert any(0 in c.new_tokens for c in cases) and any(c.in_place for c in cases)
    assert any(not c.interleaved for c in cases) and any(c.layers > 1 for c in cases)
    assert {c.corruption for c in cases} == set(CORRUPTIONS)
    write_through = [c for c in cases if c.write_through]
    assert {c.cache_dtype for c in write_through} == set(CACHE_DTYPES)
    assert {c.kv_output for c in write_through} == {False, True}
    assert len({c.kv_columns for c in write_through}) > 1
    assert any(c.k_scale not in (None, 1.0) for c in write_through)
    assert any(length % c.page_size == 0 and length > 0
               for c in cases for length in c.cache_lengths if c.page_size > 1)
