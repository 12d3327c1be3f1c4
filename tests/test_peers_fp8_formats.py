"""The engine chains for DeepSeek-V3.2's ``fp8_ds_mla`` cache row
(``benchmarks/peers/ds_mla_chain.py``) and for the fp8 attention query
(``benchmarks/peers/fp8_query_chain.py``) against float64 references written here.

The Triton kernels run in Triton's CPU interpreter in a subprocess (``TRITON_INTERPRET=1``)
with ``tests/test_engine_triton.py``'s shims (torch's nearest-even fp32 -> bf16 / fp8 casts
where the interpreter's truncate, fp32 scalars, Liger's ``rsqrt``) and an exact bf16 -> fp32
upcast of subnormals, none touching the kernels' code. The 656-byte row is built here from
its definition (the SPEC's "DeepSeek-V3.2's fp8_ds_mla cache row"): tile amax over finite
values, the raw or power-of-two scale, float32 division, saturation, and an e4m3 encoder of
its own (nearest even over the 127 positive codes, NaN as 0x7F), so the row is compared
byte for byte.
Values that pass through the chains' float32 RMSNorm and rotary are compared with float64
at one bf16 ulp; the quantized bytes are then checked exactly against the reference applied
to the chain's own bf16 values.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tvm_fused.testing.compare import agreement

from .test_engine_triton import SHIMS, compile_sm90_ptx

ROOT = Path(__file__).resolve().parents[1]
D, R, TILE = 512, 64, 128
ROW_BYTES = D + 4 * D // TILE + 2 * R  # 656
Q_A_RANK = 1536  # the fused projection output is [T, 1536 + 576]: q_a | kv_a
BF16 = torch.bfloat16
E4M3 = torch.float8_e4m3fn


# ---------------------------------------------------------------- float64 references


def _e4m3_table() -> torch.Tensor:
    """The 127 positive finite float8_e4m3fn values (codes 0x00..0x7E), float64, from the
    format: bias 7, 3 mantissa bits, subnormals at exponent 0; 0x7F is NaN."""
    codes = torch.arange(127, dtype=torch.float64)
    exponent, mantissa = torch.div(codes, 8, rounding_mode="floor"), codes % 8
    return torch.where(exponent == 0, mantissa / 8 * 2.0**-6,
                       (1 + mantissa / 8) * 2.0 ** (exponent - 7))


def e4m3_bytes(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64 holding float32 values, saturated to +-448, or NaN) as e4m3 bytes:
    nearest value, ties to the even code, the sign bit kept (-0 is 0x80), NaN as 0x7F."""
    table = _e4m3_table()
    magnitude = x.abs().nan_to_num(0.0)
    hi = torch.searchsorted(table, magnitude).clamp(max=126)  # first value >= magnitude
    lo = (hi - 1).clamp(min=0)
    below, above = magnitude - table[lo], table[hi] - magnitude
    up = (above < below) | ((above == below) & (hi % 2 == 0))
    code = torch.where(up, hi, lo) | torch.where(torch.signbit(x), 128, 0)
    return torch.where(x.isnan(), 0x7F, code).to(torch.uint8)


def e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    """float64 values of e4m3 bytes (NaN for 0x7F / 0xFF)."""
    codes = codes.to(torch.int64)
    table = torch.cat((_e4m3_table(), torch.tensor([float("nan")], dtype=torch.float64)))
    return torch.where(codes >= 128, -1.0, 1.0) * table[codes % 128]


def tile_scales(kv_c: torch.Tensor, tile_scale: str) -> torch.Tensor:
    """float32 ``[n, D / 128]`` scales of the rows ``kv_c [n, D]``: amax over each tile's
    finite values, ``max(amax / 448, FLT_MIN)`` or ``2^ceil(log2(max(amax / 448, 1e-4)))``,
    ``amax / 448`` rounded to float32 (a float64 quotient of float32 values rounded once to
    float32 is the float32 quotient)."""
    v = kv_c.double().unflatten(-1, (-1, TILE))
    amax = torch.where(v.isfinite(), v.abs(), 0.0).amax(-1)
    ratio = (amax / 448).float().double()
    if tile_scale == "raw":
        scale = ratio.clamp(min=2.0**-126)
    else:
        scale = 2.0 ** torch.ceil(torch.log2(ratio.clamp(min=1e-4)))
    return scale.float()


def ds_mla_rows(kv_c: torch.Tensor, k_pe: torch.Tensor, tile_scale: str) -> torch.Tensor:
    """The 656-byte rows (uint8 ``[n, 656]``) of ``kv_c [n, 512]`` and ``k_pe [n, 64]``
    (bf16): e4m3 of ``saturate(v / s_i)`` (float32 quotient; NaN or +-inf: NaN), the tiles'
    float32 scales, ``k_pe``'s bf16 bytes."""
    scale = tile_scales(kv_c, tile_scale)
    v = kv_c.double().unflatten(-1, (-1, TILE))
    quotient = (v / scale.double()[..., None]).float().double()
    quotient = torch.where(v.isfinite(), quotient.clamp(-448, 448), float("nan"))
    latent = e4m3_bytes(quotient).flatten(-2)
    return torch.cat((latent, scale.contiguous().view(torch.uint8),
                      k_pe.contiguous().view(torch.uint8)), dim=-1)


def rope64(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
           interleaved: bool) -> torch.Tensor:
    """float64 rotary of ``x [T, ..., R]`` by ``table [P, R]`` (cosines then sines) at
    ``positions``, rounded once to x's dtype; GPT-J pairs or NeoX halves."""
    half = x.shape[-1] // 2
    rows = table[positions.long()].double()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = rows[:, :half].reshape(shape), rows[:, half:].reshape(shape)
    x64 = x.double()
    x0, x1 = (x64[..., 0::2], x64[..., 1::2]) if interleaved else (x64[..., :half],
                                                                    x64[..., half:])
    y0, y1 = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    y = torch.stack((y0, y1), -1).flatten(-2) if interleaved else torch.cat((y0, y1), -1)
    return y.to(x.dtype)


def rmsnorm64(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 RMSNorm, the normalized value rounded to gamma's dtype before the product,
    the product rounded to x's dtype."""
    x64 = x.double()
    normed = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(gamma.dtype)
    return (normed.double() * gamma.double()).to(x.dtype)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Identical but for one ulp on a few values (float32 against float64 rounding)."""
    share, ulps = agreement(got.cpu(), want.cpu())
    assert ulps <= 1 and share >= 0.98, f"{name}: {share:.4f} identical, {ulps} ulps apart"


def padded_cache(pages: int, page_size: int, generator, device: str):
    """``(storage, cache)``: random bytes ``[pages, page_size * 656 + 48]`` and its view
    ``[pages, page_size, 656]`` (a page stride of 48 bytes more than its rows)."""
    storage = torch.randint(0, 256, (pages, page_size * ROW_BYTES + 48), generator=generator,
                            dtype=torch.uint8).to(device)
    return storage, storage[:, :page_size * ROW_BYTES].view(pages, page_size, ROW_BYTES)


def expected_storage(storage, page_size: int, slots, rows) -> torch.Tensor:
    """``storage`` (the bytes before the call) with ``rows`` at the valid ``slots``."""
    expected = storage.clone()
    view = expected[:, :page_size * ROW_BYTES].view(expected.shape[0], page_size, ROW_BYTES)
    valid = slots >= 0
    view[slots[valid] // page_size, slots[valid] % page_size] = rows.to(expected.device)
    return expected


# ---------------------------------------------------------------- ds_mla: writer and chain


def check_ds_mla_writer(tile_scale: str, index_dtype=torch.int64, device: str = "cpu"):
    """7 tokens, 6 in ``slot_mapping`` (one at -1; the 7th is CUDA-graph padding), kv_c and
    k_pe column slices of a ``[7, 2112]`` projection output, a cache with a padded page
    stride. Tiles: all zero with a -0.0; a NaN, +inf and -inf; amax 7 (a power-of-two scale
    for both modes); values near 1e-38 (raw scale FLT_MIN); 3e4; 1e-6 (the pow2 floor)."""
    from benchmarks.peers.ds_mla_chain import concat_and_cache_ds_mla

    g = torch.Generator().manual_seed(11)
    tokens, pages, page_size = 7, 3, 4
    wide = torch.randn(tokens, Q_A_RANK + D + R, generator=g)
    latent = wide[:, Q_A_RANK:Q_A_RANK + D]
    latent[0, TILE:2 * TILE] = 0.0
    latent[0, TILE + 5] = -0.0
    latent[1, TILE + 2], latent[1, 2 * TILE + 44], latent[1, 3 * TILE + 1] = (
        float("nan"), float("inf"), float("-inf"))
    latent[2, :TILE] *= 1e-38
    latent[2, 3 * TILE:] *= 3e4
    latent[4, 2 * TILE:3 * TILE].clamp_(-6.5, 6.5)
    latent[4, 2 * TILE + 9] = -7.0  # amax / 448 = 2^-6 exactly
    latent[5] *= 1e-6
    wide = wide.to(BF16).to(device)
    kv_c, k_pe = wide[:, Q_A_RANK:Q_A_RANK + D], wide[:, Q_A_RANK + D:]
    slots = torch.tensor([5, 0, 11, -1, 6, 3], dtype=index_dtype)
    storage, cache = padded_cache(pages, page_size, g, device)
    before = storage.clone().cpu()
    concat_and_cache_ds_mla(kv_c, k_pe, cache, slots.to(device), tile_scale)
    n, valid = slots.shape[0], slots >= 0
    kv_c, k_pe = kv_c.cpu()[:n][valid], k_pe.cpu()[:n][valid]
    rows = ds_mla_rows(kv_c, k_pe, tile_scale)
    expected = expected_storage(before, page_size, slots.long(), rows)
    assert torch.equal(storage.cpu(), expected), (
        f"{tile_scale}: {int((storage.cpu() != expected).sum())} bytes differ")
    # the format's meaning: q * s_i recovers each finite value to e4m3's precision
    written = rows[:, :D].double().unflatten(-1, (-1, TILE))
    latent_rows = kv_c.double().unflatten(-1, (-1, TILE))
    scale = rows[:, D:D + 16].contiguous().view(torch.float32).double()[..., None]
    recovered = e4m3_values(rows[:, :D]).unflatten(-1, (-1, TILE)) * scale
    finite = latent_rows.isfinite()
    error = (recovered - latent_rows).abs()[finite]
    bound = (latent_rows.abs() / 16 + scale * 2.0**-9).expand_as(latent_rows)[finite]
    assert (error <= bound).all(), f"{tile_scale}: a value is not recovered"
    assert (written[~finite] == 0x7F).all(), "NaN and +-inf are stored as NaN"
    if tile_scale == "pow2":
        assert (torch.frexp(scale).mantissa == 0.5).all(), "powers of two"
        assert scale.min() == 2.0**-13, "the 1e-4 floor of amax / 448, rounded up"
    else:
        assert scale.min() == 2.0**-126, "FLT_MIN: the zero and the 1e-38 tiles"


def check_ds_mla_chain(tile_scale: str, interleaved: bool, index_dtype, table_dtype,
                       device: str = "cpu", heads: int = 3):
    """``ds_mla_chain`` on 5 tokens (4 in ``slot_mapping``, one at -1): q_pe a view of
    ``q [5, H, 192]``, kv_input the last 576 columns of ``[5, 2112]``. The normed latent and
    both ropes agree with float64 (one ulp); every other column keeps its bits; the cache
    rows are the 656-byte rows of the chain's own normed latent and roped k_pe, byte for
    byte, and every other byte of the cache's storage is unchanged."""
    from benchmarks.peers.ds_mla_chain import ds_mla_chain
    from benchmarks.peers.engine_steps import cos_sin_cache

    g = torch.Generator().manual_seed(3 + interleaved)
    tokens, pages, page_size, eps = 5, 2, 4, 1e-6
    q = torch.randn(tokens, heads, 192, generator=g).to(BF16)
    fused = torch.randn(tokens, Q_A_RANK + D + R, generator=g).to(BF16)
    fused[1, Q_A_RANK:Q_A_RANK + TILE] *= 50  # one tile far louder than the others
    table = cos_sin_cache(4096, dtype=table_dtype)
    gamma = (1 + 0.25 * torch.randn(D, generator=g)).to(BF16)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(index_dtype)
    slots = torch.tensor([6, -1, 1, 4], dtype=index_dtype)
    storage, cache = padded_cache(pages, page_size, g, device)
    before = storage.clone().cpu()
    x_q, x_fused = q.clone().to(device), fused.clone().to(device)
    q_pe, kv_input = x_q[..., 128:], x_fused[:, Q_A_RANK:]
    out = ds_mla_chain(q_pe, positions.to(device), slots.to(device), table.to(device),
                       gamma.to(device), kv_input, cache, eps, tile_scale, interleaved)
    assert out[0] is q_pe and out[2].data_ptr() == kv_input[:, D:].data_ptr()
    normed = out[1].cpu()
    x_q, x_fused = x_q.cpu(), x_fused.cpu()
    check_close("kv_c_normed", normed, rmsnorm64(fused[:, Q_A_RANK:Q_A_RANK + D], gamma, eps))
    check_close("q_pe", x_q[..., 128:], rope64(q[..., 128:], positions, table, interleaved))
    check_close("k_pe", x_fused[:, -R:], rope64(fused[:, -R:], positions, table, interleaved))
    assert torch.equal(x_q[..., :128], q[..., :128]), "q's nope columns"
    assert torch.equal(x_fused[:, :-R], fused[:, :-R]), "the projection's other columns"
    valid = slots >= 0
    n = slots.shape[0]
    rows = ds_mla_rows(normed[:n][valid], x_fused[:n, -R:][valid], tile_scale)
    expected = expected_storage(before, page_size, slots.long(), rows)
    assert torch.equal(storage.cpu(), expected), (
        f"{tile_scale}: {int((storage.cpu() != expected).sum())} bytes differ")


# a fourth shim: the interpreter's bf16 -> fp32 upcast garbles subnormals (it normalizes them
# with an exponent the output cannot hold), where the GPU's conversion is exact (a shift):
# here it is the bits shifted by 16
EXACT_UPCAST = textwrap.dedent("""
    convert_float_down = interpreter._convert_float

    def convert_float_exact(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.bfloat16 and output_dtype == tl.float32:
            return np.ascontiguousarray(values).view(np.uint16).astype(np.uint32) << 16
        return convert_float_down(values, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert_float_exact
""")

WRITER = SHIMS + EXACT_UPCAST + textwrap.dedent("""
    from tests.test_peers_fp8_formats import check_ds_mla_writer
    check_ds_mla_writer("raw", torch.int64)
    check_ds_mla_writer("pow2", torch.int32)
""")

CHAIN = SHIMS + EXACT_UPCAST + textwrap.dedent("""
    from tests.test_peers_fp8_formats import check_ds_mla_chain
    check_ds_mla_chain("raw", True, torch.int64, torch.bfloat16)
    check_ds_mla_chain("pow2", False, torch.int32, torch.float32)
""")


def _interpret(script: str) -> str:
    """Run ``script`` in a Python process with Triton's CPU interpreter, from the repository
    root; it must succeed. Returns its stdout."""
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel")  # the shims patch its RMSNorm module
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_e4m3_encoder_of_the_reference_matches_torch():
    """The reference's own e4m3 encoder agrees with torch's cast (nearest even, saturated
    input) on random values, every midpoint between neighbours (the ties), every value and
    the signed zeros."""
    table = _e4m3_table()
    g = torch.Generator().manual_seed(0)
    values = torch.cat((torch.randn(4000, generator=g, dtype=torch.float64) * 60,
                        torch.randn(1000, generator=g, dtype=torch.float64) * 1e-3,
                        (table[1:] + table[:-1]) / 2, table, torch.tensor([0.0, -0.0])))
    values = torch.cat((values, -values)).float().double().clamp(-448, 448)
    want = values.float().to(E4M3).view(torch.uint8)
    assert torch.equal(e4m3_bytes(values), want)
    assert torch.equal(e4m3_values(want), values.float().to(E4M3).double())


def test_ds_mla_writer_in_the_interpreter():
    """The Triton row writer, byte for byte, both scale modes (int64 and int32 slots)."""
    _interpret(WRITER)


def test_ds_mla_chain_in_the_interpreter():
    """The three launches: GPT-J pairs, raw scales, a bf16 table and int64 indices; NeoX
    pairs, pow2 scales, a float32 table and int32 indices."""
    _interpret(CHAIN)


def test_ds_mla_chain_refuses_what_it_cannot_write():
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel")
    from benchmarks.peers.ds_mla_chain import concat_and_cache_ds_mla, ds_mla_chain

    kv_c, k_pe = torch.zeros(2, D, dtype=BF16), torch.zeros(2, R, dtype=BF16)
    slots = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="656"):
        concat_and_cache_ds_mla(kv_c, k_pe, torch.zeros(1, 4, 576, dtype=torch.uint8), slots)
    with pytest.raises(ValueError, match="tile_scale"):
        concat_and_cache_ds_mla(kv_c, k_pe, torch.zeros(1, 4, 656, dtype=torch.uint8), slots,
                                "ue8m0")
    with pytest.raises(ValueError, match="gamma"):
        ds_mla_chain(torch.zeros(2, 1, R, dtype=BF16), slots, slots,
                     torch.zeros(8, R), torch.ones(D), torch.zeros(2, D + R, dtype=BF16),
                     torch.zeros(1, 4, 656, dtype=torch.uint8), 1e-6)


def test_ds_mla_kernels_compile_for_sm90():
    """The writer and the NeoX rotary through Triton's compiler for sm_90 (no GPU needed),
    which the interpreter skips: the division is IEEE, the fp8 cast nearest-even saturating
    (the e4m3 pair conversion)."""
    pytest.importorskip("triton")
    from benchmarks.peers.ds_mla_chain import _ds_mla_row_kernel
    from benchmarks.peers.engine_triton import _rotary_kernel

    for pow2 in (False, True):
        ptx = compile_sm90_ptx(_ds_mla_row_kernel, {
            "KV_DIM": D, "NUM_TILES": 4, "BLOCK_TILES": 4, "TILE_SIZE": TILE, "PE_DIM": R,
            "BLOCK_PE": R, "POW2": pow2}, {"kv_c_ptr": "*bf16", "k_pe_ptr": "*bf16",
                                          "cache_ptr": "*u8", "slots_ptr": "*i64"})
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
        assert "div.rn.f32" in ptx
    rotary = compile_sm90_ptx(_rotary_kernel, {
        "NUM_Q_HEADS": 128, "BLOCK_Q": 128, "NUM_K_HEADS": 1, "BLOCK_K": 1, "ROT_DIM": 64,
        "HALF": 32, "HAS_KEY": True, "IS_NEOX": True}, {
            "positions_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "cos_sin_ptr": "*fp32"})
    assert "cvt.rn.bf16" in rotary


@pytest.mark.gpu
@pytest.mark.parametrize("tile_scale", ["raw", "pow2"])
def test_ds_mla_chain_on_the_gpu(tile_scale):
    """On the GPU (the GPU's own fp8 conversion, 128 heads)."""
    pytest.importorskip("liger_kernel")
    check_ds_mla_writer(tile_scale, device="cuda")
    check_ds_mla_chain(tile_scale, True, torch.int64, torch.bfloat16, "cuda", heads=128)
    check_ds_mla_chain(tile_scale, False, torch.int32, torch.float32, "cuda", heads=16)


# ---------------------------------------------------------------- the fp8 attention query


def query_inputs(device: str, heads: int = 3, padded_heads: int = 8, tokens: int = 5,
                 table_dtype=BF16, seed: int = 5):
    """``(q_nope [T, H, 512], q [T, H, 192], positions, table, storage)``: q_nope the
    transposed view of an ``[H, T, 512]`` matmul output, with a NaN, +-inf and values past
    the fp8 range; ``storage`` random fp8 bytes ``[T + 2, H_pad, 576]`` (2 padding rows)."""
    from benchmarks.peers.engine_steps import cos_sin_cache

    g = torch.Generator().manual_seed(seed)
    absorbed = torch.randn(heads, tokens, D, generator=g) * 4
    absorbed[0, 0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e4])
    q_nope = absorbed.to(BF16).to(device).transpose(0, 1)
    q = torch.randn(tokens, heads, 192, generator=g).to(BF16).to(device)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(device)
    table = cos_sin_cache(4096, dtype=table_dtype).to(device)
    storage = torch.randint(0, 256, (tokens + 2, padded_heads, D + R), generator=g,
                            dtype=torch.uint8).to(device)
    return q_nope, q, positions, table, storage


def query_bytes(q_nope: torch.Tensor, q_pe: torch.Tensor, q_scale: float) -> torch.Tensor:
    """e4m3 bytes ``[T, H, 576]`` of ``saturate(cat(q_nope, q_pe) / q_scale)`` (float32
    quotient, NaN kept, +-inf saturated)."""
    v = torch.cat((q_nope.cpu(), q_pe.cpu()), -1).double()
    quotient = (v / torch.tensor(q_scale).float().double()).float().double()
    return e4m3_bytes(quotient.clamp(-448, 448))


def check_fp8_query(fn, device: str, interleaved: bool, q_scale: float, **kwargs):
    """``fn`` (``fp8_query_chain`` or a compiled one) writes ``out[:T, :H]`` as the
    reference does from its own roped q_pe (which agrees with float64 to one ulp); heads
    ``H..H_pad``, rows past T and q's nope columns keep their bytes."""
    q_nope, q, positions, table, storage = query_inputs(device)
    before = storage.clone()
    tokens, heads = q_nope.shape[:2]
    x_q = q.clone()
    out = storage.view(E4M3)
    scale = torch.tensor([q_scale], dtype=torch.float32, device=device)
    assert fn(q_nope, x_q[..., 128:], positions, table, scale, out,
              interleaved=interleaved, **kwargs) is out
    check_close("q_pe", x_q[..., 128:], rope64(q[..., 128:], positions, table, interleaved))
    assert torch.equal(x_q[..., :128], q[..., :128]), "q's nope columns"
    storage, expected = storage.cpu().clone(), before.cpu().clone()
    written = storage[:tokens, :heads].clone()
    expected[:tokens, :heads] = 0
    storage[:tokens, :heads] = 0
    assert torch.equal(storage, expected), "padded heads and rows past T keep their bytes"
    # a NaN's sign is the platform's (x86 makes negative NaNs, CUDA positive ones)
    written = torch.where(written & 0x7F == 0x7F, 0x7F, written)
    want = query_bytes(q_nope, x_q[..., 128:], q_scale)
    assert torch.equal(written, want), f"{int((written != want).sum())} bytes differ"
    assert (written[0, 0, :4] == torch.tensor([0x7F, 0x7E, 0xFE, 0x7E])).all(), (
        "NaN kept; +-inf and 3e4 / q_scale saturated to +-448")


@pytest.mark.parametrize(("interleaved", "q_scale"), [(True, 0.37), (False, 2.0**-4)],
                         ids=["gptj-0.37", "neox-pow2"])
def test_fp8_query_chain_eager(interleaved, q_scale):
    from benchmarks.peers.fp8_query_chain import fp8_query_chain

    check_fp8_query(fp8_query_chain, "cpu", interleaved, q_scale)


def test_fp8_query_chain_reciprocal_is_the_division_for_a_power_of_two():
    """vLLM's ``x * (1 / q_scale)`` gives the division's bytes when ``1 / q_scale`` is
    exact."""
    from benchmarks.peers.fp8_query_chain import fp8_query_chain

    check_fp8_query(fp8_query_chain, "cpu", True, 0.25, reciprocal=True)


def test_fp8_query_chain_refuses_a_short_buffer():
    from benchmarks.peers.fp8_query_chain import concat_quant_fp8

    q_nope, q, _, _, storage = query_inputs("cpu")
    with pytest.raises(ValueError, match="out"):
        concat_quant_fp8(q_nope, q[..., 128:], torch.ones(1), storage[:, :2].view(E4M3))


@pytest.mark.parametrize("dynamic", ["tokens", True], ids=["dynamic-tokens", "dynamic"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_query_chain_compiled(device, dynamic):
    """``torch.compile`` of the chain (exact casts; the token count dynamic, or every size)
    writes the same bytes."""
    from benchmarks.peers.fp8_query_chain import compiled_fp8_query_chain

    check_fp8_query(compiled_fp8_query_chain, device, True, 0.37, dynamic=dynamic)


@pytest.mark.gpu
def test_triton_rope_fp8_query_chain_on_the_gpu():
    """vLLM's split: the Triton rotary, then the compiled concat + quantize."""
    pytest.importorskip("triton")
    from benchmarks.peers.fp8_query_chain import triton_rope_fp8_query_chain

    def run(*args, interleaved):
        assert interleaved
        return triton_rope_fp8_query_chain(*args)

    check_fp8_query(run, "cuda", True, 0.37)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
def test_flashinfer_fp8_query_on_the_gpu(interleaved):
    """FlashInfer's fused kernel into the padded buffer: within one fp8 step of the
    reference (it multiplies by ``1 / q_scale`` and ropes in its own order); padded heads
    and rows past T untouched; q_pe not modified."""
    from benchmarks.peers.fp8_query_chain import FlashInferUnavailable, flashinfer_fp8_query

    q_nope, q, positions, table, storage = query_inputs("cuda")
    q_nope = q_nope.clone()
    q_nope[0, 0, :3] = 0.0  # FlashInfer's handling of NaN and inf is its own
    before = storage.clone()
    tokens, heads = q_nope.shape[:2]
    q_pe = q[..., 128:]
    try:
        flashinfer_fp8_query(q_nope, q_pe, positions, table, 0.37, storage.view(E4M3),
                             interleaved)
    except FlashInferUnavailable as error:
        pytest.skip(str(error))
    assert torch.equal(q_pe, q[..., 128:])
    want = query_bytes(q_nope, rope64(q_pe.cpu(), positions.cpu(), table.cpu(), interleaved),
                       0.37)
    got = storage[:tokens, :heads].cpu()
    share, steps = agreement(got.view(E4M3), want.view(E4M3))
    assert steps <= 1 and share >= 0.95, f"{share:.4f} identical, {steps} steps apart"
    rest = torch.ones(storage.shape[:2], dtype=torch.bool)
    rest[:tokens, :heads] = False
    assert torch.equal(storage[rest.cuda()], before[rest.cuda()])


def test_flashinfer_fp8_query_without_flashinfer_is_an_import_error(monkeypatch):
    """Without FlashInfer the provider raises ``FlashInferUnavailable``, an ImportError
    whose message says what to install."""
    from benchmarks.peers.fp8_query_chain import FlashInferUnavailable, flashinfer_fp8_query

    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer fails
    monkeypatch.delenv("FLASHINFER_ROPE_LIB", raising=False)  # and no library built
    monkeypatch.setitem(sys.modules, "flashinfer.rope", None)
    q_nope, q, positions, table, storage = query_inputs("cpu")
    with pytest.raises(FlashInferUnavailable, match="flashinfer") as raised:
        flashinfer_fp8_query(q_nope, q[..., 128:], positions, table, 0.37,
                             storage.view(E4M3))
    assert isinstance(raised.value, ImportError)
