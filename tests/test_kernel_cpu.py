"""The llvm-built kernel against the float64 reference, over the CPU test matrix."""

import itertools

import pytest
import torch

from tvm_fused.checking import run_and_check
from tvm_fused.inputs import make_inputs

from .cases import DECODE, PREFILL, RAGGED, matrix_id

HEADS = (1, 16, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PAGE_SIZES = (1, 16, 128)
MATRIX = list(itertools.product(HEADS, DTYPES, PAGE_SIZES))


@pytest.mark.parametrize("index", range(len(MATRIX)),
                         ids=[matrix_id(*case) for case in MATRIX])
def test_matrix(index):
    """Every (heads, dtype, page size); the other options rotate so that each combination of
    layout, mode and offsets dtype appears across the matrix."""
    heads, dtype, page_size = MATRIX[index]
    new_tokens, cache_lengths = (RAGGED, DECODE, PREFILL)[index % 3]
    inputs = make_inputs(new_tokens, cache_lengths, num_q_heads=heads, page_size=page_size,
                         dtype=dtype, padding_rows=index % 4, strided_q=index % 2 == 0,
                         layers=1 + 2 * (index % 2),
                         offsets_dtype=(torch.uint32, torch.int32)[index // 2 % 2],
                         seed=index)
    report = run_and_check(inputs, in_place=index % 4 == 1,
                           interleaved=index % 5 != 2)
    assert report.ok, report.summary()


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
def test_modes_and_layouts(interleaved, in_place):
    inputs = make_inputs(*RAGGED, num_q_heads=16, page_size=16, padding_rows=3, layers=3)
    report = run_and_check(inputs, in_place=in_place, interleaved=interleaved)
    assert report.ok, report.summary()


@pytest.mark.parametrize("offsets_dtype", [torch.uint32, torch.int32])
@pytest.mark.parametrize("freqs_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma_dtype", [torch.bfloat16, torch.float32])
def test_mixed_dtypes(offsets_dtype, freqs_dtype, gamma_dtype):
    inputs = make_inputs(*DECODE, num_q_heads=16, offsets_dtype=offsets_dtype,
                         freqs_dtype=freqs_dtype, gamma_dtype=gamma_dtype)
    report = run_and_check(inputs)
    assert report.ok, report.summary()


def test_all_rows_padding_touches_nothing():
    """Every request empty: no q row and no cache row may change."""
    inputs = make_inputs([0, 0], [4, 9], num_q_heads=16, padding_rows=5)
    report = run_and_check(inputs)
    assert report.ok, report.summary()


def test_zero_tokens():
    inputs = make_inputs([0], [3], num_q_heads=16)
    report = run_and_check(inputs)
    assert report.ok, report.summary()


def test_epsilon_is_applied():
    """A zero row normalizes to exactly zero only because epsilon keeps rsqrt finite."""
    inputs = make_inputs([1], [0], num_q_heads=1, dtype=torch.float32)
    page = int(inputs.lookup_table[0, 0])
    inputs.k_cache[page, 0, :512] = 0
    report = run_and_check(inputs, epsilon=1e-3)
    assert report.ok, report.summary()
    assert torch.equal(inputs.k_cache[page, 0, :512], torch.zeros(512))
