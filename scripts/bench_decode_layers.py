"""What the op costs an engine per layer of a decode step, with and without PDL (GPU).

A DeepSeek-V3 decode step runs the MLA prologue in each of its 61 layers, right after the
projections that produce that layer's q and latent. This script captures such a step in one
CUDA graph: per layer, ``fused_qkv = hidden @ W_a`` (``[T, 7168] x [7168, 1536 + 576]``),
``q = fused_qkv[:, :1536] @ W_b`` (``[1536, H * 192]``), then the provider's prologue on the
layer's own cache ``[blocks, 64, 576]``; each layer has its own weights and cache. The op's
cost per layer is (the graph's time with the prologue - without it) / layers, both graphs
timed in the same run (replays on a cold L2, medians).

Providers: ``tvm-fused`` (``fused_rope_rmsnorm_slots``), ``tvm-fused pdl`` (the same with
``pdl=True``: its launch overlaps the GEMM before it), ``tvm-fused pdl early-indices``
(``pdl="early-indices"``: its index reads too), ``triton fused`` (the Triton peer of
the same fused op, ``benchmarks/peers/triton_fused.py``, addressed by offsets and a page
table of the same tokens) and, for the write-through form, ``vllm steps in triton`` (three
Triton launches: ``benchmarks/peers/engine_triton.py``). Forms: ``write-through`` (the
latent read from ``fused_qkv``, vLLM's), ``in-place`` (the caller first copies the latent
rows into the cache, an ``index_copy_`` that the baseline graph runs too). Caches: bf16,
fp8 e4m3 (``k_scale``).

Output: a JSON line per configuration and provider (``--out``) and a table with the GPU's
name. Usage: python scripts/bench_decode_layers.py --out OUT/layers.jsonl [--quick]
``--timeline`` records one replay of each graph instead (CUPTI, ``benchmarks/timeline.py``):
per kernel of a layer, its median duration and its gap after the kernel before it, which
shows where a provider's time goes between the GEMMs (a PDL launch's overlap is a negative
gap).
``--device cpu --layers 2`` runs each step once, untimed, and checks it: after each tvm-fused
provider's step (the Triton ones are left out), every layer's roped q rope part and new cache
rows against the float64 reference (``tvm_fused.testing.compare.check_run``: and everything
else in q, the cache and ``fused_qkv`` unchanged); the exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import timeline  # noqa: E402
from benchmarks.peers import engine_steps as es  # noqa: E402
from tvm_fused import fused_rope_rmsnorm_slots  # noqa: E402
from tvm_fused.testing.compare import check_run, whole_storage  # noqa: E402
from tvm_fused.testing.inputs import OpInputs  # noqa: E402
from tvm_fused.timing import capture_graph, time_graph  # noqa: E402

HIDDEN, Q_A_RANK, KV_LORA, ROPE, NOPE = 7168, 1536, 512, 64, 128
BLOCK_SIZE, MAX_POSITION = 64, 163840
TOKENS, HEADS, CACHES, FORMS = (1, 8, 64, 256), (16, 128), ("auto", "fp8"), (
    "write-through", "in-place")
PDL = {"tvm-fused": False, "tvm-fused pdl": True, "tvm-fused pdl early-indices": "early-indices"}
PROVIDERS = (*PDL, "triton fused", "vllm steps in triton")
NEEDS = {"triton fused": ("triton",), "vllm steps in triton": ("triton", "liger_kernel")}
QUICK = {"tokens": (1, 64), "heads": (16, 128), "caches": ("auto",)}
EPS, K_SCALE = 1e-6, 0.5


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int
    heads: int
    cache: str  # "auto" (bf16) or "fp8"
    form: str


@dataclasses.dataclass
class Layer:
    """One layer's weights, cache and outputs: ``w_a [7168, 2112]``, ``w_b [1536, H * 192]``
    bf16, ``kv_cache [blocks, 64, 576]`` (bf16 or uint8 fp8 bytes), ``fused_qkv [T, 2112]``
    and ``q [T, H, 192]`` (written by the GEMMs, so that a capture holds them)."""

    w_a: torch.Tensor
    w_b: torch.Tensor
    kv_cache: torch.Tensor
    fused_qkv: torch.Tensor
    q: torch.Tensor


@dataclasses.dataclass
class Step:
    """A decode step's inputs: ``hidden [T, 7168]``, each request's one token at
    ``positions [T]`` in its own cache page, ``slot_mapping [T]`` (page * 64 + position %
    64), the same tokens as ``input_row_offsets [T + 1]``, ``lookup_table [T, pages]`` and
    ``cache_lengths [T]`` (the Triton fused peer's addressing), the cos/sin table split
    (vLLM's) and ``freqs_cis`` interleaved (the same values, MAX's layout), gamma, the fp8
    cache's ``k_scale``, and the layers."""

    hidden: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    input_row_offsets: torch.Tensor
    lookup_table: torch.Tensor
    cache_lengths: torch.Tensor
    cos_sin_cache: torch.Tensor
    freqs_cis: torch.Tensor
    gamma: torch.Tensor
    k_scale: torch.Tensor | None
    layers: list


def make_step(config: Config, layers: int, device, seed: int = 0) -> Step:
    """One decode token per request, at random positions, each in a page of its own."""
    g = torch.Generator(device=device).manual_seed(seed)
    t, bf16 = config.tokens, torch.bfloat16
    blocks = t + 8
    fp8 = config.cache == "fp8"

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(bf16)

    stack = [Layer(randn(HIDDEN, Q_A_RANK + KV_LORA + ROPE, scale=HIDDEN ** -0.5),
                   randn(Q_A_RANK, config.heads * (NOPE + ROPE), scale=Q_A_RANK ** -0.5),
                   torch.zeros(blocks, BLOCK_SIZE, KV_LORA + ROPE, device=device,
                               dtype=torch.uint8 if fp8 else bf16),
                   torch.empty(t, Q_A_RANK + KV_LORA + ROPE, dtype=bf16, device=device),
                   torch.empty(t, config.heads, NOPE + ROPE, dtype=bf16, device=device))
             for _ in range(layers)]
    positions = torch.randint(0, MAX_POSITION, (t,), device=device, generator=g)
    pages = torch.randperm(blocks, device=device, generator=g)[:t]
    table = torch.full((t, MAX_POSITION // BLOCK_SIZE), -1, dtype=torch.int32, device=device)
    table[torch.arange(t, device=device), positions // BLOCK_SIZE] = pages.to(torch.int32)
    cos_sin = es.cos_sin_cache(MAX_POSITION, ROPE, dtype=bf16, device=device)
    half = ROPE // 2
    interleaved = torch.stack((cos_sin[:, :half], cos_sin[:, half:]), -1).flatten(1)
    return Step(randn(t, HIDDEN), positions, pages * BLOCK_SIZE + positions % BLOCK_SIZE,
                torch.arange(t + 1, dtype=torch.int32, device=device), table,
                positions.to(torch.int32), cos_sin, interleaved.contiguous(),
                (1 + 0.25 * torch.randn(KV_LORA, device=device, generator=g)).to(bf16),
                torch.tensor([K_SCALE], device=device) if fp8 else None, stack)


def prologue(provider: str | None, config: Config, step: Step):
    """The step's function: every layer's GEMMs and then ``provider``'s prologue (None: no
    prologue; in place, the caller's copy of the latent into the cache stays)."""
    fp8 = config.cache == "fp8"
    write_through = config.form == "write-through"

    def run():
        for layer in step.layers:
            torch.mm(step.hidden, layer.w_a, out=layer.fused_qkv)
            torch.mm(layer.fused_qkv[:, :Q_A_RANK], layer.w_b, out=layer.q.view(
                config.tokens, -1))
            kv_lora = layer.fused_qkv[:, Q_A_RANK:]
            cache = layer.kv_cache.view(torch.float8_e4m3fn) if fp8 else layer.kv_cache
            if not write_through:
                cache.view(-1, KV_LORA + ROPE).index_copy_(0, step.slot_mapping, kv_lora)
            if provider is None:
                continue
            q_rope = layer.q[..., NOPE:]
            form = {"kv_input": kv_lora, "k_scale": step.k_scale} if write_through else {}
            if provider == "vllm steps in triton":
                from benchmarks.peers.engine_triton import vllm_mla_prologue_triton

                vllm_mla_prologue_triton(layer.q, kv_lora, step.cos_sin_cache, step.gamma,
                                         layer.kv_cache, step.slot_mapping, step.positions,
                                         config.cache, step.k_scale, EPS)
            elif provider == "triton fused":
                from benchmarks.peers.triton_fused import triton_fused_rope_rmsnorm

                triton_fused_rope_rmsnorm(q_rope, step.input_row_offsets, step.freqs_cis,
                                          step.gamma, cache, step.lookup_table,
                                          step.cache_lengths, out=q_rope, epsilon=EPS, **form)
            else:
                fused_rope_rmsnorm_slots(
                    q_rope, step.positions, step.slot_mapping, step.cos_sin_cache, step.gamma,
                    cache, out=q_rope, epsilon=EPS, pdl=PDL[provider], validate=False,
                    **form)

    return run


def configs(args) -> list[Config]:
    return [Config(*c) for c in itertools.product(args.tokens, args.heads, args.cache,
                                                  args.forms)
            if not (c[2] == "fp8" and c[3] == "in-place")]  # fp8 caches: write-through only


def layer_inputs(config: Config, step: Step, layer: Layer) -> OpInputs:
    """The op's arguments in ``layer`` as ``OpInputs`` (views of the step's tensors), for
    ``check_run``: slots addressing with vLLM's split table; the latent from ``fused_qkv``
    (write-through) or from the cache (in place)."""
    cache = layer.kv_cache.view(torch.float8_e4m3fn) if config.cache == "fp8" else layer.kv_cache
    write_through = config.form == "write-through"
    return OpInputs(
        q_rope=layer.q[..., NOPE:], input_row_offsets=step.input_row_offsets,
        freqs_cis=step.cos_sin_cache, gamma=step.gamma, k_cache=cache,
        lookup_table=step.lookup_table, cache_lengths=step.cache_lengths,
        q_storage=whole_storage(layer.q), cache_storage=whole_storage(cache),
        kv_input=layer.fused_qkv[:, Q_A_RANK:] if write_through else None,
        kv_storage=whole_storage(layer.fused_qkv) if write_through else None,
        k_scale=step.k_scale, positions=step.positions, slot_mapping=step.slot_mapping,
        freqs_layout="split")


def check(config: Config, step: Step, providers) -> list[dict]:
    """Run the step once without a prologue, then once with each provider's, untimed, each
    from the same caches; after each, every layer against the float64 reference of the
    inputs the step without a prologue left (``check_run``, in place on q). A row per
    provider: ``ok`` and the layers that failed, with the first failure's report."""
    initial = [layer.kv_cache.clone() for layer in step.layers]

    def run(provider):
        for layer, cache in zip(step.layers, initial):
            layer.kv_cache.copy_(cache)  # no rows left by the provider before
        prologue(provider, config, step)()

    run(None)  # the GEMMs (and in place, the caller's copy into the cache): the op's inputs
    before = [layer_inputs(config, step, layer).clone() for layer in step.layers]
    rows = []
    for provider in providers:
        run(provider)
        reports = [check_run(inputs, layer_inputs(config, step, layer), layer.q[..., NOPE:],
                             in_place=True, epsilon=EPS)
                   for inputs, layer in zip(before, step.layers)]
        failed = [i for i, report in enumerate(reports) if not report.ok]
        rows.append({**dataclasses.asdict(config), "provider": provider,
                     "layers": len(reports), "ok": not failed, "failed_layers": failed,
                     "report": reports[failed[0] if failed else 0].summary()})
    return rows


def measure(config: Config, args) -> list[dict]:
    step = make_step(config, args.layers, args.device, args.seed)
    providers = [p for p in args.providers
                 if not (p == "vllm steps in triton" and config.form == "in-place")]
    if args.device == "cpu":  # one untimed, checked run of each (not the Triton ones)
        return check(config, step, [p for p in providers if "triton" not in p])
    base = time_graph(prologue(None, config, step), reps=args.reps).median_us
    rows = []
    for provider in providers:
        total = time_graph(prologue(provider, config, step), reps=args.reps).median_us
        rows.append({"gpu": torch.cuda.get_device_name(), **dataclasses.asdict(config),
                     "provider": provider, "layers": args.layers, "step_us": total,
                     "baseline_step_us": base, "op_us_per_layer": (total - base) / args.layers})
    return rows


def measure_timeline(config: Config, args) -> list[dict]:
    """One row per provider (and ``None``, the GEMMs alone): the kernels of one layer from
    one recorded replay of the step's graph (``timeline.per_position``)."""
    step = make_step(config, args.layers, args.device, args.seed)
    rows = []
    for provider in (None, *args.providers):
        if provider == "vllm steps in triton" and config.form == "in-place":
            continue
        kernels = timeline.replay_kernels(capture_graph(prologue(provider, config, step)))
        rows.append({"gpu": torch.cuda.get_device_name(), **dataclasses.asdict(config),
                     "provider": provider or "none", "layers": args.layers,
                     "layer_us": timeline.layer_period_us(kernels, args.layers),
                     "kernels": [dataclasses.asdict(p)
                                 for p in timeline.per_position(kernels, args.layers)]})
    return rows


def print_cost(config: Config, row: dict) -> None:
    print(f"{config.tokens:4d} tok {config.heads:3d} heads {config.cache:4s} "
          f"{config.form:13s} | {row['provider']:22s} {row['op_us_per_layer']:7.2f} "
          f"us/layer (step {row['step_us']:8.1f} us, without "
          f"{row['baseline_step_us']:8.1f})", flush=True)


def print_check(config: Config, row: dict) -> None:
    failed = f"FAILED in layers {row['failed_layers']}" if row["failed_layers"] else "ok"
    print(f"{config.tokens:4d} tok {config.heads:3d} heads {config.cache:4s} "
          f"{config.form:13s} | {row['provider']:27s} check of {row['layers']} layers "
          f"{failed}: {row['report']}", flush=True)


def print_timeline(config: Config, row: dict) -> None:
    print(f"{config.tokens:4d} tok {config.heads:3d} heads {config.cache:4s} "
          f"{config.form:13s} | {row['provider']:27s} layer {row['layer_us']:6.2f} us:",
          flush=True)
    for kernel in row["kernels"]:
        print(f"    gap {kernel['gap_us']:6.2f} us, ran {kernel['duration_us']:6.2f} us  "
              f"{kernel['name'][:90]}", flush=True)


def parser() -> argparse.ArgumentParser:
    def csv(kind):
        return lambda text: tuple(kind(x) for x in text.split(",") if x)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokens", type=csv(int))
    p.add_argument("--heads", type=csv(int))
    p.add_argument("--cache", type=csv(str))
    p.add_argument("--forms", type=csv(str), default=FORMS)
    p.add_argument("--providers", type=csv(str), default=PROVIDERS)
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeline", action="store_true",
                   help="per-kernel gaps and durations of one replay (CUPTI), not timings")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    subset = QUICK if args.quick else {"tokens": TOKENS, "heads": HEADS, "caches": CACHES}
    args.tokens = args.tokens or subset["tokens"]
    args.heads = args.heads or subset["heads"]
    args.cache = args.cache or subset["caches"]
    for name, given, allowed in (("--cache", args.cache, CACHES), ("--forms", args.forms, FORMS),
                                 ("--providers", args.providers, PROVIDERS)):
        if unknown := [x for x in given if x not in allowed]:
            p.error(f"{name}: unknown {unknown}, expected some of {allowed}")
    if args.layers < 1 or args.reps < 1:
        p.error("--layers and --reps must be positive")
    args.providers = [name for name in args.providers if _available(name)]
    return args


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, a stub module
        return False


def _available(provider: str) -> bool:
    """Whether the peers ``provider`` needs import here; if not, a note on stderr."""
    missing = [module for module in NEEDS.get(provider, ()) if not _importable(module)]
    if missing:
        print(f"skipping {provider!r}: {', '.join(missing)} not installed "
              "(pip install -e '.[bench]')", file=sys.stderr)
    return not missing


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"{args.layers} layers per graph, cold L2, medians of {args.reps} replays")
    failed = 0
    for config in configs(args):
        rows = measure_timeline(config, args) if args.timeline else measure(config, args)
        for row in rows:
            if "ok" in row:  # a check (on the CPU)
                print_check(config, row)
                failed += not row["ok"]
            else:
                (print_timeline if args.timeline else print_cost)(config, row)
            if args.out:
                with args.out.open("a") as out:
                    out.write(json.dumps(row) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
