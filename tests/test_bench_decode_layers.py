"""scripts/bench_decode_layers.py (a GPU benchmark): its options, and one untimed step of
each form on the CPU (the shapes of the layers and the provider calls)."""

import re
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


def test_a_peer_that_is_not_installed_is_skipped_with_a_note(monkeypatch, capsys):
    """Without Liger, vLLM's chain is left out (a note says why), not a traceback."""
    found = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name: None if name == "liger_kernel" else found(name))
    args = bench.parse_args(["--quick"])
    assert "vllm steps in triton" not in args.providers and "tvm-fused" in args.providers
    assert re.search(r"skipping 'vllm steps in triton': (triton, )?liger_kernel not installed",
                     capsys.readouterr().err)


CPU_STEP = ["--device", "cpu", "--layers", "2", "--tokens", "3", "--heads", "16"]


@pytest.mark.parametrize("cache", ["auto", "fp8"])
def test_a_step_runs_and_checks_on_the_cpu(cache, capsys):
    """Each tvm-fused provider's step, every form (fp8: write-through only), checked in
    every layer against the float64 reference."""
    assert bench.main([*CPU_STEP, "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "GPU:" not in out and "FAILED" not in out
    forms = ("write-through",) if cache == "fp8" else bench.FORMS
    checked = {(line.split("|")[0].split()[-1], line.split("|")[1].split(" check")[0].strip())
               for line in out.splitlines() if "check of 2 layers ok" in line}
    assert checked == {(form, provider) for form in forms for provider in bench.PDL}


@pytest.mark.parametrize("form", ["in-place", "write-through"])
def test_a_wrong_provider_fails_the_check(form, monkeypatch, capsys):
    """A tvm-fused that does nothing: q unroped (and write-through, no cache rows)."""
    monkeypatch.setattr(bench, "fused_rope_rmsnorm_slots", lambda *args, **kwargs: None)
    assert bench.main([*CPU_STEP, "--cache", "auto", "--forms", form,
                       "--providers", "tvm-fused"]) == 1
    assert "FAILED in layers [0, 1]" in capsys.readouterr().out
