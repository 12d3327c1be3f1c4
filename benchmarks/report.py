"""Benchmark CSV -> a markdown table with speedups over each peer, and a PNG plot.

Reads the rows ``benchmarks.suite`` writes (one per provider and token count) and needs no
GPU, so the plot can be drawn where matplotlib is installed.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

OURS = "tvm-fused default"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows, heads: int, pairing: str) -> dict[str, dict[int, dict]]:
    """provider -> tokens -> row, for one head count and pairing."""
    series = defaultdict(dict)
    for row in rows:
        if int(row["heads"]) == heads and row["pairing"] == pairing:
            series[row["provider"]][int(row["tokens"])] = row
    return series


def markdown_table(rows: list[dict], heads: int = 128, pairing: str = "gptj",
                   ours: str = OURS) -> str:
    """Per token count: our time (from Python, replayed in a CUDA graph, host time of the
    call), bandwidth, fraction of the large-copy bandwidth, the time of a device copy of as
    many bytes, and every peer's time with our speedup over it (``peer / ours``); empty
    without rows of ``ours``."""
    series = _series(rows, heads, pairing)
    if ours not in series:
        return ""
    peers = [name for name in series if name != ours]
    gpu = next(iter(series[ours].values()))["gpu"]
    header = ["tokens", f"{ours} µs", "graph µs", "host µs", "TB/s", "% of copy",
              "same-bytes copy µs"] + [
        f"{p} µs (x)" for p in peers]
    lines = [f"{gpu}, {heads} heads, {pairing}, bf16, cold L2, median of CUDA-event runs",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tokens, row in sorted(series[ours].items()):
        ours_us = float(row["median_us"])
        graph, host = float(row["graph_us"]), float(row["host_us"])
        cells = [str(tokens), f"{ours_us:.2f}", "" if math.isnan(graph) else f"{graph:.2f}",
                 "" if math.isnan(host) else f"{host:.1f}", f"{float(row['tb_per_s']):.2f}",
                 f"{100 * float(row['copy_fraction']):.0f}",
                 f"{float(row['same_bytes_copy_us']):.2f}"]
        for peer in peers:
            other = series[peer].get(tokens)
            peer_us = None if other is None else float(other["median_us"])
            cells.append("" if peer_us is None else f"{peer_us:.1f} ({peer_us / ours_us:.1f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, heads: int = 128, pairing: str = "gptj") -> None:
    """Time and fraction of copy bandwidth vs tokens, one line per provider (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows, heads, pairing)
    fig, (time_ax, bw_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for name, points in sorted(series.items()):
        tokens = sorted(points)
        time_ax.plot(tokens, [float(points[t]["median_us"]) for t in tokens], "o-", label=name)
        bw_ax.plot(tokens, [100 * float(points[t]["copy_fraction"]) for t in tokens], "o-",
                   label=name)
    gpu = next(iter(next(iter(series.values())).values()))["gpu"]
    for ax in (time_ax, bw_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (decode: one per request; prefill: few requests)")
        ax.grid(True, which="both", alpha=0.3)
    time_ax.set_yscale("log")
    time_ax.set_ylabel("µs per call (cold L2, median)")
    bw_ax.set_ylabel("% of device-to-device copy bandwidth")
    bw_ax.axhline(90, color="gray", linestyle="--", linewidth=1)
    time_ax.legend(fontsize=8)
    fig.suptitle(f"MLA fused RoPE + RMSNorm prologue, {heads} q heads, {pairing}, bf16 — {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
