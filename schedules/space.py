"""The MetaSchedule design spaces of the fused op's schedules.

Every knob of a schedule config is drawn with ``sch.sample_categorical`` (so the choice is a
decision in the schedule's trace), the candidates of later knobs are restricted to the values
valid with the earlier ones (invalid combinations are never drawn), and the same body as the
hand-written default schedules the PrimFunc. Because knob values steer Python control flow,
a space is searched with ``ReplayFunc`` (a fresh draw per candidate); a record's knob values
are read back from its trace with ``config_from_trace``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tvm
from tvm import s_tir

from tvm_fused.form import Form

from .config import ScheduleConfig, default_for_tokens
from .cpu import CpuScheduleConfig, apply_cpu_schedule
from .fused import apply_block_group_schedule

SAMPLE_CATEGORICAL = "SampleCategorical"


@dataclasses.dataclass(frozen=True)
class DesignSpace:
    """Knobs (drawn in this order) -> candidates, the config they make, and its schedule."""

    knobs: dict
    config_type: type
    apply: Callable  # (sch, op, config) -> None
    default_for: Callable  # (tokens of a bucket, op) -> the hand-written default config
    constrain: Callable = lambda name, chosen, values: values

    def make_config(self, values: dict):
        fields = {f.name: f.type for f in dataclasses.fields(self.config_type)}
        return self.config_type(**{name: bool(value) if fields[name] in (bool, "bool")
                                   else value for name, value in values.items()})


def _gpu_constraint(name: str, chosen: dict, values: tuple) -> tuple:
    if name == "norm_threads_per_row":  # a row's threads must fit (and tile) the block
        return tuple(v for v in values if chosen["block_threads"] % v == 0)
    if name in ("norm_rows_per_thread", "grid_blocks") and chosen["norm_threads_per_row"] > 32:
        return values[:1]  # see ScheduleConfig: a cross-warp reduction runs once per thread
    return values


GPU_SPACE = DesignSpace(
    knobs={
        "block_threads": (64, 128, 256, 512),
        "norm_threads_per_row": (32, 64, 128),
        "vector_bytes": (16, 8, 4),
        "rope_vectors_per_thread": (1, 2, 4),
        "norm_rows_per_thread": (1, 2, 4),
        "unroll": (1, 0),
        "norm_first": (0, 1),
        "grid_blocks": (0, 1024, 2048, 4096),
        # last: records drawn before them decode without them
        "k_rope_in_norm_group": (0, 1),
        "nope_vectors_per_thread": (1, 2, 4, 8),
    },
    config_type=ScheduleConfig,
    apply=apply_block_group_schedule,
    default_for=default_for_tokens,
    constrain=_gpu_constraint,
)

CPU_SPACE = DesignSpace(
    knobs={"tokens_per_task": (1, 4, 16), "parallel": (1, 0)},
    config_type=CpuScheduleConfig,
    apply=apply_cpu_schedule,
    default_for=lambda tokens, op: CpuScheduleConfig(),
)


def space_for(target: tvm.target.Target) -> DesignSpace:
    """The design space of ``target``'s schedule."""
    return GPU_SPACE if target.kind.name == "cuda" else CPU_SPACE


def sample_config(sch: s_tir.Schedule, space: DesignSpace, fixed=None):
    """Draw a valid config with ``sample_categorical``, or record ``fixed`` as the decisions
    (its trace then decodes to it)."""
    chosen: dict = {}
    for name, all_values in space.knobs.items():
        values = space.constrain(name, chosen, all_values)
        decision = None if fixed is None else values.index(int(getattr(fixed, name)))
        choice = sch.sample_categorical(list(values), [1.0 / len(values)] * len(values),
                                        decision=decision)
        chosen[name] = int(sch.get(choice))
    return space.make_config(chosen)


def single_changes(space: DesignSpace, config) -> list:
    """The valid configs that differ from ``config`` in exactly one knob, in knob order
    (each knob's other candidates in the space's order): what a tuning measures right after
    the default, so that a few trials already try every one-knob change of it."""
    base = {name: int(getattr(config, name)) for name in space.knobs}
    changes = []
    for name, values in space.knobs.items():
        for value in values:
            values_of = {**base, name: value}
            if value != base[name] and _valid(space, values_of):
                changes.append(space.make_config(values_of))
    return changes


def can_draw(space: DesignSpace, config) -> bool:
    """Whether ``sample_config`` could draw ``config`` (a decision of an older space may
    hold values this one no longer offers)."""
    return _valid(space, {name: int(getattr(config, name)) for name in space.knobs})


def _valid(space: DesignSpace, values_of: dict) -> bool:
    """Whether ``sample_config`` could draw these knob values (and they make a config)."""
    chosen: dict = {}
    for name, all_values in space.knobs.items():
        if values_of[name] not in space.constrain(name, chosen, all_values):
            return False
        chosen[name] = values_of[name]
    try:
        space.make_config(chosen)
    except ValueError:
        return False
    return True


def schedule_fn(op: Form, space: DesignSpace, fixed=None):
    """A ``ScheduleFn`` body: sample a config (or take ``fixed``) and apply it."""

    def space_fn(sch: s_tir.Schedule) -> s_tir.Schedule:
        space.apply(sch, op, sample_config(sch, space, fixed))
        return sch

    return space_fn


def config_from_trace(trace_json, space: DesignSpace):
    """The config of a trace in MetaSchedule's JSON form, ``[insts, decisions]``.

    Each instruction is ``[kind, inputs, attrs, outputs]``; a SampleCategorical's attrs are
    ``[candidates, probabilities]`` and its decision is the index of the drawn candidate. A
    trace drawn before the space's last knobs were added decodes with those knobs at the
    config's defaults.
    """
    insts, decisions = trace_json
    decided = {int(index): int(value) for index, value in decisions}
    values = [int(inst[2][0][decided[i]]) for i, inst in enumerate(insts)
              if inst[0] == SAMPLE_CATEGORICAL]
    if not 0 < len(values) <= len(space.knobs):
        raise ValueError(f"trace has {len(values)} knob decisions, expected at most "
                         f"{len(space.knobs)}")
    return space.make_config(dict(zip(space.knobs, values)))
