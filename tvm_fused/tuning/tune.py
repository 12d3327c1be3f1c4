"""The tuning driver: one MetaSchedule task per token-count bucket, records kept in the repo.

For each bucket the hand-written default schedule is measured first (so the tuned choice is
never worse than it), with the config an earlier tuning decided (the committed decisions of
the GPU and form, re-measured in the same run) and every config one knob away from the default
(``single_changes``: a structural change the default misses is found in few trials), then
``ReplayFunc`` draws candidates from the design space until the bucket has ``trials``
measured records. The work directory's JSON database grows record by record, so a killed run
loses at most the batch in flight and a re-run continues from it. At the end the database is
compacted into ``tuning_logs/<gpu>/<form key>/`` with metadata.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..compiler.definition import OP_NAME
from ..form import Form
from ..progress import Progress
from ..schedules.space import can_draw, schedule_fn, single_changes, space_for
from . import decisions, records
from .buckets import BUCKETS
from .layout import records_dir
from .measure import TIMING, alloc_local, alloc_rpc, build_candidate, run_local
from .workload import bucket_workload, workload_hash

BUILD_TIMEOUT_SEC = 180  # a fresh builder worker imports TVM's tensor intrinsics first
RUN_TIMEOUT_SEC = 120
RUNS_PER_CANDIDATE = 40  # microsecond kernels: the median of few runs is noise


@dataclasses.dataclass(frozen=True)
class RpcTarget:
    """Where measurements go when they are distributed: an RPC tracker and a device key."""

    tracker_host: str
    tracker_port: int
    key: str
    workers: int = 1


_EVALUATOR = ms.runner.EvaluatorConfig(number=1, repeat=RUNS_PER_CANDIDATE, min_repeat_ms=0)


def _cost_model(name: str) -> str:
    if name != "auto":
        return name
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _builder(workers: int):
    return ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=BUILD_TIMEOUT_SEC,
                                   max_workers=workers)


def _runner(form: Form, rpc: RpcTarget | None):
    """A runner that feeds candidates ``form``'s bucket inputs: local, or over RPC."""
    if rpc is None:
        return ms.runner.LocalRunner(f_alloc_argument=functools.partial(alloc_local, form),
                                     f_run_evaluator=run_local, timeout_sec=RUN_TIMEOUT_SEC,
                                     evaluator_config=_EVALUATOR)
    config = ms.runner.RPCConfig(tracker_host=rpc.tracker_host, tracker_port=rpc.tracker_port,
                                 tracker_key=rpc.key, session_timeout_sec=RUN_TIMEOUT_SEC)
    return ms.runner.RPCRunner(config, f_alloc_argument=functools.partial(alloc_rpc, form),
                               max_workers=rpc.workers, evaluator_config=_EVALUATOR)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """One status line per measured batch (bucket, trials so far, best time), and the
    progress of the search."""

    def __init__(self, names: list[str], log, total: int):
        self.names, self.log, self.best, self.count = names, log, {}, {}
        self.progress = Progress(total, "tune")

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results):
        name = self.names[task_id]
        self.count[name] = self.count.get(name, 0) + len(runner_results)
        for result in runner_results:
            if result.run_secs:
                secs = records.mean_seconds(result.run_secs)
                self.best[name] = min(self.best.get(name, float("inf")), secs)
        failed = sum(1 for r in runner_results if r.error_msg)
        best_us = self.best.get(name, float("nan")) * 1e6
        self.log(f"[{name}] +{len(runner_results)} measured ({failed} failed), "
                 f"{self.count[name]} this run, best {best_us:.2f} us")
        self.progress.advance(len(runner_results), f"measured ({name})")


def seed_configs(space, default, decided) -> list:
    """The configs a bucket's tuning measures first, in order: its hand-written ``default``,
    the ``decided`` config of an earlier tuning (None: none; re-measured in this run, so a
    winner found before is never lost and is compared with the default of the same run;
    skipped if the space can no longer draw it), then every config one knob away from the
    default (``single_changes``)."""
    seeds = [default]
    if decided is not None and decided != default and can_draw(space, decided):
        seeds.append(decided)
    return seeds + [config for config in single_changes(space, default) if config not in seeds]


@dataclasses.dataclass
class _Session:
    """One tuning run of a form: what its steps share."""

    form: Form
    target: tvm.target.Target
    space: object  # schedules.space.DesignSpace
    trials: int
    builder: object
    runner: object
    database: object
    workers: int
    log: Callable
    cost_model: str

    def seed(self, workloads: dict, decided: dict) -> dict:
        """For each bucket of ``workloads`` (tokens -> workload), measure its
        ``seed_configs`` (``decided``: tokens -> the config an earlier tuning decided;
        ``trials`` configs at most), every bucket's in one batch (one builder pool), and
        commit each as a record. Returns tokens -> ``[(config, seconds)]`` of those that
        built and ran, the default first; ``RuntimeError`` if a default fails."""
        jobs = []  # (tokens, config, schedule)
        for tokens, workload in workloads.items():
            default = self.space.default_for(tokens, self.form)
            for config in seed_configs(self.space, default, decided.get(tokens))[:self.trials]:
                sch = tvm.s_tir.Schedule(workload)
                schedule_fn(self.form, self.space, fixed=config)(sch)
                jobs.append((tokens, config, sch))
        built = self.builder.build([ms.builder.BuilderInput(sch.mod, self.target)
                                    for _, _, sch in jobs])
        args_info = {tokens: ms.arg_info.ArgInfo.from_prim_func(workload["main"])
                     for tokens, workload in workloads.items()}
        device_type = "cuda" if self.target.kind.name == "cuda" else "cpu"
        runnable = [i for i, b in enumerate(built) if not b.error_msg]
        futures = self.runner.run([ms.runner.RunnerInput(
            built[i].artifact_path, device_type, args_info[jobs[i][0]]) for i in runnable])
        results = dict(zip(runnable, (future.result() for future in futures)))
        measured = {tokens: [] for tokens in workloads}
        for i, (tokens, config, sch) in enumerate(jobs):
            error = built[i].error_msg or results[i].error_msg
            if error and not measured[tokens]:  # the bucket's first job is its default
                raise RuntimeError(f"the default schedule of the {tokens}-token bucket "
                                   f"failed: {error}")
            if error:
                self.log(f"  {config} failed: {error.splitlines()[0][:200]}")
                continue
            self.database.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, self.database.commit_workload(workloads[tokens]),
                results[i].run_secs, self.target, args_info[tokens]))
            measured[tokens].append((config, records.mean_seconds(results[i].run_secs)))
        return measured

    def search(self, workloads: dict, remaining: dict, work_dir: Path) -> None:
        """Draw and measure ``remaining[tokens]`` more candidates of each bucket."""
        names = [f"{OP_NAME}-{tokens}tok" for tokens in remaining]
        tasks = [ms.TuneContext(
            mod=workloads[tokens], target=self.target, task_name=name,
            num_threads=self.workers, space_generator=ms.space_generator.ScheduleFn(
                schedule_fn(self.form, self.space), sch_rules=[], postprocs=[],
                mutator_probs={}),
            search_strategy=ms.search_strategy.ReplayFunc())
            for tokens, name in zip(remaining, names)]
        counts = list(remaining.values())
        ms.tune.tune_tasks(
            tasks=tasks, task_weights=[1.0] * len(tasks), work_dir=str(work_dir),
            max_trials_global=sum(counts), max_trials_per_task=max(counts),
            num_trials_per_iter=min(16, max(counts)), builder=self.builder,
            runner=self.runner, database=self.database, cost_model=self.cost_model,
            task_scheduler="round-robin",
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                               _Progress(names, self.log, sum(counts))])


def _log_seeds(log, tokens: int, measured: list, earlier) -> None:
    """One line on a bucket's seeds: the default's time, the earlier decision's, the best."""
    (default, default_s), (best, best_s) = measured[0], min(measured, key=lambda m: m[1])
    earlier_s = None if earlier in (None, default) else dict(measured).get(earlier)
    log(f"[{OP_NAME}-{tokens}tok] default schedule: {default_s * 1e6:.2f} us"
        f"{'' if earlier_s is None else f'; decided before: {earlier_s * 1e6:.2f} us'}"
        f"; {len(measured)} seeds measured, best "
        f"{best_s * 1e6:.2f} us{'' if best == default else f' ({best})'}")


def tune(form: Form, target: tvm.target.Target, *, buckets=BUCKETS, trials: int = 32,
         logs_dir: Path, work_dir: Path, device_name: str, cost_model: str = "auto",
         rpc: RpcTarget | None = None, builder_workers: int | None = None,
         log=print) -> Path:
    """Tune ``form`` for ``target`` per bucket; return the folder the compacted records went
    to (``logs_dir/<gpu>/<form key>``).

    ``trials`` counts measured candidates per bucket, the default included; buckets that
    already have that many records in ``work_dir`` are skipped.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    for table in (records.WORKLOADS, records.RECORDS):
        records.drop_malformed_lines(work_dir / table)
    workers = builder_workers or max(1, min(16, (os.cpu_count() or 2)))
    session = _Session(form, target, space_for(target), trials, _builder(workers),
                       _runner(form, rpc), ms.database.JSONDatabase(work_dir=str(work_dir)),
                       workers, log, _cost_model(cost_model))
    started = time.time()
    workloads = {tokens: bucket_workload(form, tokens) for tokens in buckets}
    done = {tokens: len(session.database.get_top_k(session.database.commit_workload(w),
                                                   trials))
            for tokens, w in workloads.items()}
    dest = records_dir(logs_dir, device_name, form)
    decided = (decisions.read(dest, session.space.config_type)
               if (dest / decisions.DECISIONS).is_file() else {})
    fresh = {tokens: w for tokens, w in workloads.items() if done[tokens] == 0}
    if fresh:
        for tokens, measured in session.seed(fresh, decided).items():
            _log_seeds(log, tokens, measured, decided.get(tokens))
            done[tokens] = len(measured)
    for tokens in workloads:
        if done[tokens] >= trials and tokens not in fresh:
            log(f"[{OP_NAME}-{tokens}tok] {done[tokens]} records already: skipped")
    remaining = {tokens: trials - done[tokens] for tokens in workloads if done[tokens] < trials}
    if remaining:
        session.search(workloads, remaining, work_dir)
    records.compact(work_dir, dest, session.space, {
        workload_hash(w): session.space.default_for(tokens, form)
        for tokens, w in workloads.items()})
    chosen = _write_metadata(session, dest, device_name, workloads, time.time() - started,
                             timing=TIMING["cuda" if target.kind.name == "cuda" and rpc is None
                                           else "rpc"], work_dir=work_dir)
    decisions.write(dest, device_name, form, chosen)
    log(f"records: {dest} ({time.time() - started:.0f} s)")
    return dest


def _write_metadata(session: _Session, dest: Path, device_name: str, workloads: dict,
                    seconds: float, *, timing: str, work_dir: Path) -> dict:
    """Write ``metadata.json``; return the config chosen per bucket."""
    best = records.best_records(Path(work_dir) / records.RECORDS,
                                Path(work_dir) / records.WORKLOADS)
    previous = records.load_metadata(dest) if (dest / records.METADATA).is_file() else {}
    buckets, choices, space = {}, {}, session.space
    for tokens, workload in workloads.items():
        shash = workload_hash(workload)
        ranked = best.get(shash, [])
        default = space.default_for(tokens, session.form)
        defaults = records.default_records(ranked, space, default)
        chosen = choices[tokens] = records.choose(ranked, space, default)
        buckets[str(tokens)] = {
            "workload": shash,
            "records": len(ranked),
            "best_us": ranked[0][0] * 1e6 if ranked else None,
            "default_us": defaults[0][0] * 1e6 if defaults else None,
            "chosen": "default" if chosen == default else dataclasses.asdict(chosen),
        }
    metadata = {
        "gpu": device_name,
        "op": dataclasses.asdict(session.form),
        "target": str(session.target),
        "versions": {"tvm": tvm.__version__, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "trials_per_bucket": session.trials,
        "tuning_seconds": round(seconds) + previous.get("tuning_seconds", 0),
        "timing": timing,
        "buckets": buckets,
    }
    (dest / records.METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    return choices
