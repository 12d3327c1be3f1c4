"""The static-shape workload of a bucket and inputs that make its runs valid."""

from __future__ import annotations

import torch
import tvm
import tvm_ffi

from ..compiler.definition import fused_rope_rmsnorm_func, parameters
from ..form import Form
from ..testing.inputs import OpInputs, inputs_for
from .buckets import bucket_case

EPSILON = 1e-6


def bucket_inputs(form: Form, tokens: int, device="cpu") -> OpInputs:
    """The inputs a bucket is tuned and timed on: a realistic batch of ``tokens`` tokens of
    ``form``'s calls, every tensor compact (so a remote runner can rebuild them as plain
    arrays)."""
    new_tokens, cache_lengths = bucket_case(tokens)
    return inputs_for(form, new_tokens, cache_lengths, kv_columns=(form.row_width, 0),
                      strided_q=False, device=device)


def bucket_tensors(form: Form, tokens: int, device="cpu") -> list[torch.Tensor]:
    """The kernel's tensor arguments for a bucket, in parameter order (``parameters``, but
    epsilon): ``bucket_inputs`` with a contiguous ``q_rope_output`` of the query's dtype (and
    ``kv_output``, a contiguous ``q_nope_out``, if the form has them), an fp8 cache's
    ``k_scale`` and an fp8 query's ``q_scale`` 1, and an error counter."""
    inputs = bucket_inputs(form, tokens, device)
    q, rows, nope = inputs.q_rope, inputs.kv_input, inputs.q_nope
    out_dtype = getattr(torch, form.out_element)
    values = {
        "q_rope": q, "q_rope_output": torch.empty_like(q, dtype=out_dtype), "q_nope": nope,
        "q_nope_out": None if nope is None else torch.empty_like(nope, dtype=out_dtype),
        "q_scale": torch.ones(1, device=device), "kv_input": rows,
        "kv_output": None if rows is None else torch.empty_like(rows),
        "offsets": inputs.input_row_offsets, "freqs_cis": inputs.freqs_cis,
        "gamma": inputs.gamma, "k_cache": inputs.k_cache,
        "k_scale": torch.ones(1, device=device), "lookup_table": inputs.lookup_table,
        "cache_lengths": inputs.cache_lengths, "positions": inputs.positions,
        "slot_mapping": inputs.slot_mapping,
        "errors": torch.zeros(1, dtype=torch.int32, device=device)}
    return [values[name] for name in parameters(form) if name != "epsilon"]


def _static_buffer(param, shape, strides):
    """A buffer like ``param``'s with concrete 64-bit shape (and strides, if it has any)."""
    dims = [tvm.tirx.IntImm("int64", int(v)) for v in shape]
    steps = [tvm.tirx.IntImm("int64", int(v)) for v in strides] if param.strides else []
    return tvm.tirx.decl_buffer(dims, str(param.ty.dtype), param.name, strides=steps,
                                data_alignment=param.ty.data_alignment)


def bucket_workload(form: Form, tokens: int) -> tvm.IRModule:
    """The PrimFunc specialized to bucket ``tokens``: every shape and stride a constant (the
    layouts of ``bucket_inputs``, q_rope_output contiguous) and epsilon bound to 1e-6
    (MetaSchedule measures functions of tensors only)."""
    func = fused_rope_rmsnorm_func(form)
    # offsets' shape, batch + 1, follows from cache_lengths' (specialize binds plain vars);
    # a tensor of constant sizes (gamma, the scales, the error count) is static already
    binding = {param: _static_buffer(param, tensor.shape, tensor.stride())
               for param, tensor in zip(func.params, bucket_tensors(form, tokens))
               if param.name != "offsets" and not all(
                   isinstance(size, tvm.tirx.IntImm) for size in param.shape)}
    binding[func.params[-1]] = tvm.tirx.FloatImm("float32", EPSILON)
    return tvm.IRModule({"main": func.specialize(binding)})


def workload_hash(workload: tvm.IRModule) -> str:
    """The key MetaSchedule files a workload under (``module_equality="structural"``)."""
    return str(tvm_ffi.structural_hash(workload))
