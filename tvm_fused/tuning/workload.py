"""The static-shape workload of a bucket and inputs that make its runs valid."""

from __future__ import annotations

import torch
import tvm
import tvm_ffi

from ..form import Form
from ..compiler.definition import fused_rope_rmsnorm_func
from ..testing.inputs import OpInputs, make_inputs
from .buckets import bucket_case

EPSILON = 1e-6


def bucket_inputs(op: Form, tokens: int, device="cpu") -> OpInputs:
    """The inputs a bucket is tuned and timed on: a realistic batch of ``tokens`` tokens,
    every tensor compact (so a remote runner can rebuild them as plain arrays)."""
    new_tokens, cache_lengths = bucket_case(tokens)
    return make_inputs(
        new_tokens, cache_lengths, num_q_heads=op.num_q_heads, rope_dim=op.rope_dim,
        kv_norm_dim=op.kv_norm_dim, page_size=op.page_size, dtype=getattr(torch, op.dtype),
        gamma_dtype=getattr(torch, op.gamma_dtype), freqs_dtype=getattr(torch, op.freqs_dtype),
        offsets_dtype=getattr(torch, op.offsets_dtype), write_through=op.write_through,
        cache_dtype=getattr(torch, op.cache_element), kv_columns=(op.row_width, 0),
        strided_q=False, device=device)


def bucket_tensors(op: Form, tokens: int, device="cpu") -> list[torch.Tensor]:
    """The kernel's tensor arguments for a bucket, in parameter order: ``bucket_inputs`` with
    a contiguous ``q_rope_output`` (and ``kv_output``, if the op has one), an fp8 cache's
    ``k_scale`` 1, and an error counter."""
    inputs = bucket_inputs(op, tokens, device)
    q = inputs.q_rope
    rows = [inputs.kv_input] if op.write_through else []
    if op.kv_output:
        rows.append(torch.empty(inputs.kv_input.shape, dtype=q.dtype, device=device))
    scale = [torch.ones(1, device=device)] if op.cache_dtype else []
    offsets, freqs, gamma, k_cache, table, lengths = inputs.args()[1:]
    return [q, torch.empty(q.shape, dtype=q.dtype, device=device), *rows, offsets, freqs,
            gamma, k_cache, *scale, table, lengths, torch.zeros(1, dtype=torch.int32,
                                                                device=device)]


def _static_buffer(param, shape, strides):
    """A buffer like ``param``'s with concrete 64-bit shape (and strides, if it has any)."""
    dims = [tvm.tirx.IntImm("int64", int(v)) for v in shape]
    steps = [tvm.tirx.IntImm("int64", int(v)) for v in strides] if param.strides else []
    return tvm.tirx.decl_buffer(dims, str(param.ty.dtype), param.name, strides=steps,
                                data_alignment=param.ty.data_alignment)


def bucket_workload(op: Form, tokens: int) -> tvm.IRModule:
    """The PrimFunc specialized to bucket ``tokens``: every shape and stride a constant (the
    layouts of ``bucket_inputs``, q_rope_output contiguous) and epsilon bound to 1e-6
    (MetaSchedule measures functions of tensors only)."""
    func = fused_rope_rmsnorm_func(op)
    # offsets' shape, batch + 1, follows from cache_lengths' (specialize binds plain vars)
    binding = {param: _static_buffer(param, tensor.shape, tensor.stride())
               for param, tensor in zip(func.params, bucket_tensors(op, tokens))
               if param.name != "offsets"}
    binding[func.params[-1]] = tvm.tirx.FloatImm("float32", EPSILON)
    return tvm.IRModule({"main": func.specialize(binding)})


def workload_hash(workload: tvm.IRModule) -> str:
    """The key MetaSchedule files a workload under (``module_equality="structural"``)."""
    return str(tvm_ffi.structural_hash(workload))
