"""The command line: instant help, one-line errors for bad options, the main job on the CPU;
the package's lazy exports."""

import subprocess
import sys

import pytest
import torch


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tvm_fused", *args], capture_output=True,
                          text=True, check=False, timeout=600)


def test_help_loads_neither_torch_nor_tvm():
    code = ("import sys\nfrom tvm_fused.__main__ import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'tvm' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "run " in run.stdout and run.stdout.strip().endswith("False False")


def test_lazy_exports_resolve_once():
    """An export is imported on first use and then kept on the package: a call through
    ``tvm_fused.fused_rope_rmsnorm`` must not pay the import machinery every time (it cost
    about 3 µs of host time per call)."""
    code = ("import tvm_fused\nassert 'fused_rope_rmsnorm' not in vars(tvm_fused)\n"
            "f = tvm_fused.fused_rope_rmsnorm\n"
            "assert vars(tvm_fused)['fused_rope_rmsnorm'] is f\nprint('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert run.stdout.strip() == "ok", run.stderr


BAD = [
    (("run", "--heads", "0"), "num_q_heads must be positive"),
    (("source", "--page-size", "24"), "page_size must be a power of two"),
    (("source", "--arch", "sm_xx"), "--arch must look like"),
    (("fuzz", "--cases", "0"), "must be a positive integer"),
    (("run", "--requests", "-3"), "--requests: must be a positive integer"),
    (("source", "--write-through", "--cache-dtype", "float8_e4m3fn", "--arch", "sm_80"),
     "fp8 caches and queries need sm_89 or newer"),
    (("source", "--cache-format", "fp8_ds_mla", "--write-through", "--arch", "sm_86"),
     "fp8 caches and queries need sm_89 or newer"),
]
if not torch.cuda.is_available():
    BAD.append((("run", "--device", "cuda"), "no CUDA GPU is available"))


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_is_one_line(args, message):
    run = _cli(*args)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


def test_run_checks_the_kernel_on_the_cpu():
    run = _cli("run", "--device", "cpu", "--heads", "2", "--tokens", "5", "--page-size", "4")
    assert run.returncode == 0, run.stderr
    assert "worst error / tolerance" in run.stdout and "-> PASS" in run.stdout


def test_run_checks_the_engine_form_on_the_cpu():
    run = _cli("run", "--device", "cpu", "--heads", "2", "--tokens", "5", "--page-size", "4",
               "--slots", "--split-table", "--norm-once", "--write-through", "--cache-dtype",
               "float8_e4m3fn")
    assert run.returncode == 0, run.stderr
    assert "addressed by slots, split cos/sin table" in run.stdout and "-> PASS" in run.stdout
