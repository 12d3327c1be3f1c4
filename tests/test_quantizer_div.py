"""``quantizer_div``, the division of every fp8 quantization, against torch's IEEE division:
plainly on the CPU (``llvm``), and on the GPU, where it is a branch-free sequence of fused
multiply-adds, over random float32 bit patterns and every edge (subnormal, tiny and huge
operands, zeros of both signs, inf, NaN): bit for bit wherever the quotient is at least
FLT_MIN in magnitude, else below it with the dividend's sign, and the same fp8 values."""

import subprocess

import pytest
import torch
import tvm
from tvm.script import tirx as T

from tests.test_cuda_codegen import _nvcc
from tvm_fused.compiler import cuda
from tvm_fused.compiler.build import build, cuda_target, device_target, kernel_source
from tvm_fused.compiler.exact_math import quantizer_div

N = 1 << 22
THREADS = 256
FLT_MIN = 2.0**-126


def _divider(n: int, gpu: bool) -> tvm.IRModule:
    """``r[i] = quantizer_div(a[i], b[i])`` over ``n`` float32s, a thread each on the GPU."""
    if gpu:
        @T.prim_func
        def divide(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32"),
                   r: T.Buffer((n,), "float32")):
            T.func_attr({"global_symbol": "divide", "tirx.noalias": True})
            for bx in T.thread_binding(n // THREADS, "blockIdx.x"):
                for tx in T.thread_binding(THREADS, "threadIdx.x"):
                    r[bx * THREADS + tx] = quantizer_div(a[bx * THREADS + tx],
                                                         b[bx * THREADS + tx])
    else:
        @T.prim_func
        def divide(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32"),
                   r: T.Buffer((n,), "float32")):
            T.func_attr({"global_symbol": "divide", "tirx.noalias": True})
            for i in range(n):
                r[i] = quantizer_div(a[i], b[i])
    return tvm.IRModule({"divide": divide})


def _operands(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dividends: random bit patterns (every sign, exponent, subnormal, inf and NaN), then
    edges; divisors: random positive finite bit patterns (subnormals and the largest
    included), then edges, each edge dividend against each edge divisor."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randint(-2**31, 2**31, (n,), generator=gen, dtype=torch.int64, device=device)
    b = torch.randint(1, 0x7F800000, (n,), generator=gen, dtype=torch.int64, device=device)
    a, b = a.to(torch.int32).view(torch.float32), b.to(torch.int32).view(torch.float32)
    powers = [2.0**e for e in (-149, -140, -127, -126, -125, -101, -100, -99, -65, -64, -63,
                               -20, -9, 0, 1, 8, 63, 64, 100, 126, 127)]
    edge_b = torch.tensor([*powers, 448.0, 57344.0, 1.75, 3.4028235e38, 1.1754942e-38, 0.1,
                           1 / 3], dtype=torch.float32)
    edge_b = torch.cat((edge_b, (edge_b.view(torch.int32) + 1).view(torch.float32)))
    edge_a = torch.cat((edge_b, -edge_b, torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 448.0 * 1.75, 1e-45])))
    pairs_a = edge_a.repeat_interleave(edge_b.numel())
    pairs_b = edge_b.repeat(edge_a.numel())
    count = pairs_a.numel()
    a[:count], b[:count] = pairs_a.to(device), pairs_b.to(device)
    return a, b


def _assert_quotients(result: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    expected = a / b  # IEEE division, correctly rounded (no fast math in torch)
    nan = expected.isnan()
    assert torch.equal(result.isnan(), nan)
    normal = ~nan & (expected.abs() >= FLT_MIN)
    assert torch.equal(result[normal].view(torch.int32), expected[normal].view(torch.int32))
    small = ~nan & ~normal
    assert bool((result[small].abs() < FLT_MIN).all())
    assert torch.equal(result[small].signbit(), expected[small].signbit())
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        limit = torch.finfo(dtype).max
        fp8 = [x[~nan].clamp(-limit, limit).to(dtype).view(torch.uint8)
               for x in (result, expected)]
        assert torch.equal(*fp8)


def test_quantizer_div_is_division_on_the_cpu():
    n = 1 << 16
    a, b = _operands(n, "cpu")
    result = tvm.runtime.empty((n,), "float32")
    build(_divider(n, gpu=False), device_target("cpu"))["divide"](
        tvm.runtime.tensor(a.numpy()), tvm.runtime.tensor(b.numpy()), result)
    _assert_quotients(torch.from_numpy(result.numpy()), a, b)


def test_cuda_quantizer_div_has_no_division_and_compiles(tmp_path):
    """No ``__fdiv_rn`` (a branch per value to its slow path): one correctly rounded
    reciprocal of the divisor's significand and fused multiply-adds; nvcc builds it."""
    src = kernel_source(_divider(1 << 10, gpu=True), cuda_target())
    assert "__fdiv_rn(" not in src and " / " not in src
    assert src.count("__frcp_rn(") == 1 and src.count("__fmaf_rn(") == 4
    (tmp_path / "k.cu").write_text(src)
    command = cuda.nvcc_command("sm_90a", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu"),
                                kind="cubin")
    result = subprocess.run([_nvcc(), *command[1:]], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_quantizer_div_on_the_gpu_matches_ieee_division():
    a, b = _operands(N, "cuda")
    result = torch.empty_like(a)
    build(_divider(N, gpu=True), device_target("cuda"))["divide"](a, b, result)
    _assert_quotients(result, a, b)
    assert int(result.isfinite().sum()) > N // 2  # the test divides mostly finites
