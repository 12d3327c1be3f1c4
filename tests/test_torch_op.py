"""The torch custom ops: generated for every entry point and variant, every option in their
schemas; eager and under torch.compile(fullgraph=True), on CPU and GPU, from CUDA graphs."""

import inspect

import pytest
import torch

import tvm_fused.torch_op  # noqa: F401  (registers torch.ops.tvm_fused.*)
from tvm_fused import fused_rope_rmsnorm, fused_rope_rmsnorm_slots
from tvm_fused.testing.compare import check_run, whole_storage
from tvm_fused.testing.inputs import engine_addressed, make_inputs, rows_like, with_options

from .cases import FORMS, RAGGED

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ENTRIES = {"offsets": fused_rope_rmsnorm, "slots": fused_rope_rmsnorm_slots}
VARIANTS = {"new": "", "out": "_out", "in_place": "_"}


def _inputs(device, addressing, form):
    """RAGGED on 3 layers with a stale index: a page past the cache (offsets) or a slot past
    it (slots, whose last two tokens have no slot_mapping entry); the slots inputs use the
    split table and the once-rounded norm."""
    inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, device=device,
                         **FORMS[form])
    if addressing == "offsets":
        inputs.lookup_table[2, 8] = inputs.k_cache.shape[0]  # request 2 writes 126-130
        return inputs, 3
    inputs = engine_addressed(with_options(inputs, freqs_layout="split", norm_rounding="once"),
                              unslotted=2)
    inputs.slot_mapping[5] = inputs.k_cache.shape[0] * inputs.k_cache.shape[1]
    return inputs, 1


def _kv_output(inputs, device):
    """A ``kv_output``: a column slice of a wider tensor (None in place)."""
    if inputs.kv_input is None:
        return None
    storage, rows = rows_like(inputs.q_rope.shape[0], 576, (600, 8), inputs.q_rope.dtype,
                              torch.Generator().manual_seed(5))
    return storage.to(device).as_strided(rows.shape, rows.stride(), rows.storage_offset())


def _call(addressing, variant):
    """A function running the op's variant on ``(args, options)``; returns the roped q."""
    op = getattr(torch.ops.tvm_fused, ENTRIES[addressing].__name__ + VARIANTS[variant])

    def run(args, out, options):
        if variant == "new":
            return op(*args, **options)
        if variant == "out":
            op(*args, out=out, **options)
            return out
        op(*args, **options)
        return args[0]

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("addressing", ENTRIES)
@pytest.mark.parametrize("form", ["in-place", "fp8-e5m2-scaled"])
def test_every_variant(device, compiled, variant, addressing, form):
    """Each op in each variant, eager or compiled: the stale index is skipped and counted;
    write-through, ``kv_output`` (a column slice) receives the rows and an fp8 cache its
    scale."""
    inputs, stale = _inputs(device, addressing, form)
    kv_output = _kv_output(inputs, device)
    kv_output_before = None if kv_output is None else whole_storage(kv_output).clone()
    out = torch.full_like(inputs.q_rope, 7.0) if variant == "out" else None
    out_before = None if out is None else out.clone()
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    options = {**inputs.latent(), **inputs.options(), "kv_output": kv_output, "errors": errors}
    before = inputs.clone()
    run = _call(addressing, variant)
    if compiled:
        torch._dynamo.reset()  # one code object for every case: each compiles afresh
        run = torch.compile(run, fullgraph=True)
    result = run(inputs.args(), out, options)
    report = check_run(before, inputs, result, out_before, in_place=variant == "in_place",
                       errors_counted=int(errors), kv_output=kv_output,
                       kv_output_storage_before=kv_output_before)
    assert report.ok and report.errors_expected == stale, report.summary()


def _schema_names(op):
    return [a.name for a in op.default._schema.arguments]


def _mutated(op):
    return {a.name for a in op.default._schema.arguments if a.alias_info and
            a.alias_info.is_write}


@pytest.mark.parametrize("addressing", ENTRIES)
def test_ops_take_every_option_and_declare_their_mutations(addressing):
    """The schema of each variant holds every parameter of its entry point (``out`` only in
    the out variant; ``validate`` and ``schedule`` are Python-only), with its default, and
    declares what the op writes."""
    entry = ENTRIES[addressing]
    params = inspect.signature(entry).parameters
    expected = [name for name in params if name not in ("out", "validate", "schedule")]
    for variant, suffix in VARIANTS.items():
        op = getattr(torch.ops.tvm_fused, entry.__name__ + suffix)
        names = _schema_names(op)
        assert sorted(names) == sorted(expected + (["out"] if variant == "out" else []))
        written = {"k_cache", "kv_output", "q_nope_out", "errors", *{"out": ["out"], "in_place": [
            "q_rope"]}.get(variant, [])}
        assert _mutated(op) == written
        defaults = {a.name: a.default_value for a in op.default._schema.arguments
                    if a.has_default_value()}
        assert defaults["freqs_layout"] == params["freqs_layout"].default
        assert defaults["epsilon"] == pytest.approx(params["epsilon"].default)


def test_an_unknown_pdl_mode_is_an_error():
    inputs, _ = _inputs("cpu", "offsets", "in-place")
    with pytest.raises(ValueError, match="pdl must be one of"):
        torch.ops.tvm_fused.fused_rope_rmsnorm(*inputs.args(), pdl="sometimes")


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

    def call():
        torch.ops.tvm_fused.fused_rope_rmsnorm_slots_(*inputs.args(), **inputs.latent())

    new = fresh("cpu", 1)
    assert not torch.equal(new.slot_mapping, inputs.slot_mapping.cpu())
    _check_graph_replay(call, inputs, new, ("q_storage", "kv_storage", "cache_storage",
                                            "positions", "slot_mapping"))


@pytest.mark.gpu
def test_reduce_overhead_compile():
    def run(*args):
        return torch.ops.tvm_fused.fused_rope_rmsnorm(*args)

    compiled = torch.compile(run, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up runs, then graph replays
        inputs = make_inputs(*RAGGED, num_q_heads=4, page_size=16, layers=3, device="cuda")
        before = inputs.clone()
        out = compiled(*inputs.args()).clone()
        report = check_run(before, inputs, out)
        assert report.ok, report.summary()
