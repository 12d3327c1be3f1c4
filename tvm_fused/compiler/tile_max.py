"""Several maxima reduced by one block: ``amax_i[t] = max(amax_i[t], value_i)`` for each tile
``i`` of a row (of uint32 values: the bits of non-negative floats, which order alike), a tuple
reduction, so that a GPU schedule reduces every tile of the row in one cross-thread allreduce
(each shuffle step moves all the tiles' values, independent of each other) instead of one
allreduce after another.

TVM recognizes a reduction block only through its registry of comm reducers, which knows sums,
maxima and argmax: ``_register_max_reducer(k)`` adds the k-tuple of maxima (of any dtype, the
identity its smallest value: 0 for uint32). The registry is a C++ static that outlives the
interpreter, so the Python getters it holds are never freed (a reference is leaked on
purpose: freeing them after Python has shut down crashes at exit). Importing this module
registers the tuples of 2 to ``MAX_TILES`` maxima: every process that lowers a module with
such a block (a build, a MetaSchedule builder worker) imports it through ``pipeline.py``; a
longer tuple is registered where its block is defined.
"""

from __future__ import annotations

import ctypes
import functools

import tvm
import tvm_ffi
from tvm.script import tirx as T
from tvm.script.ir_builder import tirx as builder

MAX_TILES = 16  # tiles of 128 per row: latent rows of up to 2048 elements


@functools.cache
def _register_max_reducer(count: int) -> None:
    """Teach TVM's reducer registry the ``count``-tuple of maxima (once)."""
    combiner = tvm_ffi.convert(lambda x, y: [T.max(a, b) for a, b in zip(x, y, strict=True)])
    identity = tvm_ffi.convert(lambda values: [T.min_value(v.ty.dtype) for v in values])
    for getter in (combiner, identity):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(getter))
    tvm.get_global_func("s_tir.schedule.RegisterReducer")(count, combiner, identity)


for _count in range(2, MAX_TILES + 1):
    _register_max_reducer(_count)


def alloc_maxima(n, count: int) -> list:
    """``count`` uint32 buffers ``[n]``, one per tile (inside a block's scope)."""
    return [T.sblock_alloc_buffer((n,), "uint32") for _ in range(count)]


def init_maxima(maxima: list, t) -> None:
    """The reduction's init: ``maxima[i][t] = 0`` for every tile ``i``."""
    for buffer in maxima:
        builder.buffer_store(buffer, T.uint32(0), [t])


def update_maxima(maxima: list, t, values: list) -> None:
    """The reduction's body, in the form TVM matches: every new maximum bound first, then
    stored (``maxima[i][t] = max(maxima[i][t], values[i])``)."""
    _register_max_reducer(len(maxima))  # rows of more than MAX_TILES tiles
    bound = [builder.bind(T.max(buffer[t], value)) for buffer, value in zip(maxima, values,
                                                                             strict=True)]
    for buffer, value in zip(maxima, bound, strict=True):
        builder.buffer_store(buffer, value, [t])
