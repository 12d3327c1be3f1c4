"""One description of a form of the op: ``Form``, everything a built kernel is specialized on.

Token count, batch size, page count, pages per request and table length are *not* in it: they
are symbolic in the kernel, so one build serves every batch. Each field of ``Form`` is one
dimension of the op (a dtype, a static dim, the cache format, the addressing, the table
layout, the pairing, the norm rounding, where the latent comes from, which outputs exist,
the launch), and its entry in the dataclass carries what the rest of the package derives
from it, so that a new dimension is one entry here:

- ``choices``: the values it takes (checked by ``Form``);
- ``cli``: its options on the command line (``add_cli_options``, ``from_cli``: the ``run``,
  ``source`` and ``tune`` commands);
- ``key``: its token in ``Form.key()``, which names the tuning records folder (a token only
  where the value differs from the usual one, so that common forms keep short names).

The kernel cache keys a build by every field (``compiler/kernel_cache.py``), the definition
reads the fields to pick its stages (``compiler/definition.py``), and the torch-facing call
derives the form of each call from its tensors (``dispatch.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

# dtypes by name, as TVM and torch (``torch.<name>``) both spell them
DTYPES = ("bfloat16", "float16", "float32")
FREQS_DTYPES = ("float32", "bfloat16")
OFFSETS_DTYPES = ("uint32", "int32")
INDEX_DTYPES = ("int64", "int32")  # positions and slot_mapping
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "uint8": 1, "int64": 8, "int32": 4, "uint32": 4}
CACHE_FORMATS = ("plain", "fp8_ds_mla")
DS_MLA_TILE = 128  # fp8_ds_mla: latent values per float32 scale
ALIGNMENTS = (16, 8, 4, 2, 1)
INDEX_BITS = (32, 64)  # the kernel's index arithmetic (``index_bits``)
# a 32-bit kernel's tensors each have fewer elements than this, and span fewer: the sum of
# size * stride over their dims (past the last element's offset) is below it too
INDEX_LIMIT = 2**31
# what a 32-bit kernel's entry says of tensors past INDEX_LIMIT (the torch entry points then
# call the 64-bit kernel)
INDEX_REFUSAL = "needs a kernel of 64-bit indices"


def dtype_name(dtype) -> str:
    """The name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def _dim(flags: tuple[str, ...], prefix: str, help_text: str):
    """A static dim: a positive int, always in the key as ``prefix`` + value."""
    return {"cli": {"flags": flags, "help": help_text},
            "key": lambda form, value: f"{prefix}{value}"}


def _switch(flag: str, token: str, help_text: str):
    """An on/off property: ``flag`` turns it on; ``token`` in the key when on."""
    return {"cli": {"flags": (flag,), "help": help_text},
            "key": lambda form, value: token if value else ""}


def _choice(choices: tuple, flags: tuple[str, ...], help_text: str,
            key: Callable | None = None, switches: dict | None = None):
    """One of ``choices`` (the first the usual one); ``key(form, value)`` its key token
    (default: the value where it is not the first choice); ``switches``: flags that set one
    value (``{"--slots": "slots"}``)."""
    return {"choices": choices,
            "cli": {"flags": flags, "help": help_text, "switches": switches or {}},
            "key": key or (lambda form, value: "" if value == choices[0] else str(value))}


@dataclass(frozen=True)
class Form:
    """Static dims, dtypes and options of the fused MLA RoPE + RMSNorm op.

    Attributes
    ----------
    dtype : of ``q_rope``, its output, ``kv_input`` and ``kv_output`` (and ``k_cache``
        unless ``cache_dtype``).
    num_q_heads : q heads per token (``q_rope.shape[1]``).
    rope_dim : rotary dims per head and of the cache row's rope part (even).
    kv_norm_dim : the cache row's latent part, RMS-normalized.
    page_size : cache rows per page (a power of two).
    interleaved : GPT-J pairs ``(x[2j], x[2j+1])`` if True, NeoX ``(x[j], x[j + R/2])`` if not.
    write_through : where the latent comes from. False: the new cache rows are updated in
        place (the caller wrote them). True: they are written from ``kv_input`` (``[n, D +
        R]``, the projection's output), never read.
    kv_output : the write-through form also writes each new row to ``kv_output``.
    cache_dtype : ``k_cache``'s dtype where it is not ``dtype``: fp8 (write-through only),
        each value computed in ``dtype`` and stored as ``fp8(saturate(value / k_scale))``.
    cache_format : ``"plain"`` (a row of ``D + R`` values) or ``"fp8_ds_mla"`` (DeepSeek-V3.2's
        row of ``D + 4 D/128 + 2 R`` bytes in a uint8 cache: the latent in e4m3 per tile of
        128 values, the tiles' float32 scales, the rope part in ``dtype``; write-through).
    tile_scale : fp8_ds_mla's tile scales: ``"raw"`` (``amax / 448``, vLLM's) or ``"pow2"``
        (rounded up to a power of two, FlashMLA's reference).
    out_dtype : the roped q's output dtype where it is not ``dtype``: fp8, each value stored as
        ``fp8(saturate(value / q_scale))`` (the fp8 attention query).
    q_nope : the op also copies ``q_nope [n, H, D]`` to ``q_nope_out`` (in ``out_dtype``), the
        attention query's other columns.
    pdl : programmatic dependent launch (sm_90+, ``compiler/grid_dependency.py``): the kernel
        may start while the one before still runs, and waits for it before any memory
        access.
    pdl_early_indices : with ``pdl``, the index tensors are read before the wait too.
    addressing : ``"offsets"`` (MAX's: ``input_row_offsets``, ``cache_lengths``,
        ``lookup_table``) or ``"slots"`` (vLLM's, SGLang's: ``positions``, ``slot_mapping``).
    freqs_layout : the cos/sin table's columns: ``"interleaved"`` (MAX's ``freqs_cis``) or
        ``"split"`` (vLLM's ``cos_sin_cache``: cosines, then sines).
    norm_rounding : ``"before_gamma"`` (HF, DeepSeek, vLLM, MAX: the normalized value rounded
        to gamma's dtype before the product) or ``"once"`` (SGLang, FlashInfer).
    freqs_dtype, gamma_dtype : of the cos/sin table and of ``gamma`` (None: ``dtype``).
    offsets_dtype : of ``input_row_offsets`` (offsets addressing).
    positions_dtype, slots_dtype : of ``positions`` and ``slot_mapping`` (slots addressing).
    alignment : bytes every tensor's data pointer and row strides are multiples of (16 lets
        the GPU kernel access 16-byte vectors); the kernel's entry refuses other tensors.
    index_bits : 32: the kernel indexes in 32 bits, for tensors each of fewer than 2^31
        elements whose strides span fewer than 2^31 (``INDEX_LIMIT``; its entry refuses
        others); 64: any tensor (a cache of every layer, a long prefill's full q).
        The torch entry points call the 32-bit kernel, the 64-bit one where it refuses.
    """

    dtype: str = field(default="bfloat16", metadata=_choice(
        DTYPES, ("--dtype",), "dtype of q, the latent rows and the cache",
        key=lambda form, value: value))
    num_q_heads: int = field(default=128, metadata=_dim(("--heads",), "h", "q heads"))
    rope_dim: int = field(default=64, metadata=_dim(("--rope-dim",), "r", "rotary dims"))
    kv_norm_dim: int = field(default=512, metadata=_dim(
        ("--kv-norm-dim",), "d", "latent dims of a cache row"))
    page_size: int = field(default=128, metadata=_dim(
        ("--page-size",), "p", "cache rows per page, a power of two"))
    interleaved: bool = field(default=True, metadata={
        "cli": {"flags": ("--neox",), "help": "NeoX (half-split) rope pairs", "inverted": True},
        "key": lambda form, value: "gptj" if value else "neox"})
    write_through: bool = field(default=False, metadata=_switch(
        "--write-through", "write-through",
        "the write-through form: new rows from kv_input (the projection output)"))
    kv_output: bool = field(default=False, metadata=_switch(
        "--kv-output", "kv-output", "with --write-through: the new rows go to kv_output too"))
    cache_dtype: str | None = field(default=None, metadata=_choice(
        (None, *FP8_DTYPES), ("--cache-dtype",), "an fp8 cache (with --write-through)"))
    cache_format: str = field(default="plain", metadata=_choice(
        CACHE_FORMATS, ("--cache-format",), "the cache row's format (with --write-through)",
        key=lambda form, value: "" if value == "plain" else "ds-mla"))
    tile_scale: str = field(default="raw", metadata=_choice(
        ("raw", "pow2"), ("--tile-scale",), "fp8_ds_mla's tile scales"))
    out_dtype: str | None = field(default=None, metadata=_choice(
        (None, *FP8_DTYPES), ("--out-dtype",), "an fp8 roped q (the fp8 attention query)",
        key=lambda form, value: "" if value is None else f"q-{value}"))
    q_nope: bool = field(default=False, metadata=_switch(
        "--q-nope", "q-nope", "also write q_nope to q_nope_out (the whole attention query)"))
    pdl: bool = field(default=False, metadata=_switch(
        "--pdl", "pdl", "programmatic dependent launch (sm_90+)"))
    pdl_early_indices: bool = field(default=False, metadata=_switch(
        "--pdl-early-indices", "early-indices", "with --pdl: index reads before the wait"))
    addressing: str = field(default="offsets", metadata=_choice(
        ("offsets", "slots"), ("--addressing",), "how tokens find their row",
        switches={"--slots": "slots"}))
    freqs_layout: str = field(default="interleaved", metadata=_choice(
        ("interleaved", "split"), ("--freqs-layout",), "the cos/sin table's columns",
        key=lambda form, value: "split-table" if value == "split" else "",
        switches={"--split-table": "split"}))
    norm_rounding: str = field(default="before_gamma", metadata=_choice(
        ("before_gamma", "once"), ("--norm-rounding",), "the RMSNorm's rounding",
        key=lambda form, value: "norm-once" if value == "once" else "",
        switches={"--norm-once": "once"}))
    freqs_dtype: str = field(default="float32", metadata=_choice(
        FREQS_DTYPES, ("--freqs-dtype",), "dtype of the cos/sin table",
        key=lambda form, value: "" if value == "float32" else f"freqs-{value}"))
    gamma_dtype: str | None = field(default=None, metadata=_choice(
        (None, *DTYPES), ("--gamma-dtype",), "dtype of gamma (default: --dtype)",
        key=lambda form, value: "" if value == form.dtype else f"gamma-{value}"))
    offsets_dtype: str = field(default="uint32", metadata=_choice(
        OFFSETS_DTYPES, ("--offsets-dtype",), "dtype of input_row_offsets",
        key=lambda form, value: "" if value == "uint32" or form.addressing != "offsets"
        else f"offsets-{value}"))
    positions_dtype: str = field(default="int64", metadata=_choice(
        INDEX_DTYPES, ("--positions-dtype",), "dtype of positions (--slots)",
        key=lambda form, value: "" if value == "int64" or form.addressing != "slots"
        else f"positions-{value}"))
    slots_dtype: str = field(default="int64", metadata=_choice(
        INDEX_DTYPES, ("--slots-dtype",), "dtype of slot_mapping (--slots)",
        key=lambda form, value: "" if value == "int64" or form.addressing != "slots"
        else f"slots-{value}"))
    alignment: int = field(default=16, metadata=_choice(
        ALIGNMENTS, ("--alignment",), "bytes every pointer and row stride is a multiple of",
        key=lambda form, value: "" if value == 16 else f"align{value}"))
    index_bits: int = field(default=32, metadata=_choice(
        INDEX_BITS, ("--index-bits",), "the kernel's index arithmetic (64: tensors of 2^31 "
        "elements or more)", key=lambda form, value: "" if value == 32 else "index64"))

    def __post_init__(self) -> None:
        if self.gamma_dtype is None:
            object.__setattr__(self, "gamma_dtype", self.dtype)
        for entry in dataclasses.fields(self):
            value = getattr(self, entry.name)
            if "choices" in entry.metadata and value not in entry.metadata["choices"]:
                raise ValueError(f"{entry.name} must be one of {entry.metadata['choices']}, "
                                 f"got {value!r}")
        for name in ("num_q_heads", "kv_norm_dim", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rope_dim < 0:
            raise ValueError(f"rope_dim must be 0 or positive, got {self.rope_dim}")
        if self.rope_dim % 2:
            raise ValueError(f"rope_dim must be even, got {self.rope_dim}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.kv_output and not self.write_through:
            raise ValueError("kv_output needs the write-through form")
        if self.cache_dtype is not None and not self.write_through:
            raise ValueError("an fp8 cache needs the write-through form (normalizing a "
                             "latent already quantized in the cache would be lossy)")
        if self.ds_mla:
            self._check_ds_mla()
        elif self.tile_scale != "raw":
            raise ValueError("tile_scale applies to the fp8_ds_mla cache format only")
        if self.pdl_early_indices and not self.pdl:
            raise ValueError("pdl_early_indices needs pdl")

    def _check_ds_mla(self) -> None:
        if not self.write_through:
            raise ValueError("the fp8_ds_mla cache format needs the write-through form "
                             "(kv_input)")
        if self.cache_dtype is not None:
            raise ValueError("the fp8_ds_mla cache format takes a uint8 k_cache (its own fp8 "
                             "values and scales), not an fp8 cache_dtype")
        if self.dtype == "float32":
            raise ValueError("the fp8_ds_mla row keeps the rope part in 16 bits: q must be "
                             "bfloat16 or float16, got float32")
        if self.kv_norm_dim % DS_MLA_TILE:
            raise ValueError(f"the fp8_ds_mla row quantizes tiles of {DS_MLA_TILE}: "
                             f"kv_norm_dim must be a multiple, got {self.kv_norm_dim}")
        if self.alignment < 4:
            raise ValueError("the fp8_ds_mla row holds float32 scales: every pointer and row "
                             "stride must be a multiple of 4 bytes")

    def key(self) -> str:
        """The form's name in tuning records: each field's token, in field order
        (``bfloat16-h128-r64-d512-p128-gptj-write-through-float8_e4m3fn``)."""
        tokens = (entry.metadata["key"](self, getattr(self, entry.name))
                  for entry in dataclasses.fields(self))
        return "-".join(token for token in tokens if token)

    def aligned_elems(self, dtype: str) -> int:
        """Elements of ``dtype`` that ``alignment`` bytes hold (at least 1)."""
        return max(self.alignment // ITEMSIZE[dtype], 1)

    @property
    def index_dtype(self) -> str:
        """The dtype of the kernel's index arithmetic."""
        return f"int{self.index_bits}"

    @property
    def ds_mla(self) -> bool:
        """The cache holds fp8_ds_mla rows."""
        return self.cache_format == "fp8_ds_mla"

    @property
    def cache_element(self) -> str:
        """The dtype of ``k_cache``'s elements."""
        return "uint8" if self.ds_mla else self.cache_dtype or self.dtype

    @property
    def out_element(self) -> str:
        """The dtype of the roped q's output (and ``q_nope_out``)."""
        return self.out_dtype or self.dtype

    @property
    def cache_row(self) -> int:
        """Elements of ``k_cache``'s dtype in one cache row: ``D + R``, or fp8_ds_mla's
        ``D + 4 D/128 + 2 R`` bytes."""
        if self.ds_mla:
            return self.kv_norm_dim + 4 * self.scale_tiles + 2 * self.rope_dim
        return self.row_width

    @property
    def rope_offset(self) -> int:
        """Where a cache row's rope part starts, in elements of q's dtype: ``D``, or after
        fp8_ds_mla's latent bytes and scales."""
        return (self.kv_norm_dim + 4 * self.scale_tiles) // 2 if self.ds_mla else \
            self.kv_norm_dim

    @property
    def scale_tiles(self) -> int:
        """fp8_ds_mla: tiles (float32 scales) of a row's latent."""
        return self.kv_norm_dim // DS_MLA_TILE

    @property
    def row_width(self) -> int:
        """Elements in one cache row: ``kv_norm_dim + rope_dim``."""
        return self.kv_norm_dim + self.rope_dim

    @property
    def index_names(self) -> tuple[str, ...]:
        """The index tensors of the form's addressing, in the entry point's order."""
        return SLOTS if self.addressing == "slots" else OFFSETS

    @property
    def pdl_mode(self) -> bool | str:
        """The entry points' ``pdl`` argument for this form."""
        return EARLY_INDICES if self.pdl_early_indices else self.pdl


# the index tensors of each addressing, by argument name
OFFSETS = ("input_row_offsets", "lookup_table", "cache_lengths")
SLOTS = ("positions", "slot_mapping")
EARLY_INDICES = "early-indices"  # pdl=: the index tensors are read before PDL's wait


def add_cli_options(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One option per field of ``Form`` (its entry's ``cli``) but those in ``exclude``, with
    the field's default."""
    for entry in dataclasses.fields(Form):
        if entry.name in exclude:
            continue
        cli = entry.metadata["cli"]
        flags, dest = cli["flags"], entry.name
        if entry.type in (bool, "bool"):
            parser.add_argument(*flags, dest=dest, help=cli["help"],
                                action="store_false" if cli.get("inverted") else "store_true")
            continue
        if "choices" in entry.metadata:
            choices = [c for c in entry.metadata["choices"] if c is not None]
            parser.add_argument(*flags, dest=dest, choices=choices, default=entry.default,
                                type=type(choices[0]), help=cli["help"])
            for switch, value in cli["switches"].items():
                parser.add_argument(switch, dest=dest, action="store_const", const=value,
                                    help=f"the same as {flags[0]} {value}")
        else:
            parser.add_argument(*flags, dest=dest, type=int, default=entry.default,
                                help=f"{cli['help']} (default {entry.default})")


def from_cli(args: argparse.Namespace) -> Form:
    """The ``Form`` the options of ``add_cli_options`` describe, the defaults where a field
    has no option (ValueError names a bad one)."""
    return Form(**{entry.name: getattr(args, entry.name, entry.default)
                   for entry in dataclasses.fields(Form)})

