"""Command line of tvm-fused.

  run     build the fused kernel, check it against the float64 reference and, on a GPU, time it
  source  print the generated CUDA source (no GPU needed)
  tune    tune the schedule with MetaSchedule, one task per token-count bucket
  records what tuning found: per GPU, op and bucket, the best record against the default
  fuzz    random cases against the float64 reference, a repro line per failure

The benchmark suite lives beside the package, in a checkout: python -m benchmarks --help.
Heavy modules (torch, TVM) load only once a command runs, so --help is instant.
"""

from __future__ import annotations

import argparse
import re
import sys

from . import form  # plain Python: no torch or TVM


class UsageError(ValueError):
    """An option value the command cannot use: reported in one line, not a traceback."""


def _form_of(args: argparse.Namespace) -> form.Form:
    """The form the options describe (UsageError names a bad one)."""
    try:
        return form.from_cli(args)
    except ValueError as error:
        raise UsageError(str(error)) from None


QUERY_SCALE = 0.5  # q_scale of ``run``'s fp8 queries


def _describe(op: form.Form) -> str:
    cache = "an fp8_ds_mla" if op.ds_mla else f"a {op.cache_element}"
    latent = "in place" if not op.write_through else (
        f"write-through into {cache} cache" + (" and kv_output" if op.kv_output else ""))
    if op.out_dtype or op.q_nope:
        latent += (f", the {'whole ' if op.q_nope else ''}attention query in "
                   f"{op.out_element}")
    return (f"{op.num_q_heads} heads, rope_dim {op.rope_dim}, kv_norm_dim {op.kv_norm_dim}, "
            f"page size {op.page_size}, {op.dtype}, {'interleaved' if op.interleaved else 'NeoX'}"
            f", {latent}, addressed by {op.addressing}, {op.freqs_layout} cos/sin table, "
            f"RMSNorm rounded {op.norm_rounding.replace('_', ' ')}")


def _device(name: str) -> str:
    """``cuda`` or ``cpu`` for ``auto``/``cuda``/``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    return name


def run(args: argparse.Namespace) -> int:
    import random

    import torch

    from .testing.compare import run_and_check
    from .testing.inputs import inputs_for

    op = _form_of(args)
    device = torch.device(_device(args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (llvm target)"
    requests = args.requests or min(args.tokens, 8)
    base, extra = divmod(args.tokens, requests)
    new = [base + (i < extra) for i in range(requests)]
    rng = random.Random(0)
    inputs = inputs_for(op, new, [rng.randrange(0, 4096) for _ in range(requests)],
                        device=device)
    print(f"device: {name}")
    print(f"op: {_describe(op)}; {args.tokens} tokens in {requests} requests")
    out_dtype = getattr(torch, op.out_element)
    report = run_and_check(inputs.clone(), interleaved=op.interleaved, kv_output=op.kv_output,
                           pdl=op.pdl_mode, out_dtype=out_dtype,
                           q_scale=QUERY_SCALE if op.out_dtype else None)
    print(f"check: {report.summary()}")
    if not report.ok:
        return 1
    if device.type == "cuda":
        _time(inputs, op, args.reps, name)
    return 0


def _time(inputs, op: form.Form, reps: int, gpu_name: str) -> None:
    """The op's GPU time next to a device copy of as many bytes, timed the same way."""
    import torch

    from .timing import bytes_moved, time_cuda

    out_dtype = getattr(torch, op.out_element)
    out = torch.empty_like(inputs.q_rope, dtype=out_dtype)
    query = {}
    if op.q_nope:
        query = {"q_nope": inputs.q_nope,
                 "q_nope_out": torch.empty_like(inputs.q_nope, dtype=out_dtype)}
    kv_output = torch.empty_like(inputs.kv_input) if op.kv_output else None
    moved = bytes_moved(op, inputs.q_rope.shape[0])
    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    timings = {
        "tvm-fused": time_cuda(lambda: inputs.call(
            kv_output=kv_output, out=out, interleaved=op.interleaved, pdl=op.pdl_mode,
            validate=False, **query), reps=reps),
        "copy of as many bytes": time_cuda(lambda: dst.copy_(src), reps=reps),
    }
    for label, timing in timings.items():
        print(f"{label:>22}: {timing.median_us:9.2f} us (p20 {timing.p20_us:.2f}, p80 "
              f"{timing.p80_us:.2f}), {moved / timing.median_us / 1e3:7.1f} GB/s  "
              f"[{gpu_name}, cold L2, CUDA events, {timing.reps} runs]")


def source(args: argparse.Namespace) -> int:
    if args.arch is not None and not re.fullmatch(r"sm_\d{2,3}a?", args.arch):
        raise UsageError(f"--arch must look like sm_90a or sm_80, got {args.arch!r}")
    op = _form_of(args)
    from .compiler.build import cuda_target
    from .kernels import check_target, cuda_source

    target = cuda_target(args.arch)
    try:
        check_target(op, target)
    except ValueError as error:
        raise UsageError(f"--arch {args.arch}: {error}") from None
    print(cuda_source(op, target))
    return 0


def tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .compiler.build import as_target, device_target
    from .compiler.kernel_cache import cache_dir
    from .tuning.layout import CPU_DEVICE, gpu_slug, user_logs_dir
    from .tuning.tune import RpcTarget
    from .tuning.tune import tune as run_tuning

    op = _form_of(args)
    buckets = tuple(int(b) for b in args.buckets.split(","))
    if args.target == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        target = device_target(device)
    else:
        target = as_target(args.target)
    device_name = torch.cuda.get_device_name() if target.kind.name == "cuda" else CPU_DEVICE
    rpc = None
    if args.rpc_tracker:
        host, port = args.rpc_tracker.rsplit(":", 1)
        rpc = RpcTarget(host, int(port), args.rpc_key, args.rpc_workers)
    logs_dir = Path(args.out) if args.out else user_logs_dir()
    work_dir = Path(args.work_dir or cache_dir() / "tuning_work") / gpu_slug(device_name) \
        / op.key()
    print(f"records and decisions: {logs_dir}; MetaSchedule's database: {work_dir}")
    run_tuning(op, target, buckets=buckets, trials=args.trials, logs_dir=logs_dir,
               work_dir=work_dir, device_name=device_name, cost_model=args.cost_model,
               rpc=rpc)
    return 0


def records(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tuning.layout import default_logs_dir
    from .tuning.summary import bucket_results, markdown

    results = bucket_results(Path(args.dir) if args.dir else default_logs_dir())
    if not results:
        raise UsageError("no tuning records there")
    print(markdown(results), end="")
    return 0


def fuzz(args: argparse.Namespace) -> int:
    from .testing.fuzz import fuzz as run_fuzz

    return 1 if run_fuzz(args.seed, args.cases, _device(args.device), jobs=args.jobs) else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="python -m tvm_fused", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main_parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run", help="build the fused kernel, check it against float64, time it on a GPU")
    form.add_cli_options(run_parser, exclude=("alignment", "index_bits"))  # the inputs' own
    run_parser.add_argument("--tokens", type=_positive, default=1024,
                            help="new tokens in the step (default 1024)")
    run_parser.add_argument("--requests", type=_positive, default=None,
                            help="requests the tokens are spread over (default min(tokens, 8))")
    run_parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                            help="auto: the GPU if there is one, else the CPU (llvm)")
    run_parser.add_argument("--reps", type=_positive, default=50, help="timed runs on a GPU")
    run_parser.set_defaults(func=run)
    source_parser = commands.add_parser("source", help="print the generated CUDA source")
    form.add_cli_options(source_parser)
    source_parser.add_argument("--arch", default=None, help="sm_XX[a] (default sm_90a)")
    source_parser.set_defaults(func=source)
    tune_parser = commands.add_parser(
        "tune", help="tune the block-group schedule with MetaSchedule, per token bucket")
    form.add_cli_options(tune_parser)
    tune_parser.add_argument("--buckets", default="1,8,64,512,4096,32768",
                             help="token counts to tune for (comma-separated)")
    tune_parser.add_argument("--trials", type=_positive, default=32,
                             help="measured candidates per bucket, the default included")
    tune_parser.add_argument("--target", default="auto",
                             help="auto (this GPU, else llvm), cuda, llvm or a target JSON")
    tune_parser.add_argument("--out", default=None,
                             help="records folder (default: tuning_logs/ in the user's kernel "
                                  "cache folder, $TVM_FUSED_CACHE_DIR or ~/.cache/tvm_fused, "
                                  "whose decisions the runtime prefers to the package's)")
    tune_parser.add_argument("--work-dir", default=None,
                             help="MetaSchedule's working database; re-runs resume from it "
                                  "(default: tuning_work/ in the kernel cache folder)")
    tune_parser.add_argument("--cost-model", choices=("auto", "xgb", "random", "mlp"),
                             default="auto", help="auto: xgb if xgboost imports, else random")
    tune_parser.add_argument("--rpc-tracker", default=None,
                             help="HOST:PORT of a TVM RPC tracker to measure on")
    tune_parser.add_argument("--rpc-key", default="gpu", help="device key at the tracker")
    tune_parser.add_argument("--rpc-workers", type=_positive, default=1,
                             help="measurements in flight over RPC (one per server)")
    tune_parser.set_defaults(func=tune)
    records_parser = commands.add_parser(
        "records", help="what tuning found: per GPU, op and bucket, best against default")
    records_parser.add_argument("--dir", default=None,
                                help="records folder (default: the package's tuning_logs/)")
    records_parser.set_defaults(func=records)
    fuzz_parser = commands.add_parser(
        "fuzz", help="random cases against the float64 reference (a repro line per failure)")
    fuzz_parser.add_argument("--seed", type=int, default=0, help="seed of the first case")
    fuzz_parser.add_argument("--cases", type=_positive, default=100, help="(default 100)")
    fuzz_parser.add_argument("--jobs", type=_positive, default=1,
                             help="worker processes (cases build kernels in parallel)")
    fuzz_parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                             help="auto: the GPU if there is one, else the CPU")
    fuzz_parser.set_defaults(func=fuzz)
    return main_parser


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as error:
        cli.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
