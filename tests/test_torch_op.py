"""The torch custom ops: eager, under torch.compile(fullgraph=True), on CPU and GPU."""

import pytest
import torch

import tvm_fused.torch_op  # noqa: F401  (registers torch.ops.tvm_fused.*)
from tvm_fused.testing.compare import check_run, whole_storage
from tvm_fused.testing.inputs import engine_addressed, make_inputs, rows_like, with_options

from .cases import FORMS, RAGGED

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _inputs(device):
    return make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, device=device)


def _out_of_place(*args, errors=None):
    return torch.ops.tvm_fused.fused_rope_rmsnorm(*args, 1e-6, True, errors)


def _in_place(q, *args, errors=None):
    torch.ops.tvm_fused.fused_rope_rmsnorm_(q, *args, 1e-6, True, errors)
    return q


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
def test_custom_op(device, compiled, in_place):
    """A stale page-table entry (past the cache) is skipped and counted, eager or compiled."""
    inputs = _inputs(device)
    inputs.lookup_table[2, 8] = inputs.k_cache.shape[0]  # request 2 writes positions 126-130
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    before = inputs.clone()
    fn = _in_place if in_place else _out_of_place
    out = (torch.compile(fn, fullgraph=True) if compiled else fn)(*inputs.args(),
                                                                  errors=errors)
    if in_place:
        assert out.data_ptr() == inputs.q_rope.data_ptr()
    report = check_run(before, inputs, out, in_place=in_place, errors_counted=int(errors))
    assert report.ok and report.errors_expected == 3, report.summary()


def _write_through(q, kv_input, *args, k_scale, kv_output, errors):
    return torch.ops.tvm_fused.fused_rope_rmsnorm_write_through(
        q, kv_input, *args, k_scale, 1e-6, True, kv_output, errors)


def _write_through_in_place(q, kv_input, *args, k_scale, kv_output, errors):
    torch.ops.tvm_fused.fused_rope_rmsnorm_write_through_(
        q, kv_input, *args, k_scale, 1e-6, True, kv_output, errors)
    return q


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("form", ["write-through", "fp8-e5m2-scaled"])
def test_write_through_custom_op(device, compiled, in_place, form):
    """The write-through ops, eager or compiled, with kv_output (a column slice), a stale
    page-table entry that is skipped and counted, and (fp8) a scale."""
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, device=device,
                         **FORMS[form])
    inputs.lookup_table[2, 8] = inputs.k_cache.shape[0]
    storage, kv_output = rows_like(inputs.q_rope.shape[0], 576, (600, 8), inputs.q_rope.dtype,
                                   torch.Generator().manual_seed(5))
    kv_output = storage.to(device).as_strided(kv_output.shape, kv_output.stride(),
                                              kv_output.storage_offset())
    kv_output_before = whole_storage(kv_output).clone()
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    before = inputs.clone()
    fn = _write_through_in_place if in_place else _write_through
    q, *rest = inputs.args()
    out = (torch.compile(fn, fullgraph=True) if compiled else fn)(
        q, inputs.kv_input, *rest, k_scale=inputs.k_scale, kv_output=kv_output, errors=errors)
    report = check_run(before, inputs, out, in_place=in_place, errors_counted=int(errors),
                       kv_output=kv_output, kv_output_storage_before=kv_output_before)
    assert report.ok and report.errors_expected == 3, report.summary()


def _slots_in_place(q, positions, slots, table, gamma, k_cache, *, kv_input, k_scale, errors):
    torch.ops.tvm_fused.fused_rope_rmsnorm_slots_(
        q, positions, slots, table, gamma, k_cache, kv_input, k_scale, 1e-6, True, "split",
        "once", None, errors)
    return q


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("form", ["in-place", "fp8-e5m2-scaled"])
def test_slots_custom_op(device, compiled, form):
    """The engine-addressed op, eager or compiled: a slot past the cache is skipped and
    counted, two padding tokens have no slot_mapping entry."""
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, device=device,
                         **FORMS[form])
    inputs = engine_addressed(with_options(inputs, freqs_layout="split", norm_rounding="once"),
                              unslotted=2)
    inputs.slot_mapping[5] = inputs.k_cache.shape[0] * inputs.k_cache.shape[1]
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    before = inputs.clone()
    fn = torch.compile(_slots_in_place, fullgraph=True) if compiled else _slots_in_place
    out = fn(*inputs.args(), **inputs.form(), errors=errors)
    report = check_run(before, inputs, out, in_place=True, errors_counted=int(errors))
    assert report.ok and report.errors_expected == 1, report.summary()


def _mutated(op):
    schema = op.default._schema
    return {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}


def test_ops_declare_their_mutations():
    assert _mutated(torch.ops.tvm_fused.fused_rope_rmsnorm_) == {"q_rope", "k_cache", "errors"}
    assert _mutated(torch.ops.tvm_fused.fused_rope_rmsnorm) == {"k_cache", "errors"}
    assert _mutated(torch.ops.tvm_fused.fused_rope_rmsnorm_write_through) == {
        "k_cache", "kv_output", "errors"}
    assert _mutated(torch.ops.tvm_fused.fused_rope_rmsnorm_write_through_) == {
        "q_rope", "k_cache", "kv_output", "errors"}
    assert _mutated(torch.ops.tvm_fused.fused_rope_rmsnorm_slots_) == {
        "q_rope", "k_cache", "kv_output", "errors"}


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["in-place", "fp8-e5m2-scaled"])
def test_op_replays_from_a_cuda_graph(form):
    """The form's op rotating q in place, captured once, replayed on new contents of the same
    tensors."""
    def fresh(device):
        return make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, device=device,
                           **FORMS[form])

    inputs = fresh("cuda")
    q, *rest = inputs.args()

    def call():
        if inputs.kv_input is None:
            torch.ops.tvm_fused.fused_rope_rmsnorm_(q, *rest, 1e-6, True, None)
        else:
            torch.ops.tvm_fused.fused_rope_rmsnorm_write_through_(
                q, inputs.kv_input, *rest, inputs.k_scale, 1e-6, True, None, None)

    _check_graph_replay(call, inputs, fresh("cpu"), ("q_storage", "kv_storage", "cache_storage"))


def _check_graph_replay(call, inputs, new, names):
    """Capture ``call`` (rotating ``inputs.q_rope`` in place) in a CUDA graph, copy the
    tensors ``names`` of ``new`` into the captured ones, replay, check the result."""
    call()  # build first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for name in names:
        if getattr(inputs, name) is not None:
            getattr(inputs, name).copy_(getattr(new, name))
    before = inputs.clone()
    graph.replay()
    torch.cuda.synchronize()
    report = check_run(before, inputs, inputs.q_rope, in_place=True)
    assert report.ok, report.summary()


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["write-through", "fp8-e5m2-scaled"])
def test_slots_op_replays_from_a_cuda_graph(form):
    """vLLM's decode graph: the slots op captured once, replayed after the step's new q,
    latent, positions and slot mapping (other pages) were copied into the captured tensors;
    two padding tokens have no slot_mapping entry."""
    def fresh(device, seed):
        inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, device=device,
                             seed=seed, **FORMS[form])
        return engine_addressed(with_options(inputs, freqs_layout="split"), unslotted=2)

    inputs = fresh("cuda", 0)
    q, positions, slots, table, gamma, k_cache = inputs.args()

    def call():
        torch.ops.tvm_fused.fused_rope_rmsnorm_slots_(
            q, positions, slots, table, gamma, k_cache, inputs.kv_input, inputs.k_scale, 1e-6,
            True, "split", "before_gamma", None, None)

    new = fresh("cpu", 1)
    assert not torch.equal(new.slot_mapping, inputs.slot_mapping.cpu())
    _check_graph_replay(call, inputs, new, ("q_storage", "kv_storage", "cache_storage",
                                            "positions", "slot_mapping"))


@pytest.mark.gpu
def test_reduce_overhead_compile():
    compiled = torch.compile(_out_of_place, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up runs, then graph replays
        inputs = _inputs("cuda")
        before = inputs.clone()
        out = compiled(*inputs.args()).clone()
        report = check_run(before, inputs, out)
        assert report.ok, report.summary()
