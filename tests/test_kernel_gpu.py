"""The CUDA kernel against the float64 reference, and its serving-stack behaviour."""

import pytest
import torch

from tvm_fused import fused_rope_rmsnorm
from tvm_fused.schedules import ScheduleConfig
from tvm_fused.testing.compare import check_run, run_and_check
from tvm_fused.testing.inputs import make_inputs

from .cases import (
    BAD_INDICES,
    FORMS,
    MATRIX,
    MATRIX_IDS,
    PREFILL,
    RAGGED,
    bad_index_inputs,
    check_matrix_case,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("index", range(len(MATRIX)), ids=MATRIX_IDS)
def test_matrix(index):
    """The CPU matrix, on the GPU."""
    report = check_matrix_case(index, "cuda")
    assert report.ok, report.summary()


@pytest.mark.parametrize("tokens", [0, 1, 7, 4096, 20000])
def test_token_counts(tokens):
    """Token counts from none to far more than one wave of blocks, 128 heads bf16."""
    requests = max(1, min(tokens, 13))
    new = [tokens // requests + (i < tokens % requests) for i in range(requests)]
    cached = [(97 * i) % 3000 for i in range(requests)]
    inputs = make_inputs(new, cached, padding_rows=3, seed=tokens, device="cuda")
    report = run_and_check(inputs, validate=True)
    assert report.ok, report.summary()


def test_side_stream():
    """The kernel runs on torch's current stream, after the work queued there: q_rope holds
    zeros until a copy queued behind a ~1 ms spin on the side stream fills it in, so a kernel
    launched on any other stream would rope the zeros and fail the check."""
    inputs = make_inputs(*PREFILL, num_q_heads=128, device="cuda")
    before = inputs.clone()
    values = inputs.q_rope.clone()
    inputs.q_rope.zero_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    out = torch.empty_like(inputs.q_rope)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)
        inputs.q_rope.copy_(values)
        result = fused_rope_rmsnorm(*inputs.args(), out=out)
    stream.synchronize()
    report = check_run(before, inputs, result)
    assert report.ok, report.summary()


def test_cuda_graph_replay_with_fewer_real_tokens():
    """Capture at a padded size, replay with new data and fewer real tokens: outputs right,
    padding rows and every other cache row untouched."""
    capture_rows = 24
    static = make_inputs([5, 9, 10], [3, 100, 250], num_q_heads=16, page_size=16,
                         device="cuda")
    out = torch.empty_like(static.q_rope)
    fused_rope_rmsnorm(*static.args(), out=out)  # builds the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_rope_rmsnorm(*static.args(), out=out)
    for seed, (new, cached) in enumerate([([2, 0, 7], [5, 6, 120]), ([1, 1, 1], [0, 15, 16]),
                                          ([8, 8, 8], [200, 1, 33])]):
        fresh = make_inputs(new, cached, num_q_heads=16, page_size=16,
                            padding_rows=capture_rows - sum(new), seed=seed + 1)
        # same tensors as captured, new contents (the cache keeps its shape and pages)
        static.q_rope.copy_(fresh.q_rope)
        static.input_row_offsets.copy_(fresh.input_row_offsets)
        static.cache_lengths.copy_(fresh.cache_lengths)
        static.lookup_table.zero_()
        static.lookup_table[:, :fresh.lookup_table.shape[1]].copy_(
            fresh.lookup_table[:, :static.lookup_table.shape[1]])
        static.lookup_table.clamp_(min=0)
        before = static.clone()
        out.normal_()
        out_before = out.clone()
        graph.replay()
        torch.cuda.synchronize()
        report = check_run(before, static, out, out_before)
        assert report.ok, report.summary()


# the cache row's rope on the norm's blocks: one warp per row (a row's rope on its first 8
# threads), rows of four warps (the rope's 32 narrow lanes on the first), two rows per thread
# in a persistent grid whose blocks stride over several chunks
K_ROPE_IN_NORM_GROUP = [
    ScheduleConfig(k_rope_in_norm_group=True),
    ScheduleConfig(block_threads=256, norm_threads_per_row=128, vector_bytes=4,
                   k_rope_in_norm_group=True, norm_first=True),
    ScheduleConfig(norm_rows_per_thread=2, grid_blocks=3, k_rope_in_norm_group=True),
]
K_ROPE_IN_NORM_GROUP_IDS = ["k-rope-in-norm-group", "k-rope-in-wide-rows",
                            "k-rope-in-persistent-two-rows"]
SCHEDULES = [
    ScheduleConfig(block_threads=64, norm_threads_per_row=32, vector_bytes=4),
    ScheduleConfig(block_threads=256, norm_threads_per_row=32, rope_vectors_per_thread=2,
                   norm_rows_per_thread=2, unroll=False),
    ScheduleConfig(block_threads=512, norm_threads_per_row=128, vector_bytes=8,
                   rope_vectors_per_thread=4),
    ScheduleConfig(rope_vectors_per_thread=2, norm_first=True),
    # persistent grids small enough that every block strides over several chunks, and
    # blocks of different groups end their strides on different tails
    ScheduleConfig(grid_blocks=3),
    ScheduleConfig(block_threads=256, rope_vectors_per_thread=2, norm_rows_per_thread=2,
                   grid_blocks=5, norm_first=True),
    *K_ROPE_IN_NORM_GROUP,
]


@pytest.mark.parametrize("schedule", SCHEDULES,
                         ids=["narrow", "two-warp-rows", "wide", "norm-first-two-vectors",
                              "persistent", "persistent-two-rows", *K_ROPE_IN_NORM_GROUP_IDS])
@pytest.mark.parametrize("heads, interleaved", [(128, True), (128, False), (1, False)],
                         ids=["v3", "v3-neox", "one-head-neox"])
def test_schedule_variants(schedule, heads, interleaved):
    """Knob values the tuner may pick: shared-memory row reductions, several rows or heads
    per thread, narrow vectors."""
    inputs = make_inputs(*RAGGED, num_q_heads=heads, page_size=16, padding_rows=2,
                         device="cuda")
    report = run_and_check(inputs, interleaved=interleaved, schedule=schedule)
    assert report.ok, report.summary()


@pytest.mark.parametrize("schedule", K_ROPE_IN_NORM_GROUP, ids=K_ROPE_IN_NORM_GROUP_IDS)
@pytest.mark.parametrize("form", ["write-through", "fp8-e4m3", "fp8-e5m2-scaled"])
def test_k_rope_in_norm_group_writes_through(form, schedule):
    """The cache rows' shared group in the write-through form: rows from kv_input into bf16
    or fp8 caches, and to kv_output."""
    inputs = make_inputs(*RAGGED, num_q_heads=16, page_size=16, padding_rows=2,
                         device="cuda", **FORMS[form])
    report = run_and_check(inputs, schedule=schedule)
    assert report.ok, report.summary()


@pytest.mark.parametrize("case", BAD_INDICES)
@pytest.mark.parametrize("form", ["in-place", "fp8-e5m2-scaled"])
def test_k_rope_in_norm_group_skips_bad_indices(form, case):
    """Both bodies of the shared group skip a token that points nowhere, and it is counted
    once."""
    corrupt, errors = BAD_INDICES[case]
    inputs = bad_index_inputs("cuda", form)
    corrupt(inputs)
    report = run_and_check(inputs, validate=False, schedule=K_ROPE_IN_NORM_GROUP[0])
    assert report.ok and report.errors_expected == errors, report.summary()
