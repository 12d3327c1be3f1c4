"""GPU benchmarks: every provider of the op checked, then timed on the same inputs.

A provider is a function ``(call: Call) -> None`` doing the whole op in one form: in place
(the new latent rows are in the cache) or write-through (they come from ``kv_input``, a
column slice of the projection output, into a cache of q's dtype or fp8, and to
``kv_output`` if asked). Each is first run on a scratch copy of the inputs (compiles,
autotunes), then checked against the float64 reference on a fresh copy, then timed with
CUDA events on a cold L2 (``timing.time_cuda``): as issued from Python, and at decode sizes
replayed from a captured CUDA graph, both one call per graph (cold) and ``STEADY_CALLS`` calls
back to back (the steady state of an engine's decode graph, GPU time per call); the host time
of one Python call is measured too. Rows
carry the GPU name and library versions, and the device-to-device copy bandwidth measured
in the same run, so each row states its fraction of what the memory system delivers.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import tvm

from tvm_fused import Form, fused_rope_rmsnorm, fused_rope_rmsnorm_slots
from tvm_fused.progress import Progress
from tvm_fused.schedules.config import default_for_tokens
from tvm_fused.testing.compare import CheckReport, check_run, query_buffer, whole_storage
from tvm_fused.testing.inputs import OpInputs, inputs_for, split_table
from tvm_fused.timing import STEADY_CALLS, bytes_moved, time_cuda, time_graph
from tvm_fused.tuning import decisions
from tvm_fused.tuning.buckets import bucket_case, nearest_bucket

from .peers.flashinfer_rope import LIB_ENV as FLASHINFER_LIB
from .peers.torch_eager import (
    slot_mapping,
    torch_fused_rope_rmsnorm,
    torch_write_through,
    write_cache_rows,
)

DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
DECODE_MAX = 256
CHECK_MAX_TOKENS = 4096  # the float64 reference runs on the CPU: larger checks take minutes
PREFIX_POOL_PAGES = 64  # decode contexts share cached pages: 256 long requests fit in memory
COPY_BYTES = 1 << 30
FP8_K_SCALE = 0.5  # k_scale of fp8 caches (its value does not change the time)
Q_SCALE = 0.5  # q_scale of the fp8 attention query

# in place; write-through; write-through writing the whole fp8 attention query
FORMS = ("in-place", "write-through", "fp8-query")
COPY_THEN_IN_PLACE = "copy + tvm-fused in-place"
ENGINE_CHAIN = "vllm chain (triton)"
FLASHINFER = "liger norm + flashinfer"
# the providers of each form, in the order they are timed
PROVIDERS = {
    "in-place": ("tvm-fused tuned", "tvm-fused default", "triton fused", "liger",
                 "torch.compile", "torch eager"),
    "write-through": ("tvm-fused tuned", "tvm-fused default", COPY_THEN_IN_PLACE,
                      ENGINE_CHAIN, "triton fused", "torch.compile", "torch eager"),
    "fp8-query": ("tvm-fused tuned", "tvm-fused default", ENGINE_CHAIN, FLASHINFER),
}
ALL_PROVIDERS = tuple(dict.fromkeys(name for names in PROVIDERS.values() for name in names))


# the options of the forms the peers take: MAX's addressing and interleaved table, and the
# RMSNorm rounded to gamma's dtype before the product (HF's order); the Triton fused peer
# takes either addressing and table layout (TRITON_OPTIONS); tvm-fused takes every form
PEER_OPTIONS = {"addressing": "offsets", "freqs_layout": "interleaved",
                "norm_rounding": "before_gamma"}
TRITON_OPTIONS = {"norm_rounding": "before_gamma"}


def cache_name(form: Form) -> str:
    """``form``'s cache: its dtype, or ``"fp8_ds_mla"``."""
    return form.cache_format if form.ds_mla else form.cache_element


def form_name(form: Form) -> str:
    """Where ``form``'s latent comes from and what it writes of q, one of ``FORMS``."""
    return FORMS[2] if form.q_nope else FORMS[form.write_through]


@dataclasses.dataclass
class Call:
    """What one call of a provider gets: the op's ``inputs``; ``out`` ``[n, H, R]`` for the
    roped q; ``kv_output`` ``[n, D + R]`` in q's dtype for the new rows (None: not asked
    for); each real token's ``positions`` and cache ``slots`` (int64 ``[n_real]``: freqs
    row, ``page * page_size + offset``), computed before timing, as a serving engine's
    scheduler computes its ``slot_mapping``; the table as vLLM keeps it (``cos_sin_cache
    [P, R]``: cosines, then sines; made once, as at model load). With the fp8 attention
    query (``inputs.q_nope``), ``out`` and ``q_nope_out`` are the column slices of one fp8
    ``[n, H + 2, D + R]`` buffer and ``q_scale`` its scale (float32 ``[1]``)."""

    inputs: OpInputs
    out: torch.Tensor
    kv_output: torch.Tensor | None
    positions: torch.Tensor
    slots: torch.Tensor
    cos_sin_cache: torch.Tensor
    q_nope_out: torch.Tensor | None = None
    q_scale: torch.Tensor | None = None

    def query(self) -> torch.Tensor:
        """The fp8 attention query ``[n, H, D + R]`` (its real heads), whose column slices
        ``q_nope_out`` and ``out`` are."""
        return self.q_nope_out.as_strided((*self.out.shape[:2], self.q_nope_out.shape[2]
                                           + self.out.shape[2]), self.q_nope_out.stride())


Provider = Callable[[Call], None]


def sweep_inputs(form: Form, tokens: int, device="cuda") -> OpInputs:
    """Inputs of ``form``'s calls on ``tokens`` tokens: a decode step (one new token for each
    of ``tokens`` requests with 1k-4k cached) up to ``DECODE_MAX``, else a prefill of a few
    requests. ``q_rope`` is the rope view ``q[..., 128:]`` of a full MLA q, as in a model; in
    the write-through form, ``kv_input`` is the latent columns of a fused ``q_a | kv_a``
    projection output, and an fp8 cache comes with ``k_scale = FP8_K_SCALE``."""
    new_tokens, cache_lengths = bucket_case(tokens, decode_max=DECODE_MAX)
    return inputs_for(form, new_tokens, cache_lengths,
                      k_scale=FP8_K_SCALE if form.cache_dtype else None,
                      prefix_pool=PREFIX_POOL_PAGES, device=device)


def new_call(inputs: OpInputs, form: Form, addressing: tuple) -> Call:
    """A call on ``inputs`` (of ``form``) with random ``out`` (and ``kv_output`` if the form
    has it), each its own whole storage, or with the form's fp8 attention query, random
    bytes in one buffer (``Call``); ``addressing``: ``(positions, slots)`` from
    ``engine_addressing``."""
    q = inputs.q_rope
    rows = None
    if form.kv_output:
        rows = torch.randn(inputs.kv_input.shape, dtype=q.dtype, device=q.device)
    table = split_table(inputs.freqs_cis) if inputs.freqs_layout == "interleaved" \
        else inputs.freqs_cis
    if not form.out_dtype:
        return Call(inputs, torch.randn(q.shape, dtype=q.dtype, device=q.device), rows,
                    *addressing, table)
    out, q_nope_out = query_buffer(inputs, getattr(torch, form.out_dtype), None,
                                   torch.Generator().manual_seed(0))
    q_scale = torch.tensor([Q_SCALE], dtype=torch.float32, device=q.device)
    return Call(inputs, out, rows, *addressing, table, q_nope_out, q_scale)


def engine_addressing(inputs: OpInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, slots)`` of ``inputs``' real tokens (int64, on their device)."""
    return slot_mapping(inputs.input_row_offsets, inputs.lookup_table, inputs.cache_lengths,
                        inputs.k_cache.shape[1], int(inputs.input_row_offsets[-1]))


def _tvm_fused(form: Form, schedule) -> Callable:
    """tvm-fused's entry point of ``form``'s addressing with ``form``'s call options (pairing,
    table layout, norm rounding, PDL), ``schedule`` (None: the runtime's choice) and no
    argument checks in Python (bound once: the suite times the host's part of a call too)."""
    entry = fused_rope_rmsnorm_slots if form.addressing == "slots" else fused_rope_rmsnorm
    return functools.partial(entry, interleaved=form.interleaved,
                             freqs_layout=form.freqs_layout, norm_rounding=form.norm_rounding,
                             pdl=form.pdl_mode, validate=False, schedule=schedule)


def tvm_provider(form: Form, schedule=None) -> Provider:
    """tvm-fused in ``form`` (the inputs' form) with ``schedule``."""
    fused = _tvm_fused(form, schedule)

    def run(call: Call) -> None:
        query = {} if call.q_nope_out is None else {"q_nope": call.inputs.q_nope,
                                                    "q_nope_out": call.q_nope_out}
        fused(*call.inputs.args(), **call.inputs.latent(), **call.inputs.options(),
              kv_output=call.kv_output, out=call.out, q_scale=call.q_scale, **query)

    return run


def copy_then_in_place(form: Form, schedule=None) -> Provider:
    """The write-through op as a user of the in-place op runs it: each new latent row
    copied from ``kv_input`` into its cache row (a torch index copy), then tvm-fused in
    place (a cache of q's dtype, no ``kv_output``) with ``form``'s other options."""
    fused = _tvm_fused(dataclasses.replace(form, write_through=False, kv_output=False,
                                           cache_dtype=None), schedule)

    def run(call: Call) -> None:
        inputs = call.inputs
        write_cache_rows(inputs.k_cache, call.slots, inputs.kv_input[:call.slots.shape[0]])
        fused(*inputs.args(), out=call.out)

    return run


def engine_chain(form: Form) -> Provider:
    """vLLM's launches for ``form`` (write-through, no ``kv_output``; PEER_OPTIONS), its
    Triton kernels (``engine_triton.vllm_mla_chain_triton``): Liger's RMSNorm, the rotary
    in place on q's rope part and the latent's, the cache writer of the form's cache (bf16,
    per-tensor fp8 or fp8_ds_mla); with the fp8 attention query, then the concat +
    quantize compiled by Inductor (``fp8_query_chain.compiled_concat_quant_fp8``). It
    modifies its inputs (``MODIFIES_INPUTS``): the roped q is ``q_rope`` itself, unless
    the query is written."""
    from .peers.engine_triton import vllm_mla_chain_triton
    from .peers.fp8_query_chain import compiled_concat_quant_fp8

    cache = "fp8_ds_mla" if form.ds_mla else {None: "auto", "float8_e4m3fn": "fp8_e4m3",
                                              "float8_e5m2": "fp8_e5m2"}[form.cache_dtype]

    def run(call: Call) -> None:
        inputs = call.inputs
        vllm_mla_chain_triton(inputs.q_rope, inputs.kv_input, call.cos_sin_cache,
                              inputs.gamma, inputs.k_cache, call.slots, call.positions,
                              cache, inputs.k_scale, is_neox=not form.interleaved,
                              tile_scale=form.tile_scale)
        if call.q_nope_out is not None:
            compiled_concat_quant_fp8(inputs.q_nope, inputs.q_rope, call.q_scale, call.query())

    run.MODIFIES_INPUTS = True
    return run


def flashinfer_append(form: Form) -> Provider:
    """FlashInfer's launch for the whole fp8 attention query with a per-tensor fp8 cache
    (its rope + quantize + paged append kernel, ``flashinfer_rope.FlashInferMLAppend``, writing
    the query's column slices), after Liger's RMSNorm; prepared once per call (its
    addressing computed from the call's index tensors, as an engine's scheduler does).
    Needs ``$FLASHINFER_ROPE_LIB`` (``scripts/build_flashinfer_rope.sh``)."""
    from .peers.flashinfer_rope import AttentionQuery, FlashInferMLAppend

    prepared = {}

    def run(call: Call) -> None:
        if id(call) not in prepared:
            inputs = call.inputs
            query = AttentionQuery(inputs.q_nope, call.q_nope_out, call.out,
                                   float(call.q_scale))
            prepared[id(call)] = call, FlashInferMLAppend(
                *inputs.args(), inputs.kv_input, float(inputs.k_scale),
                num_tokens=call.positions.shape[0], query=query)
        prepared[id(call)][1]()

    return run


def triton_provider(form: Form) -> Provider:
    """The Triton fused kernel in ``form`` (the inputs' form): its entry point of the form's
    addressing, with the form's pairing and table layout."""
    from .peers.triton_fused import triton_fused_rope_rmsnorm, triton_fused_rope_rmsnorm_slots

    entry = (triton_fused_rope_rmsnorm_slots if form.addressing == "slots"
             else triton_fused_rope_rmsnorm)

    def run(call: Call) -> None:
        entry(*call.inputs.args(), **call.inputs.latent(), kv_output=call.kv_output,
              out=call.out, interleaved=form.interleaved, freqs_layout=form.freqs_layout)

    return run


def _with_token_count(fn, interleaved: bool) -> Provider:
    """A provider from an in-place implementation that takes the real token count from the
    host."""
    def run(call: Call) -> None:
        fn(*call.inputs.args(), num_tokens=call.positions.shape[0], out=call.out,
           interleaved=interleaved)

    return run


def _with_slots(fn, interleaved: bool) -> Provider:
    """A provider from a write-through implementation that takes each token's position and
    cache slot (``torch_write_through``'s arguments)."""
    def run(call: Call) -> None:
        inputs = call.inputs
        fn(inputs.q_rope, call.positions, call.slots, inputs.freqs_cis, inputs.gamma,
           inputs.kv_input, inputs.k_cache, k_scale=inputs.k_scale, out=call.out,
           kv_output=call.kv_output, interleaved=interleaved)

    return run


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def providers(form: Form, tokens: int, names: tuple[str, ...]) -> dict[str, Provider]:
    """The providers in ``names`` that exist for ``form`` (``PROVIDERS`` of its
    ``form_name``): "tvm-fused tuned" only with tuning decisions for this GPU and form,
    the peers only in the options they take (``PEER_OPTIONS``; the Triton fused peer's:
    ``TRITON_OPTIONS``), "liger" only for NeoX pairs, the copy before the in-place op only
    into a cache of q's dtype without ``kv_output``, FlashInfer's only into an fp8 e4m3
    cache with GPT-J pairs and ``$FLASHINFER_ROPE_LIB`` set."""
    interleaved = form.interleaved
    default = default_for_tokens(nearest_bucket(tokens), form)  # the hand-written one
    decided = {}
    if "tvm-fused tuned" in names:
        decided = decisions.for_gpu(torch.cuda.get_device_name(), form)
    torch_op, wrap = ((torch_write_through, _with_slots) if form.write_through
                      else (torch_fused_rope_rmsnorm, _with_token_count))
    makers = {
        "tvm-fused tuned": lambda: tvm_provider(form),  # the runtime's choice
        "tvm-fused default": lambda: tvm_provider(form, default),
        COPY_THEN_IN_PLACE: lambda: copy_then_in_place(form, default),
        ENGINE_CHAIN: lambda: engine_chain(form),
        FLASHINFER: lambda: flashinfer_append(form),
        "triton fused": lambda: triton_provider(form),
        "liger": lambda: _with_token_count(_liger(), interleaved),
        "torch.compile": lambda: wrap(_compiled(torch_op), interleaved),
        "torch eager": lambda: wrap(torch_op, interleaved),
    }
    peers = all(getattr(form, name) == value for name, value in PEER_OPTIONS.items())
    plain = peers and not form.ds_mla  # the fused peers write plain rows only
    triton = not form.ds_mla and all(getattr(form, name) == value
                                      for name, value in TRITON_OPTIONS.items())
    available = {"tvm-fused tuned": bool(decided), "liger": plain and not interleaved,
                 COPY_THEN_IN_PLACE: form.cache_dtype is None and not (form.kv_output
                                                                        or form.ds_mla),
                 ENGINE_CHAIN: peers and not form.kv_output and form.dtype == form.gamma_dtype,
                 "triton fused": triton, "torch.compile": plain, "torch eager": plain,
                 FLASHINFER: plain and interleaved and form.cache_dtype == "float8_e4m3fn"
                 and bool(os.environ.get(FLASHINFER_LIB))}
    return {name: makers[name]() for name in names
            if name in PROVIDERS[form_name(form)] and available.get(name, True)}


def _liger():
    from .peers.liger import liger_rope_rmsnorm

    return liger_rope_rmsnorm


@dataclasses.dataclass
class Row:
    gpu: str
    provider: str
    pairing: str
    heads: int
    tokens: int
    regime: str
    dtype: str
    form: str  # FORMS
    cache_dtype: str
    kv_output: bool  # the write-through form also wrote kv_output
    median_us: float
    p20_us: float
    p80_us: float
    graph_us: float  # one call replayed from a graph, cold L2 (decode sizes)
    steady_us: float  # per call of STEADY_CALLS captured back to back in one graph (decode)
    host_us: float
    tb_per_s: float
    copy_fraction: float
    same_bytes_copy_us: float
    checked: bool
    q_error_of_tolerance: float  # worst error / tolerance of the reference check (<= 1)
    norm_error_of_tolerance: float
    date: str
    versions: str


def copy_us(nbytes: int, reps: int) -> float:
    """Median µs of a device-to-device copy moving ``nbytes`` (half read, half written),
    cold L2."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), reps=reps).median_us


def copy_bandwidth(nbytes: int = COPY_BYTES, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in TB/s (bytes read + written), cold L2."""
    return nbytes / copy_us(nbytes, reps) / 1e6


def host_us(fn, calls: int = 50, batches: int = 7) -> float:
    """Host time of one call of ``fn()`` (enqueueing only): the median over ``batches`` of
    the mean over ``calls`` back-to-back calls (the GPU drains between batches)."""
    fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(means)


def check_provider(name: str, provider: Provider, base: OpInputs,
                   form: Form) -> tuple[Call, CheckReport | None]:
    """Warm ``provider`` up on a scratch copy of ``base`` (inputs of ``form``), then run it
    on a fresh copy and check it (``kv_output`` too, if the form has it). A provider that
    ``MODIFIES_INPUTS`` (vLLM's in-place rotary) is checked with its roped q in ``q_rope``
    (unless it writes the fp8 query) and the inputs it ropes restored before the check.
    Returns ``(call, report)``; report is None past ``CHECK_MAX_TOKENS`` tokens;
    ``AssertionError`` if the check fails."""
    tokens = base.q_rope.shape[0]
    addressing = engine_addressing(base)
    provider(new_call(base.clone(), form, addressing))
    call = new_call(base.clone(), form, addressing)
    modifies = getattr(provider, "MODIFIES_INPUTS", False)
    in_place = modifies and call.q_nope_out is None
    if in_place:
        call.out = call.inputs.q_rope
    out_before = whole_storage(call.out).clone()
    rows_before = None if call.kv_output is None else call.kv_output.clone()
    provider(call)
    if call.out.is_cuda:
        torch.cuda.synchronize()
    if tokens > CHECK_MAX_TOKENS:
        return call, None
    if modifies:
        call.inputs.kv_storage.copy_(base.kv_storage)
        if not in_place:
            call.inputs.q_storage.copy_(base.q_storage)
    report = check_run(base, call.inputs, call.out, out_before, in_place=in_place,
                       interleaved=form.interleaved, kv_output=call.kv_output,
                       kv_output_storage_before=rows_before, q_nope_out=call.q_nope_out,
                       q_scale=call.q_scale)
    if not report.ok:
        raise AssertionError(f"{name} is wrong at {tokens} tokens: {report.summary()}")
    return call, report


def _graph_us(call, reps: int, log, calls: int = 1) -> float:
    """Median replay time of ``calls`` calls of ``call`` captured back to back in a CUDA
    graph, per call; NaN if it cannot be captured."""
    try:
        return time_graph(call, reps=reps, calls=calls).median_us / calls
    except Exception as error:
        log(f"  CUDA graph capture failed: {error!r}"[:500])
        return math.nan


def measure(form: Form, tokens: int, provider_map: dict[str, Provider], copy_tb_s: float,
            failures: list[str], reps: int = 100, log=print) -> list[Row]:
    """Check, then time, each provider on ``sweep_inputs(form, tokens)``; a provider that
    raises or computes a wrong result is logged and appended to ``failures``. Bytes per op
    are the form's (``timing.bytes_moved``) for every provider: the copy before the in-place
    op is measured against the same bytes, the op's own."""
    gpu = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, tvm {tvm.__version__}, cuda {torch.version.cuda}"
    base = sweep_inputs(form, tokens)
    moved = bytes_moved(form, tokens)
    same_bytes_copy = copy_us(moved, reps)
    decode = tokens <= DECODE_MAX
    pairing = "gptj" if form.interleaved else "neox"
    what = (f"{gpu} | {form_name(form)} {cache_name(form)} cache"
            f"{' +kv_output' * form.kv_output} | {pairing} {form.num_q_heads:3d} heads | "
            f"{tokens:6d} tok")
    rows = []
    for name, provider in provider_map.items():
        try:
            call, report = check_provider(name, provider, base, form)
        except Exception as error:
            log(f"{what} | {name:<25} FAILED: {error!r}"[:2000])
            failures.append(f"{name} at {tokens} tokens, {form.num_q_heads} heads, "
                            f"{form_name(form)}, {cache_name(form)} cache"
                            f"{', kv_output' * form.kv_output}: {error!r}")
            continue

        def run(p=provider, c=call):
            p(c)

        timing = time_cuda(run, reps=reps)
        graph_us = _graph_us(run, reps, log) if decode else math.nan
        steady_us = _graph_us(run, reps, log, STEADY_CALLS) if decode else math.nan
        host = host_us(run) if decode else math.nan
        tb_s = moved / timing.median_us / 1e6
        row = Row(gpu, name, pairing, form.num_q_heads, tokens,
                  "decode" if decode else "prefill", form.dtype, form_name(form),
                  cache_name(form), form.kv_output, timing.median_us, timing.p20_us,
                  timing.p80_us, graph_us, steady_us, host, tb_s, tb_s / copy_tb_s,
                  same_bytes_copy,
                  report is not None, report.q_error if report else math.nan,
                  report.k_norm_error if report else math.nan,
                  datetime.date.today().isoformat(), versions)
        log(f"{what} | {name:<25} {row.median_us:9.2f} us (p20 {row.p20_us:.2f}, p80 "
            f"{row.p80_us:.2f}) graph {graph_us:7.2f} us steady {steady_us:6.2f} us host "
            f"{host:6.2f} us {tb_s:6.3f} TB/s "
            f"({100 * row.copy_fraction:5.1f}% of copy, same-bytes copy "
            f"{same_bytes_copy:.2f} us) checked={row.checked}")
        rows.append(row)
    return rows


def write_csv(rows: list[Row], path: Path) -> None:
    """Append ``rows`` to the CSV at ``path`` (with a header if the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(Row)])
        if new:
            writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)


@dataclasses.dataclass(frozen=True)
class Part:
    """One sweep of the suite: ``heads`` q heads, GPT-J pairs if ``interleaved``, each of
    ``tokens``, each provider of ``providers`` that exists for it, in the write-through form
    if ``write_through`` (else in place) with a cache of ``cache_dtype`` (None: q's dtype;
    else fp8, write-through only) or of ``cache_format`` (``"fp8_ds_mla"``: write-through),
    writing ``kv_output`` too if asked, and the whole fp8 attention query if ``fp8_query``
    (both write-through only).
    """

    heads: int
    interleaved: bool
    tokens: tuple[int, ...]
    providers: tuple[str, ...]
    _: dataclasses.KW_ONLY
    write_through: bool = False
    cache_dtype: str | None = None
    kv_output: bool = False
    cache_format: str = "plain"
    fp8_query: bool = False

    def __post_init__(self) -> None:
        self.form(Form())  # Form refuses what no form has (ValueError)

    def form(self, base: Form) -> Form:
        """``base`` with this part's heads, pairing, latent source, cache dtype and format,
        ``kv_output``, and the whole fp8 attention query (``q_nope``, an fp8 ``out``) if
        ``fp8_query``."""
        return dataclasses.replace(base, num_q_heads=self.heads, interleaved=self.interleaved,
                                   write_through=self.write_through,
                                   cache_dtype=self.cache_dtype, kv_output=self.kv_output,
                                   cache_format=self.cache_format, q_nope=self.fp8_query,
                                   out_dtype="float8_e4m3fn" if self.fp8_query else None)


# the sweep of the README's performance section (in place)
SUITE = (
    Part(128, True, DECODE_TOKENS + PREFILL_TOKENS, PROVIDERS["in-place"]),
    Part(128, False, (1, 64, 256, 4096, 32768),
         ("tvm-fused default", "triton fused", "liger", "torch eager")),
    Part(16, True, (4096, 32768), ("tvm-fused default", "triton fused")),
    Part(64, True, (4096, 32768), ("tvm-fused default", "triton fused")),
)


def run_suite(parts, base: Form, csv_path: Path | None, reps: int = 100,
              log=print) -> tuple[list[Row], list[str]]:
    """Measure every ``Part`` of ``parts`` on ``base``'s other dims; rows are appended to
    ``csv_path`` as each token count finishes. Returns the rows and the failures
    (providers that raised or were wrong)."""
    copy_tb_s = copy_bandwidth()
    log(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_tb_s:.3f} TB/s "
        f"({COPY_BYTES >> 20} MiB read + written, cold L2)")
    rows, failures = [], []
    progress = Progress(sum(len(part.tokens) for part in parts), "suite")
    for part in parts:
        form = part.form(base)
        for index, tokens in enumerate(part.tokens):
            provider_map = providers(form, tokens, part.providers)
            if index == 0 and "tvm-fused tuned" in part.providers and \
                    "tvm-fused tuned" not in provider_map:
                log(f"note: no tuning decisions for {form_name(form)}, {cache_name(form)} "
                    f"cache, {part.heads} heads on this GPU: 'tvm-fused tuned' is left out "
                    "(the runtime runs the default schedule: ask for 'tvm-fused default')")
            measured = measure(form, tokens, provider_map, copy_tb_s, failures, reps, log)
            if csv_path is not None:
                write_csv(measured, csv_path)
            rows += measured
            progress.advance(note=f"{form_name(form)}, {part.heads} heads, {tokens} tokens")
    return rows, failures
