"""Concurrent use: threads and streams with separate caches, and racing first builds."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from tvm_fused.testing.compare import run_and_check
from tvm_fused.testing.inputs import make_inputs

from .cases import DECODE, PREFILL, RAGGED


def _cases(device):
    return [make_inputs(*case, num_q_heads=heads, page_size=16, seed=i, device=device)
            for i, (case, heads) in enumerate([(RAGGED, 4), (DECODE, 16), (PREFILL, 4),
                                               (RAGGED, 16)] * 2)]


def _run_threads(cases, run):
    reports, errors = [None] * len(cases), []

    def work(i):
        try:
            reports[i] = run(cases[i])
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return reports


def test_threads_with_separate_caches_cpu():
    reports = _run_threads(_cases("cpu"), run_and_check)
    assert all(r.ok for r in reports), [r.summary() for r in reports if not r.ok]


@pytest.mark.gpu
def test_threads_on_separate_streams_gpu():
    def on_own_stream(inputs):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            report = run_and_check(inputs)
        stream.synchronize()
        return report

    reports = _run_threads(_cases("cuda"), on_own_stream)
    assert all(r.ok for r in reports), [r.summary() for r in reports if not r.ok]


FIRST_USE = textwrap.dedent("""
    from tvm_fused.testing.compare import run_and_check
    from tvm_fused.testing.inputs import make_inputs
    report = run_and_check(make_inputs([3, 2], [1, 17], num_q_heads=3, page_size=8))
    assert report.ok, report.summary()
""")


def test_first_builds_racing_in_two_processes(tmp_path):
    """Both processes build the same kernel into one cache directory at once: both succeed,
    and the cache holds one complete, loadable library (written under a temporary name and
    renamed into place)."""
    env = dict(os.environ, TVM_FUSED_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    assert len(list(tmp_path.glob("*/*.so"))) == 1
    assert not list(tmp_path.glob("*/*.tmp*"))
    rerun = subprocess.run([sys.executable, "-c", FIRST_USE], env=env, capture_output=True,
                           text=True, check=False)
    assert rerun.returncode == 0 and "rebuilding" not in rerun.stderr, rerun.stderr
