"""What the definition's stages read of a form: static sizes as TIR constants, dtypes, which
stages exist, and the strides and views through which tensors are addressed."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder

from ..form import ITEMSIZE, Form
from .exact_math import quantizer_div, round_to


def f32(x):
    """``x`` as float32."""
    return T.Cast("float32", x)


class Layout:
    """The static side of ``form``'s definition.

    Sizes are constants of ``index_dtype``, the dtype of the symbolic dims they meet (the
    ABI binds int64 shapes; a 32-bit kernel's body narrows them, see ``definition.py``): ``H``
    heads, ``R`` rope dims (``R2`` pairs), ``D`` latent dims, ``W = D + R`` a row, ``PS``
    rows per page. Rope pairs are addressed through views ``[..., R/2, 2]`` whose strides
    (``pair``: ``(pj, pp)``) encode the pairing, and the cos/sin table through a view
    ``[max_seq_len, R/2, 2]`` whose strides encode its layout.
    """

    def __init__(self, form: Form, index_dtype: str = "int64"):
        self.form, self.index_dtype = form, index_dtype
        self.H, self.R, self.D, self.PS, self.W, self.R2 = (self.const(v) for v in (
            form.num_q_heads, form.rope_dim, form.kv_norm_dim, form.page_size,
            form.row_width, form.rope_dim // 2))
        self.ZERO, self.ONE, self.TWO, self.NONE = (self.const(v) for v in (0, 1, 2, -1))
        self.CW, self.TILES = self.const(form.cache_row), self.const(max(form.scale_tiles, 1))
        self.dtype, self.gdtype, self.fdtype = form.dtype, form.gamma_dtype, form.freqs_dtype
        self.cdtype, self.odtype = form.cache_element, form.out_element
        self.write_through, self.kv_output = form.write_through, form.kv_output
        self.fp8 = form.cache_dtype is not None  # a per-tensor fp8 cache (``k_scale``)
        self.ds_mla = form.ds_mla
        self.rope = form.rope_dim > 0
        self.slots = form.addressing == "slots"
        self.round_once = form.norm_rounding == "once"
        # the pair view's strides of (pair j, element p): adjacent, or R/2 apart (NeoX)
        self.pair = (self.TWO, self.ONE) if form.interleaved else (self.ONE, self.R2)
        self.freqs_strides = ((self.R, self.TWO, self.ONE) if form.freqs_layout == "interleaved"
                              else (self.R, self.ONE, self.R2))

    def const(self, value: int) -> tvm.tirx.IntImm:
        """``value`` as an index constant."""
        return tvm.tirx.IntImm(self.index_dtype, value)

    def index(self, value, low=None, high=None):
        """``value`` (int64) as an index: a 32-bit kernel's narrowed, clamped into ``[low,
        high]`` first where given (every value past an end means what the end means)."""
        if self.index_dtype == "int64":
            return value
        if low is not None:
            value = T.max(T.min(value, high), low)
        return T.Cast(self.index_dtype, value)

    def align(self, dtype: str) -> int:
        """Data-pointer alignment a buffer of ``dtype`` declares (and the entry checks)."""
        return max(self.form.alignment, ITEMSIZE[dtype])

    def aligned(self, stride, dtype: str | None = None):
        """``stride`` as a visible multiple of the elements of ``dtype`` (default q's) the
        alignment holds (equal to it: the entry asserts it), so that vector accesses through
        the views are provably aligned."""
        elems = self.const(self.form.aligned_elems(dtype or self.dtype))
        return stride // elems * elems

    def pair_strides(self, *row_strides, dtype: str | None = None) -> tuple:
        """Strides of a ``[..., R/2, 2]`` pair view of rows with strides ``(*row_strides,
        1)``."""
        return (*(self.aligned(s, dtype) for s in row_strides), *self.pair)

    def multiples(self, dtype: str, *strides):
        """The strides are multiples of the elements of ``dtype`` the alignment holds."""
        elems = self.const(self.form.aligned_elems(dtype))
        return tvm.tirx.all(*(stride % elems == self.ZERO for stride in strides))

    def refusal(self, name: str, dtype: str) -> tuple:
        """The entry's ValueError for a tensor whose strides this kernel was not built for."""
        return ("ValueError", [
            f"{name}'s strides must be multiples of {self.form.aligned_elems(dtype)} elements "
            f"({self.form.alignment} bytes), the alignment this kernel was built for"])

    def row_views(self, name: str, rows, dtype: str, *strides) -> tuple:
        """Views of the rows ``[..., W]`` of buffer ``rows`` (leading strides ``strides``):
        ``{name}_rows``, the whole rows, and ``{name}_pairs`` ``[..., R/2, 2]``, their rope
        part; ``(None, None)`` without the buffer."""
        if rows is None:
            return None, None
        lead = tuple(rows.shape[:-1])
        whole = declare(f"{name}_rows", (*lead, self.W), dtype, data=rows.data,
                        elem_offset=rows.elem_offset,
                        strides=(*(self.aligned(s, dtype) for s in strides), self.ONE))
        pairs = declare(f"{name}_pairs", (*lead, self.R2, self.TWO), dtype, data=rows.data,
                        elem_offset=rows.elem_offset + self.D,
                        strides=self.pair_strides(*strides, dtype=dtype))
        return whole, pairs

    def cache_views(self, k_cache, ks0, ks1) -> tuple:
        """The views of ``k_cache`` the stores write: ``(k_rows, k_pairs, k_scales)``, the
        latent as rows ``[..., W]`` (of which the first ``D`` are the latent), the rope part
        as pairs ``[..., R/2, 2]`` in the rope dtype, and the tile scales ``[..., D/128]``
        float32 (None but for fp8_ds_mla, whose uint8 row holds the latent as e4m3 bytes,
        then the scales, then the rope part in ``dtype``)."""
        if not self.ds_mla:
            return (*self.row_views("k", k_cache, self.cdtype, ks0, ks1), None)
        lead = tuple(k_cache.shape[:-1])
        start = k_cache.elem_offset  # bytes
        scales_at = self.form.kv_norm_dim  # bytes into the row
        rope_at = scales_at + 4 * self.form.scale_tiles
        latent = declare("k_rows", (*lead, self.D), "float8_e4m3fn", data=k_cache.data,
                         elem_offset=start, strides=(
                             self.aligned(ks0, "uint8"), self.aligned(ks1, "uint8"), self.ONE))
        scales = declare("k_scales", (*lead, self.TILES), "float32", data=k_cache.data,
                         elem_offset=start // self.const(4) + self.const(scales_at // 4),
                         strides=(ks0 // self.const(4), ks1 // self.const(4), self.ONE))
        pairs = declare("k_pairs", (*lead, self.R2, self.TWO), self.dtype, data=k_cache.data,
                        elem_offset=start // self.TWO + self.const(rope_at // 2),
                        strides=self.pair_strides(ks0 // self.TWO, ks1 // self.TWO))
        return latent, pairs, scales

    def scaled(self, value, k_scale):
        """``value`` (q's dtype) over the cache's scale: a float32 quotient exact for fp8
        (``quantizer_div``; the value rounded to q's dtype on every target first: see
        ``exact_math``)."""
        return quantizer_div(round_to(self.dtype, f32(value)), k_scale[0])


def declare(name: str, *args, **kwargs):
    """``T.decl_buffer(*args, **kwargs)`` named ``name`` (as the parser names ``name =
    T.decl_buffer(...)``), for helpers that make views."""
    buffer = T.decl_buffer(*args, **kwargs)
    IRBuilder.name(name, buffer)
    return buffer
