"""tvm-fused as a drop-in for the three steps a vLLM DeepSeek layer runs today (GPU).

Per configuration (phase, tokens, q heads, cache dtype), on vLLM-shaped inputs, each provider
on its own copy of them:

- ``vllm eager``: ``kv_a_layernorm``, ``rotary_emb``, ``concat_and_cache_mla`` in plain torch
  (``benchmarks/peers/engine_steps.py: vllm_mla_prologue``); the ratios are against it;
- ``vllm torch.compile``: the same under ``torch.compile`` (inductor, casts kept exact:
  ``engine_steps.compiled``);
- ``triton norm + torch``: Liger's Triton RMSNorm (HF/Llama rounding), then the torch rotary
  and the torch ``concat_and_cache_mla``;
- ``vllm steps in triton``: vLLM's three kernels as three Triton launches, hand-written the
  way a user would (``benchmarks/peers/engine_triton.py: vllm_mla_prologue_triton``): Liger's
  RMSNorm (``"llama"`` casting: vLLM's rounding), a one-program-per-token rotary in place on
  q's rope view and ``k_pe`` (vLLM's ``rotary_embedding``), a one-program-per-token
  ``concat_and_cache_mla`` skipping negative slots in the kernel;
- ``tvm-fused``: one call of ``tvm_fused.fused_rope_rmsnorm_slots`` (write-through from
  ``kv_lora``, vLLM's split cos/sin table, vLLM's RMSNorm rounding, in place on q's rope
  columns); at prefill it also writes ``kv_output`` (vLLM's prefill reads ``kv_c_normed`` and
  ``k_pe``; ``--kv-output`` changes when).

Inputs: ``q = randn(T, H, 192)`` bf16 (its rope view ``q[..., 128:]``), ``fused_qkv =
randn(T, 1536 + 576)`` bf16 and ``kv_lora = fused_qkv[:, 1536:]``, ``cos_sin_cache
[163840, 64]`` bf16 (theta 10000; DeepSeek-V3's max_position_embeddings), the
``kv_a_layernorm`` weight ``[512]`` bf16, ``kv_cache [T / 64 + 16 blocks, 64, 576]`` (block
size 64, FlashMLA's) in bf16 (``auto``) or uint8 fp8 bytes (``fp8``, e4m3, ``k_scale``),
``slot_mapping`` and ``positions`` int64, as a serving step has them: at decode one token per
request, each at a random position and a random distinct slot; at prefill requests of up to
4096 new tokens, each at consecutive positions from a random start and in consecutive slots
of shuffled blocks (``serving_indices``).

Timing: decode sizes (one token per request): GPU time per call of ``--graph-calls`` calls
captured back to back in ONE CUDA graph, after warm-up, the graph replayed on a cold L2
(``tvm_fused.timing.time_cuda``, median over ``--reps``); prefill sizes: CUDA events around
each call on a cold L2 (``time_cuda``), median. Bytes moved are the op's (``timing.bytes_moved``
of tvm-fused's form, ``op_form``: q's rope part read and written, the latent row read, the
cache row written, the table row, ``kv_output`` if written; gamma once), the same for every
provider of a configuration.

``--check`` first runs each provider once on fresh copies of the same inputs and reports the
fraction of identical bytes of the written cache rows, of q's rope part and (tvm-fused at
prefill) of ``kv_output`` against ``vllm eager``'s ``[kv_c_normed | k_pe]``; it never fails.

Output: one JSON line per provider and configuration to ``--out`` (``us``, ``bytes``,
``tb_per_s``, ``x_vs_vllm_eager`` = vllm eager's time over the provider's, above 1: faster;
``check`` with ``--check``; ``error`` where a provider failed) and a table on stdout with the
GPU's name. Usage (the repository root on the path, or run from it):
    python scripts/bench_drop_in.py --out OUT/drop_in.jsonl [--quick] [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import engine_steps as es  # noqa: E402
from tvm_fused.form import Form  # noqa: E402
from tvm_fused.timing import bytes_moved, time_cuda, time_graph  # noqa: E402

DECODE_TOKENS = (1, 8, 32, 64, 128, 256)
PREFILL_TOKENS = (1024, 4096, 8192, 16384, 32768)
DECODE_MAX = 256  # token counts up to it are decode steps
HEADS = (16, 128)
CACHES = ("auto", "fp8")
QUICK = {"tokens": (1, 64, 4096), "heads": (16, 128), "caches": CACHES}
PROVIDERS = ("vllm eager", "vllm torch.compile", "triton norm + torch", "vllm steps in triton",
             "tvm-fused")
BASELINE = "vllm eager"
KV_OUTPUT = ("prefill", "always", "never")
Q_A_RANK, KV_LORA, ROPE, NOPE = 1536, 512, 64, 128
BLOCK_SIZE, SPARE_BLOCKS = 64, 16
MAX_POSITION = 163840
EPS = 1e-6


def _csv(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(part) for part in text.split(",") if part)

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON lines file (appended)")
    p.add_argument("--quick", action="store_true",
                   help=f"a small subset: tokens {QUICK['tokens']}, heads {QUICK['heads']}")
    p.add_argument("--check", action="store_true",
                   help="first compare each provider's bytes with vllm eager's")
    p.add_argument("--tokens", type=_csv(int), help="comma-separated token counts "
                   f"(default decode {DECODE_TOKENS} and prefill {PREFILL_TOKENS})")
    p.add_argument("--heads", type=_csv(int), help=f"comma-separated (default {HEADS})")
    p.add_argument("--cache", type=_csv(str), help=f"comma-separated of {CACHES} (default all)")
    p.add_argument("--providers", type=_csv(str), default=PROVIDERS,
                   help=f"comma-separated of {PROVIDERS}")
    p.add_argument("--graph-calls", type=int, default=20, help="calls in one decode graph")
    p.add_argument("--reps", type=int, default=50, help="timed runs (graph replays at decode)")
    p.add_argument("--k-scale", type=float, default=0.5, help="k_scale of the fp8 cache")
    p.add_argument("--kv-output", choices=KV_OUTPUT, default="prefill",
                   help="when tvm-fused also writes kv_output (vLLM's kv_c_normed | k_pe)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, with defaults filled in (``--quick``'s subset where not given) and
    checked."""
    p = parser()
    args = p.parse_args(argv)
    subset = QUICK if args.quick else {"tokens": DECODE_TOKENS + PREFILL_TOKENS,
                                       "heads": HEADS, "caches": CACHES}
    args.tokens = args.tokens or subset["tokens"]
    args.heads = args.heads or subset["heads"]
    args.cache = args.cache or subset["caches"]
    for name, given, allowed in (("--cache", args.cache, CACHES),
                                 ("--providers", args.providers, PROVIDERS)):
        if unknown := [x for x in given if x not in allowed]:
            p.error(f"{name}: unknown {unknown}, expected some of {allowed}")
    if min(args.tokens) < 1 or min(args.heads) < 1 or args.graph_calls < 1 or args.reps < 1:
        p.error("token counts, heads, --graph-calls and --reps must be positive")
    return args


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int
    heads: int
    cache: str  # "auto" (bf16) or "fp8" (e4m3 bytes)

    @property
    def phase(self) -> str:
        return "decode" if self.tokens <= DECODE_MAX else "prefill"


def configs(args) -> list[Config]:
    """Every configuration of ``args``, decode sizes first."""
    return [Config(t, h, c) for t in sorted(args.tokens) for h in args.heads for c in args.cache]


def writes_kv_output(args, config: Config) -> bool:
    return args.kv_output == "always" or (args.kv_output == "prefill"
                                          and config.phase == "prefill")


def op_form(config: Config, kv_output: bool) -> Form:
    """The form of tvm-fused's call in ``config``: write-through from ``kv_lora`` into a
    cache of bf16 or fp8 e4m3 bytes of block size 64, vLLM's addressing and split bf16
    table, and ``kv_output`` if written."""
    return Form(num_q_heads=config.heads, rope_dim=ROPE, kv_norm_dim=KV_LORA,
                page_size=BLOCK_SIZE, write_through=True, kv_output=kv_output,
                cache_dtype="float8_e4m3fn" if config.cache == "fp8" else None,
                addressing="slots", freqs_layout="split", freqs_dtype="bfloat16")


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor  # [T, H, 192] bf16
    fused_qkv: torch.Tensor  # [T, 1536 + 576] bf16
    cos_sin_cache: torch.Tensor  # [MAX_POSITION, 64] bf16
    gamma: torch.Tensor  # [512] bf16
    kv_cache: torch.Tensor  # [blocks, 64, 576] bf16 or uint8
    slot_mapping: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    kv_cache_dtype: str
    k_scale: torch.Tensor | None  # [1] float32 (fp8)

    @property
    def kv_lora(self) -> torch.Tensor:
        return self.fused_qkv[:, Q_A_RANK:]

    def clone(self) -> Inputs:
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)})


PREFILL_REQUEST = 4096  # new tokens per request at prefill


def serving_indices(config: Config, blocks: int, g: torch.Generator, device) -> dict:
    """``positions`` and ``slot_mapping`` ``[T]`` int64 of a serving step: decode, one token
    per request at a random position and a random distinct slot; prefill, requests of up to
    ``PREFILL_REQUEST`` tokens at consecutive positions from a random start, written to
    consecutive slots of blocks in a shuffled order."""
    t = config.tokens
    if config.phase == "decode":
        return {"slot_mapping": torch.randperm(blocks * BLOCK_SIZE, device=device,
                                               generator=g)[:t],
                "positions": torch.randint(0, MAX_POSITION, (t,), device=device, generator=g)}
    token = torch.arange(t, device=device)
    starts = torch.randint(0, MAX_POSITION - PREFILL_REQUEST, (-(-t // PREFILL_REQUEST),),
                           device=device, generator=g)
    order = torch.randperm(blocks, device=device, generator=g)
    return {"slot_mapping": order[token // BLOCK_SIZE] * BLOCK_SIZE + token % BLOCK_SIZE,
            "positions": starts[token // PREFILL_REQUEST] + token % PREFILL_REQUEST}


def make_inputs(config: Config, k_scale: float, seed: int, device="cuda") -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    t, bf16 = config.tokens, torch.bfloat16
    blocks = -(-t // BLOCK_SIZE) + SPARE_BLOCKS
    fp8 = config.cache == "fp8"
    return Inputs(
        q=torch.randn(t, config.heads, NOPE + ROPE, dtype=bf16, device=device, generator=g),
        fused_qkv=torch.randn(t, Q_A_RANK + KV_LORA + ROPE, dtype=bf16, device=device,
                              generator=g),
        cos_sin_cache=es.cos_sin_cache(MAX_POSITION, ROPE, dtype=bf16, device=device),
        gamma=(1 + 0.25 * torch.randn(KV_LORA, device=device, generator=g)).to(bf16),
        kv_cache=torch.zeros(blocks, BLOCK_SIZE, KV_LORA + ROPE, device=device,
                             dtype=torch.uint8 if fp8 else bf16),
        **serving_indices(config, blocks, g, device),
        kv_cache_dtype=config.cache,
        k_scale=torch.tensor([k_scale], device=device) if fp8 else None)


def kv_output_buffer(x: Inputs) -> torch.Tensor:
    return torch.empty_like(x.kv_lora)


def provider(name: str, x: Inputs, kv_output: torch.Tensor | None):
    """A zero-argument call of provider ``name`` on ``x`` (and ``kv_output``, tvm-fused's)."""
    steps = (x.cos_sin_cache, x.gamma, x.kv_cache, x.slot_mapping, x.positions,
             x.kv_cache_dtype, x.k_scale, EPS)
    if name == "vllm eager":
        return lambda: es.vllm_mla_prologue(x.q, x.kv_lora, *steps)
    if name == "vllm torch.compile":
        return lambda: es.compiled_vllm_mla_prologue(x.q, x.kv_lora, *steps)
    if name == "triton norm + torch":
        from liger_kernel.ops.rms_norm import rms_norm_forward

        def liger_then_torch():
            kv_c, k_pe = x.kv_lora[:, :KV_LORA], x.kv_lora[:, KV_LORA:]
            normed = rms_norm_forward(kv_c, x.gamma, EPS, 0.0, "llama", None)[0]
            q_pe = x.q[..., NOPE:]
            q_pe.copy_(es.rotary_gptj_split_cache(x.positions, q_pe, x.cos_sin_cache))
            k_pe.copy_(es.rotary_gptj_split_cache(x.positions, k_pe, x.cos_sin_cache))
            es.concat_and_cache_mla(normed, k_pe, x.kv_cache, x.slot_mapping,
                                    x.kv_cache_dtype, x.k_scale)

        return liger_then_torch
    if name == "vllm steps in triton":
        from benchmarks.peers.engine_triton import vllm_mla_prologue_triton

        return lambda: vllm_mla_prologue_triton(x.q, x.kv_lora, *steps)
    if name == "tvm-fused":
        import tvm_fused

        fused = tvm_fused.fused_rope_rmsnorm_slots  # AttributeError until it exists
        cache = x.kv_cache.view(torch.float8_e4m3fn) if x.k_scale is not None else x.kv_cache
        q_rope = x.q[..., NOPE:]
        return lambda: fused(q_rope, x.positions, x.slot_mapping, x.cos_sin_cache, x.gamma,
                             cache, kv_input=x.kv_lora, kv_output=kv_output, k_scale=x.k_scale,
                             epsilon=EPS, out=q_rope, interleaved=True, freqs_layout="split",
                             norm_rounding="before_gamma", validate=False)
    raise ValueError(f"unknown provider {name!r}")


def graph_us(fn, calls: int, reps: int) -> float:
    """GPU µs per call of ``calls`` calls of ``fn`` captured back to back in one CUDA graph
    (warmed up first), the graph replayed on a cold L2."""
    return time_graph(fn, reps=reps, calls=calls).median_us / calls


def written(x: Inputs) -> dict[str, torch.Tensor]:
    """What the op writes, as bytes: the cache rows at the slots and q's rope part."""
    slots = x.slot_mapping
    rows = x.kv_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE]
    return {"cache": rows.view(torch.uint8), "q": x.q[..., NOPE:].contiguous().view(torch.uint8)}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a == b).float().mean()), 6)


def check(args, config: Config, base: Inputs, names) -> dict[str, dict]:
    """Each provider run once on a fresh copy of ``base``: fractions of its bytes equal to
    ``vllm eager``'s (``{name: {"cache_bytes_equal": ..., ...}}``; ``{"error": ...}`` if it
    raised)."""
    reference = base.clone()
    _, normed, k_pe = es.vllm_mla_prologue(reference.q, reference.kv_lora, *(
        reference.cos_sin_cache, reference.gamma, reference.kv_cache, reference.slot_mapping,
        reference.positions, reference.kv_cache_dtype, reference.k_scale, EPS))
    want = written(reference) | {"kv_output": torch.cat((normed, k_pe), -1).view(torch.uint8)}
    del reference
    results = {}
    for name in names:
        x = base.clone()
        rows = kv_output_buffer(x) if name == "tvm-fused" and writes_kv_output(args, config) \
            else None
        try:
            provider(name, x, rows)()
            torch.cuda.synchronize()
        except Exception as error:  # reported, never fatal
            results[name] = {"error": repr(error)[:300]}
            continue
        got = written(x) | ({} if rows is None else {"kv_output": rows.view(torch.uint8)})
        results[name] = {f"{key}_bytes_equal": same_bytes(got[key], want[key]) for key in got}
    return results


def measure(args, config: Config, base: Inputs, name: str) -> dict:
    """Time provider ``name`` on its own copy of ``base``."""
    x = base.clone()
    rows = kv_output_buffer(x) if name == "tvm-fused" and writes_kv_output(args, config) \
        else None
    row = {"provider": name, "phase": config.phase, "tokens": config.tokens,
           "heads": config.heads, "cache_dtype": "bfloat16" if config.cache == "auto"
           else "float8_e4m3fn", "kv_cache_dtype": config.cache, "kv_output": rows is not None,
           "k_scale": None if x.k_scale is None else args.k_scale}
    row["bytes"] = bytes_moved(op_form(config, rows is not None), config.tokens)
    try:
        fn = provider(name, x, rows)
        fn()  # compiles, autotunes
        torch.cuda.synchronize()
        if config.phase == "decode":
            us = graph_us(fn, args.graph_calls, args.reps)
            row["timing"] = f"per call, {args.graph_calls} calls in one CUDA graph, cold L2"
        else:
            us = time_cuda(fn, reps=args.reps).median_us
            row["timing"] = "CUDA events, cold L2, median"
    except Exception as error:
        torch.cuda.synchronize()
        return row | {"us": None, "tb_per_s": None, "error": repr(error)[:500]}
    return row | {"us": round(us, 3), "tb_per_s": round(row["bytes"] / us / 1e6, 4)}


def print_rows(config: Config, rows: list[dict]) -> None:
    base = next((r["us"] for r in rows if r["provider"] == BASELINE and r["us"]), None)
    for r in rows:
        head = (f"{r['phase']:7} {r['tokens']:6d} tok {r['heads']:3d} heads {config.cache:4} | "
                f"{r['provider']:<20}")
        if r["us"] is None:
            print(f"{head} FAILED: {r['error']}", flush=True)
            continue
        ratio = f"{base / r['us']:6.2f}x" if base else "   n/a"
        checked = "".join(f" {k.removesuffix('_bytes_equal')}={v}" for k, v in
                          r.get("check", {}).items())
        print(f"{head} {r['us']:10.2f} us {r['tb_per_s']:7.3f} TB/s {ratio} vs {BASELINE}"
              f"{checked}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    for limit in ("recompile_limit", "cache_size_limit"):  # one compile per shape and dtype
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 256)
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu} | torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    for config in configs(args):
        base = make_inputs(config, args.k_scale, args.seed)
        checked = check(args, config, base, args.providers) if args.check else {}
        rows = []
        for name in args.providers:
            row = {"gpu": gpu, **measure(args, config, base, name)}
            if name in checked:
                row["check"] = checked[name]
            rows.append(row)
        base_us = next((r["us"] for r in rows if r["provider"] == BASELINE), None)
        for r in rows:
            r["x_vs_vllm_eager"] = round(base_us / r["us"], 4) if base_us and r["us"] else None
        print_rows(config, rows)
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        del base
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
