"""The checker itself catches a wrong run: each stray write planted after a correct run
(outside the tensors, in another layer, in rows the op must not touch, in a written row)
makes ``check_run`` fail, whatever the layer count."""

import pytest
import torch

from tvm_fused import fused_rope_rmsnorm
from tvm_fused.testing.compare import check_run
from tvm_fused.testing.inputs import GUARD, make_inputs

from .cases import RAGGED


def _bump(tensor):
    tensor.add_(1.0)


PLANTS = {
    "guard before the cache": lambda i: _bump(i.cache_storage[:1]),
    "guard after the cache": lambda i: _bump(i.cache_storage[-1:]),
    "guard after q": lambda i: _bump(i.q_storage[-GUARD:]),
    "a row of another page": lambda i: _bump(i.k_cache[int(i.lookup_table[0, 0]), 10, :1]),
    "another layer": lambda i: _bump(i.cache_storage[GUARD:GUARD + 1]),
    "q's other columns": lambda i: _bump(i.q_storage[GUARD:GUARD + 1]),
    "a padding q row": lambda i: _bump(i.q_rope[-1, 0, :1]),
    "a written q value": lambda i: _bump(i.q_rope[0, 0, :1]),
    "a written cache value": lambda i: _bump(i.k_cache[int(i.lookup_table[0, 0]), 2, :1]),
}


@pytest.mark.parametrize("layers, plant", [
    (layers, plant) for layers in (1, 3) for plant in (None, *PLANTS)
    if layers > 1 or plant != "another layer"])
def test_checker_fails_on_planted_writes(layers, plant):
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=layers, padding_rows=2)
    before = inputs.clone()
    fused_rope_rmsnorm(*inputs.args(), out=inputs.q_rope)
    if plant is not None:
        PLANTS[plant](inputs)
    report = check_run(before, inputs, inputs.q_rope, in_place=True)
    assert report.ok == (plant is None), report.summary()


@pytest.mark.parametrize("plant", [None, "a padding row", "a written row"])
def test_checker_fails_on_planted_writes_to_a_callers_out(plant):
    """Out of place into the caller's tensor (its whole storage): rows the op must not write
    are compared bit for bit, written rows with the reference."""
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, padding_rows=2)
    before = inputs.clone()
    out = torch.randn_like(inputs.q_rope)
    out_before = out.clone()
    fused_rope_rmsnorm(*inputs.args(), out=out)
    if plant is not None:
        _bump(out[-1 if plant == "a padding row" else 0, 0, :1])
    report = check_run(before, inputs, out, out_before)
    assert report.ok == (plant is None), report.summary()


def test_checker_fails_on_a_wrong_error_count():
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16)
    inputs.lookup_table[2, 8] = inputs.k_cache.shape[0]  # three error tokens
    before = inputs.clone()
    errors = torch.zeros(1, dtype=torch.int32)
    out = fused_rope_rmsnorm(*inputs.args(), errors=errors, validate=False)
    assert check_run(before, inputs, out, errors_counted=int(errors)).ok
    assert not check_run(before, inputs, out, errors_counted=int(errors) - 1).ok
