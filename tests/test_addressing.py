"""Engine addressing (positions + slot mapping), the split cos/sin table and the RMSNorm's
single rounding, against the float64 reference on every device: every addressing x table
layout x form x cache dtype, indices that point nowhere, and the argument checks."""

import itertools

import pytest
import torch

from tvm_fused import fused_rope_rmsnorm_slots
from tvm_fused.testing.compare import agreement, check_run, located, run_and_check
from tvm_fused.testing.inputs import engine_addressed, make_inputs, with_options
from tvm_fused.testing.reference import reference_outputs

from .cases import BAD_SLOTS, FORMS, RAGGED, bad_index_inputs, snapshot, thinned, unchanged

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ADDRESSINGS = ("offsets", "slots")
LAYOUTS = ("interleaved", "split")
COMBINATIONS = list(itertools.product(ADDRESSINGS, LAYOUTS, FORMS))
IDS = ["-".join(case) for case in COMBINATIONS]


def _inputs(index: int, device: str, **extra):
    """Combination ``index`` on RAGGED (4 heads, page size 16, 3 layers, padding rows); the
    other options rotate across the matrix: pairing, the RMSNorm's rounding, fp32 or bf16
    table, index dtypes, tokens without a slot_mapping entry."""
    addressing, layout, form = COMBINATIONS[index]
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, padding_rows=2,
                         freqs_dtype=(torch.float32, torch.bfloat16)[index % 3 == 2],
                         seed=index, device=device, **{**FORMS[form], **extra})
    inputs = with_options(inputs, freqs_layout=layout,
                          norm_rounding=("before_gamma", "once")[index % 2])
    if addressing == "slots":
        dtypes = ((torch.int64, torch.int64), (torch.int32, torch.int64),
                  (torch.int64, torch.int32))[index % 3]
        inputs = engine_addressed(inputs, unslotted=index % 4, index_dtypes=dtypes)
    return inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", thinned(range(len(COMBINATIONS)), IDS, every=2))
def test_combination_matches_reference(device, index):
    inputs = _inputs(index, device)
    for in_place in (False, True):
        report = run_and_check(inputs.clone(), in_place=in_place, interleaved=index % 5 != 3,
                               validate=device == "cpu")
        assert report.ok, report.summary()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_rounding_is_the_one_asked_for(device, dtype):
    """The two RMSNorm roundings are both within an ulp of the exact value, so the float64
    check alone cannot tell them apart; bit agreement does: the op's normed values are the
    reference's of the same rounding but where float32 evaluation order decides a rounding
    (a share of ~1e-4), and differ from the other rounding's on about a quarter."""
    inputs = make_inputs([256], [5], num_q_heads=1, write_through=True, dtype=dtype, seed=3,
                         device=device)
    for rounding, other in (("before_gamma", "once"), ("once", "before_gamma")):
        run = with_options(inputs, norm_rounding=rounding)
        rows = torch.empty(run.kv_input.shape, dtype=dtype, device=device)
        run.call(kv_output=rows)
        normed = rows[:, :512].cpu()
        for reference_rounding, least, most in ((rounding, 0.999, 1.0), (other, 0.5, 0.9)):
            expected = reference_outputs(located(run), **_reference_args(inputs),
                                         norm_rounding=reference_rounding).rows[:, :512]
            same, apart = agreement(normed, expected)
            assert least <= same <= most and apart <= 2, (rounding, reference_rounding, same)


def _reference_args(inputs) -> dict:
    return {"q_rope": inputs.q_rope, "freqs_cis": inputs.freqs_cis, "gamma": inputs.gamma,
            "k_cache": inputs.k_cache, "kv_input": inputs.kv_input}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["in-place", "fp8-e5m2-scaled"])
@pytest.mark.parametrize("validate", [True, False], ids=["validate", "unchecked"])
@pytest.mark.parametrize("case", BAD_SLOTS)
def test_bad_slot_or_position_is_refused_or_skipped_and_counted(device, form, validate, case):
    corrupt, errors = BAD_SLOTS[case]
    inputs = engine_addressed(bad_index_inputs(device, form))
    corrupt(inputs)
    if errors and validate:
        before = snapshot(inputs)
        with pytest.raises(ValueError):
            inputs.call(validate=True)
        assert unchanged(inputs, before)
        return
    for in_place in (False, True):
        report = run_and_check(inputs.clone(), in_place=in_place, validate=validate)
        assert report.ok and report.errors_expected == errors, report.summary()


def test_repeated_slot_is_refused():
    inputs = engine_addressed(bad_index_inputs("cpu"))
    inputs.slot_mapping[3] = inputs.slot_mapping[0]
    before = snapshot(inputs)
    with pytest.raises(ValueError, match="repeats a slot"):
        inputs.call()
    assert unchanged(inputs, before)


@pytest.mark.parametrize("change, error, match", [
    (lambda x: {"positions": x.positions.float()}, TypeError, "positions must have dtype"),
    (lambda x: {"slot_mapping": x.slot_mapping[:, None]}, ValueError, "slot_mapping must have"),
    (lambda x: {"positions": torch.zeros(x.q_rope.shape[0] + 1, dtype=torch.int64)},
     ValueError, "more than q_rope's"),
    (lambda x: {"slot_mapping": torch.cat((x.slot_mapping, x.slot_mapping[:1] + 1))},
     ValueError, "more than positions'"),
    (lambda x: {"positions": x.positions[:4]}, ValueError, "more than positions'"),
    (lambda x: {"cos_sin_cache": x.freqs_cis[:, :32]}, ValueError, "cos_sin_cache must have"),
])
def test_malformed_engine_arguments_are_refused(change, error, match):
    inputs = engine_addressed(bad_index_inputs("cpu", "write-through"))
    names = ("q_rope", "positions", "slot_mapping", "cos_sin_cache", "gamma", "k_cache")
    call = dict(zip(names, inputs.args()), **change(inputs))
    before = snapshot(inputs)
    with pytest.raises(error, match=match):
        fused_rope_rmsnorm_slots(**call, kv_input=inputs.kv_input, freqs_layout="interleaved")
    assert unchanged(inputs, before)


def test_an_unknown_pdl_mode_is_refused():
    inputs = _inputs(0, "cpu")
    before = snapshot(inputs)
    with pytest.raises(ValueError, match="pdl must be False, True or 'early-indices'"):
        inputs.call(pdl="early")
    assert unchanged(inputs, before)


@pytest.mark.parametrize("addressing", ADDRESSINGS)
def test_pdl_is_ignored_on_the_cpu(addressing):
    """``pdl=True`` is a GPU launch's property: on the CPU the op computes the same."""
    inputs = _inputs(ADDRESSINGS.index(addressing) * len(LAYOUTS) * len(FORMS) + 1, "cpu")
    before = inputs.clone()
    for pdl in (True, "early-indices"):
        after = before.clone()
        out = after.call(pdl=pdl)
        report = check_run(before, after, out)
        assert report.ok, report.summary()
