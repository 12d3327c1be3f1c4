"""The static description of one fused-op instance: everything a built module is specialized on.

Token count, batch size, page count, pages per request and ``max_seq_len`` are *not* here: they
are symbolic in the PrimFunc, so one built module serves every batch.
"""

from __future__ import annotations

from dataclasses import dataclass

# dtypes by name, as TVM and torch (``torch.<name>``) both spell them
DTYPES = ("bfloat16", "float16", "float32")
FREQS_DTYPES = ("float32", "bfloat16")
OFFSETS_DTYPES = ("uint32", "int32")
INDEX_DTYPES = ("int64", "int32")  # positions and slot_mapping
ADDRESSINGS = ("offsets", "slots")
FREQS_LAYOUTS = ("interleaved", "split")
NORM_ROUNDINGS = ("before_gamma", "once")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "int64": 8, "int32": 4}


def dtype_name(dtype) -> str:
    """The name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class OpConfig:
    """Static dimensions and dtypes of the fused MLA RoPE + RMSNorm op.

    Attributes
    ----------
    num_q_heads : q heads per token (``q_rope.shape[1]``).
    rope_dim : rotary dims per head, and the width of the cache row's rope part (even).
    kv_norm_dim : width of the cache row's latent part, RMS-normalized in place.
    page_size : cache rows per page (any power of two).
    dtype : dtype of ``q_rope``, ``q_rope_output`` and ``k_cache`` (and of ``kv_input`` and
        ``kv_output``).
    freqs_dtype : dtype of ``freqs_cis``.
    gamma_dtype : dtype of ``gamma``.
    offsets_dtype : dtype of ``input_row_offsets``.
    addressing : how tokens find their position and cache row. ``"offsets"`` (MAX's):
        ``input_row_offsets``, ``cache_lengths`` and ``lookup_table``. ``"slots"`` (vLLM's,
        SGLang's, FlashInfer's): ``positions [m]`` and ``slot_mapping [s]`` (``page *
        page_size + row``; negative: no cache row); tokens from ``m`` on are padding,
        tokens from ``s`` on have no cache row.
    positions_dtype, slots_dtype : dtypes of ``positions`` and ``slot_mapping`` (slots).
    freqs_layout : the cos/sin table's columns: ``"interleaved"`` (MAX's ``freqs_cis``: pair
        ``j``'s cos at ``2j``, sin at ``2j + 1``) or ``"split"`` (vLLM's ``cos_sin_cache``:
        cosines in ``[0, R/2)``, sines in ``[R/2, R)``).
    norm_rounding : ``"before_gamma"`` (HF, DeepSeek, vLLM, MAX): the normalized value is
        rounded to gamma's dtype, multiplied by gamma and rounded again; ``"once"`` (SGLang,
        FlashInfer): ``x * rsqrt(...) * gamma`` in float32, rounded once.
    interleaved : GPT-J pairs ``(x[2j], x[2j+1])`` if True, NeoX pairs ``(x[j], x[j + rope_dim/2])``
        otherwise.
    write_through : the form of the op. False: the new cache rows are updated in place (the
        caller has written the latent there). True: they are written from ``kv_input``
        (``[n, kv_norm_dim + rope_dim]``, the projection's output), never read, and the same
        rows go to ``kv_output`` too if ``kv_output``.
    kv_output : the write-through kernel also writes each new row to ``kv_output`` (``[n,
        kv_norm_dim + rope_dim]``, q's dtype).
    cache_dtype : dtype of ``k_cache`` if not ``dtype``: an fp8 type (write-through only),
        each value computed in ``dtype`` and stored as ``fp8(saturate(value / k_scale))``.
    pdl : programmatic dependent launch (``compiler/grid_dependency.py``; sm_90 or newer):
        the kernel may start while the kernel before it in the stream still runs, and waits
        for it to complete before any memory access, so it is right whatever that kernel
        writes; only the launch and the address arithmetic overlap it.
    pdl_early_indices : with ``pdl``, the index tensors (``input_row_offsets``,
        ``cache_lengths``, ``lookup_table``, or ``positions`` and ``slot_mapping``) are read
        before the wait too: faster, but the kernel right before must not write them.
    alignment : bytes that every tensor's data pointer and row strides are multiples of
        (16 lets the GPU kernel use 16-byte vector accesses; the element size of ``dtype``
        assumes nothing). The kernel relies on it: callers check it per call.
    """

    num_q_heads: int = 128
    rope_dim: int = 64
    kv_norm_dim: int = 512
    page_size: int = 128
    dtype: str = "bfloat16"
    freqs_dtype: str = "float32"
    gamma_dtype: str = "bfloat16"
    offsets_dtype: str = "uint32"
    addressing: str = "offsets"
    positions_dtype: str = "int64"
    slots_dtype: str = "int64"
    freqs_layout: str = "interleaved"
    norm_rounding: str = "before_gamma"
    interleaved: bool = True
    write_through: bool = False
    kv_output: bool = False
    cache_dtype: str | None = None
    pdl: bool = False
    pdl_early_indices: bool = False
    alignment: int = 16

    def __post_init__(self) -> None:
        for name in ("num_q_heads", "rope_dim", "kv_norm_dim", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rope_dim % 2:
            raise ValueError(f"rope_dim must be even, got {self.rope_dim}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("gamma_dtype", self.gamma_dtype, DTYPES)
        _check_choice("freqs_dtype", self.freqs_dtype, FREQS_DTYPES)
        _check_choice("offsets_dtype", self.offsets_dtype, OFFSETS_DTYPES)
        _check_choice("addressing", self.addressing, ADDRESSINGS)
        _check_choice("positions_dtype", self.positions_dtype, INDEX_DTYPES)
        _check_choice("slots_dtype", self.slots_dtype, INDEX_DTYPES)
        _check_choice("freqs_layout", self.freqs_layout, FREQS_LAYOUTS)
        _check_choice("norm_rounding", self.norm_rounding, NORM_ROUNDINGS)
        if self.kv_output and not self.write_through:
            raise ValueError("kv_output needs the write-through form")
        if self.cache_dtype is not None:
            _check_choice("cache_dtype", self.cache_dtype, FP8_DTYPES)
            if not self.write_through:
                raise ValueError("an fp8 cache needs the write-through form (normalizing a "
                                 "latent already quantized in the cache would be lossy)")
        if self.pdl_early_indices and not self.pdl:
            raise ValueError("pdl_early_indices needs pdl")
        if self.alignment not in (1, 2, 4, 8, 16):
            raise ValueError(f"alignment must be a power of two up to 16, got {self.alignment}")

    def aligned_elems(self, dtype: str) -> int:
        """Elements of ``dtype`` that ``alignment`` bytes hold (at least 1)."""
        return max(self.alignment // ITEMSIZE[dtype], 1)

    @property
    def cache_element(self) -> str:
        """The dtype of ``k_cache``'s elements."""
        return self.cache_dtype or self.dtype

    @property
    def row_width(self) -> int:
        """Elements in one cache row: ``kv_norm_dim + rope_dim``."""
        return self.kv_norm_dim + self.rope_dim


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
