"""The llvm-built kernel against the float64 reference, over the CPU test matrix."""

import pytest
import torch

from tvm_fused.testing.compare import run_and_check
from tvm_fused.testing.inputs import make_inputs

from .cases import DECODE, FORMS, MATRIX, MATRIX_IDS, RAGGED, check_matrix_case, thinned


@pytest.mark.parametrize("index", thinned(range(len(MATRIX)), MATRIX_IDS))
def test_matrix(index):
    report = check_matrix_case(index, "cpu")
    assert report.ok, report.summary()


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
def test_modes_and_layouts(interleaved, in_place):
    inputs = make_inputs(*RAGGED, num_q_heads=16, page_size=16, padding_rows=3, layers=3)
    report = run_and_check(inputs, in_place=in_place, interleaved=interleaved)
    assert report.ok, report.summary()


@pytest.mark.parametrize("offsets_dtype", thinned([torch.uint32, torch.int32], ["uint32", "int32"],
                                                  every=2))
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


@pytest.mark.parametrize("form", ["in-place", "write-through"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_rounds_to_a_bf16_gamma_dtype(dtype, form):
    """A bf16 gamma with a wider cache: the normalized value is rounded to bf16 before the
    gamma product and the product again (SPEC.md), a difference of 2^-8 relative that the
    fp32/fp16 tolerances see. (TVM's CPU build computes bf16 in float32 and dropped both
    roundings until ``exact_math.round_to``.)"""
    inputs = make_inputs(*RAGGED, num_q_heads=2, page_size=16, dtype=dtype,
                         gamma_dtype=torch.bfloat16, **FORMS[form])
    report = run_and_check(inputs)
    assert report.ok, report.summary()


def test_signatures_alternating_under_one_quick_key_each_get_their_kernel():
    """Calls that differ only in what the kernel's entry checks (the table's and offsets'
    dtypes) share a quick key: each is refused by the other's kernel and takes its own."""
    cases = [dict(freqs_dtype=torch.bfloat16), dict(offsets_dtype=torch.int32),
             dict(freqs_dtype=torch.bfloat16)]
    for dtypes in cases:
        inputs = make_inputs(*DECODE, num_q_heads=16, **dtypes)
        report = run_and_check(inputs)
        assert report.ok, (dtypes, report.summary())
