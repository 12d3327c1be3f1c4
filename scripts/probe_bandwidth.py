"""What the op's q layout lets a plain copy reach (GPU): is the gap to a contiguous copy the
layout's or the kernel's?

The op reads each token's q rope part, 64 elements at the end of every head's 192 (128 B of
every 384 B), and writes it densely. This times, on a cold L2 (``timing.time_cuda``), for 128
and 16 heads at 4096 and 32768 tokens: torch's contiguous device copy of the same bytes (the
benchmark's baseline), and an autotuned Triton row copy (16-byte accesses) of the same bytes
laid out contiguously and laid out as the op reads them (strided rows). Prints one JSON line
per point.

Usage: python scripts/probe_bandwidth.py
"""

import json

import torch
import triton
import triton.language as tl

from tvm_fused.timing import time_cuda


@triton.autotune(
    configs=[triton.Config({"ROWS": rows}, num_warps=warps)
             for rows in (8, 16, 32, 64, 128) for warps in (4, 8)],
    key=["rows", "src_stride"],
)
@triton.jit
def _copy_rows(src, dst, rows, src_stride, COLS: tl.constexpr, ROWS: tl.constexpr):
    """dst[r, :COLS] = src[r * src_stride : + COLS] for r < rows (dst dense)."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    col = tl.arange(0, COLS)[None, :]
    mask = row < rows
    tl.store(dst + row * COLS + col, tl.load(src + row * src_stride + col, mask=mask),
             mask=mask)


def copy_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy ``src [rows, cols]`` (last dim contiguous, any row stride) into dense ``dst``."""
    rows, cols = src.shape
    _copy_rows[lambda meta: (triton.cdiv(rows, meta["ROWS"]),)](
        src, dst, rows, src.stride(0), COLS=cols)


print(json.dumps({"gpu": torch.cuda.get_device_name(), "triton": triton.__version__}))
for heads in (128, 16):
    for tokens in (4096, 32768):
        q = torch.randn(tokens * heads, 192, dtype=torch.bfloat16, device="cuda")
        strided = q[:, 128:]
        dense = strided.contiguous()
        out = torch.empty_like(dense)
        nbytes = 2 * dense.numel() * dense.element_size()
        row = {"heads": heads, "tokens": tokens, "bytes": nbytes}
        for name, fn in (("torch contiguous copy", lambda: out.copy_(dense)),
                         ("triton contiguous rows", lambda: copy_rows(dense, out)),
                         ("triton strided rows", lambda: copy_rows(strided, out))):
            fn()
            assert torch.equal(out, dense), name
            out.zero_()
            us = time_cuda(fn, reps=60).median_us
            row[name] = {"us": round(us, 2), "TB/s": round(nbytes / us / 1e6, 3)}
        print(json.dumps(row), flush=True)
