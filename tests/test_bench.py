"""The benchmark suite's inputs (CPU) and one small suite run end to end (GPU)."""

import pytest
import torch

from benchmarks.suite import DECODE_MAX, sweep_inputs
from tvm_fused.compiler.config import OpConfig


@pytest.mark.parametrize("tokens", [1, DECODE_MAX])
def test_decode_sizes_are_one_token_per_long_request(tokens):
    inputs = sweep_inputs(OpConfig(num_q_heads=2), tokens, device="cpu")
    offsets = inputs.input_row_offsets.to(torch.int64)
    assert offsets.tolist() == list(range(tokens + 1))
    assert int(inputs.cache_lengths.min()) >= 1024
    assert inputs.q_rope.stride(1) > inputs.q_rope.shape[2]  # the rope view of a full q


def test_prefill_sizes_are_few_long_requests():
    inputs = sweep_inputs(OpConfig(num_q_heads=2), 4096, device="cpu")
    counts = (inputs.input_row_offsets[1:].to(torch.int64)
              - inputs.input_row_offsets[:-1].to(torch.int64))
    assert int(counts.sum()) == 4096 and len(counts) <= 8 and int(counts.min()) >= 512


PROVIDERS = ("tvm-fused default", "torch.compile", "torch eager")


@pytest.mark.gpu
def test_small_suite_checks_and_times_every_provider(tmp_path):
    from benchmarks.report import read_rows
    from benchmarks.suite import run_suite

    csv = tmp_path / "bench.csv"
    rows, failures = run_suite([(4, True, (1, 2048), PROVIDERS)],
                               OpConfig(), csv, reps=5, log=lambda _: None)
    assert not failures
    assert {(r.provider, r.tokens) for r in rows} == {
        (p, t) for p in PROVIDERS for t in (1, 2048)}
    assert all(r.checked and r.median_us > 0 and r.copy_fraction > 0 for r in rows)
    assert len(read_rows(csv)) == len(rows) == 2 * len(PROVIDERS)
