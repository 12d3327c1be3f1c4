"""The README's performance tables, one per GPU, from ``results/headline.csv``.

Each row of the headline CSV is one figure of tvm-fused beside a peer measured in the same run
(or, where ``peer_note`` says so, another run on the same GPU model), copied from the result
file it names (``source``): the GPU, the date and revision, what was timed, the timing
("graph": GPU µs per call of calls back to back in one CUDA graph; "cold": one call on a cold
L2, with the share of the copy bandwidth where measured), both times and the peer's name.
``render`` turns them into markdown, one table per GPU in the order the GPUs first appear;
``update_readme`` rewrites the README's block between ``BEGIN`` and ``END`` with it (``python
-m benchmarks report --headline results/headline.csv --readme README.md``), and a test keeps
the README equal to it.
"""

from __future__ import annotations

import csv
from pathlib import Path

BEGIN = "<!-- headline tables: python -m benchmarks report --headline -->"
END = "<!-- end of headline tables -->"
COLUMNS = ("gpu", "date", "revision", "copy_tb_s", "what", "heads", "tokens", "timing",
           "tvm_fused_us", "tvm_pct_copy", "peer", "peer_us", "peer_pct_copy", "peer_note",
           "source")


def read(path: Path) -> list[dict]:
    """The rows of a headline CSV; ValueError if a column is missing."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = set(COLUMNS) - set(rows[0] if rows else COLUMNS)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return rows


def _time(us: str, pct: str) -> str:
    """``us`` µs, with its share of the copy bandwidth if given."""
    return f"{float(us):.2f}" + (f" ({float(pct):.0f}% of copy)" if pct else "")


def _row(row: dict) -> str:
    ratio = float(row["peer_us"]) / float(row["tvm_fused_us"])
    timing = "graph" if row["timing"] == "graph" else "cold"
    note = f" ({row['peer_note']})" if row["peer_note"] else ""
    cells = [row["what"], f"{row['heads']}, {row['tokens']}", timing,
             _time(row["tvm_fused_us"], row["tvm_pct_copy"]),
             f"{row['peer']} {_time(row['peer_us'], row['peer_pct_copy'])}{note}",
             f"{ratio:.2f}x", f"{row['date']}, {row['revision']}", f"`{row['source']}`"]
    return "| " + " | ".join(cells) + " |"


def render(rows: list[dict]) -> str:
    """One markdown table per GPU (ratio: the peer's time over tvm-fused's; above 1,
    tvm-fused is faster)."""
    parts = []
    for gpu in dict.fromkeys(row["gpu"] for row in rows):
        mine = [row for row in rows if row["gpu"] == gpu]
        copies = sorted({row["copy_tb_s"] for row in mine if row["copy_tb_s"]})
        parts += [f"**{gpu}** (device copy {' / '.join(copies)} TB/s in the runs below)", "",
                  "| what | heads, tokens | timing | tvm-fused µs | peer µs | ratio "
                  "| date, revision | source |",
                  "| --- | --- | --- | ---: | --- | ---: | --- | --- |",
                  *(_row(row) for row in mine), ""]
    return "\n".join(parts)


def _block(text: str) -> tuple[int, int]:
    """Where the headline block's content lies in ``text`` (between the markers)."""
    return text.index(BEGIN) + len(BEGIN), text.index(END)


def update_readme(readme: Path, rows: list[dict]) -> bool:
    """Rewrite ``readme``'s headline block with ``render(rows)``; whether it changed."""
    text = readme.read_text()
    start, end = _block(text)
    new = text[:start] + "\n\n" + render(rows) + "\n" + text[end:]
    readme.write_text(new)
    return new != text


def readme_block(readme: Path) -> str:
    """The README's headline block as it stands (what ``update_readme`` writes)."""
    text = readme.read_text()
    start, end = _block(text)
    return text[start:end].strip("\n")
