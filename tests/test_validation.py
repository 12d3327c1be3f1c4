"""Every bad input raises a clear exception naming the argument, and changes nothing."""

import pytest
import torch

from tvm_fused import OP_NAME, Form, api, build
from tvm_fused.testing.inputs import make_inputs, split_table

from .cases import call_with as _call
from .cases import snapshot, unchanged


def _inputs():
    return make_inputs([2, 0, 3], [5, 1, 127], num_q_heads=4, page_size=16, padding_rows=1)


def _bad(name, make, error, match):
    """A replacement for argument ``name`` built from good inputs, and what it must raise."""
    return pytest.param(name, make, error, match, id=f"{name}:{make.__name__}")


def wrong_dtype_q(i): return i.q_rope.float()
def int_q(i): return i.q_rope.to(torch.int32)
def rank_q(i): return i.q_rope[0]
def list_q(i): return i.q_rope.tolist()
def fp32_cache(i): return i.k_cache.float()
def short_row_cache(i): return i.k_cache[..., :-2]
def page_size_3(i): return i.k_cache[:, :3]
def noncontig_last_cache(i): return i.k_cache.transpose(1, 2)
def int64_offsets(i): return i.input_row_offsets.to(torch.int64)
def short_offsets(i): return i.input_row_offsets[:-1]
def float_lookup(i): return i.lookup_table.float()
def short_lookup(i): return i.lookup_table[:-1]
def int64_lengths(i): return i.cache_lengths.to(torch.int64)
def long_lengths(i): return torch.cat([i.cache_lengths, i.cache_lengths[:1]])
def short_gamma(i): return i.gamma[:-1]
def int_gamma(i): return i.gamma.to(torch.int32)
def meta_gamma(i): return i.gamma.to("meta")
def odd_freqs(i): return i.freqs_cis[:, :-1]
def column_major_freqs(i): return i.freqs_cis.t().contiguous().t()
def int_freqs(i): return i.freqs_cis.to(torch.int32)
def fp16_freqs(i): return i.freqs_cis.half()
def full_q(i): return torch.randn(*i.q_rope.shape[:2], 192).to(i.q_rope.dtype)


BAD_ARGUMENTS = [
    _bad("q_rope", wrong_dtype_q, TypeError, "k_cache must have dtype of q_rope"),
    _bad("q_rope", int_q, TypeError, "q_rope must have dtype"),
    _bad("q_rope", rank_q, ValueError, "q_rope must have 3 dims"),
    _bad("q_rope", list_q, TypeError, "q_rope must be a torch.Tensor"),
    _bad("k_cache", fp32_cache, TypeError, "k_cache must have dtype of q_rope"),
    _bad("k_cache", short_row_cache, ValueError, "k_cache rows must hold"),
    _bad("k_cache", page_size_3, ValueError, "page size"),
    _bad("k_cache", noncontig_last_cache, ValueError, "k_cache must be contiguous in its last"),
    _bad("input_row_offsets", int64_offsets, TypeError, "input_row_offsets must have dtype"),
    _bad("input_row_offsets", short_offsets, ValueError, "input_row_offsets must have batch"),
    _bad("lookup_table", float_lookup, TypeError, "lookup_table must have dtype"),
    _bad("lookup_table", short_lookup, ValueError, "lookup_table must have batch"),
    _bad("cache_lengths", int64_lengths, TypeError, "cache_lengths must have dtype"),
    _bad("cache_lengths", long_lengths, ValueError, "input_row_offsets must have batch"),
    _bad("gamma", short_gamma, ValueError, "gamma must have kv_norm_dim = 512 elements"),
    _bad("gamma", int_gamma, TypeError, "gamma must have dtype"),
    _bad("gamma", meta_gamma, ValueError, "gamma is on meta"),
    _bad("freqs_cis", odd_freqs, ValueError, "freqs_cis must have rope_dim"),
    _bad("freqs_cis", column_major_freqs, ValueError, "freqs_cis must be contiguous"),
    _bad("freqs_cis", int_freqs, TypeError, "freqs_cis must have dtype"),
    _bad("freqs_cis", fp16_freqs, TypeError, "freqs_cis must have dtype"),
    _bad("q_rope", full_q, ValueError,
         r"q_rope's last dim must be rope_dim = 64 .* q\[\.\.\., -64:\]"),
]


def _as_on_a_gpu(monkeypatch) -> None:
    """``validate=None`` takes the GPU default's path on the CPU: TVM's compiled entry checks
    (overlap too) refuse the call before the launch and the Python checks run for the
    message."""
    monkeypatch.setattr(api, "_default_proves_contents", lambda q_rope: False)


@pytest.fixture(params=["checked", "sync-free", "unchecked"])
def validate(request, monkeypatch):
    """The ``validate=`` of a call: None, on the CPU (every check, contents too); None, as on
    a GPU (``_as_on_a_gpu``); False (the entry's checks alone)."""
    if request.param == "sync-free":
        _as_on_a_gpu(monkeypatch)
    return False if request.param == "unchecked" else None


@pytest.mark.parametrize("name, make, error, match", BAD_ARGUMENTS)
def test_bad_argument_raises_and_writes_nothing(name, make, error, match, validate):
    inputs = _inputs()
    before = snapshot(inputs)
    with pytest.raises(error, match=match):
        _call(inputs.args(), validate=validate, **{name: make(inputs)})
    assert unchanged(inputs, before)


def test_out_with_wrong_shape_dtype_or_strides(validate):
    inputs = _inputs()
    before = snapshot(inputs)
    for out, message in (
        (torch.empty(inputs.q_rope.shape[0] + 1, *inputs.q_rope.shape[1:],
                     dtype=inputs.q_rope.dtype), "out must have the shape"),
        (torch.empty(inputs.q_rope.shape, dtype=torch.float64), "out must have dtype"),
        (inputs.q_rope.as_strided(inputs.q_rope.shape, (64 * 4, 1, 0)), "out must be contiguous"),
        (inputs.q_storage.as_strided(inputs.q_rope.shape, (4 * 64, 64, 1),
                                     inputs.q_rope.storage_offset()), "starts where q_rope does"),
    ):
        with pytest.raises((TypeError, ValueError), match=message):
            _call(inputs.args(), out=out, validate=validate)
    assert unchanged(inputs, before)


def _view_of(storage, like):
    """A tensor shaped like ``like`` over the start of ``storage``'s memory."""
    return storage.reshape(-1)[:like.numel()].view(like.shape)


OVERLAPS = {
    "out on the cache": (lambda i: {"out": _view_of(i.k_cache, i.q_rope)},
                         "out overlaps k_cache"),
    # half a rope part back: out's columns meet q_rope's (a whole part back, they would be
    # the disjoint columns of the row before, which the op takes)
    "out shifted from q": (lambda i: {"out": i.q_storage.as_strided(
        i.q_rope.shape, i.q_rope.stride(), i.q_rope.storage_offset() - 32)},
        "out overlaps q_rope"),
    "q on the cache": (lambda i: {"q_rope": _view_of(i.k_cache, i.q_rope)},
                       "k_cache overlaps q_rope"),
    "errors in the cache": (lambda i: {"errors": i.k_cache.view(torch.int32).reshape(-1)[:1]},
                            "k_cache overlaps errors|errors overlaps"),
    "cache on gamma": (lambda i: {"gamma": i.k_cache[0, 0, :512]}, "k_cache overlaps gamma"),
}


@pytest.mark.parametrize("mode", ["checked", "sync-free", "unchecked", "validate"])
@pytest.mark.parametrize("case", OVERLAPS)
def test_overlapping_written_tensors_are_refused(case, mode, monkeypatch):
    """A tensor the op writes (out, k_cache, errors) may not share memory with another
    argument: the op would read what it has already written (refused by every call: by the
    Python checks, or by the compiled entry, with the Python checks naming it)."""
    if mode == "sync-free":
        _as_on_a_gpu(monkeypatch)
    validate = {"validate": True, "unchecked": False}.get(mode)
    inputs = _inputs()
    replace, message = OVERLAPS[case]
    before = snapshot(inputs)
    with pytest.raises(ValueError, match=message) as refused:
        _call(inputs.args(), validate=validate, **replace(inputs))
    assert unchanged(inputs, before)
    # one exception, one traceback: not raised while the entry's refusal was handled
    assert refused.value.__context__ is None and refused.value.__cause__ is None


SELF_OVERLAPPING = {
    "k_cache": lambda i: i.k_cache[:1].expand(i.k_cache.shape),
    "out": lambda i: torch.empty_like(i.q_rope[:1]).expand(i.q_rope.shape),
    "kv_output": lambda i: torch.empty_like(i.kv_input[:1]).expand(i.kv_input.shape),
}


@pytest.mark.parametrize("validate", [None, True], ids=["cpu-default", "validate"])
@pytest.mark.parametrize("name", SELF_OVERLAPPING)
def test_a_self_overlapping_written_tensor_is_refused(name, validate):
    """An expanded view the op writes would have two tokens write one address: the checks
    (validate=True, the CPU's default) refuse it, naming it."""
    inputs = make_inputs([2, 0, 3], [5, 1, 127], num_q_heads=4, page_size=16,
                         write_through=True)
    before = snapshot(inputs)
    with pytest.raises(ValueError, match=f"{name} is a self-overlapping view"):
        _call(inputs.args(), validate=validate, kv_input=inputs.kv_input,
              **{name: SELF_OVERLAPPING[name](inputs)})
    assert unchanged(inputs, before)


@pytest.mark.parametrize("given, declared", [("split", "interleaved"),
                                             ("interleaved", "split")])
def test_a_table_in_the_other_layout_is_refused_under_validate(given, declared):
    """Row 0 of a cos/sin table (position 0: cosines 1, sines 0) tells the layouts apart:
    a table in the other layout than ``freqs_layout`` is refused by validate=True."""
    inputs = _inputs()
    table = split_table(inputs.freqs_cis) if given == "split" else inputs.freqs_cis
    before = snapshot(inputs)
    with pytest.raises(ValueError, match=f"freqs_cis is a {given} table.*"
                                         f"pass freqs_layout='{given}'"):
        _call(inputs.args(), validate=True, freqs_cis=table, freqs_layout=declared)
    assert unchanged(inputs, before)
    _call(inputs.args(), validate=True, freqs_cis=table, freqs_layout=given)  # accepted


@pytest.mark.parametrize("epsilon", [-1e-6, float("nan"), float("inf"), 1e39])
def test_bad_epsilon_is_refused(epsilon, validate):
    """A negative, NaN or infinite epsilon (or one float32 cannot hold) would write NaN into
    the cache: refused by the Python checks and by the kernel's entry."""
    inputs = _inputs()
    before = snapshot(inputs)
    with pytest.raises(ValueError, match="epsilon must be"):
        _call(inputs.args(), validate=validate, epsilon=epsilon)
    assert unchanged(inputs, before)


def test_bad_errors_counter_is_refused(validate):
    inputs = _inputs()
    for errors, error, message in ((torch.zeros(2, dtype=torch.int32), ValueError,
                                    "errors must be a one-element"),
                                   (torch.zeros(1, dtype=torch.int64), TypeError,
                                    "errors must be an int32")):
        with pytest.raises(error, match=message):
            _call(inputs.args(), validate=validate, errors=errors)


def test_odd_rope_dim():
    inputs = make_inputs([1], [0], num_q_heads=2, rope_dim=6, kv_norm_dim=10, page_size=4)
    with pytest.raises(ValueError, match="rope_dim"):
        _call(inputs.args(), q_rope=inputs.q_rope[..., :5],
              freqs_cis=inputs.freqs_cis[:, :5].contiguous(),
              k_cache=inputs.k_cache[..., :15])


@pytest.mark.parametrize("case", [
    "offsets_not_from_zero", "offsets_decreasing", "offsets_beyond_rows",
    "position_beyond_freqs", "page_beyond_lookup_table", "page_id_out_of_range",
    "negative_cache_length",
])
def test_validate_rejects_out_of_range_contents(case):
    inputs = _inputs()
    args = list(inputs.args())
    if case == "offsets_not_from_zero":
        args[1] = torch.tensor([1, 2, 2, 5], dtype=torch.uint32)
    elif case == "offsets_decreasing":
        args[1] = torch.tensor([0, 3, 2, 5], dtype=torch.uint32)
    elif case == "offsets_beyond_rows":
        args[1] = torch.tensor([0, 2, 2, 7], dtype=torch.uint32)
    elif case == "position_beyond_freqs":
        args[2] = inputs.freqs_cis[:100]
    elif case == "page_beyond_lookup_table":
        args[6] = torch.tensor([5, 1, 16 * inputs.lookup_table.shape[1]], dtype=torch.int32)
    elif case == "page_id_out_of_range":
        args[5] = inputs.lookup_table.clone()
        args[5][2, 7] = inputs.k_cache.shape[0]
    elif case == "negative_cache_length":
        args[6] = torch.tensor([5, -1, 127], dtype=torch.int32)
    before = snapshot(inputs)
    with pytest.raises(ValueError):
        _call(args, validate=True)
    assert unchanged(inputs, before)




@pytest.mark.parametrize("case", OVERLAPS)
def test_the_compiled_entry_refuses_overlaps_by_itself(case):
    """The kernel called directly, no Python check on the way: its entry asserts that the
    written tensors' bytes are disjoint from every other argument's (CheckNoOverlap)."""
    inputs = _inputs()
    args = dict(zip(("q_rope", "input_row_offsets", "freqs_cis", "gamma", "k_cache",
                     "lookup_table", "cache_lengths"), inputs.args()),
                out=torch.empty_like(inputs.q_rope), errors=torch.zeros(1, dtype=torch.int32))
    replace, _ = OVERLAPS[case]
    args.update(replace(inputs))
    kernel = build(Form(num_q_heads=4, page_size=16))[OP_NAME]
    before = snapshot(inputs)
    with pytest.raises(ValueError, match=r"overlaps .* in memory"):
        kernel(*(args[name] for name in ("q_rope", "out", "input_row_offsets", "freqs_cis",
                                         "gamma", "k_cache", "lookup_table", "cache_lengths",
                                         "errors")), 1e-6)
    assert unchanged(inputs, before)


def test_the_compiled_entry_takes_q_itself_as_out_and_empty_tensors_anywhere():
    """``out`` may start where q_rope does with its strides (in place); an empty tensor
    overlaps nothing."""
    inputs = _inputs()
    kernel = build(Form(num_q_heads=4, page_size=16))[OP_NAME]
    q, offsets, freqs, gamma, k_cache, table, lengths = inputs.args()
    errors = torch.zeros(1, dtype=torch.int32)
    kernel(q, q[:], offsets, freqs, gamma, k_cache, table, lengths, errors, 1e-6)
    empty_q = k_cache.reshape(-1)[:0].view(0, *q.shape[1:])
    no_requests = torch.zeros(1, dtype=offsets.dtype)
    kernel(empty_q, empty_q, no_requests, freqs, gamma, k_cache, table[:0], lengths[:0], errors,
           1e-6)
