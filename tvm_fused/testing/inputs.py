"""Realistic random inputs of the fused op, for the CLI, the tests and the benchmarks."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..form import Form

ROPE_THETA = 10000.0
NOPE_DIM = 128  # q's non-rope part: q_rope is usually the view q[..., 128:192]
# columns before the latent in a fused projection output (DeepSeek's q_lora_rank: vLLM's
# fused q_a | kv_a output is [T, 1536 + 576]): kv_input is usually such a column slice
Q_LORA_RANK = 1536


# elements of random values before and after each storage, to catch stray writes: 128 bytes
# or more in every dtype, so that a view keeps the allocation's 128-byte line alignment, as a
# projection's output does (a 32-byte offset made every 128-byte q rope chunk straddle two
# lines: the H200 then read 1.5x the bytes from DRAM, in every implementation given them)
GUARD = 128


@dataclasses.dataclass
class OpInputs:
    """The arguments of ``fused_rope_rmsnorm`` (``q_rope`` first), and what they came from.

    ``q_storage`` and ``cache_storage`` are the flat tensors that ``q_rope`` and ``k_cache``
    view, each with ``GUARD`` elements of random values before and after it: the whole q
    (``q_rope`` is a column range of it) and the whole cache (several layers when
    ``layers > 1``, rows padded when ``row_width`` says so). Write-through inputs also have
    ``kv_input`` (a column range of the projection output ``kv_storage``, guarded too) and,
    with an fp8 cache, maybe ``k_scale``. Engine-addressed inputs (``engine_addressed``) also
    have ``positions`` and ``slot_mapping``, which replace the offsets, page table and cache
    lengths as arguments (those stay, as what the slots came from). ``freqs_layout`` is
    ``freqs_cis``'s layout, ``norm_rounding`` the RMSNorm's rounding the call asks for.
    """

    q_rope: torch.Tensor
    input_row_offsets: torch.Tensor
    freqs_cis: torch.Tensor
    gamma: torch.Tensor
    k_cache: torch.Tensor
    lookup_table: torch.Tensor
    cache_lengths: torch.Tensor
    q_storage: torch.Tensor
    cache_storage: torch.Tensor
    kv_input: torch.Tensor | None = None
    kv_storage: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    freqs_layout: str = "interleaved"
    norm_rounding: str = "before_gamma"
    q_nope: torch.Tensor | None = None
    cache_format: str = "plain"
    tile_scale: str = "raw"

    @property
    def engine(self) -> bool:
        """Addressed by positions and slot mapping (``fused_rope_rmsnorm_slots``)."""
        return self.positions is not None

    def args(self) -> tuple:
        """Positional arguments of the op's entry point (``fused_rope_rmsnorm``, or
        ``fused_rope_rmsnorm_slots`` for engine-addressed inputs) and its reference."""
        if self.engine:
            return (self.q_rope, self.positions, self.slot_mapping, self.freqs_cis, self.gamma,
                    self.k_cache)
        return (self.q_rope, self.input_row_offsets, self.freqs_cis, self.gamma, self.k_cache,
                self.lookup_table, self.cache_lengths)

    def latent(self) -> dict:
        """Keyword arguments of ``fused_rope_rmsnorm`` and the reference that say where the
        latent comes from: ``kv_input`` (None: in place) and ``k_scale``."""
        return {"kv_input": self.kv_input, "k_scale": self.k_scale}

    def options(self) -> dict:
        """Keyword arguments of the entry point and the reference for the table layout, the
        RMSNorm's rounding and the cache row's format."""
        options = {"freqs_layout": self.freqs_layout, "norm_rounding": self.norm_rounding}
        if self.cache_format != "plain":
            options.update(cache_format=self.cache_format, tile_scale=self.tile_scale)
        return options

    def call(self, **kwargs) -> torch.Tensor:
        """The op's entry point on these inputs (their form and options, and ``kwargs``)."""
        from .. import api

        entry = api.fused_rope_rmsnorm_slots if self.engine else api.fused_rope_rmsnorm
        return entry(*self.args(), **self.latent(), **self.options(), **kwargs)

    def to(self, device) -> OpInputs:
        """A copy on ``device`` (views stay views of the copied storage)."""
        return self._with(lambda t: t.to(device, copy=True))

    def clone(self) -> OpInputs:
        """A deep copy on the same device."""
        return self._with(torch.clone)

    def _with(self, copy) -> OpInputs:
        q_storage, cache_storage = copy(self.q_storage), copy(self.cache_storage)

        def view(tensor, storage):
            return storage.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())

        kv_storage = kv_input = None
        if self.kv_input is not None:
            kv_storage = copy(self.kv_storage)
            kv_input = view(self.kv_input, kv_storage)

        def maybe(tensor):
            return None if tensor is None else copy(tensor)

        q_nope = None
        if self.q_nope is not None:
            q_nope = view(self.q_nope, copy(self.q_nope.new_empty(0).set_(
                self.q_nope.untyped_storage())))
        return OpInputs(view(self.q_rope, q_storage), copy(self.input_row_offsets),
                        copy(self.freqs_cis), copy(self.gamma), view(self.k_cache, cache_storage),
                        copy(self.lookup_table), copy(self.cache_lengths), q_storage,
                        cache_storage, kv_input, kv_storage, maybe(self.k_scale),
                        maybe(self.positions), maybe(self.slot_mapping), self.freqs_layout,
                        self.norm_rounding, q_nope, self.cache_format, self.tile_scale)


def rope_freqs(max_seq_len: int, rope_dim: int, dtype=torch.float32) -> torch.Tensor:
    """``[max_seq_len, rope_dim]``: column ``2j`` = cos(p θ_j), ``2j+1`` = sin(p θ_j)."""
    theta = ROPE_THETA ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * theta[None]
    return torch.stack((angles.cos(), angles.sin()), dim=-1).flatten(1).to(dtype)


def guarded(shape, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """``(storage, view)``: a contiguous random ``view`` of ``shape`` inside a flat random
    ``storage`` with ``GUARD`` more elements on each side (random bytes for uint8)."""
    numel = math.prod(shape)
    if dtype == torch.uint8:
        storage = torch.randint(0, 256, (numel + 2 * GUARD,), dtype=dtype, generator=gen)
        return storage, storage[GUARD:GUARD + numel].view(shape)
    storage = torch.randn(numel + 2 * GUARD, generator=gen).to(dtype)
    return storage, storage[GUARD:GUARD + numel].view(shape)


def q_like(rows: int, heads: int, rope_dim: int, columns: tuple[int, int], dtype: torch.dtype,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(storage, view)``: columns ``[start, start + rope_dim)`` of a random q ``[rows, heads,
    width]`` inside guards, ``columns = (width, start)``."""
    width, start = columns
    storage, q = guarded((rows, heads, width), dtype, gen)
    return storage, q[..., start:start + rope_dim]


def rows_like(rows: int, row_width: int, columns: tuple[int, int], dtype: torch.dtype,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(storage, view)``: columns ``[start, start + row_width)`` of a random ``[rows,
    width]`` inside guards, ``columns = (width, start)`` (``kv_input``, ``kv_output``)."""
    width, start = columns
    storage, whole = guarded((rows, width), dtype, gen)
    return storage, whole[:, start:start + row_width]


def make_inputs(
    new_tokens: list[int],
    cache_lengths: list[int],
    *,
    num_q_heads: int = 128,
    rope_dim: int = 64,
    kv_norm_dim: int = 512,
    page_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    gamma_dtype: torch.dtype | None = None,
    freqs_dtype: torch.dtype = torch.float32,
    offsets_dtype: torch.dtype = torch.uint32,
    write_through: bool = False,
    cache_dtype: torch.dtype | None = None,
    cache_format: str = "plain",
    tile_scale: str = "raw",
    k_scale: float | None = None,
    q_nope: bool = False,
    kv_columns: tuple[int, int] | None = None,
    padding_rows: int = 0,
    strided_q: bool = True,
    q_columns: tuple[int, int] | None = None,
    row_width: int | None = None,
    layers: int = 1,
    spare_pages: int = 3,
    prefix_pool: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> OpInputs:
    """Random inputs for requests with ``new_tokens[b]`` new tokens after ``cache_lengths[b]``.

    Pages are assigned to requests in a shuffled order, with ``spare_pages`` unused ones;
    lookup-table entries past a request's pages are -1 (a kernel that read them would fault).
    With ``prefix_pool``, the pages that hold only cached rows (which the op must not touch)
    are drawn from a shared pool of that many pages, so long contexts stay small in memory.
    ``q_rope`` is columns ``[start, start + R)`` of a q ``[n, H, width]``, ``q_columns =
    (width, start)``: by default ``(128 + R, 128)`` (the rope part of an MLA q) if
    ``strided_q``, else ``(R, 0)``. ``row_width`` (default ``D + R``) is the cache row
    stride; ``layers > 1`` makes ``k_cache`` layer ``layers // 2`` of a multi-layer cache.
    ``write_through`` adds ``kv_input``: columns ``kv_columns = (width, start)`` of a random
    projection output, by default ``(1536 + D + R, 1536)``. ``cache_dtype`` (default: dtype)
    may be fp8 (write-through only), with ``k_scale`` (None: no scale tensor);
    ``cache_format="fp8_ds_mla"`` makes a uint8 cache of random bytes with rows of ``D +
    4 D/128 + 2 R`` bytes (write-through, ``tile_scale``). ``q_nope`` adds the attention
    query's nope part ``[n, H, D]``, a transposed view.
    """
    if len(new_tokens) != len(cache_lengths):
        raise ValueError("new_tokens and cache_lengths need one entry per request")
    gen = torch.Generator().manual_seed(seed)
    batch = len(new_tokens)
    total = sum(new_tokens)
    rows = total + padding_rows
    q_storage, q_rope = q_like(rows, num_q_heads, rope_dim, q_columns or (
        (NOPE_DIM + rope_dim, NOPE_DIM) if strided_q else (rope_dim, 0)), dtype, gen)

    ends = [c + t for c, t in zip(cache_lengths, new_tokens)]
    pages_per_request = [math.ceil(e / page_size) for e in ends]
    # logical pages before first_own[b] hold only cached rows: shared pool pages if asked
    first_own = [min(c // page_size, p) if prefix_pool else 0
                 for c, p in zip(cache_lengths, pages_per_request)]
    pool = prefix_pool or 0
    num_pages = pool + sum(p - f for p, f in zip(pages_per_request, first_own)) + spare_pages
    max_pages = max(pages_per_request, default=0) + 1
    order = torch.randperm(num_pages, generator=gen).to(torch.int32)
    lookup_table = torch.full((batch, max_pages), -1, dtype=torch.int32)
    used = pool
    for b, (count, first) in enumerate(zip(pages_per_request, first_own)):
        if first:
            lookup_table[b, :first] = order[torch.randint(pool, (first,), generator=gen)]
        lookup_table[b, first:count] = order[used:used + count - first]
        used += count - first

    ds_mla = cache_format == "fp8_ds_mla"
    row = kv_norm_dim + 4 * kv_norm_dim // 128 + 2 * rope_dim if ds_mla else \
        kv_norm_dim + rope_dim
    cache_storage, cache = guarded((num_pages, layers, page_size, row_width or row),
                                   torch.uint8 if ds_mla else cache_dtype or dtype, gen)
    k_cache = cache[:, layers // 2, :, :row]
    gamma = (1 + 0.25 * torch.randn(kv_norm_dim, generator=gen)).to(gamma_dtype or dtype)
    offsets = torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int64)
    inputs = OpInputs(
        q_rope=q_rope,
        input_row_offsets=offsets.to(offsets_dtype),
        freqs_cis=rope_freqs(max(ends, default=0) + 5, rope_dim, freqs_dtype),
        gamma=gamma,
        k_cache=k_cache,
        lookup_table=lookup_table,
        cache_lengths=torch.tensor(cache_lengths, dtype=torch.int32),
        q_storage=q_storage,
        cache_storage=cache_storage,
        cache_format=cache_format,
        tile_scale=tile_scale,
    )
    if q_nope:
        _, heads_first = guarded((num_q_heads, rows, kv_norm_dim), dtype, gen)
        inputs.q_nope = heads_first.transpose(0, 1)
    if write_through:
        width = kv_norm_dim + rope_dim
        inputs.kv_storage, inputs.kv_input = rows_like(
            rows, width, kv_columns or (Q_LORA_RANK + width, Q_LORA_RANK), dtype, gen)
    if k_scale is not None:
        inputs.k_scale = torch.tensor([k_scale], dtype=torch.float32)
    return inputs.to(device) if torch.device(device).type != "cpu" else inputs


def split_table(freqs_cis: torch.Tensor) -> torch.Tensor:
    """An interleaved ``freqs_cis [P, R]`` in the split layout: cosines, then sines."""
    return torch.cat((freqs_cis[:, 0::2], freqs_cis[:, 1::2]), dim=1).contiguous()


def with_options(inputs: OpInputs, *, freqs_layout: str = "interleaved",
                 norm_rounding: str = "before_gamma") -> OpInputs:
    """A copy of ``inputs`` (interleaved table) with the table in ``freqs_layout`` and calls
    asking for ``norm_rounding``."""
    result = inputs.clone()
    if freqs_layout == "split":
        result.freqs_cis = split_table(inputs.freqs_cis)
    result.freqs_layout, result.norm_rounding = freqs_layout, norm_rounding
    return result


def engine_addressed(inputs: OpInputs, *, unslotted: int = 0,
                     index_dtypes: tuple = (torch.int64, torch.int64)) -> OpInputs:
    """A copy of ``inputs`` addressed as vLLM does: ``positions`` and ``slot_mapping`` of the
    real tokens (those of ``input_row_offsets``), located by the reference. Each token keeps
    its fate: a token without a cache row (negative page) gets slot -1, an error token its
    position past the table or a slot past the cache. The last ``unslotted`` tokens get no
    ``slot_mapping`` entry (vLLM's CUDA-graph padding: no cache row). ``index_dtypes``: of
    positions and slot mapping."""
    from ..tokens import locate_tokens

    device = inputs.q_rope.device
    page_size = inputs.k_cache.shape[1]
    end = inputs.k_cache.shape[0] * page_size
    tokens = locate_tokens(inputs.input_row_offsets, inputs.cache_lengths, inputs.lookup_table,
                           inputs.freqs_cis.shape[0], inputs.k_cache.shape[0], page_size)
    # page * page_size + row, -1 without a page, the cache's end for an error token
    slots = torch.where(tokens.page >= 0, tokens.page * page_size + tokens.row, -1)
    slots = torch.where(tokens.q_written, slots, end)
    result = inputs.clone()
    result.positions = tokens.pos.to(index_dtypes[0]).to(device)
    result.slot_mapping = slots[:slots.numel() - unslotted].to(index_dtypes[1]).to(device)
    return result


def inputs_for(form: Form, new_tokens: list[int], cache_lengths: list[int],
               **options) -> OpInputs:
    """Random inputs of a call of ``form``: its dims and dtypes, where its latent comes from
    and its cache, its table layout, norm rounding and addressing; ``options``: those of
    ``make_inputs`` (the pairing and PDL are options of the call, not of the inputs)."""
    inputs = make_inputs(
        new_tokens, cache_lengths, num_q_heads=form.num_q_heads, rope_dim=form.rope_dim,
        kv_norm_dim=form.kv_norm_dim, page_size=form.page_size, dtype=getattr(torch, form.dtype),
        gamma_dtype=getattr(torch, form.gamma_dtype),
        freqs_dtype=getattr(torch, form.freqs_dtype),
        offsets_dtype=getattr(torch, form.offsets_dtype), write_through=form.write_through,
        cache_dtype=None if form.ds_mla else getattr(torch, form.cache_element),
        cache_format=form.cache_format, tile_scale=form.tile_scale, q_nope=form.q_nope,
        **options)
    inputs = with_options(inputs, freqs_layout=form.freqs_layout,
                          norm_rounding=form.norm_rounding)
    if form.addressing == "slots":
        inputs = engine_addressed(inputs, index_dtypes=(getattr(torch, form.positions_dtype),
                                                        getattr(torch, form.slots_dtype)))
    return inputs
