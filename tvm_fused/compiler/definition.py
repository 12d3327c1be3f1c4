"""The compute definition of the fused MLA prologue as one TensorIR PrimFunc (no schedule).

``fused_rope_rmsnorm_func(form)`` returns a block-based PrimFunc whose stages read like
SPEC.md. It declares the parameters the form has (``parameters``), asserts its entry
contract, makes the views the branches address, and calls the four branches
(``branches.py``), each locating its own tokens (``locate.py``) because on the GPU they run
in different thread blocks; ``row(t)`` is cache row ``k_cache[slot[t] // page_size, slot[t] %
page_size]``:

    q branch     q_locate  t           q_pos[t]: position of token t if it has a freqs row,
                                       else -1; q_state[t]: PADDING, OK or ERROR
                 q_freqs   t, j, p     cos/sin of pair j at q_pos[t] (0 without a position)
                 q_load    t, h, j, p  q_in  = q_rope[t, h, pair j, elem p]   (if positioned)
                 q_rope    t, h, j, p  q_out = rope(q_in[t, h, j, :], freqs[q_pos[t], j])[p]
                 q_store   t, h, j, p  q_rope_output[t, h, pair j, elem p] = q_out  (if OK)
    k branch     k_locate, k_freqs, k_load, k_rope, [k_quant,] k_store: the same on
                 row(t)[kv_norm_dim:]
    norm branch  norm_locate, norm_load (the latent: row(t)[:kv_norm_dim]),
                 norm_sumsq  t, c (reduction)  sumsq[t] = sum_c float32(x[t, c])^2
                 norm_scale  t                 scale[t] = rsqrt(sumsq[t] / kv_norm_dim + eps)
                 norm_apply  t, c              y[t, c] = dtype(gamma_dtype(gamma_dtype(x * scale[t])
                                                                    * gamma[c]))
                                               (``norm_rounding="once"``: dtype(x * scale[t]
                                               * gamma[c]), one rounding)
                 [norm_quant]
                 norm_store  t, c              row(t)[c] = y[t, c]
    nope branch  nope_locate, [nope_quant,] nope_store  t, h, c
                                               q_nope_out[t, h, c] = q_nope[t, h, c]  (if OK)
    count branch count_locate, count_errors  t errors[0] += 1 if token t is an ERROR

What each field of the form changes:

- ``write_through``: in place, the k and norm branches load the cache row itself;
  write-through, they load token t's row of ``kv_input`` instead and never read the cache;
  ``kv_output``: their stores also write ``kv_output[t]``;
- ``cache_dtype`` (fp8): a stage per branch, ``k_quant`` and ``norm_quant``
  (``fp8(saturate(out / k_scale))``), between the last compute stage and the store: the
  value is first rounded to ``dtype``, as SPEC.md asks;
- ``cache_format="fp8_ds_mla"``: the cache is uint8 rows viewed three ways (``Layout.
  cache_views``: the latent as e4m3, the tile scales as float32, the rope part in q's
  dtype); the norm branch gains ``norm_tile_share`` and ``norm_tile_amax`` (every tile's
  maximum in one reduction over the row), ``norm_tile_scale``, ``norm_quant`` and
  ``norm_scale_store`` (``branches.tile_stages``);
- ``out_dtype`` (fp8): ``q_quant`` between ``q_rope`` and ``q_store``, by ``q_scale``;
  ``q_nope``: the nope branch; ``rope_dim`` 0: no q and k branches;
- ``addressing``: the locate stages' body (``locate.py``), either way giving every branch
  the same per-token values: the position and one slot, ``page * page_size + row``;
- ``freqs_layout`` and ``interleaved``: the strides of the pair views of the table and of
  the rows (``layout.py``), so one body serves every layout and pairing;
- ``pdl``: the PrimFunc names what may be read before the wait for the kernel before
  (``grid_dependency.py``): nothing, or with ``pdl_early_indices`` the index tensors.

Indices that point nowhere (SPEC.md): a token whose position has no freqs row, whose logical
page is past the lookup table's width, whose physical page is ``>= num_pages`` or whose slot
is ``>= num_pages * page_size``, or that no request claims (offsets not ascending from 0), is
an ERROR: none of its rows is written, and ``count_errors`` counts it. A negative physical
page or slot, or a token past ``slot_mapping``, means "no cache row": the q row is still
roped. Rows of ``q_rope`` past ``offsets[batch]`` (past ``positions``) are PADDING: never
read or written. The cache is updated in place: loads read it through ``*_in`` views and
stores write it through others of the same memory, which keeps the dataflow a stage
pipeline; a row is stored only after the stages before have read all of it.

The entry asserts what the kernel was built for: row strides that are multiples of
``form.alignment`` bytes (buffers declare the same alignment for their data pointers, which
``alignment_check.CheckDataAlignment`` asserts), a finite, non-negative epsilon, and (slots)
no more positions than q rows nor slots than positions.

Unscheduled, the PrimFunc builds for ``llvm``; ``schedules/`` maps it onto GPU thread blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import tvm
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder

from ..form import INDEX_LIMIT, INDEX_REFUSAL, ITEMSIZE, Form
from .block_groups import BLOCK_GROUPS
from .branches import count_branch, k_branch, nope_branch, norm_branch, q_branch
from .grid_dependency import GRID_DEPENDENCY
from .layout import Layout, declare
from .locate import Index
from .overlap_check import ALIAS, WRITTEN

OP_NAME = "fused_rope_rmsnorm"

# every parameter a kernel may have, in call order: those a form has (``parameters``) are
# its kernel's arguments
PARAMETERS = ("q_rope", "q_rope_output", "q_nope", "q_nope_out", "kv_input", "kv_output",
              "offsets", "freqs_cis", "gamma", "k_cache", "k_scale", "q_scale", "lookup_table",
              "cache_lengths", "positions", "slot_mapping", "errors", "epsilon")


def parameters(form: Form) -> tuple[str, ...]:
    """The names of the kernel's parameters for ``form``, in call order."""
    offsets, slots = form.addressing == "offsets", form.addressing == "slots"
    present = {"kv_input": form.write_through, "kv_output": form.kv_output,
               "q_nope": form.q_nope, "q_nope_out": form.q_nope,
               "offsets": offsets, "k_scale": form.cache_dtype is not None,
               "q_scale": form.out_dtype is not None,
               "lookup_table": offsets, "cache_lengths": offsets, "positions": slots,
               "slot_mapping": slots}
    return tuple(name for name in PARAMETERS if present.get(name, True))


def _symbols() -> dict:
    """The symbolic sizes and strides of the parameters, as the ABI binds them (64-bit: a
    layer view of a multi-layer cache spans more than 2^31 elements)."""
    return {name: tvm.tirx.Var(name, "int64") for name in (
        "n", "batch", "max_seq_len", "num_pages", "max_pages", "m", "s", "qs0", "qs1", "os0",
        "os1", "ns0", "ns1", "nos0", "nos1", "is0", "vs0", "ks0", "ks1", "ls0", "fs0")}


def _declarations(layout: Layout, v: dict) -> dict:
    """``name -> (shape, dtype, strides, data alignment)`` of every tensor parameter."""
    form, dtype, odtype, one = layout.form, layout.dtype, layout.odtype, layout.ONE
    H, R, D, W = layout.H, layout.R, layout.D, layout.W
    return {
        "q_rope": ((v["n"], H, R), dtype, (v["qs0"], v["qs1"], one), layout.align(dtype)),
        "q_rope_output": ((v["n"], H, R), odtype, (v["os0"], v["os1"], one),
                          layout.align(odtype)),
        "q_nope": ((v["n"], H, D), dtype, (v["ns0"], v["ns1"], one), layout.align(dtype)),
        "q_nope_out": ((v["n"], H, D), odtype, (v["nos0"], v["nos1"], one),
                       layout.align(odtype)),
        "kv_input": ((v["n"], W), dtype, (v["is0"], one), layout.align(dtype)),
        "kv_output": ((v["n"], W), dtype, (v["vs0"], one), layout.align(dtype)),
        "offsets": ((v["batch"] + one,), form.offsets_dtype, None, 4),
        # compact; without rope columns any strides (torch gives an empty table odd ones)
        "freqs_cis": ((v["max_seq_len"], R), layout.fdtype,
                      None if layout.rope else (v["fs0"], one), layout.align(layout.fdtype)),
        "gamma": ((D,), layout.gdtype, None, layout.align(layout.gdtype)),
        "k_cache": ((v["num_pages"], layout.PS, layout.CW), layout.cdtype,
                    (v["ks0"], v["ks1"], one), layout.align(layout.cdtype)),
        "k_scale": ((one,), "float32", None, 4),
        "q_scale": ((one,), "float32", None, 4),
        "lookup_table": ((v["batch"], v["max_pages"]), "int32", (v["ls0"], one), 4),
        "cache_lengths": ((v["batch"],), "int32", None, 4),
        "positions": ((v["m"],), form.positions_dtype, None, ITEMSIZE[form.positions_dtype]),
        "slot_mapping": ((v["s"],), form.slots_dtype, None, ITEMSIZE[form.slots_dtype]),
        "errors": ((one,), "int32", None, 4),
    }


def _handle_name(name: str) -> str:
    """The name of a tensor parameter's handle (as the PrimFunc prints it)."""
    short = {"q_rope": "q", "q_rope_output": "out", "q_nope_out": "nope_out",
             "freqs_cis": "freqs", "k_cache": "k",
             "lookup_table": "lookup", "cache_lengths": "lengths", "slot_mapping": "slots"}
    return f"{short.get(name, name)}_handle"


@dataclasses.dataclass(frozen=True)
class Tensors:
    """The declared parameters by name (None where the form has none), and the symbols."""

    buffers: dict
    symbols: dict

    def __getattr__(self, name):
        return self.buffers.get(name) if name in PARAMETERS else self.symbols[name]


def _constant(shape) -> bool:
    """Every size in ``shape`` is a constant."""
    return all(isinstance(size, tvm.tirx.IntImm) for size in shape)


def declare_parameters(abi: Layout, body: Layout) -> Tensors:
    """Declare the form's parameters in call order (inside the PrimFunc being built): the
    symbolic sizes in ``abi``'s dtype (int64, what the ABI binds), a tensor of constant
    sizes (gamma, the scales, the error count) in ``body``'s index dtype (its loops meet the
    body's thread indices)."""
    symbols = _symbols()
    wide, buffers = _declarations(abi, symbols), {}
    narrow = _declarations(body, symbols)
    for name in parameters(abi.form):
        if name == "epsilon":
            buffers[name] = T.arg("epsilon", T.float32())
            continue
        shape, dtype, strides, align = narrow[name] if _constant(narrow[name][0]) else wide[name]
        handle = T.arg(_handle_name(name), T.handle())
        buffers[name] = T.match_buffer(handle, shape, dtype, strides=strides, align=align)
        IRBuilder.name(name, buffers[name])
    return Tensors(buffers, symbols)


def _fits(buffer) -> tvm.tirx.PrimExpr:
    """``buffer`` (an ABI parameter) has fewer than 2^31 elements, and its strides span
    fewer (``form.INDEX_LIMIT``)."""
    elements = functools.reduce(operator.mul, buffer.shape)
    fits = elements < T.int64(INDEX_LIMIT)
    if buffer.strides:
        span = functools.reduce(operator.add, [size * stride for size, stride in zip(
            buffer.shape, buffer.strides, strict=True)])
        fits = tvm.tirx.all(fits, span < T.int64(INDEX_LIMIT))
    return fits


def _all_fit(tensors: Tensors) -> tvm.tirx.PrimExpr:
    """Every tensor parameter ``_fits``."""
    return tvm.tirx.all(*(_fits(buffer) for name, buffer in tensors.buffers.items()
                          if name != "epsilon"))


@T.macro
def _assert_32_bit_index(a):
    assert _all_fit(a), (
        "ValueError", ["a tensor of 2^31 elements or more, or whose strides span as many, "
                       + INDEX_REFUSAL + " (Form(index_bits=64)); the torch entry points "
                       "call it themselves"])


def narrow_parameters(tensors: Tensors, layout: Layout) -> Tensors:
    """The parameters as the branches of a kernel indexing in ``layout.index_dtype`` see
    them: ``tensors`` themselves for 64 bits; for 32, each tensor with a symbolic size
    viewed with its sizes and strides narrowed (inside the PrimFunc being built, after
    ``_assert_32_bit_index``); those of constant sizes (gamma, the scales, the error count)
    as they are."""
    if layout.index_dtype == "int64":
        return tensors
    used = {expr for name, buffer in tensors.buffers.items() if name != "epsilon"
            for expr in (*buffer.shape, *buffer.strides) if isinstance(expr, tvm.tirx.Var)}
    symbols = {name: T.Cast(layout.index_dtype, var) if var in used
               else tvm.tirx.Var(name, layout.index_dtype)
               for name, var in tensors.symbols.items()}
    declarations, buffers = _declarations(layout, symbols), {}
    for name, buffer in tensors.buffers.items():
        if name == "epsilon" or _constant(buffer.shape):
            buffers[name] = buffer
            continue
        shape, dtype, strides, _ = declarations[name]
        buffers[name] = declare(name, shape, dtype, data=buffer.data, strides=strides)
    return Tensors(buffers, symbols)


def _func_attrs(form: Form) -> dict:
    """The PrimFunc's attributes: its name; the branches become one launch
    (``MergeBlockGroups``, which checks that they write disjoint tensors but for the cache
    rows and ``kv_output``, of which the k rope and norm branches write other columns: the
    definition's views say so); with PDL what may be read before the wait; the written
    tensors the entry checks for overlaps (the output of q may be q itself, an in-place
    update with its strides)."""
    index_names = (["positions", "slot_mapping"] if form.addressing == "slots"
                   else ["offsets", "lookup_table", "cache_lengths"])
    early = {GRID_DEPENDENCY: index_names if form.pdl_early_indices else []} if form.pdl else {}
    written = ["q_rope_output", *(["q_nope_out"] if form.q_nope else []), "k_cache",
               *(["kv_output"] if form.kv_output else []), "errors"]
    # the output of q may be q itself (same dtype only)
    alias = {} if form.out_dtype else {ALIAS: ["q_rope_output", "q_rope"]}
    return {"global_symbol": OP_NAME, BLOCK_GROUPS: ["k_cache", "kv_output"], **early,
            WRITTEN: written, **alias}


# fmt: off
def _entry_checks(layout: Layout):
    """A macro asserting what the kernel was built for (see the module's docstring)."""
    dtype, cdtype, odtype = layout.dtype, layout.cdtype, layout.odtype

    @T.macro
    def checks(a):
        assert layout.multiples(dtype, a.qs0, a.qs1), layout.refusal("q_rope", dtype)
        assert layout.multiples(odtype, a.os0, a.os1), layout.refusal("q_rope_output", odtype)
        assert layout.multiples(cdtype, a.ks0, a.ks1), layout.refusal("k_cache", cdtype)
        if layout.form.q_nope:
            assert layout.multiples(dtype, a.ns0, a.ns1), layout.refusal("q_nope", dtype)
            assert layout.multiples(odtype, a.nos0, a.nos1), layout.refusal("q_nope_out",
                                                                           odtype)
        if layout.write_through:
            assert layout.multiples(dtype, a.is0), layout.refusal("kv_input", dtype)
        if layout.kv_output:
            assert layout.multiples(dtype, a.vs0), layout.refusal("kv_output", dtype)
        assert T.isfinite(a.epsilon) and a.epsilon >= T.float32(0), (
            "ValueError", ["epsilon must be finite and non-negative"])
        if layout.slots:
            assert a.m <= a.n, ("ValueError", ["positions has more entries than q_rope's rows"])
            assert a.s <= a.m, ("ValueError", ["slot_mapping has more entries than positions"])
    return checks


def _branches(layout: Layout):
    """A macro making the views the branches address, then calling them (no rope branch
    without rope dims; the nope branch only with ``q_nope``)."""
    R2, TWO, dtype, odtype = layout.R2, layout.TWO, layout.dtype, layout.odtype

    @T.macro
    def body(a):
        index = T.meta_var(Index(a.offsets, a.cache_lengths, a.lookup_table, a.positions,
                                 a.slot_mapping, a.max_seq_len, a.num_pages * layout.PS))
        if layout.rope:
            q_pairs = T.decl_buffer((a.n, layout.H, R2, TWO), dtype, data=a.q_rope.data,
                                    elem_offset=a.q_rope.elem_offset,
                                    strides=layout.pair_strides(a.qs0, a.qs1))
            out_pairs = T.decl_buffer((a.n, layout.H, R2, TWO), odtype,
                                      data=a.q_rope_output.data,
                                      elem_offset=a.q_rope_output.elem_offset,
                                      strides=layout.pair_strides(a.os0, a.os1, dtype=odtype))
            freqs_pairs = T.decl_buffer((a.max_seq_len, R2, TWO), layout.fdtype,
                                        data=a.freqs_cis.data,
                                        elem_offset=a.freqs_cis.elem_offset,
                                        strides=layout.freqs_strides)
        # the cache's views after q's (the order keeps earlier forms' TensorIR, and with it
        # their tuning records' workload hashes, as they were)
        k_rows, k_pairs, k_scales = T.meta_var(layout.cache_views(a.k_cache, a.ks0, a.ks1))
        if layout.rope:
            q_branch(layout)(a.n, q_pairs, out_pairs, freqs_pairs, a.q_scale, index)
        if layout.form.q_nope:
            nope_branch(layout)(a.n, a.q_nope, a.q_nope_out, a.q_scale, index)
        if layout.write_through:  # the k and norm branches read kv_input (and write kv_output)
            input_rows, input_pairs = T.meta_var(layout.row_views("input", a.kv_input, dtype,
                                                                  a.is0))
            output_rows, output_pairs = T.meta_var(layout.row_views("output", a.kv_output,
                                                                    dtype, a.vs0))
            if layout.rope:
                k_branch(layout)(a.n, input_pairs, k_pairs, output_pairs, freqs_pairs,
                                 a.k_scale, index)
            norm_branch(layout)(a.n, input_rows, (k_rows, k_scales), output_rows, a.gamma,
                                a.epsilon, a.k_scale, index)
        else:  # the k and norm branches update the cache rows in place, through views that
            # read them (a stage pipeline: a row is stored after the stages before read it)
            k_in_rows, k_in_pairs = T.meta_var(layout.row_views("k_in", a.k_cache, dtype,
                                                                a.ks0, a.ks1))
            if layout.rope:
                k_branch(layout)(a.n, k_in_pairs, k_pairs, None, freqs_pairs, None, index)
            norm_branch(layout)(a.n, k_in_rows, (k_rows, None), None, a.gamma, a.epsilon,
                                None, index)
        count_branch(layout)(a.n, a.errors, index)
    return body


def fused_rope_rmsnorm_func(form: Form) -> tvm.tirx.PrimFunc:
    """The fused op as an unscheduled block-based PrimFunc named ``fused_rope_rmsnorm``,
    taking ``parameters(form)`` in order (``n`` tokens, ``H`` heads, ``R`` rope_dim, ``D``
    kv_norm_dim, ``W = D + R``; every other dim symbolic too):

    - q_rope, q_rope_output ``[n, H, R]`` dtype, strides ``(s0, s1, 1)``; the output may be
      q_rope itself
    - kv_input ``[n, W]`` dtype, strides ``(is0, 1)`` (write-through: the new rows, never
      written); kv_output ``[n, W]`` dtype (with ``form.kv_output``)
    - offsets ``[batch + 1]``, lookup_table ``[batch, max_pages]``, cache_lengths
      ``[batch]`` (offsets addressing); positions ``[m]``, slot_mapping ``[s]`` (slots)
    - freqs_cis ``[max_seq_len, R]``, gamma ``[D]``, both compact
    - k_cache ``[num_pages, page_size, W]`` cache dtype, strides ``(ks0, ks1, 1)``; k_scale
      ``[1]`` float32 (an fp8 cache: it stores ``value / k_scale``)
    - errors ``[1]`` int32 (the number of ERROR tokens is added to it), epsilon float32

    Every tensor of q's or the cache's dtype must start at a multiple of ``form.alignment``
    bytes (so must ``freqs_cis`` and ``gamma``), and its row strides be multiples of it: the
    compiled entry refuses other tensors before launching.
    """
    abi, layout = Layout(form), Layout(form, form.index_dtype)
    attrs, checks, branches = _func_attrs(form), _entry_checks(abi), _branches(layout)
    narrow = form.index_bits == 32

    @T.prim_func(s_tir=True)
    def fused_rope_rmsnorm():
        T.func_attr(attrs)
        tensors = T.meta_var(declare_parameters(abi, layout))
        checks(tensors)
        if narrow:
            _assert_32_bit_index(tensors)
        narrowed = T.meta_var(narrow_parameters(tensors, layout))
        branches(narrowed)

    return fused_rope_rmsnorm
# fmt: on
