"""scripts/bench_decode_layers.py (a GPU benchmark): its options, and one untimed step of
each form on the CPU (the shapes of the layers and the provider calls)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_decode_layers as bench


def test_options():
    args = bench.parse_args(["--quick"])
    assert args.tokens == (1, 64) and args.layers == 61
    configs = bench.configs(bench.parse_args(["--cache", "auto,fp8", "--tokens", "8"]))
    assert {(c.cache, c.form) for c in configs} == {("auto", "write-through"),
                                                    ("auto", "in-place"),
                                                    ("fp8", "write-through")}
    with pytest.raises(SystemExit):
        bench.parse_args(["--providers", "nope"])


def test_a_step_runs_on_the_cpu(capsys):
    assert bench.main(["--device", "cpu", "--layers", "2", "--tokens", "1", "--heads", "16",
                       "--cache", "auto"]) == 0
    assert "GPU:" not in capsys.readouterr().out
