"""Ragged batches the kernel tests share: empty requests, page-boundary crossings."""

import itertools

import torch

from tvm_fused.checking import run_and_check
from tvm_fused.inputs import make_inputs

# (new tokens per request, cache lengths before the step)
RAGGED = ([3, 0, 5, 1, 7], [2, 9, 126, 0, 31])
DECODE = ([1] * 6, [0, 15, 16, 127, 128, 300])
PREFILL = ([37, 0, 20], [0, 5, 240])


def matrix_id(heads, dtype, page_size):
    return f"h{heads}-{str(dtype).removeprefix('torch.')}-ps{page_size}"


HEADS = (1, 16, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PAGE_SIZES = (1, 16, 128)
MATRIX = list(itertools.product(HEADS, DTYPES, PAGE_SIZES))
MATRIX_IDS = [matrix_id(*case) for case in MATRIX]


def check_matrix_case(index: int, device: str):
    """Run matrix entry ``index`` on ``device``: every (heads, dtype, page size); the other
    options rotate so that each layout, mode and offsets dtype appears across the matrix."""
    heads, dtype, page_size = MATRIX[index]
    new_tokens, cache_lengths = (RAGGED, DECODE, PREFILL)[index % 3]
    inputs = make_inputs(new_tokens, cache_lengths, num_q_heads=heads, page_size=page_size,
                         dtype=dtype, padding_rows=index % 4, strided_q=index % 2 == 0,
                         layers=1 + 2 * (index % 2),
                         offsets_dtype=(torch.uint32, torch.int32)[index // 2 % 2],
                         seed=index, device=device)
    return run_and_check(inputs, in_place=index % 4 == 1, interleaved=index % 5 != 2,
                         validate=True)
