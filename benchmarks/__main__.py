"""Benchmarks of tvm-fused (run from a checkout).

  suite   check, then time, tvm-fused and its peers on the GPU (the suite of
          benchmarks.suite.SUITE unless heads, tokens, providers, --neox, a form, a cache
          dtype or --kv-output are given)
  report  markdown tables and PNG plots from a suite CSV (no GPU needed); with --headline,
          the README's performance tables from results/headline.csv (--readme rewrites them)

The write-through form against the in-place op, bf16 and fp8 caches, 128 and 16 heads:
  python -m benchmarks suite --form in-place,write-through \\
      --cache-dtype bfloat16,float8_e4m3fn --heads 128,16 --csv wt.csv
DeepSeek-V3.2's cache row and the whole fp8 attention query against vLLM's chain:
  python -m benchmarks suite --form write-through,fp8-query \\
      --cache-dtype float8_e4m3fn,fp8_ds_mla --csv formats.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tvm_fused.form import DTYPES, FP8_DTYPES

DS_MLA = "fp8_ds_mla"  # the cache format a --cache-dtype may name


def _names(value: str) -> list[str]:
    """The comma-separated items of ``value`` (none for an empty string)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def suite_parts(args: argparse.Namespace) -> tuple:
    """The ``benchmarks.suite.Part``s the suite's arguments ask for: ``SUITE`` without any
    selection; else each head count (default 128), form (default in place) and cache dtype
    (default q's) with the token counts (default all) and providers (default each form's
    all), the in-place form only with a cache of q's dtype; ``kv_output`` for the
    write-through parts. ``ValueError`` for a selection that has no part."""
    from .suite import (
        ALL_PROVIDERS,
        DECODE_TOKENS,
        FORMS,
        PREFILL_TOKENS,
        PROVIDERS,
        SUITE,
        Part,
    )

    if not (args.tokens or args.heads or args.providers or args.neox or args.form
            or args.cache_dtype or args.kv_output):
        return SUITE
    forms = _names(args.form) or ["in-place"]
    caches = _names(args.cache_dtype) or [args.dtype]
    names = _names(args.providers)
    for what, given, known in (("form", forms, FORMS), ("provider", names, ALL_PROVIDERS),
                               ("cache dtype", caches, (args.dtype, *FP8_DTYPES, DS_MLA))):
        unknown = [value for value in given if value not in known]
        if unknown:
            raise ValueError(f"unknown {what} {', '.join(unknown)}: choose from "
                             f"{', '.join(known)}")
    tokens = tuple(int(t) for t in _names(args.tokens)) or DECODE_TOKENS + PREFILL_TOKENS
    parts = tuple(
        Part(int(heads), not args.neox, tokens, tuple(names) or PROVIDERS[form],
             write_through=form != "in-place",
             cache_dtype=None if cache in (args.dtype, DS_MLA) else cache,
             kv_output=args.kv_output and form == "write-through",
             cache_format=DS_MLA if cache == DS_MLA else "plain", fp8_query=form == "fp8-query")
        for heads in _names(args.heads or "128") for form in forms for cache in caches
        if form != "in-place" or cache == args.dtype)
    if not parts:
        raise ValueError("an fp8 or fp8_ds_mla cache needs --form write-through or fp8-query")
    return parts


def suite(args: argparse.Namespace) -> int:
    import torch

    from tvm_fused import Form

    from .suite import run_suite

    try:
        parts = suite_parts(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("the suite needs a CUDA GPU", file=sys.stderr)
        return 2
    base = Form(dtype=args.dtype, rope_dim=args.rope_dim, kv_norm_dim=args.kv_norm_dim,
                page_size=args.page_size)  # gamma in q's dtype
    _, failures = run_suite(parts, base, Path(args.csv) if args.csv else None, reps=args.reps)
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def report(args: argparse.Namespace) -> int:
    from .report import groups, markdown_table, plot, plot_path, read_rows, series

    if args.headline:
        from . import headline

        rows = headline.read(Path(args.csv))
        if args.readme:
            changed = headline.update_readme(Path(args.readme), rows)
            print(f"{args.readme}: headline tables {'rewritten' if changed else 'unchanged'}")
        else:
            print(headline.render(rows))
        return 0
    rows = read_rows(Path(args.csv))
    for group in groups(rows):
        for heads, pairing in ((int(h), p) for h in _names(args.heads)
                               for p in ("gptj", "neox")):
            table = markdown_table(rows, heads, pairing, group)
            if table:
                print(table, end="\n\n")
    if args.png:
        for group in groups(rows):
            if series(rows, 128, "gptj", group):
                path = plot_path(Path(args.png), group)
                plot(rows, path, group=group)
                print(f"plot: {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    suite_parser = commands.add_parser("suite", help="check, then time, every provider (GPU)")
    suite_parser.add_argument("--heads", default="", help="comma-separated head counts")
    suite_parser.add_argument("--tokens", default="", help="comma-separated token counts")
    suite_parser.add_argument("--providers", default="",
                              help="comma-separated, from benchmarks.suite.ALL_PROVIDERS "
                                   "(each form times those it has)")
    suite_parser.add_argument("--neox", action="store_true", help="NeoX (half-split) pairs")
    suite_parser.add_argument("--form", default="",
                              help="comma-separated forms of the op: in-place (default), "
                                   "write-through (the latent from kv_input), fp8-query "
                                   "(write-through, writing the whole fp8 attention query)")
    suite_parser.add_argument("--cache-dtype", default="",
                              help="comma-separated cache dtypes: --dtype's (default), "
                                   f"{', '.join(FP8_DTYPES)} or {DS_MLA} (DeepSeek-V3.2's "
                                   "row; these with write-through or fp8-query only)")
    suite_parser.add_argument("--kv-output", action="store_true",
                              help="the write-through form also writes kv_output")
    suite_parser.add_argument("--dtype", choices=DTYPES,
                              default="bfloat16", help="dtype of q, the latent and gamma")
    suite_parser.add_argument("--page-size", type=int, default=128, help="cache page size")
    suite_parser.add_argument("--rope-dim", type=int, default=64, help="rotary dims")
    suite_parser.add_argument("--kv-norm-dim", type=int, default=512, help="latent dims")
    suite_parser.add_argument("--reps", type=int, default=100, help="timed runs per point")
    suite_parser.add_argument("--csv", default=None, help="append the rows to this CSV")
    suite_parser.set_defaults(func=suite)
    report_parser = commands.add_parser("report", help="tables and plots from a suite CSV")
    report_parser.add_argument("csv", help="a CSV written by the suite")
    report_parser.add_argument("--png", default=None,
                               help="write the plot of 128 heads, GPT-J here (other forms: "
                                    "beside it, named after the form)")
    report_parser.add_argument("--heads", default="128,64,16", help="head counts to report")
    report_parser.add_argument("--headline", action="store_true",
                               help="the CSV is results/headline.csv: the README's tables, one "
                                    "per GPU")
    report_parser.add_argument("--readme", default=None,
                               help="with --headline: rewrite this README's headline block")
    report_parser.set_defaults(func=report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
