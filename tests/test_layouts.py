"""Odd strides and misaligned views: right answers on every device, or a clear refusal from
every entry point that was built for other tensors."""

import pytest
import torch

from tvm_fused import OP_NAME, Form, build
from tvm_fused.compiler.build import device_target
from tvm_fused.testing.compare import run_and_check
from tvm_fused.testing.inputs import make_inputs

from .cases import RAGGED, thinned

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (q columns (width, start), out columns or "in place", cache row width): each odd in a way
# that breaks 16-byte alignment of a pointer or a stride
LAYOUTS = {
    "q[..., 1:] of 65": ((65, 1), None, None),
    "q[..., :64] of 65": ((65, 0), None, None),
    "out[..., 1:] of 65": (None, (65, 1), None),
    "out[..., 3:] of 70": (None, (70, 3), None),
    "cache rows of 577": (None, None, 577),
    "all odd, in place": ((67, 3), "in place", 581),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("interleaved", thinned([True, False], ["gptj", "neox"], every=2))
def test_odd_strides_give_the_right_answer(device, dtype, layout, interleaved):
    q_columns, out_columns, row_width = LAYOUTS[layout]
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, dtype=dtype, layers=3,
                         q_columns=q_columns, row_width=row_width, padding_rows=2,
                         device=device)
    in_place = out_columns == "in place"
    report = run_and_check(inputs, in_place=in_place, interleaved=interleaved,
                           out_columns=None if in_place else out_columns, validate=False)
    assert report.ok, report.summary()


def _kernel_call(device):
    """A kernel built for 16-byte alignment (``build``'s default), and its arguments."""
    kernel = build(Form(num_q_heads=4, page_size=16), device_target(device))[OP_NAME]
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, device=device)
    out = torch.empty_like(inputs.q_rope)
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    return kernel, [inputs.q_rope, out, *inputs.args()[1:], errors, 1e-6], inputs


@pytest.mark.parametrize("device", DEVICES)
def test_build_refuses_tensors_it_was_not_built_for(device):
    """``build()``'s kernel asserts, at its entry, the alignment it was built for: a
    misaligned pointer or a stride that breaks it raises ValueError naming the tensor, and
    nothing is written."""
    kernel, args, inputs = _kernel_call(device)
    q = args[0]
    odd_pointer = torch.empty(q.numel() + 1, dtype=q.dtype, device=device)[1:].view(q.shape)
    odd_stride = torch.empty(*q.shape[:2], 65, dtype=q.dtype, device=device)[..., :64]
    cache = inputs.k_cache
    odd_rows = torch.empty(*cache.shape[:2], 577, dtype=cache.dtype, device=device)[..., :576]
    for index, bad, message in ((0, odd_pointer, "q_rope's data pointer must be a multiple"),
                                (1, odd_stride, "q_rope_output's strides must be multiples"),
                                (5, odd_rows, "k_cache's strides must be multiples"),
                                (9, -1.0, "epsilon must be finite")):
        before = inputs.clone()
        call = list(args)
        call[index] = bad
        with pytest.raises(ValueError, match=message):
            kernel(*call)
        assert torch.equal(inputs.cache_storage, before.cache_storage)
    kernel(*args)  # the tensors it was built for
