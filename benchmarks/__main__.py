"""Benchmarks of tvm-fused (run from a checkout).

  suite   check, then time, tvm-fused and its peers on the GPU (the suite of
          benchmarks.suite.SUITE unless heads, tokens, providers or --neox are given)
  report  markdown tables and a PNG plot from a suite CSV (no GPU needed)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tvm_fused.compiler import config


def suite(args: argparse.Namespace) -> int:
    import torch

    from tvm_fused import OpConfig

    from .suite import ALL_PROVIDERS, DECODE_TOKENS, PREFILL_TOKENS, SUITE, run_suite

    if not torch.cuda.is_available():
        print("the suite needs a CUDA GPU", file=sys.stderr)
        return 2
    base = OpConfig(rope_dim=args.rope_dim, kv_norm_dim=args.kv_norm_dim,
                    page_size=args.page_size, dtype=args.dtype, gamma_dtype=args.dtype)
    parts = SUITE
    if args.tokens or args.heads or args.providers or args.neox:
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else \
            DECODE_TOKENS + PREFILL_TOKENS
        names = args.providers.split(",") if args.providers else ALL_PROVIDERS
        parts = [(int(h), not args.neox, tokens, names) for h in (args.heads or "128").split(",")]
    _, failures = run_suite(parts, base, Path(args.csv) if args.csv else None, reps=args.reps)
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def report(args: argparse.Namespace) -> int:
    from .report import markdown_table, plot, read_rows

    rows = read_rows(Path(args.csv))
    for heads, pairing in ((int(h), p) for h in args.heads.split(",")
                           for p in ("gptj", "neox")):
        table = markdown_table(rows, heads, pairing)
        if table:
            print(table, end="\n\n")
    if args.png:
        plot(rows, Path(args.png))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    suite_parser = commands.add_parser("suite", help="check, then time, every provider (GPU)")
    suite_parser.add_argument("--heads", default="", help="comma-separated head counts")
    suite_parser.add_argument("--tokens", default="", help="comma-separated token counts")
    suite_parser.add_argument("--providers", default="",
                              help="comma-separated, from benchmarks.suite.ALL_PROVIDERS")
    suite_parser.add_argument("--neox", action="store_true", help="NeoX (half-split) pairs")
    suite_parser.add_argument("--dtype", choices=config.DTYPES,
                              default="bfloat16", help="dtype of q, the cache and gamma")
    suite_parser.add_argument("--page-size", type=int, default=128, help="cache page size")
    suite_parser.add_argument("--rope-dim", type=int, default=64, help="rotary dims")
    suite_parser.add_argument("--kv-norm-dim", type=int, default=512, help="latent dims")
    suite_parser.add_argument("--reps", type=int, default=100, help="timed runs per point")
    suite_parser.add_argument("--csv", default=None, help="append the rows to this CSV")
    suite_parser.set_defaults(func=suite)
    report_parser = commands.add_parser("report", help="tables and a plot from a suite CSV")
    report_parser.add_argument("csv", help="a CSV written by the suite")
    report_parser.add_argument("--png", default=None, help="write the plot here")
    report_parser.add_argument("--heads", default="128,64,16", help="head counts to report")
    report_parser.set_defaults(func=report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
