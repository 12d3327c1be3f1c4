"""Programmatic dependent launch (``pdl=True``) on the GPU: the op reads what the kernel right
before it wrote, eagerly and in a captured graph, in both addressings and forms.

The kernel before is a GEMM writing the op's inputs as its output, as a model's projection
does: q and the new latent rows in one output (write-through: ``q_rope`` and ``kv_input``
are column views of it), or the cache rows themselves (in place; q comes from the GEMM
before that). A GEMM writes its output last, so an op reading q or the latent before its
grid-dependency wait would see the values from before: the destination holds NaNs then.
"""

import pytest
import torch

from tvm_fused import dispatch, fused_rope_rmsnorm
from tvm_fused.testing.compare import check_run
from tvm_fused.testing.inputs import (
    NOPE_DIM,
    Q_LORA_RANK,
    OpInputs,
    engine_addressed,
    make_inputs,
)

pytestmark = pytest.mark.gpu

HEADS, TOKENS, CACHED, K = 16, 64, 0, 8192  # one request's 64 new rows: one page's run
MODES = pytest.mark.parametrize("pdl", [True, "early-indices"])
ADDRESSINGS = ("offsets", "slots")
FORMS = {"in-place": {}, "write-through": {"write_through": True},
         "fp8": {"write_through": True, "cache_dtype": torch.float8_e4m3fn, "k_scale": 0.5}}


def _producer(rows: int, columns: int, seed: int):
    """``(a, b)`` of a GEMM ``a @ b -> [rows, columns]`` bf16, long enough (K = 8192) that
    its output is written microseconds after its launch."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, K, generator=gen).to(torch.bfloat16).cuda()
    b = (torch.randn(K, columns, generator=gen) / K ** 0.5).to(torch.bfloat16).cuda()
    return a, b


class Step:
    """One decode step of a layer: GEMMs produce the op's inputs, then the op runs with PDL
    (out of place, so that q stays as the GEMM wrote it).

    ``inputs`` are the op's tensors; ``gemms`` the ``(a, b, out)`` the step runs in order,
    the last right before the op; ``run()`` does the step; ``expected()`` runs the GEMMs
    alone and returns the op's inputs as they make them, for the reference.
    """

    def __init__(self, addressing: str, form: str, pdl, seed: int = 0):
        self.pdl = pdl
        inputs = make_inputs([TOKENS], [CACHED], num_q_heads=HEADS, page_size=128,
                             device="cuda", seed=seed, **FORMS[form])
        if addressing == "slots":
            inputs = engine_addressed(inputs)
        width = NOPE_DIM + 64
        if form == "in-place":
            q = inputs.q_storage.new_empty((TOKENS, HEADS * width))
            page = int(inputs.lookup_table[0, 0])
            rows = inputs.k_cache[page, CACHED:CACHED + TOKENS]  # contiguous [64, 576]
            assert rows.is_contiguous()
            self.gemms = [(*_producer(TOKENS, q.shape[1], seed), q),
                          (*_producer(TOKENS, rows.shape[1], seed + 1), rows)]
            inputs.q_storage = q
        else:  # one projection output holds q and the latent: [n, H * 192 | 1536 | 576]
            q = inputs.q_storage.new_empty((TOKENS, HEADS * width + Q_LORA_RANK + 576))
            inputs.kv_input = q[:, HEADS * width + Q_LORA_RANK:]
            inputs.q_storage = inputs.kv_storage = q
            self.gemms = [(*_producer(TOKENS, q.shape[1], seed), q)]
        inputs.q_rope = q[:, :HEADS * width].view(TOKENS, HEADS, width)[..., NOPE_DIM:]
        self.inputs = inputs
        self.out = torch.empty_like(inputs.q_rope)

    def poison(self) -> None:
        """NaNs where the GEMMs write: what an early read would see."""
        for _, _, out in self.gemms:
            out.fill_(float("nan"))

    def run(self) -> None:
        for a, b, out in self.gemms:
            torch.mm(a, b, out=out)
        self.inputs.call(out=self.out, pdl=self.pdl, validate=False)

    def expected(self) -> OpInputs:
        """The op's inputs as the GEMMs write them."""
        for a, b, out in self.gemms:
            torch.mm(a, b, out=out)
        torch.cuda.synchronize()
        return self.inputs.clone()


def _check(step: Step, before: OpInputs) -> None:
    torch.cuda.synchronize()
    report = check_run(before, step.inputs, step.out)
    assert report.ok, report.summary()


@MODES
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("addressing", ADDRESSINGS)
def test_pdl_reads_what_the_kernel_before_wrote(addressing, form, pdl):
    step = Step(addressing, form, pdl)
    step.run()  # builds the kernel
    for _ in range(3):
        before = step.expected()
        step.poison()
        step.run()
        _check(step, before)


@MODES
@pytest.mark.parametrize("form", ["in-place", "fp8"])
@pytest.mark.parametrize("addressing", ADDRESSINGS)
def test_pdl_replays_from_a_cuda_graph(addressing, form, pdl):
    """A captured step (GEMMs, then the op) replayed on a new activation: the op sees it."""
    step = Step(addressing, form, pdl)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step.run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.run()
    for seed in (5, 6):
        a = step.gemms[-1][0]
        a.copy_(torch.randn(a.shape, generator=torch.Generator().manual_seed(seed)))
        before = step.expected()
        step.poison()
        graph.replay()
        _check(step, before)


@MODES
@pytest.mark.parametrize("addressing", ADDRESSINGS)
def test_pdl_after_itself_matches_the_plain_launch(addressing, pdl):
    """Ten calls in place back to back, each reading the q the one before wrote: PDL and the
    plain launch leave the same bits, and the last call is right for the state before it."""
    results = []
    for mode in (False, pdl):
        inputs = make_inputs([1] * 8, [0, 15, 16, 127, 128, 300, 5, 9], num_q_heads=128,
                             write_through=True, device="cuda")
        inputs = engine_addressed(inputs) if addressing == "slots" else inputs
        inputs.call(out=inputs.q_rope, pdl=mode)  # builds
        for _ in range(9):
            inputs.call(out=inputs.q_rope, pdl=mode, validate=False)
        before = inputs.clone()
        inputs.call(out=inputs.q_rope, pdl=mode, validate=False)
        torch.cuda.synchronize()
        report = check_run(before, inputs, inputs.q_rope, in_place=True)
        assert report.ok, report.summary()
        results.append(inputs)
    plain, dependent = results
    assert torch.equal(plain.q_storage.view(torch.int16), dependent.q_storage.view(torch.int16))
    assert torch.equal(plain.cache_storage.view(torch.int16),
                       dependent.cache_storage.view(torch.int16))


def test_pdl_is_refused_before_sm90(monkeypatch):
    """Below compute capability 9.0 there is no griddepcontrol: a clear error, no launch."""
    inputs = make_inputs([1], [3], num_q_heads=4, device="cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(dispatch, "KERNELS", {})  # no entry made on the real capability
    before = inputs.clone()
    with pytest.raises(ValueError, match=r"compute capability 9\.0"):
        fused_rope_rmsnorm(*inputs.args(), pdl=True)
    torch.cuda.synchronize()
    assert torch.equal(before.q_storage, inputs.q_storage)
