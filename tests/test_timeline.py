"""benchmarks/timeline.py: kernels of a Chrome trace folded into per-layer positions."""

import math

import pytest

from benchmarks import timeline


def _trace(kernels):
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": dur} for n, ts, dur in kernels]
    events.append({"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0.0, "dur": 50.0})
    return {"traceEvents": events}


def test_layers_fold_into_positions():
    # two layers of gemm (4 us), then the op (1 us) starting 0.5 us before the gemm's end
    # (a programmatic dependent launch), the next layer 0.25 us after the op's end
    kernels = []
    start = 10.0
    for _ in range(3):
        kernels += [("gemm", start, 4.0), ("op", start + 3.5, 1.0)]
        start += 4.75
    parsed = timeline.trace_kernels(_trace(reversed(kernels)))
    assert [k.name for k in parsed] == ["gemm", "op"] * 3
    gemm, op = timeline.per_position(parsed, layers=3)
    assert (gemm.name, gemm.duration_us, gemm.gap_us) == ("gemm", 4.0, 0.25)
    assert (op.name, op.duration_us, op.gap_us) == ("op", 1.0, -0.5)
    assert timeline.layer_period_us(parsed, 3) == pytest.approx(4.75)


def test_one_layer_has_no_gap_before_its_first_kernel():
    (first, second) = timeline.per_position(
        [timeline.Kernel("a", 0.0, 2.0), timeline.Kernel("b", 3.0, 1.0)], layers=1)
    assert math.isnan(first.gap_us) and second.gap_us == 1.0


def test_kernels_must_split_into_the_layers():
    with pytest.raises(ValueError, match="3 kernels do not split into 2 layers"):
        timeline.per_position([timeline.Kernel("k", float(i), 1.0) for i in range(3)], 2)
