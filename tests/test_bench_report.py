"""The benchmark report: speedup table and plot from a CSV of bench rows (no GPU needed)."""

import csv
import dataclasses

import pytest

from benchmarks.report import markdown_table, plot, read_rows


@dataclasses.dataclass
class _Row:
    provider: str
    tokens: int
    median_us: float
    heads: int = 128
    pairing: str = "gptj"
    gpu: str = "Test GPU"
    graph_us: float = float("nan")
    host_us: float = float("nan")
    tb_per_s: float = 1.0
    copy_fraction: float = 0.5
    same_bytes_copy_us: float = 3.0


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(_Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)


@pytest.fixture
def bench_csv(tmp_path):
    path = tmp_path / "bench.csv"
    _write(path, [_Row("tvm-fused default", 1, 4.0), _Row("torch eager", 1, 120.0),
                  _Row("tvm-fused default", 4096, 50.0), _Row("torch eager", 4096, 1000.0),
                  _Row("tvm-fused default", 4096, 9.0, heads=16)])
    return path


def test_table_gives_speedup_over_each_peer(bench_csv):
    table = markdown_table(read_rows(bench_csv), heads=128)
    lines = [line for line in table.splitlines() if line.startswith(("| 1 ", "| 4096 "))]
    assert "120.0 (30.0x)" in lines[0] and "1000.0 (20.0x)" in lines[1]
    assert "Test GPU" in table and "| 9.00 |" not in table  # 16-head rows stay out


def test_plot_writes_a_png(bench_csv, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    plot(read_rows(bench_csv), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
