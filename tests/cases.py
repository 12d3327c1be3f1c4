"""Cases the kernel tests (and scripts/sanitize_cases.py) share: ragged batches with empty
requests and page-boundary crossings, and indices that point nowhere."""

import itertools

import pytest
import torch

from tvm_fused import fused_rope_rmsnorm
from tvm_fused.testing.compare import run_and_check
from tvm_fused.testing.inputs import make_inputs

# (new tokens per request, cache lengths before the step)
RAGGED = ([3, 0, 5, 1, 7], [2, 9, 126, 0, 31])
DECODE = ([1] * 6, [0, 15, 16, 127, 128, 300])
PREFILL = ([37, 0, 20], [0, 5, 240])


def matrix_id(heads, dtype, page_size):
    return f"h{heads}-{str(dtype).removeprefix('torch.')}-ps{page_size}"


HEADS = (1, 16, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PAGE_SIZES = (1, 16, 128)
def thinned(values, ids=None, every: int = 3) -> list:
    """``values`` as pytest params, all but every ``every``-th marked slow: the test command
    runs a spread of the cases, ``-m slow`` (CI) the rest."""
    ids = ids or [None] * len(values)
    return [pytest.param(value, id=name, marks=() if i % every == 0 else pytest.mark.slow)
            for i, (value, name) in enumerate(zip(values, ids))]


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


# the forms of the op, as make_inputs options: the new rows from the cache itself or from
# kv_input (a column slice of a projection output), into a cache of q's dtype or fp8
FORMS = {
    "in-place": {},
    "write-through": {"write_through": True},
    "fp8-e4m3": {"write_through": True, "cache_dtype": torch.float8_e4m3fn},
    "fp8-e5m2-scaled": {"write_through": True, "cache_dtype": torch.float8_e5m2,
                        "k_scale": 0.37},
}


def bad_index_inputs(device, form: str = "in-place"):
    """RAGGED with 4 heads, page size 16, 3 layers, 2 padding rows: request 2 writes
    positions 126-130 (logical pages 7 and 8), request 3 position 0; the lookup table has 10
    columns."""
    return make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, padding_rows=2,
                       device=device, **FORMS[form])


def _set(name, index, value):
    def corrupt(inputs):
        getattr(inputs, name)[index] = value(inputs) if callable(value) else value
    return corrupt


def _keep_freqs(rows):
    def corrupt(inputs):
        inputs.freqs_cis = inputs.freqs_cis[:rows].clone()
    return corrupt


def _narrow_table(inputs):
    inputs.lookup_table = inputs.lookup_table[:, :8]  # logical page 8 is past its width


INT32_MAX = 2**31 - 1
# corruption of bad_index_inputs -> the error tokens it makes (each has a defined result)
BAD_INDICES = {
    "page at num_pages": (_set("lookup_table", (2, 8), lambda i: i.k_cache.shape[0]), 3),
    "huge page": (_set("lookup_table", (2, 8), INT32_MAX), 3),
    "position at len(freqs_cis)": (_keep_freqs(130), 1),
    "empty freqs table": (_keep_freqs(0), 16),
    "logical page at the table's width": (_narrow_table, 3),
    "huge cache length": (_set("cache_lengths", 3, INT32_MAX), 1),
    "negative cache length": (_set("cache_lengths", 3, -5), 1),
    "no cache row (page -1)": (_set("lookup_table", (2, 8), -1), 0),
    "no cache row (most negative page)": (_set("lookup_table", (2, 7), -2**31), 0),
}


def _slots_set(index, value):
    def corrupt(inputs):
        inputs.slot_mapping[index] = value(inputs) if callable(value) else value
    return corrupt


def _position_set(index, value):
    def corrupt(inputs):
        inputs.positions[index] = value(inputs) if callable(value) else value
    return corrupt


def _cache_rows(inputs) -> int:
    return inputs.k_cache.shape[0] * inputs.k_cache.shape[1]


# corruption of engine-addressed bad_index_inputs (16 tokens) -> the error tokens it makes
# (each has a defined result)
BAD_SLOTS = {
    "no cache row (slot -1)": (_slots_set(4, -1), 0),
    "no cache row (most negative slot)": (_slots_set(5, -2**63), 0),
    "slot at the cache's end": (_slots_set(6, _cache_rows), 1),
    "huge slot": (_slots_set(7, 2**63 - 1), 1),
    "negative position": (_position_set(8, -3), 1),
    "position at the table's length": (_position_set(9, lambda i: i.freqs_cis.shape[0]), 1),
    "huge position": (_position_set(10, 2**62), 1),
}


def _offsets(values):
    def corrupt(inputs):
        inputs.input_row_offsets = torch.tensor(values, dtype=torch.int64).to(
            inputs.input_row_offsets.dtype).to(inputs.q_rope.device)
    return corrupt


# corruptions of bad_index_inputs (16 real rows, 2 of padding) with no defined result: the
# kernel must still stay inside its tensors and leave rows past offsets[-1] alone
MALFORMED = {
    "offsets not from 0": _offsets([2, 3, 3, 8, 9, 16]),
    "offsets decreasing": _offsets([0, 9, 3, 8, 2, 16]),
    "offsets past q's rows": _offsets([0, 3, 3, 8, 9, 4000]),
    "huge offsets": _offsets([0, 3, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]),
    # request 4's logical page 2 is request 0's page 0: two tokens on one cache row
    "two tokens on one cache row": _set("lookup_table", (4, 2),
                                        lambda i: int(i.lookup_table[0, 0])),
}


def snapshot(inputs) -> list:
    """Copies of every tensor of ``inputs`` (whole storages), for ``unchanged``."""
    return [t.clone() for t in (inputs.q_storage, inputs.cache_storage,
                                inputs.input_row_offsets, inputs.lookup_table,
                                inputs.cache_lengths, inputs.freqs_cis, inputs.gamma,
                                inputs.kv_storage, inputs.k_scale, inputs.positions,
                                inputs.slot_mapping) if t is not None]


def unchanged(inputs, before: list) -> bool:
    """Whether every tensor of ``inputs`` is bit for bit as in ``before``."""
    return all(torch.equal(a, b) for a, b in zip(snapshot(inputs), before))


POSITIONAL = ("q_rope", "input_row_offsets", "freqs_cis", "gamma", "k_cache", "lookup_table",
              "cache_lengths")


def call_with(args, **replacements):
    """``fused_rope_rmsnorm(*args)`` with arguments replaced by name (positional or
    keyword)."""
    call = dict(zip(POSITIONAL, args))
    call.update({k: v for k, v in replacements.items() if k in POSITIONAL})
    options = {k: v for k, v in replacements.items() if k not in POSITIONAL}
    return fused_rope_rmsnorm(*(call[n] for n in POSITIONAL), **options)
