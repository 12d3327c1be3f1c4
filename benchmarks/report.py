"""Benchmark CSV -> markdown tables with speedups over each peer, and PNG plots.

Reads the rows ``benchmarks.suite`` writes (one per provider, form and token count) and needs
no GPU, so the plots can be drawn where matplotlib is installed. Rows are grouped by the
form of the op they ran (in place or write-through, the cache's dtype, whether
``kv_output`` was written); CSVs written before the forms existed hold in-place rows.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import defaultdict
from pathlib import Path

OURS = "tvm-fused default"


@dataclasses.dataclass(frozen=True)
class Group:
    """One form of the op: ``form`` ("in-place", "write-through"), the cache's dtype (None:
    q's dtype), and whether ``kv_output`` was written too."""

    form: str = "in-place"
    cache_dtype: str | None = None
    kv_output: bool = False

    @classmethod
    def of(cls, row: dict) -> Group:
        """The group of a CSV row (a row without form columns: in place)."""
        cache = row.get("cache_dtype") or row["dtype"]
        return cls(row.get("form") or "in-place", None if cache == row["dtype"] else cache,
                   row.get("kv_output") == "True")

    def label(self, dtype: str) -> str:
        """E.g. "write-through, float8_e4m3fn cache" for q's ``dtype``."""
        return (f"{self.form}, {self.cache_dtype or dtype} cache"
                + (", + kv_output" if self.kv_output else ""))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def groups(rows: list[dict]) -> list[Group]:
    """The groups of ``rows``, in the order they first appear."""
    return list(dict.fromkeys(Group.of(row) for row in rows))


def series(rows: list[dict], heads: int, pairing: str,
           group: Group = Group()) -> dict[str, dict[int, dict]]:
    """provider -> tokens -> row, for one head count, pairing and group."""
    found = defaultdict(dict)
    for row in rows:
        if int(row["heads"]) == heads and row["pairing"] == pairing and Group.of(row) == group:
            found[row["provider"]][int(row["tokens"])] = row
    return found


def _steady(row: dict) -> float:
    """A row's steady-state GPU time per call in a graph (NaN: not measured, or a CSV from
    before the figure)."""
    return float(row.get("steady_us") or "nan")


def _cell(other: dict | None, ours: dict) -> str:
    """``other``'s time and its ratio to ours (``other / ours``), then its steady-state time
    per call and ratio where both were measured; or empty."""
    if other is None:
        return ""
    other_us, ours_us = float(other["median_us"]), float(ours["median_us"])
    cell = f"{other_us:.1f} ({other_us / ours_us:.2f}x)"
    steady, ours_steady = _steady(other), _steady(ours)
    if not (math.isnan(steady) or math.isnan(ours_steady)):
        cell += f"; steady {steady:.2f} ({steady / ours_steady:.2f}x)"
    return cell


def markdown_table(rows: list[dict], heads: int = 128, pairing: str = "gptj",
                   group: Group = Group(), ours: str = OURS) -> str:
    """Per token count, for ``group``: our time (from Python, replayed in a CUDA graph one
    call per graph, per call of many back to back in one graph, host time of the call),
    bandwidth, fraction of the large-copy bandwidth, the time of a device
    copy of as many bytes, every peer's time, and our time in each other group of ``rows``
    (same heads and pairing), each with its ratio to ours (``other / ours``: above 1, ours
    is faster); empty without rows of ``ours``."""
    found = series(rows, heads, pairing, group)
    if ours not in found:
        return ""
    peers = [found[name] for name in found if name != ours]
    others = [(g, series(rows, heads, pairing, g).get(ours)) for g in groups(rows) if g != group]
    others = [(g, points) for g, points in others if points]
    first = next(iter(found[ours].values()))
    dtype = first["dtype"]
    header = ["tokens", f"{ours} µs", "graph µs", "steady µs", "host µs", "TB/s",
              "% of copy", "same-bytes copy µs (x)"]
    header += [f"{name} µs (x)" for name in found if name != ours]
    header += [f"{ours}, {g.label(dtype)} µs (x)" for g, _ in others]
    lines = [f"{first['gpu']}, {heads} heads, {pairing}, {dtype}, {group.label(dtype)}, "
             "cold L2, median of CUDA-event runs",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tokens, row in sorted(found[ours].items()):
        ours_us = float(row["median_us"])
        graph, host = float(row["graph_us"]), float(row["host_us"])
        copy = float(row["same_bytes_copy_us"])
        steady = _steady(row)
        cells = [str(tokens), f"{ours_us:.2f}", "" if math.isnan(graph) else f"{graph:.2f}",
                 "" if math.isnan(steady) else f"{steady:.2f}",
                 "" if math.isnan(host) else f"{host:.1f}", f"{float(row['tb_per_s']):.2f}",
                 f"{100 * float(row['copy_fraction']):.0f}",
                 f"{copy:.2f} ({copy / ours_us:.2f}x)"]
        cells += [_cell(points.get(tokens), row) for points in peers]
        cells += [_cell(points.get(tokens), row) for _, points in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_path(path: Path, group: Group) -> Path:
    """Where ``group``'s plot goes: ``path`` for the in-place form in q's dtype, else a name
    beside it that says the group."""
    if group == Group():
        return path
    suffix = f"-{group.form}-{group.cache_dtype or 'same'}" + ("-kv_output" * group.kv_output)
    return path.with_name(path.stem + suffix + path.suffix)


def plot(rows: list[dict], path: Path, heads: int = 128, pairing: str = "gptj",
         group: Group = Group()) -> None:
    """Time and fraction of copy bandwidth vs tokens, one line per provider (log-log), for
    one group; ``ValueError`` if it has no rows."""
    found = series(rows, heads, pairing, group)
    if not found:
        raise ValueError(f"no rows of {heads} heads, {pairing}, {group}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, bw_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for name, points in sorted(found.items()):
        tokens = sorted(points)
        time_ax.plot(tokens, [float(points[t]["median_us"]) for t in tokens], "o-", label=name)
        bw_ax.plot(tokens, [100 * float(points[t]["copy_fraction"]) for t in tokens], "o-",
                   label=name)
    first = next(iter(next(iter(found.values())).values()))
    for ax in (time_ax, bw_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (decode: one per request; prefill: few requests)")
        ax.grid(True, which="both", alpha=0.3)
    time_ax.set_yscale("log")
    time_ax.set_ylabel("µs per call (cold L2, median)")
    bw_ax.set_ylabel("% of device-to-device copy bandwidth")
    bw_ax.axhline(90, color="gray", linestyle="--", linewidth=1)
    time_ax.legend(fontsize=8)
    fig.suptitle(f"MLA fused RoPE + RMSNorm prologue, {heads} q heads, {pairing}, "
                 f"{first['dtype']}, {group.label(first['dtype'])} — {first['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
