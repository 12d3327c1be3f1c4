"""The engine drop-ins (``examples/engine_drop_in.py``) against the engines' own three steps
(``benchmarks/peers/engine_steps.py``, composed in plain torch from vLLM's and SGLang's
definitions), on the tensors a DeepSeek layer has at that point: the same q, cache bytes and
latent, but where float32 evaluation order (a sum's order, an FMA) decides a rounding.

Such values are rare (~1e-4 of them: float32 carries 16 more bits than bf16) and one ulp
apart; a wrong rounding order (SGLang's single rounding for vLLM's double one) differs on
about a quarter of the normed values, a wrong table or pairing on nearly all."""

import pytest
import torch

from benchmarks.peers import engine_steps
from examples import engine_drop_in
from tvm_fused.testing.compare import agreement

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
HEADS, TOKENS, PADDING = 16, 40, 3  # PADDING: CUDA-graph rows with no slot_mapping entry
BLOCKS, BLOCK_SIZE, MAX_POSITION = 12, 16, 4096


def _layer(device, cache_dtype, seed=0):
    """The tensors a vLLM/SGLang DeepSeek layer holds before its MLA prologue."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    q = randn(TOKENS, HEADS, 192)
    fused_qkv = randn(TOKENS, 1536 + 576)
    weight = (1 + 0.25 * torch.randn(512, generator=gen)).to(torch.bfloat16)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=gen)[:TOKENS - PADDING]
    slots[7] = -1  # vLLM's PAD_SLOT_ID
    positions = torch.randint(0, MAX_POSITION, (TOKENS,), generator=gen)
    cache = torch.randn(BLOCKS, BLOCK_SIZE, 576, generator=gen).to(cache_dtype)
    if cache_dtype.itemsize == 1:
        cache = cache.view(torch.uint8)  # vLLM's and SGLang's fp8 storage
    tensors = dict(q=q, fused_qkv=fused_qkv, weight=weight, slots=slots, positions=positions,
                   cache=cache)
    return {name: t.to(device) for name, t in tensors.items()}


def _assert_agree(ours, theirs, ulps=1, least=0.999):
    same, apart = agreement(ours.cpu(), theirs.cpu())
    assert same >= least and apart <= ulps, (same, apart)


def _assert_same_cache(ours, theirs, cache_dtype):
    """Bit-identical but where rounding is decided by float32 order (one step apart)."""
    _assert_agree(ours.view(cache_dtype), theirs.view(cache_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache", ["auto", "fp8"])
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
def test_vllm_drop_in(device, cache, table_dtype):
    """One call for vLLM's RMSNorm, rotary and concat_and_cache_mla."""
    cache_dtype = torch.bfloat16 if cache == "auto" else torch.float8_e4m3fn
    x = _layer(device, cache_dtype)
    table = engine_steps.cos_sin_cache(MAX_POSITION, dtype=table_dtype, device=device)
    k_scale = torch.tensor([0.3], device=device) if cache == "fp8" else None
    runs = {}
    for name, prologue in (("vllm", engine_steps.vllm_mla_prologue),
                           ("ours", engine_drop_in.vllm_mla_prologue)):
        q, fused_qkv, kv_cache = x["q"].clone(), x["fused_qkv"].clone(), x["cache"].clone()
        _, kv_c_normed, k_pe = prologue(q, fused_qkv[:, 1536:], table, x["weight"], kv_cache,
                                        x["slots"], x["positions"], cache, k_scale)
        runs[name] = q, kv_cache, torch.cat((kv_c_normed, k_pe.reshape(TOKENS, -1)), -1)
    (q, kv_cache, latent), (q_ref, kv_cache_ref, latent_ref) = runs["ours"], runs["vllm"]
    assert torch.equal(q[..., :128], q_ref[..., :128])  # q_nope untouched
    _assert_agree(q, q_ref)
    _assert_agree(latent, latent_ref)
    _assert_same_cache(kv_cache, kv_cache_ref, cache_dtype)
    written = x["slots"][x["slots"] >= 0].cpu()
    untouched = torch.ones(BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(kv_cache.flatten(0, 1).cpu()[untouched], x["cache"].flatten(0, 1).cpu()[
        untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_sglang_drop_in(device, cache_dtype):
    """One call for SGLang's RMSNorm (rounded once), rotary and set_mla_kv_buffer, on its
    token-slot buffer ``[size + 1, 1, 576]`` (padding tokens write the reserved slot 0)."""
    x = _layer(device, cache_dtype)
    kv_buffer = x["cache"].flatten(0, 1)[:, None]  # [size, 1, 576]
    table = engine_steps.cos_sin_cache(MAX_POSITION, dtype=torch.float32, device=device)
    # token slots from 1; the last token is CUDA-graph padding, written to the dummy slot 0
    # (several such tokens would repeat it, which only validate=True refuses)
    gen = torch.Generator().manual_seed(1)
    loc = torch.cat((torch.randperm(kv_buffer.shape[0] - 1, generator=gen)[:TOKENS - 1] + 1,
                     torch.zeros(1, dtype=torch.int64))).to(device)
    runs = {}
    for name, prologue in (("sglang", engine_steps.sglang_mla_prologue),
                           ("ours", engine_drop_in.sglang_mla_prologue)):
        q, fused_qkv, buffer = x["q"].clone(), x["fused_qkv"].clone(), kv_buffer.clone()
        _, k_nope, k_pe = prologue(q, fused_qkv[:, 1536:], table, x["weight"], buffer, loc,
                                   x["positions"])
        runs[name] = q, buffer, torch.cat((k_nope, k_pe), -1)
    (q, buffer, latent), (q_ref, buffer_ref, latent_ref) = runs["ours"], runs["sglang"]
    _assert_agree(q, q_ref)
    _assert_agree(latent, latent_ref)
    _assert_same_cache(buffer, buffer_ref, cache_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_the_engines_roundings_differ(device):
    """Why SGLang needs ``norm_rounding="once"``: vLLM's drop-in (rounding twice) on
    SGLang's steps agrees on the rope values but not on about a quarter of the normed
    ones."""
    x = _layer(device, torch.bfloat16)
    table = engine_steps.cos_sin_cache(MAX_POSITION, dtype=torch.float32, device=device)
    slots = torch.arange(TOKENS, device=device)
    latents = []
    for prologue, cache in ((engine_steps.sglang_mla_prologue, x["cache"].flatten(0, 1)[:, None]),
                            (engine_drop_in.vllm_mla_prologue, x["cache"])):
        _, normed, _ = prologue(x["q"].clone(), x["fused_qkv"][:, 1536:].clone(), table,
                                x["weight"], cache.clone(), slots, x["positions"])
        latents.append(normed)
    same, apart = agreement(latents[0].cpu(), latents[1].cpu())
    assert 0.5 < same < 0.9 and apart <= 2, (same, apart)
