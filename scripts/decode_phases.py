"""Where a decode call's time goes: variants of the generated CUDA, timed beside the Triton
peer in one run (the measurement behind benchmarks/README.md, "Where a decode call's time
goes").

Each variant rewrites the kernel's CUDA source (``tvm_fused.compiler.cuda.kernel_source``)
and builds into a kernel cache folder of its own:

- ``base``: this checkout; ``cfg:KNOB=V+KNOB=V``: the default schedule with those knobs;
- ``lazy``: the locate's ``__ldg`` loads as plain loads (as before the eager loads);
- ``only-GROUP`` (``norm``, ``k``, ``q``, ``nope``, ``count``): every other block group
  returns at once (its blocks still launch); ``none``: every group returns (an empty launch
  of the same grid);
- ``triton-empty``: the Triton peer's launch (its grid of 16 heads a program, one token, as
  it tunes itself at 1-64 tokens, and its arguments) of a kernel that returns at once: the
  peer's empty launch, to set beside ``none``;
- ``cut:norm:P``: only the norm group, stopped after the locate's loads (P=1), the page
  table's (2), or the row's load and reduction (3); ``cut:q:P``: only the q group, stopped
  after its locate (1) or its page table (2). What was computed is kept alive by a store
  that never happens;
- ``bounds:B``: ``__launch_bounds__`` asks for at least ``B`` blocks an SM, so that nvcc
  caps the registers a thread (16 blocks of 128 threads: 32 registers); the kernel is one
  for every group, so the group that needs the most sets everyone's occupancy;
- ``wide``: the kernel of 64-bit index arithmetic (``Form(index_bits=64)``, what a call
  with a tensor of 2^31 elements or more runs) instead of the 32-bit one.

``base``, ``lazy``, ``cfg:``, ``bounds:`` and ``wide`` variants are checked against the float64
reference first.
Up to 256 tokens: GPU µs per call of 50 calls back to back in one CUDA graph (median of 3);
past: cold-L2 µs and the share of the copy bandwidth. Forms: ``ip`` (in place), ``wt``
(write-through), ``fp8`` (write-through into an fp8 e4m3 cache), ``ds`` (into an fp8_ds_mla
cache), ``fq`` and ``fqds`` (the whole fp8 attention query with an fp8 or fp8_ds_mla
cache; these three without the Triton peer, which writes neither); GPU only.

usage: PYTHONPATH=. python scripts/decode_phases.py VARIANTS TOKENS HEADS FORMS
  e.g. base,lazy,only-norm,cut:norm:1,none 1,16 128 ip
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
import tempfile

import torch

import tvm_fused.api as api
import tvm_fused.compiler.cuda as cuda
from benchmarks.suite import (
    DECODE_MAX,
    check_provider,
    copy_bandwidth,
    engine_addressing,
    new_call,
    sweep_inputs,
    triton_provider,
    tvm_provider,
)
from tvm_fused import dispatch
from tvm_fused.form import Form
from tvm_fused.schedules.config import default_for_tokens
from tvm_fused.timing import STEADY_CALLS, bytes_moved, time_cuda, time_graph

# a block group's test: its body opens with its block index, after a test of the threads it
# uses where it uses fewer than the block's, or with the ``return;`` a variant puts there (a
# test inside a group does not)
GROUP_TEST = re.compile(
    r"if \(\(\(int\)blockIdx\.x\) < [^\n]*\{\n"
    r"(?=(?:return;\n)?(?: *if \(\(\(int\)threadIdx\.x\) < \d+\) \{\n)? *int blockIdx_x)")
FP8_QUERY = {"out_dtype": "float8_e4m3fn", "q_nope": True}
FORMS = {"ip": Form(num_q_heads=128), "wt": Form(num_q_heads=128, write_through=True),
         "fp8": Form(num_q_heads=128, write_through=True, cache_dtype="float8_e4m3fn"),
         "ds": Form(num_q_heads=128, write_through=True, cache_format="fp8_ds_mla"),
         "fq": Form(num_q_heads=128, write_through=True, cache_dtype="float8_e4m3fn",
                    **FP8_QUERY),
         "fqds": Form(num_q_heads=128, write_through=True, cache_format="fp8_ds_mla",
                      **FP8_QUERY)}
TRITON_FORMS = {"ip", "wt", "fp8"}  # those the Triton peer writes
KEEP = "if ({value} == {magic}) {{ errors_ptr[0] = 1; }} return;\n"
NORM_CUTS = ((r"bool positioned = ", "p", "(int64_t)-12345"),
             (r"norm_slot_local_ptr\[0\] = ", "norm_slot_local_ptr[0]", "-12345"),
             (r"red_buf0_ptr\[0\] = __shfl_sync", "red_buf0_ptr[0]", "-12345.0f"))
ORIGINAL = cuda.kernel_source


def _group_names(code: str, tests: list) -> list[str]:
    """The block groups in grid order, named by the first local buffers of each."""
    names = []
    for test in tests:
        body = code[test.end():test.end() + 3000]
        names.append("q" if "q_pos_local" in body else "count" if "count_state" in body
                     else "nope" if "nope_state" in body else "norm" if "norm_" in body
                     else "k")
    return names


def only(code: str, keep: set[str]) -> str:
    """``code`` with every block group not in ``keep`` returning at its start."""
    tests = list(GROUP_TEST.finditer(code))
    for test, name in reversed(list(zip(tests, _group_names(code, tests)))):
        if name not in keep:
            code = code[:test.end()] + "return;\n" + code[test.end():]
    return code


def _after(code: str, pattern: str, keep: str, start: int = 0) -> str:
    """``code`` with ``keep`` inserted after the first statement matching ``pattern`` from
    ``start`` on."""
    end = code.index(";", re.compile(pattern).search(code, start).end()) + 1
    return code[:end] + "\n" + keep + code[end:]


def cut(code: str, group: str, point: int) -> str:
    """Only ``group`` working, stopped at ``point`` (see the module's docstring)."""
    code = only(code, {group})
    if group == "norm":
        pattern, value, magic = NORM_CUTS[point - 1]
        return _after(code, pattern, KEEP.format(value=value, magic=magic))
    start = code.index("q_pos_local_ptr[1];")
    suffix = re.compile(r"bool positioned(_\d+)? = ").search(code, start).group(1) or ""
    if point == 1:
        return _after(code, r"bool positioned" + suffix + " = ",
                      KEEP.format(value="p" + suffix, magic="(int64_t)-12345"), start)
    return _after(code, r"q_state_local_ptr\[0\] = ",
                  KEEP.format(value="q_state_local_ptr[0]", magic="7"), start)


def rewrite(variant: str, code: str) -> str:
    """The CUDA source of ``variant``."""
    if variant.startswith("cut:"):
        _, group, point = variant.split(":")
        return cut(code, group, int(point))
    if variant == "lazy":
        return re.sub(r"__ldg\(\(&\((\w+_ptr\[[^\]]*\])\)\)\)", r"\1", code)
    if variant.startswith("only-"):
        return only(code, {variant.removeprefix("only-")})
    if variant == "none":
        return only(code, set())
    if variant.startswith("bounds:"):  # at least that many blocks an SM: nvcc caps registers
        return re.sub(r"__launch_bounds__\((\d+)\)",
                      rf"__launch_bounds__(\1, {int(variant[7:])})", code)
    return code


def schedule_of(variant: str, form: Form, tokens: int):
    """``cfg:K=V+K=V``: the default with those knobs; anything else: the runtime's choice."""
    if not variant.startswith("cfg:"):
        return None
    default = default_for_tokens(tokens, form)
    knobs = dict(item.split("=") for item in variant[4:].split("+"))
    return dataclasses.replace(default, **{
        k: type(getattr(default, k))(int(v)) for k, v in knobs.items()})


def timed(provider, call, form: Form, tokens: int, copy: float) -> str:
    """Graph µs per call up to 256 tokens; cold µs and the share of the copy bandwidth
    past."""
    if tokens <= DECODE_MAX:
        return "{:.2f}".format(statistics.median(
            time_graph(lambda: provider(call), reps=30, calls=STEADY_CALLS).median_us
            / STEADY_CALLS
            for _ in range(3)))
    us = time_cuda(lambda: provider(call), reps=20).median_us
    return f"{us:.1f} ({bytes_moved(form, tokens) / us / 1e6 / copy:.1%})"


def _empty_peer_kernel():
    """A Triton kernel with the peer's parameters that returns at once."""
    import triton
    import triton.language as tl

    globals()["tl"] = tl  # triton.jit resolves the annotations in the module's globals

    @triton.jit
    def empty(q_ptr, out_ptr, k_ptr, freqs_ptr, gamma_ptr, kv_ptr, kvo_ptr, scale_ptr,
              offsets_ptr, lengths_ptr, table_ptr, positions_ptr, slots_ptr, n_tokens, batch,
              n_slots, token_bucket, epsilon, q_s0, q_s1, o_s0, o_s1, k_s0, k_s1, t_s0, kv_s0,
              kvo_s0, NUM_HEADS: tl.constexpr, ROPE_DIM: tl.constexpr,
              NORM_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, INTERLEAVED: tl.constexpr,
              FREQS_SPLIT: tl.constexpr, SLOTS: tl.constexpr, WRITE_THROUGH: tl.constexpr,
              KV_OUTPUT: tl.constexpr, QUANTIZE: tl.constexpr, CACHE_MAX: tl.constexpr,
              TOKENS_PER_PROGRAM: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr):
        pass

    return empty


def empty_peer(form: Form):
    """The ``triton-empty`` variant's provider (offsets addressing)."""
    import types

    from benchmarks.peers import triton_fused

    stand_in = types.SimpleNamespace(fn=_empty_peer_kernel())

    def run(call) -> None:
        kept, triton_fused._fused_kernel = triton_fused._fused_kernel, stand_in
        try:
            triton_fused.triton_fused_rope_rmsnorm(
                *call.inputs.args(), **call.inputs.latent(), kv_output=call.kv_output,
                out=call.out, interleaved=form.interleaved, freqs_layout=form.freqs_layout,
                heads_per_program=16, tokens_per_program=1)
        finally:
            triton_fused._fused_kernel = kept

    return run


def measure(variant: str, form: Form, base, tokens: int, copy: float) -> str:
    """``variant``'s time on a copy of ``base``, built into a cache folder of its own."""
    if variant == "triton-empty":
        return timed(empty_peer(form), new_call(base.clone(), form, engine_addressing(base)),
                     form, tokens, copy)
    os.environ["TVM_FUSED_CACHE_DIR"] = tempfile.mkdtemp(prefix="decode_phases")
    dispatch.KERNELS.clear()
    cuda.kernel_source = lambda device: rewrite(variant, ORIGINAL(device))
    api.FIRST_INDEX_BITS = 64 if variant == "wide" else 32
    try:
        run = tvm_provider(form, schedule_of(variant, form, tokens))
        call = new_call(base.clone(), form, engine_addressing(base))
        if variant in ("base", "lazy", "wide") or variant.startswith(("cfg:", "bounds:")):
            check_provider(variant, run, base, form)
        else:
            run(call)
        return timed(run, call, form, tokens, copy)
    finally:
        cuda.kernel_source, api.FIRST_INDEX_BITS = ORIGINAL, 32


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit(__doc__)
    variants = argv[0].split(",")
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} copy {copy:.3f} TB/s", flush=True)
    for name in argv[3].split(","):
        for heads in (int(h) for h in argv[2].split(",")):
            form = dataclasses.replace(FORMS[name], num_q_heads=heads)
            for tokens in (int(t) for t in argv[1].split(",")):
                base = sweep_inputs(form, tokens)
                row = {}
                if name in TRITON_FORMS:
                    peer = triton_provider(form)
                    check_provider("triton", peer, base, form)
                    row["triton"] = timed(peer, new_call(base.clone(), form,
                                                         engine_addressing(base)),
                                          form, tokens, copy)
                row |= {v: measure(v, form, base, tokens, copy) for v in variants}
                print(f"{name} {heads}h {tokens:5d} tok: "
                      + " | ".join(f"{k} {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
