"""vLLM's three MLA-prologue kernels in Triton (``benchmarks/peers/engine_triton.py``) against
the torch steps of ``engine_steps``, in Triton's CPU interpreter, and compiled for sm_90.

The interpreter runs in a subprocess (``TRITON_INTERPRET=1``, as ``tests/test_peers.py``
does), with three shims for its limits, none touching the kernels' code:

- its fp32 -> bf16 cast truncates (``cast_impl`` passes no rounding mode) and its fp32 ->
  fp8 cast rounds ties up and drops the carry into the exponent (triton-lang/triton#8322),
  where the GPU's ``cvt.rn`` rounds to nearest even: those casts are torch's here;
- it passes a Python float argument as a Python float, where compiled Triton makes it an
  fp32 scalar: Liger's kernel calls ``eps.to(tl.float32)``, so floats become fp32 scalars;
- it patches ``tl.math`` but not ``libdevice``, whose ``rsqrt`` Liger binds by name: Liger's
  module gets ``tl.math.rsqrt`` (the interpreter computes both as numpy would).

So Liger's RMSNorm itself runs, and the whole ``vllm_mla_prologue_triton`` is compared with
``engine_steps.vllm_mla_prologue``; the normed latent is also compared on its own (Liger's
``"llama"`` casting is vLLM's rounding order).
"""

import os
import subprocess
import sys
import textwrap

import pytest

SHIMS = textwrap.dedent("""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    import liger_kernel.ops.rms_norm as liger_rms_norm

    NEAREST = {tl.bfloat16: (torch.bfloat16, torch.uint16),
               tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8),
               tl.float8e5: (torch.float8_e5m2, torch.uint8)}
    convert_float = interpreter._convert_float
    implicit_cvt = interpreter._implicit_cvt

    def convert_float_rn(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in NEAREST:
            dtype, bits = NEAREST[output_dtype]
            exact = torch.from_numpy(np.ascontiguousarray(values).view(np.float32))
            return exact.to(dtype).view(bits).numpy()
        return convert_float(values, input_dtype, output_dtype, rounding_mode)

    def implicit_cvt_fp32(arg):
        if isinstance(arg, float):
            handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
            return tl.tensor(handle, tl.float32)
        return implicit_cvt(arg)

    interpreter._convert_float = convert_float_rn
    interpreter._implicit_cvt = implicit_cvt_fp32
    liger_rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)  # looked up when the kernel runs
""")

COMPOSITION = SHIMS + textwrap.dedent("""
    from benchmarks.peers import engine_steps as es
    from benchmarks.peers.engine_triton import vllm_mla_prologue_triton
    from tvm_fused.testing.compare import agreement

    T, BLOCKS, BLOCK_SIZE, Q_A_RANK = 9, 3, 16, 1536
    # (kv_cache_dtype, k_scale, cache storage, heads, table dtype, index dtype)
    CASES = [("auto", None, torch.bfloat16, 4, torch.bfloat16, torch.int64),
             ("fp8", 0.3, torch.uint8, 4, torch.float32, torch.int32),
             ("fp8", None, torch.float8_e4m3fn, 3, torch.bfloat16, torch.int64)]

    def check(name, got, want, exact=False):
        share, ulps = agreement(got, want)
        print(f"{name}: {share:.6f} identical, {ulps} ulp apart at most")
        assert share == 1.0 if exact else (share >= 0.999 and ulps <= 1), name

    for case, (cache_dtype, k_scale, storage, heads, table_dtype, index) in enumerate(CASES):
        g = torch.Generator().manual_seed(case)
        bf16 = torch.bfloat16
        q = torch.randn(T, heads, 192, generator=g).to(bf16)
        fused_qkv = torch.randn(T, Q_A_RANK + 576, generator=g).to(bf16)
        fused_qkv[0, -64:] *= 300  # past 448 * k_scale: saturates in an fp8 cache
        table = es.cos_sin_cache(4096, dtype=table_dtype)
        gamma = (1 + 0.25 * torch.randn(512, generator=g)).to(bf16)
        if storage == bf16:
            kv_cache = torch.randn(BLOCKS, BLOCK_SIZE, 576, generator=g).to(bf16)
        else:
            kv_cache = torch.randint(0, 256, (BLOCKS, BLOCK_SIZE, 576), generator=g,
                                     dtype=torch.uint8).view(storage)
        slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=g)[:T - 2]  # 7 of 9 tokens
        slots[2] = -1  # PAD_SLOT_ID: writes nothing
        positions = torch.randint(0, 4096, (T,), generator=g)
        scale = None if k_scale is None else torch.tensor([k_scale])
        runs = {}
        for which, fn in (("torch", es.vllm_mla_prologue),
                          ("triton", vllm_mla_prologue_triton)):
            x = {"q": q.clone(), "fused_qkv": fused_qkv.clone(), "kv_cache": kv_cache.clone()}
            kv_lora = x["fused_qkv"][:, Q_A_RANK:]  # row stride 2112
            out = fn(x["q"], kv_lora, table, gamma, x["kv_cache"], slots.to(index),
                     positions.to(index), cache_dtype, scale, 1e-6)
            assert out[0] is x["q"] and out[2].data_ptr() == kv_lora[:, 512:].data_ptr()
            runs[which] = x | {"normed": out[1]}
        got, want = runs["triton"], runs["torch"]
        print(f"case {case}: {cache_dtype}, k_scale {k_scale}, {storage}, {heads} heads")
        check("kv_c_normed (Liger)", got["normed"], want["normed"])
        check("q", got["q"], want["q"])
        check("q's nope columns", got["q"][..., :128], q[..., :128], exact=True)
        check("fused_qkv", got["fused_qkv"], want["fused_qkv"])
        check("fused_qkv's other columns", got["fused_qkv"][:, :-64], fused_qkv[:, :-64],
              exact=True)
        valid = slots[slots >= 0]
        view = (lambda c: c) if cache_dtype == "auto" else (
            lambda c: c.view(torch.float8_e4m3fn))
        rows = (valid // BLOCK_SIZE, valid % BLOCK_SIZE)
        check("written cache rows", view(got["kv_cache"])[rows], view(want["kv_cache"])[rows])
        if cache_dtype != "auto":
            written = view(got["kv_cache"])[rows].float()
            assert written.abs().max() == 448, "saturated to the e4m3 maximum"
        untouched = torch.ones(BLOCKS * BLOCK_SIZE, dtype=torch.bool)
        untouched[valid] = False
        untouched = untouched.view(BLOCKS, BLOCK_SIZE)
        for run in (got, want):
            assert torch.equal(run["kv_cache"].view(torch.uint8)[untouched],
                               kv_cache.view(torch.uint8)[untouched]), "untouched rows"
""")


def _interpret(script: str) -> str:
    """Run ``script`` in a Python process with Triton's CPU interpreter; it must succeed.
    Returns its stdout."""
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_vllm_steps_in_triton_match_the_torch_steps_in_the_interpreter():
    """9 tokens, 7 of them in ``slot_mapping`` (one at ``PAD_SLOT_ID``), q a ``[9, H, 192]``
    tensor (H = 4, and 3 for the masked head block), ``kv_lora`` a column slice of the
    projection output; a bf16 cache (bf16 table, int64 indices), a uint8 fp8 cache with
    ``k_scale`` 0.3 (float32 table, int32 indices), an fp8 cache with no scale; a k_pe value
    past the fp8 range. q, the roped k_pe, the normed latent and the written cache rows are
    identical to the torch steps' (or one ulp apart on under 0.1%, where float32 evaluation
    order decides a rounding); every other cache row keeps its bytes."""
    _interpret(COMPOSITION)


def compile_sm90_ptx(kernel, constants: dict, types: dict) -> str:
    """The PTX of a Triton ``kernel`` for sm_90 (no GPU needed): ``constants`` its constexpr
    values, ``types`` its pointers' types (other arguments i32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else types.get(name, "i32")
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={
        (kernel.arg_names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.parametrize("cache", ["bf16", "fp8e4nv"])
def test_engine_kernels_compile_for_sm90(cache):
    """The rotary and cache kernels through Triton's compiler for sm_90 (no GPU needed),
    which the interpreter skips; the fp8 cast is the GPU's nearest-even saturating one."""
    pytest.importorskip("triton")
    from benchmarks.peers.engine_triton import _concat_and_cache_kernel, _rotary_kernel

    rotary = compile_sm90_ptx(_rotary_kernel, {
        "NUM_Q_HEADS": 128, "BLOCK_Q": 128, "NUM_K_HEADS": 1, "BLOCK_K": 1, "ROT_DIM": 64,
        "HALF": 32, "HAS_KEY": True, "IS_NEOX": False}, {"positions_ptr": "*i64", "q_ptr": "*bf16",
                                       "k_ptr": "*bf16", "cos_sin_ptr": "*bf16"})
    assert "cvt.rn.bf16" in rotary
    quantize = cache != "bf16"
    cached = compile_sm90_ptx(_concat_and_cache_kernel, {
        "KV_DIM": 512, "BLOCK_KV": 512, "PE_DIM": 64, "BLOCK_PE": 64, "QUANTIZE": quantize,
        "HAS_SCALE": quantize, "CACHE_MAX": 448.0 if quantize else 0.0}, {
        "kv_c_ptr": "*bf16", "k_pe_ptr": "*bf16", "cache_ptr": f"*{cache}",
        "slots_ptr": "*i64", "scale_ptr": "*fp32"})
    if quantize:
        assert "cvt.rn.satfinite.e4m3x2.f32" in cached
        assert "div.rn.f32" in cached
