"""Ragged batches the kernel tests share: empty requests, page-boundary crossings."""

# (new tokens per request, cache lengths before the step)
RAGGED = ([3, 0, 5, 1, 7], [2, 9, 126, 0, 31])
DECODE = ([1] * 6, [0, 15, 16, 127, 128, 300])
PREFILL = ([37, 0, 20], [0, 5, 240])


def matrix_id(heads, dtype, page_size):
    return f"h{heads}-{str(dtype).removeprefix('torch.')}-ps{page_size}"
