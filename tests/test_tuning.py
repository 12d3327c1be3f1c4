"""MetaSchedule tuning on the CPU: the space, a tiny end-to-end run, record handling, and
the staleness check of the committed records."""

import base64
import dataclasses
import json
import lzma
import os
import socket
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from tvm_fused import OP_NAME, Form, build, fused_rope_rmsnorm_func, timing
from tvm_fused.__main__ import main as cli_main
from tvm_fused.__main__ import parser as cli_parser
from tvm_fused.compiler.build import cuda_target, kernel_source
from tvm_fused.schedules import ScheduleConfig
from tvm_fused.schedules.config import DEFAULT_SCHEDULE, default_for_tokens
from tvm_fused.schedules.cpu import CpuScheduleConfig
from tvm_fused.schedules.space import (
    CPU_SPACE,
    GPU_SPACE,
    config_from_trace,
    sample_config,
    schedule_fn,
    single_changes,
)
from tvm_fused.testing.compare import check_run
from tvm_fused.testing.inputs import make_inputs
from tvm_fused.tuning import decisions, measure, records, summary
from tvm_fused.tuning.buckets import BUCKETS, DECODE_MAX, nearest_bucket
from tvm_fused.tuning.layout import CPU_DEVICE, default_logs_dir, records_dir, user_logs_dir
from tvm_fused.tuning.tune import RpcTarget, seed_configs, tune
from tvm_fused.tuning.workload import bucket_workload, workload_hash

from .cases import thinned

SPACE_OPS = (Form(num_q_heads=128), Form(num_q_heads=1, dtype="float32",
                                                 gamma_dtype="float32", interleaved=False),
             Form(num_q_heads=16, write_through=True, cache_dtype="float8_e4m3fn"))


@pytest.mark.parametrize("op", SPACE_OPS, ids=["v3-bf16", "one-head-fp32-neox",
                                               "write-through-fp8"])
@pytest.mark.parametrize("seed", thinned(range(1, 11), every=4))
def test_space_draws_only_valid_schedules(op, seed):
    """Any draw schedules, lowers to one CUDA kernel for the H100, and decodes back."""
    sch = s_tir.Schedule(fused_rope_rmsnorm_func(op), seed=seed)
    schedule_fn(op, GPU_SPACE)(sch)
    config = config_from_trace(sch.trace.as_json(), GPU_SPACE)
    assert config.block_threads % config.norm_threads_per_row == 0
    source = kernel_source(sch.mod, cuda_target())
    assert source.count("__global__ void") == 2
    assert f"__launch_bounds__({config.block_threads})" in source


@pytest.mark.parametrize("fixed", [ScheduleConfig(), ScheduleConfig(
    block_threads=256, norm_threads_per_row=32, vector_bytes=8, rope_vectors_per_thread=4,
    norm_rows_per_thread=2, unroll=False, grid_blocks=2048, k_rope_in_norm_group=True)])
def test_fixed_config_is_recorded_as_decisions(fixed):
    sch = s_tir.Schedule(fused_rope_rmsnorm_func(Form()))
    assert sample_config(sch, GPU_SPACE, fixed) == fixed
    assert config_from_trace(sch.trace.as_json(), GPU_SPACE) == fixed


@pytest.mark.slow
def test_single_changes_of_the_default_are_valid_draws():
    """The configs a tuning seeds after the default: each differs from it in one knob and is
    a draw of the space (its trace decodes back to it); none breaks a constraint."""
    base = ScheduleConfig(block_threads=128, norm_threads_per_row=128)
    changes = single_changes(GPU_SPACE, base)
    for config in changes:
        differ = [name for name in GPU_SPACE.knobs
                  if getattr(config, name) != getattr(base, name)]
        assert len(differ) == 1
        sch = s_tir.Schedule(fused_rope_rmsnorm_func(Form()))
        assert sample_config(sch, GPU_SPACE, config) == config
        assert config_from_trace(sch.trace.as_json(), GPU_SPACE) == config
    # 64-thread blocks cannot hold a 128-thread row; multi-warp rows take one row per thread
    # (nor a persistent grid)
    assert not any(c.block_threads == 64 for c in changes)
    assert all(c.norm_rows_per_thread == 1 and c.grid_blocks == 0 for c in changes)
    assert ScheduleConfig(block_threads=256, norm_threads_per_row=128) in changes
    assert ScheduleConfig(block_threads=128, norm_threads_per_row=32) in changes
    # blocks, rows, vectors, rope, unroll, order, the k rope's group, q_nope runs
    assert len(changes) == 2 + 2 + 2 + 2 + 1 + 1 + 1 + 3
    assert len(single_changes(GPU_SPACE, ScheduleConfig())) == (3 + 2 + 2 + 2 + 2 + 1 + 1 + 3
                                                                 + 1 + 3)


def test_seeds_are_the_default_the_earlier_decision_and_the_one_knob_changes():
    default = ScheduleConfig()
    changes = single_changes(GPU_SPACE, default)
    decided = ScheduleConfig(norm_threads_per_row=128, vector_bytes=8, unroll=False)
    assert seed_configs(GPU_SPACE, default, decided) == [default, decided, *changes]
    # a decision that is the default or one of its one-knob changes is measured once
    assert seed_configs(GPU_SPACE, default, default) == [default, *changes]
    assert seed_configs(GPU_SPACE, default, changes[3]) == [default, changes[3], *changes[:3],
                                                      *changes[4:]]
    assert seed_configs(GPU_SPACE, default, None) == [default, *changes]
    # a decision the space cannot draw (a value it no longer offers) is left out
    assert seed_configs(GPU_SPACE, default, ScheduleConfig(block_threads=96)) == [
        default, *changes]


def test_nearest_bucket():
    assert [nearest_bucket(n) for n in (1, 2, 3, 5, 20, 64, 100, 1000, 3000, 10**6)] == \
        [1, 1, 8, 8, 8, 64, 64, 512, 4096, 32768]  # geometric midpoints: 2.8, 22.6, ...


@pytest.mark.parametrize("op", [
    Form(num_q_heads=2), Form(num_q_heads=2, write_through=True),
    Form(num_q_heads=2, write_through=True, kv_output=True),
    Form(num_q_heads=2, write_through=True, cache_dtype="float8_e5m2"),
    Form(num_q_heads=2, write_through=True, kv_output=True, cache_dtype="float8_e4m3fn"),
    Form(num_q_heads=2, addressing="slots", positions_dtype="int32"),
    Form(num_q_heads=2, addressing="slots", write_through=True, freqs_layout="split",
         norm_rounding="once"),
    Form(num_q_heads=2, write_through=True, cache_format="fp8_ds_mla"),
    Form(num_q_heads=2, write_through=True, out_dtype="float8_e4m3fn"),
    Form(num_q_heads=2, write_through=True, cache_dtype="float8_e4m3fn",
         out_dtype="float8_e4m3fn", q_nope=True),
    Form(num_q_heads=2, addressing="slots", write_through=True, cache_format="fp8_ds_mla",
         out_dtype="float8_e5m2", q_nope=True)],
    ids=["in-place", "write-through", "kv-output", "fp8", "kv-output-fp8", "slots",
         "slots-write-through-split-once", "ds-mla", "fp8-query", "fp8-query-q-nope",
         "slots-ds-mla-fp8-query-q-nope"])
def test_runner_makes_the_forms_inputs(op):
    """The runner rebuilds a bucket's inputs for the form it is given (in another process,
    maybe remote), matching every shape and dtype of the workload's arguments."""
    args_info = [info.as_json() for info in ms.arg_info.ArgInfo.from_prim_func(
        bucket_workload(op, 8)["main"])]  # as the runner receives them
    tensors = measure._bucket_tensors(op, args_info, "cpu")
    assert len(tensors) == len(args_info)


def test_local_runner_reuses_a_buckets_inputs():
    """The runner makes a bucket's inputs once (seconds at prefill buckets) and reuses them
    for the bucket's next candidates; another bucket's replace them."""
    device = tvm.runtime.device("cpu", 0)
    op = Form(num_q_heads=2)

    def args_info(tokens):
        return [info.as_json() for info in ms.arg_info.ArgInfo.from_prim_func(
            bucket_workload(op, tokens)["main"])]

    first = measure.alloc_local(op, device, args_info(8), 1)
    assert measure.alloc_local(op, device, args_info(8), 1) is first
    other = measure.alloc_local(op, device, args_info(64), 1)
    assert other is not first and other[0][0].shape[0] == 64
    assert measure.alloc_local(op, device, args_info(8), 1) is not first  # made again


@pytest.mark.parametrize("tokens", [1, 64, 65, 4096])
def test_gpu_runner_times_decode_buckets_as_a_decode_step(tokens, monkeypatch):
    """On a GPU a decode bucket's candidate is timed as the suite's steady state (GPU time
    per call of 50 calls captured in one graph), a prefill bucket's as one cold call: each
    bucket is ranked by what an engine pays at its size."""
    timed = []

    def graph(fn, reps, calls):
        timed.append(("graph", reps, calls))
        return timing.Timing(100.0, 0.0, 0.0, reps)

    def cold(fn, reps):
        timed.append(("cold", reps))
        return timing.Timing(7.0, 0.0, 0.0, reps)

    monkeypatch.setattr(measure, "time_graph", graph)
    monkeypatch.setattr(measure, "time_cuda", cold)
    seconds = measure.gpu_seconds(lambda *args: None, [torch.empty(tokens, 2, 64)], runs=9)
    if tokens <= DECODE_MAX:
        assert timed == [("graph", 9, measure.STEADY_CALLS)]
        assert seconds == pytest.approx(100.0 / measure.STEADY_CALLS * 1e-6)
    else:
        assert timed == [("cold", 9)] and seconds == pytest.approx(7e-6)


@pytest.mark.slow
def test_tiny_llvm_tuning_end_to_end(tmp_path):
    """Tune two buckets on the CPU, read the records back, build with them, check; a second
    run resumes from the work database instead of tuning again."""
    op = Form(num_q_heads=2, dtype="float32", gamma_dtype="float32")
    logs, work = tmp_path / "logs", tmp_path / "work"
    lines = []
    dest = tune(op, tvm.target.Target("llvm"), buckets=(1, 8), trials=5, logs_dir=logs,
                work_dir=work, device_name=CPU_DEVICE, cost_model="random",
                builder_workers=2, log=lines.append)
    # the default and its 3 one-knob changes, then one random draw per bucket
    assert sum("default schedule" in line and "4 seeds measured" in line
               for line in lines) == 2
    assert sum("+1 measured" in line for line in lines) == 2
    metadata = json.loads((dest / records.METADATA).read_text())
    assert set(metadata["buckets"]) == {"1", "8"}
    assert all(entry["records"] == 5 for entry in metadata["buckets"].values())
    configs = decisions.read(dest, CpuScheduleConfig)
    assert set(configs) == {1, 8} and all(isinstance(c, CpuScheduleConfig)
                                          for c in configs.values())

    chosen = configs[nearest_bucket(6, tuple(configs))]
    kernel = build(op, "llvm", chosen)[OP_NAME]
    inputs = make_inputs([4, 2], [3, 9], num_q_heads=2, dtype=torch.float32)
    before = inputs.clone()
    out = torch.randn_like(inputs.q_rope)
    out_before = out.clone()  # out is its whole storage
    errors = torch.zeros(1, dtype=torch.int32)
    kernel(inputs.q_rope, out, *inputs.args()[1:], errors, 1e-6)
    assert check_run(before, inputs, out, out_before, errors_counted=int(errors)).ok

    lines.clear()
    tune(op, tvm.target.Target("llvm"), buckets=(1, 8), trials=5, logs_dir=logs, work_dir=work,
         device_name=CPU_DEVICE, cost_model="random", builder_workers=2,
         log=lines.append)
    assert sum("already: skipped" in line for line in lines) == 2

    # a run killed while writing leaves a truncated line: the next run drops it and goes on
    table = work / records.RECORDS
    table.write_text(table.read_text() + table.read_text().splitlines()[-1][:40])
    lines.clear()
    with pytest.warns(UserWarning, match="dropping malformed line"):
        tune(op, tvm.target.Target("llvm"), buckets=(1, 8), trials=6, logs_dir=logs,
             work_dir=work, device_name=CPU_DEVICE, cost_model="random",
             builder_workers=2, log=lines.append)
    metadata = json.loads((dest / records.METADATA).read_text())
    assert all(entry["records"] == 6 for entry in metadata["buckets"].values())

    # a retune from scratch measures the committed decision of a bucket right after its
    # default, in the same run (here one two knobs away, which no seed would try)
    decided = CpuScheduleConfig(tokens_per_task=16, parallel=False)
    decisions.write(dest, CPU_DEVICE, op, {1: decided, 8: configs[8]})
    lines.clear()
    tune(op, tvm.target.Target("llvm"), buckets=(1,), trials=2, logs_dir=logs,
         work_dir=tmp_path / "fresh", device_name=CPU_DEVICE, cost_model="random",
         builder_workers=2, log=lines.append)
    assert any("decided before:" in line and "2 seeds measured" in line for line in lines)


def test_a_form_without_decisions_is_named(tmp_path):
    """A form without decisions on a GPU gets the default, with a warning naming the GPU and
    the form's records folder (the kernel map asks once per form)."""
    tuned, untuned = Form(num_q_heads=3), Form(num_q_heads=3, addressing="slots")
    folder = records_dir(tmp_path, "Tuned GPU", tuned)
    folder.mkdir(parents=True)
    decisions.write(folder, "Tuned GPU", tuned, {1: DEFAULT_SCHEDULE})
    assert decisions.for_gpu("Tuned GPU", tuned, (tmp_path,)) == {1: DEFAULT_SCHEDULE}
    with pytest.warns(UserWarning, match=f"tuned-gpu/{untuned.key()}; using the default"):
        assert decisions.for_gpu("Tuned GPU", untuned, (tmp_path,)) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # narrower tensors than tuned: the default, silently
        assert decisions.for_gpu("Tuned GPU", Form(num_q_heads=3, alignment=8),
                                 (tmp_path,)) == {}


def test_a_64_bit_kernel_takes_its_32_bit_twins_decisions(tmp_path):
    """A form of 64-bit indices (tensors past 2^31 elements) without decisions of its own
    uses those of the same form in 32 bits; with its own, its own."""
    narrow = Form(num_q_heads=3)
    wide = dataclasses.replace(narrow, index_bits=64)
    own = dataclasses.replace(DEFAULT_SCHEDULE, block_threads=256)
    for form, config in ((narrow, DEFAULT_SCHEDULE), (wide, own)):
        folder = records_dir(tmp_path / form.key(), "Tuned GPU", form)
        folder.mkdir(parents=True)
        decisions.write(folder, "Tuned GPU", form, {1: config})
    assert decisions.for_gpu("Tuned GPU", wide, (tmp_path / narrow.key(),)) == {
        1: DEFAULT_SCHEDULE}
    assert decisions.for_gpu("Tuned GPU", wide, (tmp_path / wide.key(),)) == {1: own}


def test_the_users_decisions_come_before_the_packages(tmp_path, monkeypatch):
    """``tune`` writes under the user's cache folder by default; the runtime reads the user's
    decisions of a form first, the package's where the user has none."""
    monkeypatch.setenv("TVM_FUSED_CACHE_DIR", str(tmp_path))
    committed = next(path.parent for path in COMMITTED if CPU_DEVICE not in str(path))
    decided = json.loads((committed / decisions.DECISIONS).read_text())
    gpu, form = decided["gpu"], Form(**decided["op"])
    packaged = decisions.for_gpu(gpu, form)
    assert packaged and user_logs_dir() == tmp_path / "tuning_logs"
    own = {1: dataclasses.replace(DEFAULT_SCHEDULE, unroll=not DEFAULT_SCHEDULE.unroll)}
    folder = records_dir(user_logs_dir(), gpu, form)
    folder.mkdir(parents=True)
    decisions.write(folder, gpu, form, own)
    assert decisions.for_gpu(gpu, form) == own != packaged


def test_tune_defaults_to_the_users_cache_folder():
    """Neither the installed package nor the working directory: ``--out`` and ``--work-dir``
    default to the user's cache folder."""
    args = cli_parser().parse_args(["tune"])
    assert args.out is None and args.work_dir is None
    usage = subprocess.run([sys.executable, "-m", "tvm_fused", "tune", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "~/.cache/tvm_fused" in " ".join(usage.split())


@pytest.mark.slow
def test_two_forms_tune_into_two_record_folders(tmp_path):
    """``tune`` of the same dims addressed by offsets and by slots (``--slots``), two trials
    each, into a temporary folder: two record folders, each named by its form's key, each
    with decisions; the work databases stay apart too."""
    logs, work = tmp_path / "logs", tmp_path / "work"
    common = ["tune", "--target", "llvm", "--heads", "2", "--dtype", "float32", "--buckets",
              "1", "--trials", "2", "--cost-model", "random", "--out", str(logs),
              "--work-dir", str(work)]
    assert cli_main(common) == 0
    assert cli_main([*common, "--slots", "--split-table"]) == 0
    offsets = Form(num_q_heads=2, dtype="float32")
    slots = Form(num_q_heads=2, dtype="float32", addressing="slots", freqs_layout="split")
    folders = sorted(path.parent for path in logs.glob("*/*/decisions.json"))
    assert folders == sorted(records_dir(logs, CPU_DEVICE, form) for form in (offsets, slots))
    assert offsets.key() != slots.key()
    assert len(list(work.glob("*/*"))) == 2


def test_buckets_without_decisions_keep_their_default():
    """A tuning of some buckets (here 1 and 4096, and 2048 outside ``BUCKETS``) leaves
    every other bucket its hand-written default: 256 tokens still get bucket 512's."""
    op = Form(num_q_heads=128)
    tuned = ScheduleConfig(block_threads=256, norm_threads_per_row=128, vector_bytes=8)
    configs = decisions.with_defaults({1: tuned, 2048: tuned, 4096: tuned},
                                      lambda tokens: default_for_tokens(tokens, op))
    assert sorted(configs) == sorted({*BUCKETS, 2048})
    assert configs[1] == configs[2048] == configs[4096] == tuned
    for bucket in set(BUCKETS) - {1, 4096}:
        assert configs[bucket] == default_for_tokens(bucket, op)
    assert nearest_bucket(256, tuple(configs)) == 512


def test_records_summary_names_what_a_decision_changes(tmp_path, capsys):
    """``python -m tvm_fused records``: per bucket the best and default times, their ratio,
    and the knobs a decided config changes from the bucket's default."""
    op = Form(num_q_heads=16, write_through=True, cache_dtype="float8_e4m3fn")
    folder = records_dir(tmp_path, "Some GPU", op)
    folder.mkdir(parents=True)
    tuned = dataclasses.replace(default_for_tokens(1, op), norm_threads_per_row=128,
                                vector_bytes=8)
    (folder / records.METADATA).write_text(json.dumps({
        "gpu": "Some GPU", "op": dataclasses.asdict(op), "buckets": {
            "64": {"best_us": 6.0, "default_us": 6.3, "chosen": "default"},
            "1": {"best_us": 5.0, "default_us": 6.0, "chosen": dataclasses.asdict(tuned)},
            "4096": {"best_us": 14.0, "default_us": None, "chosen": "default"}}}))
    one, sixty_four, prefill = summary.bucket_results(tmp_path)
    assert (one.tokens, one.changed, one.gain) == (
        1, {"norm_threads_per_row": 128, "vector_bytes": 8}, 1.2)
    assert (sixty_four.tokens, sixty_four.changed) == (64, {})
    assert prefill.gain is None
    assert cli_main(["records", "--dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("Some GPU\n")
    assert f"| {op.key()} | 1 | 5.00 | 6.00 | 1.20x | norm_threads_per_row=128, " \
           "vector_bytes=8 |" in table
    assert f"| {op.key()} | 4096 | 14.00 |  |  | default |" in table


def test_every_committed_bucket_is_summarized():
    results = summary.bucket_results(default_logs_dir())
    expected = sum(len(json.loads(path.read_text())["buckets"]) for path in COMMITTED)
    assert len(results) == expected and {r.gpu for r in results} >= {"NVIDIA H200"}


def test_compaction_keeps_only_the_ops_workloads(tmp_path):
    """Two ops tuned in one work directory: each records folder gets its own buckets'
    workloads and records only, renumbered, both tables xz-compressed."""
    op = Form(num_q_heads=2, dtype="float32", gamma_dtype="float32")
    sch = s_tir.Schedule(bucket_workload(op, 1))
    schedule_fn(op, CPU_SPACE, fixed=CpuScheduleConfig())(sch)
    trace = json.loads(json.dumps(sch.trace.as_json(), default=lambda o: o.value if hasattr(
        o, "value") else list(o)))  # plain JSON, as the database stores it
    work = tmp_path / "work"
    work.mkdir()
    module = {"root_index": 0, "nodes": [{"type": "None"}]}
    text = json.dumps(module).encode()  # MetaSchedule's frame: length, JSON, in base64
    frame = base64.b64encode(struct.pack("<Q", len(text)) + text).decode()
    (work / records.WORKLOADS).write_text("".join(
        json.dumps([h, frame]) + "\n" for h in ("other-op", "ours")))
    (work / records.RECORDS).write_text("".join(
        json.dumps([index, [trace, [secs]]]) + "\n"
        for index, secs in ((0, 1e-6), (1, 2e-6), (0, 3e-6), (1, 4e-6))))
    dest = tmp_path / "folder"
    records.compact(work, dest, CPU_SPACE, {"ours": CpuScheduleConfig()})
    assert records.workload_hashes(dest / records.FOLDER_WORKLOADS) == ["ours"]
    with lzma.open(dest / records.FOLDER_WORKLOADS, "rt") as table:  # the module in plain
        assert [json.loads(line) for line in table] == [["ours", module]]
    best = records.folder_best_records(dest)
    assert list(best) == ["ours"] and [r[0] for r in best["ours"]] == [2e-6, 4e-6]


def test_malformed_record_lines_are_skipped(tmp_path):
    path = tmp_path / records.RECORDS
    good = json.dumps([0, [[[], []], [1e-5, 2e-5], {}, []]])
    failed = json.dumps([0, [[[], []], [1e10], {}, []]])
    path.write_text("\n".join([good, "{not json", '[1, "short"]', failed, good[:20]]) + "\n")
    with pytest.warns(UserWarning, match="malformed tuning record") as caught:
        kept = records.read_records(path)
    assert len(kept) == 1 and kept[0][2] == [1e-5, 2e-5]
    assert len(caught) == 3


COMMITTED = sorted(default_logs_dir().glob(f"*/*/{records.METADATA}"))


@pytest.mark.skipif(not COMMITTED, reason="no committed tuning records yet")
@pytest.mark.parametrize("metadata_path", thinned(
    COMMITTED, [f"{p.parent.parent.name}/{p.parent.name}" for p in COMMITTED], every=100))
def test_committed_records_match_the_current_definition(metadata_path: Path):
    """MetaSchedule finds records by the workload's structural hash: a change to the
    TensorIR definition that orphans the committed records fails here (re-tune)."""
    metadata = json.loads(metadata_path.read_text())
    op = Form(**metadata["op"])
    stored = records.workload_hashes(metadata_path.parent / records.FOLDER_WORKLOADS)
    # the folder holds its op's buckets, each once, and no other op's
    assert sorted(stored) == sorted(entry["workload"] for entry in metadata["buckets"].values())
    for tokens, entry in metadata["buckets"].items():
        current = workload_hash(bucket_workload(op, int(tokens)))
        assert current == entry["workload"], f"bucket {tokens}: the definition changed"
    # the decisions the runtime reads are the records' choices
    best = records.folder_best_records(metadata_path.parent)
    decided = decisions.read(metadata_path.parent)
    assert decided == {int(tokens): records.choose(best[entry["workload"]], GPU_SPACE,
                                                   GPU_SPACE.default_for(int(tokens), op))
                       for tokens, entry in metadata["buckets"].items()}


def test_choose_keeps_the_default_unless_clearly_faster():
    default = GPU_SPACE.default_for(64, Form())
    other = ScheduleConfig(block_threads=256)

    def ranked(*entries):
        traces = []
        for secs, config in entries:
            sch = s_tir.Schedule(fused_rope_rmsnorm_func(Form()))
            sample_config(sch, GPU_SPACE, config)
            traces.append((secs, sch.trace.as_json(), ""))
        return traces

    def choose(*entries):
        return records.choose(ranked(*entries), GPU_SPACE, default)

    assert choose((1.00, other), (1.08, default)) == default
    assert choose((1.00, other), (1.15, default)) == other
    assert choose((1.00, default), (1.01, other)) == default
    # records taken against another default show nothing about this one
    assert choose((1.00, other)) == default
    assert choose() == default


def test_the_default_depends_on_the_bucket_and_the_heads():
    """Two vectors per q-rope thread at the smallest and the prefill buckets, one between,
    and one everywhere when a token's q rope fills a single block (16 bf16 heads, or 32
    NeoX heads, whose lanes take two vectors each), where a second vector would only go to
    k rope threads (measured on an H200 and an H100; see
    schedules/config.py)."""
    def vectors(**op):
        return {tokens: GPU_SPACE.default_for(tokens, Form(**op)).rope_vectors_per_thread
                for tokens in BUCKETS}

    assert vectors() == vectors(num_q_heads=32) == vectors(num_q_heads=16, dtype="float32") \
        == {1: 2, 8: 2, 64: 1, 512: 1, 4096: 2, 32768: 2}
    assert vectors(num_q_heads=16) == vectors(num_q_heads=32, interleaved=False) \
        == {tokens: 1 for tokens in BUCKETS}
    # with PDL, one vector at every decode size (what follows the wait is all that counts)
    assert vectors(pdl=True) == vectors(pdl=True, pdl_early_indices=True) \
        == {1: 1, 8: 1, 64: 1, 512: 1, 4096: 2, 32768: 2}


def test_pdl_ops_have_decisions_of_their_own():
    """A PDL launch's best schedule differs from a plain one's: its records and decisions
    are filed apart (a GPU tuned for plain launches has none for PDL ones: the default)."""
    keys = {Form(pdl=pdl, pdl_early_indices=early).key()
            for pdl, early in ((False, False), (True, False), (True, True))}
    assert keys == {"bfloat16-h128-r64-d512-p128-gptj", "bfloat16-h128-r64-d512-p128-gptj-pdl",
                    "bfloat16-h128-r64-d512-p128-gptj-pdl-early-indices"}


def test_multi_warp_rows_are_one_per_thread():
    """A cross-warp row reduction repeated in one thread group races in shared memory (TVM's
    allreduce has no barrier after its read; compute-sanitizer racecheck found it): such
    configs are rejected, and the space never draws them."""
    with pytest.raises(ValueError, match="one warp per row"):
        ScheduleConfig(block_threads=256, norm_threads_per_row=64, norm_rows_per_thread=2)
    with pytest.raises(ValueError, match="one warp per row"):  # a persistent grid repeats it
        ScheduleConfig(block_threads=256, norm_threads_per_row=64, grid_blocks=1024)
    for knob in ("norm_rows_per_thread", "grid_blocks"):
        assert GPU_SPACE.constrain(knob, {"norm_threads_per_row": 128},
                                   GPU_SPACE.knobs[knob]) == GPU_SPACE.knobs[knob][:1]


def test_records_of_rejected_configs_are_skipped():
    """Records tuned before a knob combination was found unsafe are skipped, with a warning."""
    sch = s_tir.Schedule(fused_rope_rmsnorm_func(Form()))
    sample_config(sch, GPU_SPACE, ScheduleConfig(block_threads=256, norm_threads_per_row=64))
    insts, decisions = sch.trace.as_json()
    knobs = [i for i, inst in enumerate(insts) if inst[0] == "SampleCategorical"]
    rows = knobs[list(GPU_SPACE.knobs).index("norm_rows_per_thread")]
    insts[rows][2][0] = [1, 2, 4]  # as recorded before the constraint
    decisions = [[index, 1 if int(index) == rows else value] for index, value in decisions]
    other = s_tir.Schedule(fused_rope_rmsnorm_func(Form()))
    sample_config(other, GPU_SPACE, ScheduleConfig(block_threads=512))
    default = s_tir.Schedule(fused_rope_rmsnorm_func(Form()))
    sample_config(default, GPU_SPACE, DEFAULT_SCHEDULE)
    ranked = [(1.0, [insts, decisions], ""), (1.2, other.trace.as_json(), ""),
              (1.5, default.trace.as_json(), "")]
    with pytest.warns(UserWarning, match="one warp per row"):
        assert records.choose(ranked, GPU_SPACE, DEFAULT_SCHEDULE) == ScheduleConfig(
            block_threads=512)



def test_default_opens_the_grid_with_the_norm_group_at_decode_buckets():
    """Norm first up to 64 tokens, and up to the 512 bucket where a token's q rope spans
    several blocks (128 heads, not 16); q first at prefill buckets and for no bucket."""
    many, few = Form(num_q_heads=128), Form(num_q_heads=16)
    assert [default_for_tokens(t, many).norm_first for t in BUCKETS] == [
        True, True, True, True, False, False]
    assert [default_for_tokens(t, few).norm_first for t in BUCKETS] == [
        True, True, True, False, False, False]
    assert not default_for_tokens(None, many).norm_first


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_tuning_over_rpc_measures_on_the_tracker_servers(tmp_path):
    """What scripts/tune_rpc.sh does per GPU, on the CPU: a tracker, two RPC servers under
    one key, one tuning run with two measurements in flight; its records and decisions are
    those of a local run."""
    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
         str(port), "--port-end", str(port + 1)])]
    try:
        time.sleep(3)
        for _ in range(2):
            server_port = _free_port()
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                 "--key", "cpu", "--no-fork", "--port", str(server_port), "--port-end",
                 str(server_port + 10)]))
        time.sleep(5)
        op = Form(num_q_heads=2, dtype="float32", gamma_dtype="float32")
        lines = []
        dest = tune(op, tvm.target.Target("llvm"), buckets=(1,), trials=3,
                    logs_dir=tmp_path / "logs", work_dir=tmp_path / "work",
                    device_name=CPU_DEVICE, cost_model="random", builder_workers=2,
                    log=lines.append, rpc=RpcTarget("127.0.0.1", port, "cpu", workers=2))
    finally:
        for process in processes:
            process.kill()
    metadata = json.loads((dest / records.METADATA).read_text())
    assert metadata["timing"] == "TVM time evaluator"
    assert metadata["buckets"]["1"]["records"] == 3
    assert any("default schedule" in line for line in lines)
    assert set(decisions.read(dest, CpuScheduleConfig)) == {1}


@pytest.mark.slow
def test_rpc_script_runs_two_servers_on_a_single_gpu(tmp_path):
    """scripts/tune_rpc.sh end to end on a machine of one GPU (here a stand-in nvidia-smi and
    the llvm target): two servers on the GPU register with the tracker, the run measures
    through them, and the records folder holds the bucket's decisions."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: Stand-in (UUID: GPU-0)"\n')
    (fake / "nvidia-smi").chmod(0o755)
    script = Path(__file__).parent.parent / "scripts" / "tune_rpc.sh"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", RPC_PORT=str(_free_port()))
    result = subprocess.run(
        ["bash", str(script), str(tmp_path / "out"), "--heads", "2", "--dtype", "float32",
         "--buckets", "1", "--trials", "3", "--target", "llvm", "--cost-model", "random",
         "--out", str(tmp_path / "logs"), "--work-dir", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    log = (tmp_path / "out" / "tune.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 GPUs, 2 servers each" in log
    assert log.count("server:gpu") == 2  # the tracker's list of servers
    folder = next((tmp_path / "logs").glob("*/*"))
    assert set(decisions.read(folder, CpuScheduleConfig)) == {1}
