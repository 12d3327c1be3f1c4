"""Drop-in replacements for the MLA prologue of vLLM's and SGLang's DeepSeek-V2/V3 layers.

At this point of vLLM's ``DeepseekV2MLAAttention`` (``MultiHeadLatentAttentionWrapper``) the
layer holds ``q`` (``q_b_proj``'s output viewed ``[T, H, 192]``) and ``kv_lora`` (the
``kv_a`` columns of the fused ``q_a | kv_a`` projection output, ``[T, 576]``) and runs three
kernels::

    kv_c, k_pe = kv_lora.split([512, 64], dim=-1)
    kv_c_normed = self.kv_a_layernorm(kv_c)                                      # RMSNorm
    q[..., 128:], k_pe = self.rotary_emb(positions, q[..., 128:], k_pe)          # GPT-J rope
    ops.concat_and_cache_mla(kv_c_normed, k_pe, kv_cache, slot_mapping,          # (in the
                             kv_cache_dtype, layer._k_scale)                     #  attention)

``vllm_mla_prologue`` does the same in one launch, with the same tensors: vLLM's
``cos_sin_cache`` (cosines, then sines), its paged ``kv_cache [num_blocks, block_size, 576]``
(uint8 bytes for ``"fp8"``), ``slot_mapping`` (``-1``: CUDA-graph padding, no row; shorter
than ``positions`` when vLLM pads q). SGLang's layer differs in its RMSNorm, which rounds
once, and its cache, ``kv_buffer [size + 1, 1, 576]`` indexed by ``out_cache_loc`` (a cache
of page size 1, unscaled fp8): ``sglang_mla_prologue``.

Run from a checkout, ``python -m examples.engine_drop_in`` checks both against the engines'
own three steps (``benchmarks/peers/engine_steps.py``, plain torch) on a small DeepSeek-shaped
layer, on the GPU if there is one, else on the CPU, and prints one line per engine and cache.
"""

from __future__ import annotations

import torch

from tvm_fused import fused_rope_rmsnorm_slots

KV_LORA_RANK, QK_NOPE_HEAD_DIM = 512, 128
# vLLM's kv_cache_dtype names of an fp8 cache (stored as uint8 bytes)
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
       "fp8_e5m2": torch.float8_e5m2}


def vllm_mla_prologue(q: torch.Tensor, kv_lora: torch.Tensor, cos_sin_cache: torch.Tensor,
                      kv_a_layernorm_weight: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, positions: torch.Tensor,
                      kv_cache_dtype: str = "auto", k_scale: torch.Tensor | None = None,
                      eps: float = 1e-6, need_latent: bool = True):
    """vLLM's ``kv_a_layernorm``, ``rotary_emb`` and ``concat_and_cache_mla`` in one launch.

    ``q [T, H, 192]`` has its rope columns ``[128, 192)`` roped in place; ``kv_lora [T,
    576]`` is read only; each token of ``slot_mapping [<= T]`` (int64) gets its cache row,
    ``fp8(saturate(value / k_scale))`` for an fp8 ``kv_cache_dtype``. Returns ``(q,
    kv_c_normed [T, 512], k_pe [T, 64])`` as vLLM's steps leave them (the prefill path
    up-projects the latent), two views of one new ``[T, 576]`` tensor, or ``(q, None,
    None)`` with ``need_latent=False`` (decode reads the cache).
    """
    fp8 = FP8.get(kv_cache_dtype)
    latent = torch.empty(kv_lora.shape, dtype=q.dtype, device=q.device) if need_latent \
        else None
    q_pe = q[..., QK_NOPE_HEAD_DIM:]
    fused_rope_rmsnorm_slots(
        q_pe, positions, slot_mapping, cos_sin_cache, kv_a_layernorm_weight,
        kv_cache.view(fp8) if fp8 else kv_cache, kv_input=kv_lora, kv_output=latent,
        k_scale=k_scale if fp8 else None, epsilon=eps, out=q_pe)
    if latent is None:
        return q, None, None
    return q, latent[:, :KV_LORA_RANK], latent[:, KV_LORA_RANK:]


def sglang_mla_prologue(q: torch.Tensor, latent_cache: torch.Tensor,
                        cos_sin_cache: torch.Tensor, kv_a_layernorm_weight: torch.Tensor,
                        kv_buffer: torch.Tensor, out_cache_loc: torch.Tensor,
                        positions: torch.Tensor, eps: float = 1e-6):
    """SGLang's ``kv_a_layernorm`` (rounded once), ``rotary_emb`` and ``set_mla_kv_buffer``
    in one launch: ``kv_buffer [size + 1, 1, 576]`` (uint8 bytes of an e4m3 cache, unscaled,
    or the model dtype) gets row ``out_cache_loc[t]`` of each token. Returns ``(q, k_nope
    [T, 512], k_pe [T, 64])``, the latter two views of one new ``[T, 576]`` tensor."""
    cache = kv_buffer.view(torch.float8_e4m3fn) if kv_buffer.dtype == torch.uint8 else kv_buffer
    latent = torch.empty(latent_cache.shape, dtype=q.dtype, device=q.device)
    q_pe = q[..., QK_NOPE_HEAD_DIM:]
    fused_rope_rmsnorm_slots(
        q_pe, positions, out_cache_loc, cos_sin_cache, kv_a_layernorm_weight, cache,
        kv_input=latent_cache, kv_output=latent, epsilon=eps, out=q_pe, norm_rounding="once")
    return q, latent[:, :KV_LORA_RANK], latent[:, KV_LORA_RANK:]


def main() -> int:
    """Each drop-in against its engine's three steps, on copies of the same small layer (16
    heads, 40 tokens, the last 3 of them CUDA-graph padding, one ``-1`` slot): prints the
    share of bit-identical values of q, the written cache rows and the latent, then one
    verdict. The drop-ins match where at least 99.9% are identical and the rest one rounding
    step apart (float32 evaluation order, as ``tests/test_drop_in.py`` requires)."""
    from benchmarks.peers import engine_steps
    from tvm_fused.testing.compare import agreement

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    tokens, heads, blocks, block_size = 40, 16, 12, 16
    q = torch.randn(tokens, heads, 192, generator=gen).to(torch.bfloat16).to(device)
    kv_lora = torch.randn(tokens, 576, generator=gen).to(torch.bfloat16).to(device)
    weight = (1 + 0.25 * torch.randn(512, generator=gen)).to(torch.bfloat16).to(device)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens - 3].to(device)
    slots[7] = -1  # vLLM's PAD_SLOT_ID
    table = engine_steps.cos_sin_cache(4096, device=device)  # bf16, as vLLM keeps it

    matched = []

    def report(engine, cache_name, ours, theirs):
        parts = []
        for name, a, b in zip(("q", "cache rows", "latent"), ours, theirs):
            same, apart = agreement(a.cpu(), b.cpu())
            matched.append(same >= 0.999 and apart <= 1)
            parts.append(f"{name} {100 * same:.3f}% identical (max {apart} ulp)")
        print(f"{engine} drop-in, {cache_name} cache, {device}: " + ", ".join(parts))

    for cache_name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        cache = torch.zeros(blocks, block_size, 576, dtype=dtype, device=device)
        kv_cache_dtype, k_scale = "auto", None
        if dtype != torch.bfloat16:  # vLLM's fp8 cache: uint8 bytes, a per-tensor scale
            cache, kv_cache_dtype = cache.view(torch.uint8), "fp8"
            k_scale = torch.tensor([0.3], device=device)
        runs = []
        for prologue in (vllm_mla_prologue, engine_steps.vllm_mla_prologue):
            q_run, cache_run = q.clone(), cache.clone()
            _, kv_c_normed, k_pe = prologue(q_run, kv_lora.clone(), table, weight, cache_run,
                                            slots, positions, kv_cache_dtype, k_scale)
            rows = cache_run.view(dtype).flatten(0, 1)[slots[slots >= 0]]
            runs.append((q_run, rows, torch.cat((kv_c_normed, k_pe.reshape(tokens, -1)), -1)))
        report("vLLM", cache_name, *runs)

    buffer = torch.zeros(blocks * block_size + 1, 1, 576, dtype=torch.bfloat16, device=device)
    loc = torch.randperm(blocks * block_size, generator=gen)[:tokens].to(device) + 1
    table = engine_steps.cos_sin_cache(4096, dtype=torch.float32, device=device)  # SGLang's
    runs = []
    for prologue in (sglang_mla_prologue, engine_steps.sglang_mla_prologue):
        q_run, buffer_run = q.clone(), buffer.clone()
        _, k_nope, k_pe = prologue(q_run, kv_lora.clone(), table, weight, buffer_run, loc,
                                   positions)
        runs.append((q_run, buffer_run[loc], torch.cat((k_nope, k_pe), -1)))
    report("SGLang", "bf16", *runs)
    print("OK: one launch matches the engines' three steps" if all(matched) else
          "MISMATCH: a drop-in differs from its engine's steps")
    return 0 if all(matched) else 1


if __name__ == "__main__":
    raise SystemExit(main())
