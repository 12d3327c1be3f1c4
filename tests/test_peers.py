"""The benchmark peers compute the same op: checked against the float64 reference."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tvm_fused.testing.compare import check_run
from tvm_fused.testing.inputs import engine_addressed, make_inputs, with_options

from .cases import RAGGED

# The interpreter's float downcast rounds ties up and drops the carry into the exponent
# (triton-lang/triton#8322; the carry: PR #11897), so its fp8 values are off where the GPU's
# cvt.rn is right: fp32 -> fp8 here is torch's cast (nearest even), the kernel's code as is.
FP8_ROUNDING = textwrap.dedent("""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    FP8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    convert_float = interpreter._convert_float

    def convert_float_rn(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in FP8:
            exact = torch.from_numpy(np.ascontiguousarray(values).view(np.float32))
            return exact.to(FP8[output_dtype]).view(torch.uint8).numpy()
        return convert_float(values, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert_float_rn
""")

# In place, by offsets: every tile of TILES
INTERPRETED = textwrap.dedent("""
    from tests.test_peers import TILES, check_triton_peer, peer_inputs
    for dtype, interleaved, layout, heads, tile, page_size in TILES:
        inputs = peer_inputs(heads, dtype=dtype, page_size=page_size, freqs_layout=layout)
        check_triton_peer(inputs, interleaved, tile)
""")

# Write-through, by offsets: every cache with both pairings and kv_output, tiles in turn
INTERPRETED_WRITE_THROUGH = FP8_ROUNDING + textwrap.dedent("""
    import itertools
    from tests.test_peers import CACHES, PAIRINGS, SMALL_TILES, check_triton_peer, peer_inputs
    cases = itertools.product(CACHES.values(), PAIRINGS.values())
    for (cache, interleaved), tile in zip(cases, itertools.cycle(SMALL_TILES)):
        check_triton_peer(peer_inputs(4, cache=cache), interleaved, tile, kv_output=True)
""")

# By slots (int32 and int64 indices, both table layouts): in place, with out = q_rope too,
# and every cache with both pairings, tiles in turn
INTERPRETED_SLOTS = FP8_ROUNDING + textwrap.dedent("""
    import itertools
    from tests.test_peers import CACHES, PAIRINGS, SMALL_TILES, check_triton_peer, peer_inputs
    cases = [(None, True, False), (None, False, True)] + [
        (cache, interleaved, False)
        for cache, interleaved in itertools.product(CACHES.values(), PAIRINGS.values())]
    options = itertools.cycle(itertools.product((torch.int32, torch.int64),
                                                ("split", "interleaved")))
    for (cache, interleaved, out_is_q), tile, (index, layout) in zip(
            cases, itertools.cycle(SMALL_TILES), options):
        inputs = peer_inputs(6, cache=cache, freqs_layout=layout, slots=index)
        check_triton_peer(inputs, interleaved, tile, kv_output=cache is not None,
                          out_is_q=out_is_q)
""")

# caches of the write-through form: (cache dtype (None: q's), k_scale (None: no tensor));
# the small scale takes many values past e5m2's range (57344), which torch's cast turns into
# infinities unless they are clamped first (torch's e4m3fn cast saturates by itself)
CACHES = {
    "bf16": (None, None),
    "fp8-e4m3-scaled": (torch.float8_e4m3fn, 0.37),
    "fp8-e4m3": (torch.float8_e4m3fn, None),
    "fp8-e5m2-saturated": (torch.float8_e5m2, 2e-5),
}
PAIRINGS = {"interleaved": True, "neox": False}


# (q dtype, GPT-J pairs, table layout, heads, tile, page size) of the interpreted in-place
# runs: heads that the tile's heads do not divide (6, 12; 4 in a tile of 32), the 18 rows
# (16 tokens, 2 of padding) in tiles of 4 and 8 tokens
TILES = [
    (torch.float32, True, "interleaved", 4, (2, 1), 16),
    (torch.bfloat16, False, "interleaved", 4, (32, 2), 16),
    (torch.bfloat16, True, "split", 6, (4, 2), 16),
    (torch.float16, False, "split", 12, (8, 4), 1),
    (torch.bfloat16, True, "interleaved", 16, (16, 8), 128),
    (torch.bfloat16, False, "interleaved", 128, (32, 4), 128),
]
SMALL_TILES = [(2, 1), (4, 2), (8, 4), (4, 8)]  # (heads, tokens) per program, 4 or 6 heads


def peer_inputs(heads: int, *, dtype=torch.bfloat16, page_size: int = 16,
                freqs_layout: str = "interleaved", cache: tuple | None = None,
                slots: torch.dtype | None = None, device: str = "cpu"):
    """RAGGED (16 tokens, one request empty) and 2 padding rows, the page of request 2's
    last tokens missing from the page table (-1: no cache row); write-through into
    ``cache`` (a value of ``CACHES``; None: in place); the table in ``freqs_layout``; with
    ``slots``, addressed by positions and slots of that dtype, tokens 4 and 5 without a row
    (slot -1, the most negative) and the last 2 past ``slot_mapping``."""
    cache_dtype, k_scale = cache or (None, None)
    inputs = make_inputs(*RAGGED, num_q_heads=heads, page_size=page_size, dtype=dtype,
                         padding_rows=2, write_through=cache is not None,
                         cache_dtype=cache_dtype, k_scale=k_scale, device=device)
    inputs.lookup_table[2, 130 // page_size] = -1  # request 2 writes positions 126-130
    inputs = with_options(inputs, freqs_layout=freqs_layout)
    if slots is not None:
        inputs = engine_addressed(inputs, unslotted=2, index_dtypes=(slots, slots))
        inputs.slot_mapping[4] = -1
        inputs.slot_mapping[5] = torch.iinfo(slots).min
    return inputs


def check_triton_peer(inputs, interleaved: bool, tile: tuple[int, int] | None = None, *,
                      kv_output: bool = False, out_is_q: bool = False) -> None:
    """The Triton peer of ``inputs``' addressing, form and table layout, checked against the
    reference: ``tile`` ``(heads, tokens)`` per program (None: autotuned); ``out`` random
    in its own storage, or ``q_rope`` itself if ``out_is_q``; ``kv_output`` if asked."""
    from benchmarks.peers.triton_fused import (
        triton_fused_rope_rmsnorm,
        triton_fused_rope_rmsnorm_slots,
    )

    entry = triton_fused_rope_rmsnorm_slots if inputs.engine else triton_fused_rope_rmsnorm
    heads, tokens = tile or (None, None)

    def run(out, rows):
        entry(*inputs.args(), **inputs.latent(), kv_output=rows, out=out,
              interleaved=interleaved, freqs_layout=inputs.freqs_layout,
              heads_per_program=heads, tokens_per_program=tokens)

    if not out_is_q:
        check_write_through(inputs, interleaved, kv_output, run)
        return
    before = inputs.clone()
    run(inputs.q_rope, None)
    report = check_run(before, inputs, inputs.q_rope, in_place=True, interleaved=interleaved)
    assert report.ok, report.summary()


# The autotuned path, with a stub for the GPU timer that runs each config three times:
# the in-place cache, and q when out is q, must come out right (tuned on copies), the
# write-through form too (tuned on the call's own tensors)
INTERPRETED_AUTOTUNE = textwrap.dedent("""
    import torch
    from benchmarks.peers import triton_fused
    from tests.test_peers import CACHES, check_triton_peer, peer_inputs

    timed = []

    def stub_timer(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        timed.append(1)
        return [1.0 / len(timed)] * len(quantiles)  # the last config is the fastest

    triton_fused._autotuned = lambda q_rope: True
    triton_fused._fused_kernel.__dict__["do_bench"] = stub_timer
    check_triton_peer(peer_inputs(4), True)
    check_triton_peer(peer_inputs(4, slots=torch.int64), False, out_is_q=True)
    check_triton_peer(peer_inputs(4, cache=CACHES["fp8-e4m3-scaled"]), True, kv_output=True)
    assert len(timed) == 15, timed  # 5 configs of tiles up to 8 heads, each form
""")


def _interpret(script: str) -> None:
    """Run ``script`` in a Python process with Triton's CPU interpreter; it must succeed."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_triton_fused_peer_in_the_interpreter():
    """In place by offsets, each of ``TILES``, the missing page's tokens without a row."""
    _interpret(INTERPRETED)


def test_triton_write_through_peer_in_the_interpreter():
    """Every cache with both pairings, from a column slice of a wider ``kv_input`` (a row
    stride of its own), with ``kv_output`` and padding rows."""
    _interpret(INTERPRETED_WRITE_THROUGH)


def test_triton_peer_autotuned_in_the_interpreter():
    """Autotuning (its timer a stub) leaves the first call of each form right."""
    _interpret(FP8_ROUNDING + INTERPRETED_AUTOTUNE)


def test_triton_slots_peer_in_the_interpreter():
    """``triton_fused_rope_rmsnorm_slots``: in place (``out`` its own or ``q_rope``) and
    write-through into every cache, negative slots and tokens past ``slot_mapping`` without
    a row, int32 and int64 indices, both table layouts."""
    _interpret(INTERPRETED_SLOTS)


# (slots, write-through, fp8 cache, GPT-J pairs, split table, (heads, tokens) per program)
# compiled for sm_90
COMPILED = {
    "offsets-in-place": (False, False, False, True, False, (16, 1)),
    "offsets-write-through": (False, True, False, False, True, (64, 2)),
    "offsets-write-through-fp8": (False, True, True, True, False, (16, 8)),
    "slots-in-place": (True, False, False, False, True, (32, 4)),
    "slots-write-through-fp8": (True, True, True, True, True, (128, 1)),
}


@pytest.mark.parametrize(("slots", "write_through", "quantize", "interleaved", "split",
                          "tile"), COMPILED.values(), ids=COMPILED)
def test_triton_peer_compiles_for_sm90(slots, write_through, quantize, interleaved, split,
                                       tile):
    """The Triton kernel through Triton's compiler for sm_90 (no GPU needed), which the
    interpreter skips. Under Triton 3.6 (the GPU machine's) this failed on an earlier peer,
    which gave a name different types in the two branches of an if and a function returns of
    two types; newer Triton accepts both, so CI's run guards against other compile errors."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.peers.triton_fused import _fused_kernel

    fn = _fused_kernel.fn
    heads, tokens = tile
    constants = {"NUM_HEADS": 128, "ROPE_DIM": 64, "NORM_DIM": 512, "PAGE_SIZE": 128,
                 "INTERLEAVED": interleaved, "FREQS_SPLIT": split, "SLOTS": slots,
                 "WRITE_THROUGH": write_through, "KV_OUTPUT": write_through,
                 "QUANTIZE": quantize, "CACHE_MAX": 448.0 if quantize else 3.0e38,
                 "TOKENS_PER_PROGRAM": tokens, "HEADS_PER_PROGRAM": heads}
    types = {"q_ptr": "*bf16", "out_ptr": "*bf16", "k_ptr": "*fp8e4nv" if quantize else "*bf16",
             "freqs_ptr": "*fp32", "gamma_ptr": "*bf16", "kv_ptr": "*bf16", "kvo_ptr": "*bf16",
             "scale_ptr": "*fp32", "offsets_ptr": "*i32", "lengths_ptr": "*i32",
             "table_ptr": "*i32", "positions_ptr": "*i64", "slots_ptr": "*i64",
             "epsilon": "fp32"}
    signature = {name: "constexpr" if name in constants else types.get(name, "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs={
        (fn.arg_names.index(name),): value for name, value in constants.items()})
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("slots", [None, torch.int64], ids=["offsets", "slots"])
def test_triton_fused_peer_on_the_gpu(slots, interleaved):
    """128 heads in place, autotuned (vLLM's split table by slots): the tuning runs, on
    copies of the cache, leave the first call right."""
    inputs = peer_inputs(128, page_size=128, slots=slots, device="cuda",
                         freqs_layout="interleaved" if slots is None else "split")
    check_triton_peer(inputs, interleaved)


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [None, torch.int32], ids=["offsets", "slots"])
def test_triton_peer_tunes_q_in_place_on_the_gpu(slots):
    """``out`` is ``q_rope`` (64 heads, a tuning key of its own): tuned on a copy of q."""
    check_triton_peer(peer_inputs(64, slots=slots, device="cuda"), True, out_is_q=True)


@pytest.mark.gpu
def test_liger_peer_on_the_gpu():
    pytest.importorskip("liger_kernel")
    from benchmarks.peers.liger import liger_rope_rmsnorm

    inputs = make_inputs(*RAGGED, num_q_heads=128, padding_rows=3, device="cuda")
    before = inputs.clone()
    out = torch.randn_like(inputs.q_rope)
    out_before = out.clone()
    real_tokens = int(inputs.input_row_offsets[-1])  # the rows past it are padding
    liger_rope_rmsnorm(*inputs.args(), num_tokens=real_tokens, out=out)
    report = check_run(before, inputs, out, out_before, interleaved=False)
    assert report.ok, report.summary()


def test_liger_peer_refuses_interleaved_pairs():
    pytest.importorskip("liger_kernel")
    from benchmarks.peers.liger import liger_rope_rmsnorm

    inputs = make_inputs([1], [3], num_q_heads=2)
    with pytest.raises(ValueError, match="NeoX"):
        liger_rope_rmsnorm(*inputs.args(), num_tokens=1, interleaved=True)


def _check_torch_baseline(fn, device: str, interleaved: bool):
    inputs = make_inputs(*RAGGED, num_q_heads=8, padding_rows=3, device=device)
    before = inputs.clone()
    out = torch.randn_like(inputs.q_rope)
    out_before = out.clone()
    real_tokens = int(inputs.input_row_offsets[-1])  # the rows past it are padding
    fn(*inputs.args(), num_tokens=real_tokens, out=out, interleaved=interleaved)
    report = check_run(before, inputs, out, out_before, interleaved=interleaved)
    assert report.ok, report.summary()


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_torch_eager_baseline(interleaved):
    from benchmarks.peers.torch_eager import torch_fused_rope_rmsnorm

    _check_torch_baseline(torch_fused_rope_rmsnorm, "cpu", interleaved)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_compile_baseline(device):
    """The torch.compile peer compiles (Inductor once refused ``searchsorted`` over a slice
    on CUDA) and stays correct."""
    from benchmarks.peers.torch_eager import torch_fused_rope_rmsnorm

    _check_torch_baseline(torch.compile(torch_fused_rope_rmsnorm, dynamic=True), device, True)


def write_through_inputs(cache: tuple, heads: int, device: str):
    """RAGGED with 3 padding rows in the write-through form: ``kv_input`` a column slice of
    the projection output; ``cache`` a value of ``CACHES``."""
    cache_dtype, k_scale = cache
    return make_inputs(*RAGGED, num_q_heads=heads, padding_rows=3, write_through=True,
                       cache_dtype=cache_dtype, k_scale=k_scale, device=device)


def check_write_through(inputs, interleaved: bool, kv_output: bool, run) -> None:
    """Call ``run(out, kv_output)`` on ``inputs`` (``out``, and ``kv_output`` if asked, of
    the write-through form, or else None: random, each its own storage), then check the
    outputs against the reference."""
    before = inputs.clone()
    q = inputs.q_rope
    out = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    rows = None
    if kv_output:
        rows = torch.randn(inputs.kv_input.shape, dtype=q.dtype, device=q.device)
    out_before, rows_before = out.clone(), None if rows is None else rows.clone()
    run(out, rows)
    report = check_run(before, inputs, out, out_before, interleaved=interleaved,
                       kv_output=rows, kv_output_storage_before=rows_before)
    assert report.ok, report.summary()


def check_torch_write_through(fn, device: str, cache: tuple, interleaved: bool,
                              kv_output: bool) -> None:
    """The vLLM-style composition ``fn`` (``torch_write_through`` or a compiled one), 8
    heads, each token's position and slot from ``slot_mapping``."""
    from benchmarks.peers.torch_eager import slot_mapping

    inputs = write_through_inputs(cache, 8, device)
    positions, slots = slot_mapping(inputs.input_row_offsets, inputs.lookup_table,
                                    inputs.cache_lengths, inputs.k_cache.shape[1],
                                    int(inputs.input_row_offsets[-1]))
    check_write_through(inputs, interleaved, kv_output, lambda out, rows: fn(
        inputs.q_rope, positions, slots, inputs.freqs_cis, inputs.gamma, inputs.kv_input,
        inputs.k_cache, k_scale=inputs.k_scale, out=out, kv_output=rows,
        interleaved=interleaved))


@pytest.mark.parametrize("kv_output", [True, False], ids=["kv_output", "cache-only"])
@pytest.mark.parametrize("interleaved", PAIRINGS.values(), ids=PAIRINGS)
@pytest.mark.parametrize("cache", CACHES.values(), ids=CACHES)
def test_torch_write_through_on_the_cpu(cache, interleaved, kv_output):
    from benchmarks.peers.torch_eager import torch_write_through

    check_torch_write_through(torch_write_through, "cpu", cache, interleaved, kv_output)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("cache", [CACHES["bf16"], CACHES["fp8-e5m2-saturated"]],
                         ids=["bf16", "fp8-e5m2-saturated"])
def test_torch_write_through_compiled(cache, device):
    """``torch.compile(dynamic=True)`` of the composition compiles and stays correct."""
    from benchmarks.peers.torch_eager import torch_write_through

    compiled = torch.compile(torch_write_through, dynamic=True)
    check_torch_write_through(compiled, device, cache, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", PAIRINGS.values(), ids=PAIRINGS)
@pytest.mark.parametrize("cache", CACHES.values(), ids=CACHES)
def test_torch_write_through_on_the_gpu(cache, interleaved):
    from benchmarks.peers.torch_eager import torch_write_through

    check_torch_write_through(torch_write_through, "cuda", cache, interleaved, True)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", PAIRINGS.values(), ids=PAIRINGS)
@pytest.mark.parametrize("cache", CACHES.values(), ids=CACHES)
@pytest.mark.parametrize("slots", [None, torch.int64], ids=["offsets", "slots"])
def test_triton_write_through_peer_on_the_gpu(slots, cache, interleaved):
    """128 heads, tiles of 4 heads x 2 tokens (the GPU's own fp8 conversion, bit for
    bit)."""
    check_triton_peer(peer_inputs(128, cache=cache, slots=slots, device="cuda"), interleaved,
                      (4, 2), kv_output=True)


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [None, torch.int64], ids=["offsets", "slots"])
def test_triton_write_through_peer_autotuned_on_the_gpu(slots):
    """The autotuned kernel into an fp8 cache."""
    check_triton_peer(peer_inputs(128, cache=CACHES["fp8-e4m3-scaled"], slots=slots,
                                  device="cuda"), True)


def test_flashinfer_cos_sin_table_splits_the_interleaved_pairs():
    """FlashInfer's table holds pair i's cosine at column i and its sine at R/2 + i: from an
    interleaved ``freqs_cis`` of known angles, the columns are the cosines then the sines."""
    from benchmarks.peers.flashinfer_rope import cos_sin_table

    angles = torch.arange(6 * 32, dtype=torch.float64).view(6, 32) * 0.01
    freqs = torch.stack((angles.cos(), angles.sin()), dim=-1).view(6, 64).float()
    table = cos_sin_table(freqs)
    assert table.dtype == torch.float32 and table.is_contiguous()
    assert torch.equal(table[:, :32], angles.cos().float())
    assert torch.equal(table[:, 32:], angles.sin().float())
