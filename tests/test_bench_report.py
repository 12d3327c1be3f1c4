"""The benchmark report: speedup tables and plots from a CSV of bench rows (no GPU needed),
grouped by the form of the op."""

import csv
import dataclasses
from pathlib import Path

import pytest

from benchmarks import headline
from benchmarks.__main__ import main
from benchmarks.report import Group, groups, markdown_table, plot, plot_path, read_rows

WRITE_THROUGH = Group("write-through")
FP8 = Group("write-through", "float8_e4m3fn")


@dataclasses.dataclass
class _Row:
    """A row as the suite writes it (before the forms: without the form columns)."""

    provider: str
    tokens: int
    median_us: float
    heads: int = 128
    pairing: str = "gptj"
    gpu: str = "Test GPU"
    dtype: str = "bfloat16"
    graph_us: float = float("nan")
    host_us: float = float("nan")
    tb_per_s: float = 1.0
    copy_fraction: float = 0.5
    same_bytes_copy_us: float = 3.0


@dataclasses.dataclass
class _FormRow(_Row):
    form: str = "in-place"
    cache_dtype: str = "bfloat16"
    kv_output: bool = False


@dataclasses.dataclass
class _SteadyRow(_FormRow):
    steady_us: float = float("nan")


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(rows[0])])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)


@pytest.fixture
def bench_csv(tmp_path):
    """Rows from before the forms: in place."""
    path = tmp_path / "bench.csv"
    _write(path, [_Row("tvm-fused default", 1, 4.0), _Row("torch eager", 1, 120.0),
                  _Row("tvm-fused default", 4096, 50.0), _Row("torch eager", 4096, 1000.0),
                  _Row("tvm-fused default", 4096, 9.0, heads=16)])
    return path


@pytest.fixture
def forms_csv(tmp_path):
    """One token count in place, write-through into bf16 and fp8, the same provider names."""
    path = tmp_path / "forms.csv"
    wt, fp8 = {"form": "write-through"}, {"form": "write-through",
                                           "cache_dtype": "float8_e4m3fn"}
    _write(path, [_FormRow("tvm-fused default", 4096, 50.0, same_bytes_copy_us=48.0),
                  _FormRow("torch eager", 4096, 1000.0),
                  _FormRow("tvm-fused default", 4096, 40.0, same_bytes_copy_us=38.0, **wt),
                  _FormRow("copy + tvm-fused in-place", 4096, 80.0, **wt),
                  _FormRow("torch eager", 4096, 900.0, **wt),
                  _FormRow("tvm-fused default", 4096, 32.0, **fp8),
                  _FormRow("torch eager", 4096, 960.0, **fp8)])
    return path


def _line(table: str, tokens: int) -> str:
    [line] = [line for line in table.splitlines() if line.startswith(f"| {tokens} ")]
    return line


def test_table_gives_speedup_over_each_peer(bench_csv):
    table = markdown_table(read_rows(bench_csv), heads=128)
    assert "120.0 (30.00x)" in _line(table, 1) and "1000.0 (20.00x)" in _line(table, 4096)
    assert "Test GPU" in table and "| 9.00 |" not in table  # 16-head rows stay out
    assert "in-place, bfloat16 cache" in table


def test_table_gives_the_steady_state_figure_of_each_provider(tmp_path):
    """At decode sizes the steady-state time per call (many calls in one graph) stands next
    to the cold one, ours in a column, each peer's in its cell with its ratio."""
    path = tmp_path / "steady.csv"
    _write(path, [_SteadyRow("tvm-fused default", 1, 4.0, steady_us=1.5),
                  _SteadyRow("triton fused", 1, 6.0, steady_us=2.25),
                  _SteadyRow("tvm-fused default", 4096, 50.0),
                  _SteadyRow("triton fused", 4096, 80.0)])
    table = markdown_table(read_rows(path), heads=128)
    assert "steady µs" in table
    assert "| 1.50 |" in _line(table, 1) and "6.0 (1.50x); steady 2.25 (1.50x)" in _line(table, 1)
    assert "steady" not in _line(table, 4096) and "80.0 (1.60x) |" in _line(table, 4096)


def test_rows_before_the_forms_are_in_place(bench_csv):
    rows = read_rows(bench_csv)
    assert groups(rows) == [Group()]
    assert markdown_table(rows, heads=128, group=WRITE_THROUGH) == ""


def test_tables_keep_each_form_apart(forms_csv):
    rows = read_rows(forms_csv)
    assert groups(rows) == [Group(), WRITE_THROUGH, FP8]
    table = markdown_table(rows, group=WRITE_THROUGH)
    line = _line(table, 4096)
    assert "write-through, bfloat16 cache" in table.splitlines()[0]
    assert line.startswith("| 4096 | 40.00 |")
    assert "38.00 (0.95x)" in line  # the same-bytes copy against ours
    assert "80.0 (2.00x)" in line and "900.0 (22.50x)" in line  # this form's peers only
    assert "1000.0" not in line and "960.0" not in line
    header = table.splitlines()[2]
    assert "tvm-fused default, in-place, bfloat16 cache µs (x)" in header
    assert "tvm-fused default, write-through, float8_e4m3fn cache µs (x)" in header
    assert "50.0 (1.25x)" in line and "32.0 (0.80x)" in line  # ours in the other forms


def test_report_prints_a_table_per_form(forms_csv, capsys):
    assert main(["report", str(forms_csv), "--heads", "128"]) == 0
    titles = [line for line in capsys.readouterr().out.splitlines() if "cold L2" in line]
    assert [title.split(", ")[4] for title in titles] == [
        "in-place", "write-through", "write-through"]
    assert "float8_e4m3fn cache" in titles[2]


def test_plot_paths_name_the_form():
    png = Path("out/run.png")
    assert plot_path(png, Group()) == png
    assert plot_path(png, FP8) == Path("out/run-write-through-float8_e4m3fn.png")
    assert plot_path(png, Group("write-through", None, True)) == Path(
        "out/run-write-through-same-kv_output.png")


def test_plot_writes_a_png(bench_csv, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    plot(read_rows(bench_csv), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_plots_each_form(forms_csv, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "forms.png"
    assert main(["report", str(forms_csv), "--png", str(png)]) == 0
    for group in (Group(), WRITE_THROUGH, FP8):
        assert plot_path(png, group).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


HEADLINE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "headline.csv"
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_are_the_headline_csv_rendered():
    """The README's performance tables are what the report command makes of the committed
    headline CSV (one table per GPU), and each row's source file is in the repository."""
    rows = headline.read(HEADLINE)
    assert headline.readme_block(README) == headline.render(rows).strip("\n")
    assert {row["gpu"] for row in rows} >= {"NVIDIA H200", "NVIDIA H100 80GB HBM3"}
    for row in rows:
        assert (README.parent / row["source"]).exists(), row["source"]


def test_headline_report_rewrites_only_its_block(tmp_path, capsys):
    rows = [dict(gpu="GPU A", date="2026-12-07", revision="abc1234", copy_tb_s="3.00",
                 what="decode, in place", heads="128", tokens="1", timing="graph",
                 tvm_fused_us="2.00", tvm_pct_copy="", peer="Triton fused", peer_us="3.00",
                 peer_pct_copy="", peer_note="", source="x.csv"),
            dict(gpu="GPU B", date="2026-12-07", revision="abc1234", copy_tb_s="4.00",
                 what="in place", heads="16", tokens="32768", timing="cold",
                 tvm_fused_us="100", tvm_pct_copy="90.4", peer="Triton fused", peer_us="90",
                 peer_pct_copy="99.0", peer_note="another run", source="y.csv")]
    path = tmp_path / "headline.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=headline.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{headline.BEGIN}\nstale rows\n{headline.END}\n\nafter\n")
    assert main(["report", str(path), "--headline", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith(f"{headline.END}\n\nafter\n")
    assert "stale rows" not in text and text.index("**GPU A**") < text.index("**GPU B**")
    assert "| 2.00 | Triton fused 3.00 | 1.50x |" in text
    assert "100.00 (90% of copy) | Triton fused 90.00 (99% of copy) (another run) | 0.90x" in text
    assert main(["report", str(path), "--headline", "--readme", str(readme)]) == 0
    assert "unchanged" in capsys.readouterr().out
