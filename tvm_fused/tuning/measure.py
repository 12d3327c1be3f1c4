"""Building and timing MetaSchedule candidates of the fused op.

The builder compiles as the runtime build does (the ``tvm_fused`` pipeline, with
the block-group merge). The runners feed every candidate the bucket's *valid* inputs (real
offsets, page tables and positions: random integers would send it out of bounds), rebuilt
in the runner process from the argument shapes (locally, once per bucket). Locally on a GPU,
a candidate is timed as the benchmarks time what an engine pays: a decode bucket (up to
``DECODE_MAX`` tokens) by its GPU time per call of ``STEADY_CALLS`` calls captured back to
back in one CUDA graph (the steady state of a decode step, L2 warm after the first call; a
single cold call is mostly launch and cache misses, and ranked decode configs by those), a
prefill bucket by CUDA events on a cold L2; over RPC, with TVM's time evaluator.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
import tvm

from ..compiler.build import build
from ..compiler.definition import OP_NAME
from ..form import Form, dtype_name
from ..timing import STEADY_CALLS, time_cuda, time_graph
from .buckets import DECODE_MAX
from .workload import bucket_tensors

_CUDA = 2  # DLPack device type
TIMING = {"cuda": f"decode buckets: GPU time per call of {STEADY_CALLS} calls back to back in "
                  "one CUDA graph; prefill buckets: median of CUDA-event runs on a cold L2",
          "rpc": "TVM time evaluator"}  # what metadata.json says of a folder's times


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule builder function: compile as the runtime does (``compiler.build``)."""
    return build(mod, target)


def _bucket_tensors(form: Form, args_info, device) -> list[torch.Tensor]:
    """The bucket's inputs for a workload of ``form`` with these argument shapes (the token
    count is q's first dim)."""
    tensors = bucket_tensors(form, int(args_info[0][2][0]), device=device)
    for tensor, (_, dtype, shape) in zip(tensors, args_info, strict=True):
        if list(tensor.shape) != list(shape) or dtype_name(tensor.dtype) != dtype:
            raise ValueError(f"bucket inputs {tuple(tensor.shape)} {tensor.dtype} do not match "
                             f"the workload's {shape} {dtype}")
    return tensors


_last_bucket: dict = {}  # this worker process's inputs of the bucket it measured last


def _for_bucket(key, make):
    """``make()`` for the bucket ``key`` names, made once and kept for the process's next
    calls with that key (the previous bucket's value freed first)."""
    if _last_bucket.get("key") != key:
        _last_bucket.clear()
        _last_bucket["value"] = make()
        _last_bucket["key"] = key
    return _last_bucket["value"]


def alloc_local(form: Form, device: tvm.runtime.Device, args_info, alloc_repeat: int) -> list:
    """LocalRunner allocation (with ``form`` bound: ``functools.partial``): the bucket's
    inputs as torch tensors on ``device``, made once
    per bucket in the runner's process and kept for its next candidates (making them takes
    up to seconds at prefill buckets, about what measuring a candidate takes). A candidate
    leaves valid inputs (it writes its roped q and normalized cache rows, as each of its own
    timing runs does before the next)."""
    torch_device = "cuda" if device.dlpack_device_type() == _CUDA else "cpu"
    return _for_bucket((form, torch_device, str(args_info), alloc_repeat), lambda: [
        _bucket_tensors(form, args_info, torch_device) for _ in range(alloc_repeat)])


def gpu_seconds(kernel, args: list[torch.Tensor], runs: int) -> float:
    """A candidate's time on the GPU (see the module's docstring): ``args`` the bucket's
    tensors, q first (its first dim is the token count)."""
    if args[0].shape[0] <= DECODE_MAX:
        graph = time_graph(lambda: kernel(*args), reps=runs, calls=STEADY_CALLS)
        return graph.median_us / STEADY_CALLS * 1e-6
    return time_cuda(lambda: kernel(*args), reps=runs).median_us * 1e-6


def run_local(rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """LocalRunner timing, in seconds: ``gpu_seconds`` on a GPU, TVM's evaluator else."""
    kernel = rt_mod[OP_NAME]  # epsilon is bound in the workload: tensors only
    if device.dlpack_device_type() == _CUDA:
        runs = evaluator_config.repeat * evaluator_config.number
        return [gpu_seconds(kernel, args, runs) for args in repeated_args]
    evaluator = rt_mod.time_evaluator(OP_NAME, device, number=evaluator_config.number,
                                      repeat=evaluator_config.repeat,
                                      min_repeat_ms=evaluator_config.min_repeat_ms)
    return [float(c) for args in repeated_args for c in evaluator(*args).results]


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return tensor.contiguous().view(torch.uint8).numpy().view(
            getattr(ml_dtypes, dtype_name(tensor.dtype)))
    if tensor.dtype == torch.uint32:
        return tensor.view(torch.int32).numpy().view(np.uint32)
    return tensor.contiguous().numpy()


def alloc_rpc(form: Form, session, device, args_info, alloc_repeat: int) -> list:
    """RPCRunner allocation (with ``form`` bound): the bucket's inputs, made here (once per
    bucket in this worker process) and copied to the remote for each candidate."""
    arrays = _for_bucket((form, "host", str(args_info)), lambda: [
        _to_numpy(t) for t in _bucket_tensors(form, args_info, "cpu")])
    return [[tvm.runtime.tensor(a, device) for a in arrays] for _ in range(alloc_repeat)]
