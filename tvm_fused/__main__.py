"""Command line: ``python -m tvm_fused run`` (build, check, time) and ``... source``."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from .api import fused_rope_rmsnorm
from .build import cuda_source, cuda_target
from .checking import run_and_check
from .config import OpConfig
from .inputs import make_inputs
from .timing import op_bytes, time_cuda
from .torch_baseline import torch_fused_rope_rmsnorm

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", type=int, default=128, help="q heads (default 128)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--page-size", type=int, default=128)
    parser.add_argument("--rope-dim", type=int, default=64)
    parser.add_argument("--kv-norm-dim", type=int, default=512)
    parser.add_argument("--neox", action="store_true", help="NeoX (half-split) rope pairs")


def _split(tokens: int, requests: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """``tokens`` new tokens over ``requests`` requests, after cached contexts of 0-4k."""
    base, extra = divmod(tokens, requests)
    new = [base + (i < extra) for i in range(requests)]
    return new, [rng.randrange(0, 4096) for _ in range(requests)]


def run(args: argparse.Namespace) -> int:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    name = torch.cuda.get_device_name(device) if use_cuda else "CPU (llvm target)"
    requests = args.requests or max(1, min(args.tokens, 8))
    new, cached = _split(args.tokens, requests, random.Random(0))
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(new, cached, num_q_heads=args.heads, rope_dim=args.rope_dim,
                         kv_norm_dim=args.kv_norm_dim, page_size=args.page_size, dtype=dtype,
                         device=device)
    print(f"device: {name}")
    print(f"op: {args.heads} heads, rope_dim {args.rope_dim}, kv_norm_dim {args.kv_norm_dim}, "
          f"page size {args.page_size}, {args.dtype}, {'NeoX' if args.neox else 'interleaved'}"
          f", {args.tokens} tokens in {requests} requests")
    report = run_and_check(inputs.clone(), interleaved=not args.neox)
    print(f"check: {report.summary()}")
    if not report.ok:
        return 1
    if use_cuda:
        _time(inputs, args, name)
    return 0


def _time(inputs, args, gpu_name: str) -> None:
    out = torch.empty_like(inputs.q_rope)
    interleaved = not args.neox
    kernel = time_cuda(lambda: fused_rope_rmsnorm(*inputs.args(), out=out,
                                                  interleaved=interleaved, validate=False),
                       reps=args.reps)
    baseline = time_cuda(lambda: torch_fused_rope_rmsnorm(
        *inputs.args(), num_tokens=args.tokens, out=out, interleaved=interleaved),
        reps=args.reps)
    moved = op_bytes(args.tokens, args.heads, args.rope_dim, args.kv_norm_dim,
                     inputs.q_rope.dtype)
    for label, timing in (("tvm-fused", kernel), ("plain torch", baseline)):
        print(f"{label:>12}: {timing.median_us:9.2f} us (p20 {timing.p20_us:.2f}, p80 "
              f"{timing.p80_us:.2f}), {moved / timing.median_us / 1e3:7.1f} GB/s  "
              f"[{gpu_name}, cold L2, CUDA events, {timing.reps} runs]")
    print(f"speedup over plain torch: {baseline.median_us / kernel.median_us:.2f}x")


def source(args: argparse.Namespace) -> int:
    op = OpConfig(num_q_heads=args.heads, rope_dim=args.rope_dim, kv_norm_dim=args.kv_norm_dim,
                  page_size=args.page_size, dtype=args.dtype, gamma_dtype=args.dtype,
                  interleaved=not args.neox)
    print(cuda_source(op, cuda_target(args.arch)))
    return 0


def tune(args: argparse.Namespace) -> int:
    from .build import as_target
    from .tuning.records import CPU_DEVICE, default_logs_dir
    from .tuning.tune import RpcTarget
    from .tuning.tune import tune as run_tuning

    op = OpConfig(num_q_heads=args.heads, rope_dim=args.rope_dim, kv_norm_dim=args.kv_norm_dim,
                  page_size=args.page_size, dtype=args.dtype, gamma_dtype=args.dtype,
                  interleaved=not args.neox)
    if args.target == "auto":
        target = cuda_target() if torch.cuda.is_available() else as_target("llvm")
    else:
        target = as_target(args.target)
    if target.kind.name == "cuda":
        device_name = torch.cuda.get_device_name()
        if args.target == "auto":
            major, minor = torch.cuda.get_device_capability()
            target = cuda_target(f"sm_{major}{minor}{'a' if major >= 9 else ''}")
    else:
        device_name = CPU_DEVICE
    rpc = None
    if args.rpc_tracker:
        host, port = args.rpc_tracker.rsplit(":", 1)
        rpc = RpcTarget(host, int(port), args.rpc_key, args.rpc_workers)
    logs_dir = Path(args.out) if args.out else default_logs_dir()
    work_dir = Path(args.work_dir) / f"{device_name.replace(' ', '_')}-{op.num_q_heads}h"
    run_tuning(op, target, buckets=tuple(int(b) for b in args.buckets.split(",")),
               trials=args.trials, logs_dir=logs_dir, work_dir=work_dir,
               device_name=device_name, cost_model=args.cost_model, rpc=rpc)
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench import ALL_PROVIDERS, DECODE_TOKENS, PREFILL_TOKENS, SUITE, run_suite

    if not torch.cuda.is_available():
        print("bench needs a CUDA GPU")
        return 1
    base = OpConfig(rope_dim=args.rope_dim, kv_norm_dim=args.kv_norm_dim,
                    page_size=args.page_size, dtype=args.dtype, gamma_dtype=args.dtype)
    parts = SUITE
    if args.tokens or args.heads_list or args.providers or args.neox:
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else \
            DECODE_TOKENS + PREFILL_TOKENS
        names = args.providers.split(",") if args.providers else ALL_PROVIDERS
        parts = [(int(h), not args.neox, tokens, names)
                 for h in (args.heads_list or "128").split(",")]
    _, failures = run_suite(parts, base, Path(args.csv) if args.csv else None, reps=args.reps)
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def bench_report(args: argparse.Namespace) -> int:
    from .bench_report import markdown_table, plot, read_rows

    rows = read_rows(Path(args.csv))
    for heads, pairing in ((int(h), p) for h in args.heads_list.split(",")
                           for p in ("gptj", "neox")):
        table = markdown_table(rows, heads, pairing)
        if table:
            print(table, end="\n\n")
    if args.png:
        plot(rows, Path(args.png))
    return 0


def fuzz(args: argparse.Namespace) -> int:
    from .fuzz import fuzz as run_fuzz

    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    return 1 if run_fuzz(args.seed, args.cases, device, jobs=args.jobs) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_fused", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run", help="build the fused kernel, check it against torch, time it on a GPU")
    _add_config_options(run_parser)
    run_parser.add_argument("--tokens", type=int, default=1024)
    run_parser.add_argument("--requests", type=int, default=0,
                            help="requests the tokens are spread over (default min(tokens, 8))")
    run_parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    run_parser.add_argument("--reps", type=int, default=50, help="timed runs on a GPU")
    run_parser.set_defaults(func=run)
    source_parser = commands.add_parser("source", help="print the generated CUDA source")
    _add_config_options(source_parser)
    source_parser.add_argument("--arch", default=None, help="sm_XX (default sm_90a)")
    source_parser.set_defaults(func=source)
    tune_parser = commands.add_parser(
        "tune", help="tune the block-group schedule with MetaSchedule, per token bucket")
    _add_config_options(tune_parser)
    tune_parser.add_argument("--buckets", default="1,8,64,512,4096,32768",
                             help="token counts to tune for (comma-separated)")
    tune_parser.add_argument("--trials", type=int, default=32,
                             help="measured candidates per bucket, the default included")
    tune_parser.add_argument("--target", default="auto",
                             help="auto (this GPU, else llvm), cuda, llvm or a target JSON")
    tune_parser.add_argument("--out", default=None,
                             help="records folder (default: the package's tuning_logs/)")
    tune_parser.add_argument("--work-dir", default="tuning_work",
                             help="MetaSchedule's working database; re-runs resume from it")
    tune_parser.add_argument("--cost-model", choices=("auto", "xgb", "random", "mlp"),
                             default="auto", help="auto: xgb if xgboost imports, else random")
    tune_parser.add_argument("--rpc-tracker", default=None,
                             help="HOST:PORT of a TVM RPC tracker to measure on")
    tune_parser.add_argument("--rpc-key", default="gpu", help="device key at the tracker")
    tune_parser.add_argument("--rpc-workers", type=int, default=1,
                             help="measurements in flight over RPC (one per server)")
    tune_parser.set_defaults(func=tune)
    bench_parser = commands.add_parser(
        "bench", help="check, then time, tvm-fused and its peers on the GPU (the suite of "
        "tvm_fused.bench.SUITE unless heads, tokens, providers or --neox are given)")
    _add_config_options(bench_parser)
    bench_parser.add_argument("--heads-list", default="", help="comma-separated head counts")
    bench_parser.add_argument("--tokens", default="", help="comma-separated token counts")
    bench_parser.add_argument("--providers", default="",
                              help="comma-separated, from tvm_fused.bench.ALL_PROVIDERS")
    bench_parser.add_argument("--reps", type=int, default=100)
    bench_parser.add_argument("--csv", default=None, help="append the rows to this CSV")
    bench_parser.set_defaults(func=bench)
    report_parser = commands.add_parser(
        "bench-report", help="markdown tables and a PNG plot from a bench CSV (no GPU)")
    report_parser.add_argument("csv")
    report_parser.add_argument("--png", default=None, help="write the plot here")
    report_parser.add_argument("--heads-list", default="128,64,16")
    report_parser.set_defaults(func=bench_report)
    fuzz_parser = commands.add_parser(
        "fuzz", help="random cases against the float64 reference (a repro line per failure)")
    fuzz_parser.add_argument("--seed", type=int, default=0, help="seed of the first case")
    fuzz_parser.add_argument("--cases", type=int, default=100)
    fuzz_parser.add_argument("--jobs", type=int, default=1,
                             help="worker processes (cases build kernels in parallel)")
    fuzz_parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    fuzz_parser.set_defaults(func=fuzz)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
