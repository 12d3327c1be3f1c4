"""The engines' three steps in plain torch (benchmarks/peers/engine_steps.py) do what vLLM's
and SGLang's definitions say (CPU)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.peers import engine_steps as es

BF16 = torch.bfloat16
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_drop_in.py"


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values apart ``a`` and ``b`` are (same signs, checked)."""
    assert torch.equal(a.signbit(), b.signbit())
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def pairs_layout(a, b, is_neox: bool):
    """``[..., R]`` from pair halves ``a``, ``b`` ``[..., R/2]``: NeoX or GPT-J order."""
    return torch.cat((a, b), -1) if is_neox else torch.stack((a, b), -1).flatten(-2)


@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2.0 ** -22), (BF16, 2.0 ** -8)])
def test_rotary_is_a_rotation_by_the_angle(is_neox, dtype, rel):
    torch.manual_seed(0)
    positions = torch.randint(0, 1000, (7,), dtype=torch.int32)
    angles = torch.arange(1000, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    table = torch.cat((angles.cos(), angles.sin()), -1).float()
    x = torch.randn(7, 3, 64, dtype=dtype)
    x64 = x.double()
    pairs = (x64[..., :32], x64[..., 32:]) if is_neox else (x64[..., 0::2], x64[..., 1::2])
    z = torch.complex(*pairs) * torch.polar(torch.ones(()).double(), angles[positions])[:, None]
    want, size = pairs_layout(z.real, z.imag, is_neox), pairs_layout(z.abs(), z.abs(), is_neox)
    got = es.rotary_gptj_split_cache(positions, x, table, is_neox=is_neox)
    assert got.dtype == dtype
    assert ((got.double() - want).abs() <= rel * want.abs() + 2.0 ** -21 * size).all()
    assert torch.equal(es.rotary_gptj_split_cache(positions, x[:, 1], table, is_neox=is_neox),
                       got[:, 1])  # any leading dims


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_concat_and_cache_slots(slot_dtype):
    torch.manual_seed(1)
    kv_c, k_pe = torch.randn(6, 512, dtype=BF16), torch.randn(6, 1, 64, dtype=BF16)
    cache = torch.randn(4, 16, 576, dtype=BF16)
    before = cache.clone()
    slots = torch.tensor([17, -1, 0, 63], dtype=slot_dtype)  # rows 4, 5: padding
    es.concat_and_cache_mla(kv_c, k_pe, cache, slots)
    written = {17: 0, 0: 2, 63: 3}
    for slot, t in written.items():
        assert torch.equal(cache[slot // 16, slot % 16], torch.cat((kv_c[t], k_pe[t, 0])))
    flat_new, flat_old = cache.view(64, 576), before.view(64, 576)
    others = [s for s in range(64) if s not in written]
    assert torch.equal(flat_new[others].view(torch.int16), flat_old[others].view(torch.int16))
    before = cache.clone()  # no valid slot at all: nothing changes
    es.concat_and_cache_mla(kv_c, k_pe, cache, torch.full((3,), -1, dtype=slot_dtype))
    assert torch.equal(cache.view(torch.int16), before.view(torch.int16))


def test_fp8_saturates_scales_and_keeps_nan():
    kv_c = torch.zeros(1, 512, dtype=BF16)
    kv_c[0, :5] = torch.tensor([1000.0, -1000.0, 100.0, 3.0, float("nan")])
    cache = torch.zeros(2, 4, 576, dtype=torch.uint8)  # vLLM keeps fp8 bytes
    for scale, want in ((1.0, [448, -448, 96, 3]), (0.5, [448, -448, 192, 6])):  # even ties
        es.concat_and_cache_mla(kv_c, torch.zeros(1, 64, dtype=BF16), cache, torch.tensor([5]),
                                "fp8", torch.tensor([scale]))
        row = cache.view(torch.float8_e4m3fn)[1, 1, :5].float()
        assert row[:4].tolist() == want and row[4].isnan()
    assert not cache[0].any() and not cache[1, [0, 2, 3]].any()


def test_sglang_rounds_once_vllm_twice():
    torch.manual_seed(2)
    x, weight = torch.randn(64, 512, dtype=BF16), torch.randn(512, dtype=BF16)
    vllm, sglang = es.vllm_rms_norm(x, weight), es.sglang_rms_norm(x, weight)
    steps = bf16_steps(vllm, sglang)
    assert steps.max() <= 2 and (steps > 0).any()
    x64 = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert bf16_steps(sglang, (x64 * weight.double()).to(BF16)).max() <= 1


def engine_inputs(tokens=5, heads=2):
    torch.manual_seed(3)
    q = torch.randn(tokens, heads, 192, dtype=BF16)
    fused_qkv = torch.randn(tokens, 1536 + 576, dtype=BF16)
    positions = torch.randint(0, 128, (tokens,))
    return q, fused_qkv[:, 1536:], es.cos_sin_cache(128), torch.randn(512, dtype=BF16), positions


@pytest.mark.parametrize("compile_", [False, True])
def test_vllm_sequence(compile_):
    q, kv_lora, table, weight, positions = engine_inputs()
    q0, kv0 = q.clone(), kv_lora.clone()
    cache = torch.zeros(2, 8, 576, dtype=torch.uint8)
    slots = torch.tensor([9, 2, -1, 15])  # token 4: CUDA-graph padding
    fn = (torch.compile(es.vllm_mla_prologue, backend="aot_eager", fullgraph=True)
          if compile_ else es.vllm_mla_prologue)
    _, normed, k_pe = fn(q, kv_lora, table, weight, cache, slots, positions, "fp8",
                         torch.tensor([0.5]))
    assert torch.equal(q[..., :128], q0[..., :128]) and torch.equal(kv_lora[:, :512], kv0[:, :512])
    assert torch.equal(q[..., 128:], es.rotary_gptj_split_cache(positions, q0[..., 128:], table))
    assert torch.equal(k_pe, es.rotary_gptj_split_cache(positions, kv0[:, 512:], table))
    assert torch.equal(normed, es.vllm_rms_norm(kv0[:, :512], weight))
    rows = (torch.cat((normed, k_pe), -1).float() / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn)
    flat = cache.view(16, 576)
    assert torch.equal(flat[[9, 2, 15]], rows[[0, 1, 3]].view(torch.uint8))
    assert flat.sum(-1).nonzero().flatten().tolist() == [2, 9, 15]


def test_sglang_sequence():
    q, latent, table, weight, positions = engine_inputs()
    q0, latent0 = q.clone(), latent.clone()
    buffer = torch.zeros(9, 1, 576, dtype=torch.uint8)  # slot 0: padding's
    loc = torch.tensor([3, 8, 1, 0, 0])
    _, k_nope, k_pe = es.sglang_mla_prologue(q, latent, table.float(), weight, buffer, loc,
                                             positions)
    assert torch.equal(k_nope, es.sglang_rms_norm(latent0[:, :512], weight))
    assert torch.equal(q[..., 128:], es.rotary_gptj_split_cache(positions, q0[..., 128:],
                                                                table.float()))
    rows = torch.cat((k_nope, k_pe), -1).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(buffer[[3, 8, 1], 0], rows[:3])
    assert not buffer[[2, 4, 5, 6, 7]].any() and buffer[0].any()


def test_drop_in_script_imports_and_parses():
    spec = importlib.util.spec_from_file_location("bench_drop_in", SCRIPT)
    script = sys.modules["bench_drop_in"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    quick = script.configs(script.parse_args(["--quick", "--check"]))
    assert len(quick) == 12 and {c.phase for c in quick} == {"decode", "prefill"}
    assert len(script.configs(script.parse_args([]))) == 44
    with pytest.raises(SystemExit):
        script.parse_args(["--cache", "fp16"])
