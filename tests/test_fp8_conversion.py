"""The saturating fp8 conversion intrinsic on the CPU (``llvm``), scalar and vectorized,
against torch's ``x.clamp(-max, max).to(dtype)`` over float32 values at every edge of both
formats, and random ones (NaN compared as NaN)."""

import numpy as np
import pytest
import torch
import tvm
from tvm.script import tirx as T

from tvm_fused.compiler.fp8 import saturating_fp8

N = 4096


def _values(dtype: torch.dtype) -> torch.Tensor:
    """float32 values: zeros, subnormal fp8 steps and their halves (ties), the saturation
    threshold and around it, inf, NaN, their float32 neighbours, and random magnitudes."""
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps
    edges = torch.tensor([0.0, tiny, tiny / 2, tiny * 1.5, tiny * 2.5, tiny / 4,
                          info.smallest_normal, 1 + info.eps / 2, 1 + 1.5 * info.eps,
                          info.max, info.max * (1 + info.eps / 2), info.max * 1.07, 1e30,
                          float("inf"), float("nan")], dtype=torch.float32)
    bits = edges.view(torch.int32)
    edges = torch.cat((edges, (bits + 1).view(torch.float32), (bits - 1).view(torch.float32)))
    gen = torch.Generator().manual_seed(0)
    random = torch.randn(N, generator=gen) * torch.exp2(torch.randint(-30, 30, (N,),
                                                                      generator=gen).float())
    values = torch.cat((edges, -edges, random))[:N]
    return torch.cat((values, torch.zeros(N - values.numel())))


def _converter(dtype: str, lanes: int):
    @T.prim_func
    def convert(x: T.Buffer((N,), "float32"), y: T.Buffer((N,), dtype)):
        for i in range(N // lanes):
            for v in T.vectorized(lanes):
                y[i * lanes + v] = saturating_fp8(dtype, x[i * lanes + v])

    return tvm.compile(convert, target="llvm")


@pytest.mark.parametrize("lanes", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["e4m3fn", "e5m2"])
def test_conversion_matches_torch_bit_for_bit(dtype, lanes):
    x = _values(dtype)
    name = str(dtype).removeprefix("torch.")
    out = tvm.runtime.empty((N,), name)
    _converter(name, lanes)(tvm.runtime.tensor(x.numpy()), out)
    y = torch.from_numpy(out.numpy().view(np.uint8))  # numpy holds ml_dtypes' fp8
    limit = torch.finfo(dtype).max
    expected = x.clamp(-limit, limit).to(dtype)
    nan = x.isnan()
    assert torch.equal(y.view(dtype).float().isnan(), nan)
    assert torch.equal(y[~nan], expected.view(torch.uint8)[~nan])
