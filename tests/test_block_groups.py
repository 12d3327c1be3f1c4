"""MergeBlockGroups on small PrimFuncs of its own: one launch, concatenated block ranges, only
when the function asks for it, and never for launches that depend on each other."""


import pytest
import tvm
import tvm_ffi
from tvm import s_tir
from tvm.script import tirx as T
from tvm.tirx import stmt as S

from tvm_fused import Form, schedules
from tvm_fused.compiler.block_groups import BLOCK_GROUPS, GROUP_ORDER, MergeBlockGroups
from tvm_fused.compiler.build import build, cuda_target, kernel_source
from tvm_fused.compiler.pipeline import lower


def two_branches(threads_a=64, tx_b=32, ty_b=4, shared_reduce_b=False, shared=(),
                 b_reads_a_output=False):
    """Branch a: out_a[i] = 2 * a[i], one row of ``threads_a`` per block. Branch b: out_b[i]
    = a[i] + 1 (``out_a[i] + 1`` if ``b_reads_a_output``: b then depends on a) over blocks of
    ``tx_b`` x ``ty_b`` threads, optionally followed by a block-wide shared-memory exchange
    (a barrier). ``shared`` is the function's ``BLOCK_GROUPS`` attribute (None: absent): the
    tensors several launches may write."""

    span_b = tx_b * ty_b

    # fmt: off
    @T.prim_func(s_tir=True)
    def func(a_handle: T.handle, oa_handle: T.handle, ob_handle: T.handle):
        n = T.int32()
        a = T.match_buffer(a_handle, (n, 64), "float32")
        out_a = T.match_buffer(oa_handle, (n, 64), "float32")
        out_b = T.match_buffer(ob_handle, (n, 64), "float32")
        for bx in T.thread_binding(n, thread="blockIdx.x"):
            for tx in T.thread_binding(threads_a, thread="threadIdx.x"):
                with T.sblock("a"):
                    vi, vj = T.axis.remap("SS", [bx, tx])
                    T.where(tx < 64)
                    out_a[vi, vj] = a[vi, vj] * T.float32(2)
        for bx in T.thread_binding((n * 64 + span_b - 1) // span_b, thread="blockIdx.x"):
            for ty in T.thread_binding(ty_b, thread="threadIdx.y"):
                for tx in T.thread_binding(tx_b, thread="threadIdx.x"):
                    with T.sblock("b"):
                        T.reads(a[0:n, 0:64])
                        T.writes(out_b[0:n, 0:64])
                        v: T.let = (bx * ty_b + ty) * tx_b + tx
                        if shared_reduce_b:
                            buf = T.alloc_buffer((tx_b * ty_b,), "float32", scope="shared")
                            buf[ty * tx_b + tx] = T.if_then_else(v < n * 64, a[v // 64, v % 64],
                                                                 T.float32(0))
                            T.tvm_storage_sync("shared")
                            if v < n * 64:
                                out_b[v // 64, v % 64] = buf[(ty * tx_b + tx + 1) % (tx_b * ty_b)]
                        elif v < n * 64:
                            if b_reads_a_output:
                                out_b[v // 64, v % 64] = out_a[v // 64, v % 64] + T.float32(1)
                            else:
                                out_b[v // 64, v % 64] = a[v // 64, v % 64] + T.float32(1)
    # fmt: on
    return func if shared is None else func.with_attr(BLOCK_GROUPS, list(shared))


def ranked(func, rank_a: int, rank_b: int):
    """``func`` (of ``two_branches``) with ``GROUP_ORDER`` marks on its branches a and b."""
    sch = s_tir.Schedule(func)
    for block, rank in (("a", rank_a), ("b", rank_b)):
        sch.annotate(sch.get_sblock(block), GROUP_ORDER, rank)
    return sch.mod["main"]


@tvm.ir.instrument.pass_instrument
class _BeforeSplit:
    """Keeps a copy of the module as it enters SplitHostDevice (after MergeBlockGroups); a
    copy, as the pass may update the module it is given in place."""

    def __init__(self):
        self.mod = None

    def run_before_pass(self, mod, info):
        if info.name == "tirx.SplitHostDevice":
            self.mod = tvm.ir.load_json(tvm.ir.save_json(mod))


def _lower(func):
    """Lower with the tvm_fused pipeline; the function as it was before the host/device
    split."""
    capture = _BeforeSplit()
    with tvm.transform.PassContext(instruments=[capture]):
        lower(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), cuda_target())
    return capture.mod["main"]


def _launches(func):
    """``(thread tag, extent)`` of every launch of ``func``, outermost first."""
    found = []
    tvm_ffi.structural_walk(func.body, [(S.AttrStmt, lambda stmt: found.append(
        (stmt.node.thread_tag, stmt.value)) if stmt.attr_key == "thread_extent" else None)],
        order="pre")
    return found


def _evaluate(expr, **values):
    """Value of a printed integer TIR expression of non-negative symbols."""
    text = str(expr).replace("T.max", "max").replace("T.min", "min")
    return eval(text, {"max": max, "min": min}, values)


def test_one_launch_with_concatenated_grid_and_widest_block():
    merged = _lower(two_branches(threads_a=64, tx_b=32, ty_b=4))
    launches = _launches(merged)
    assert [tag for tag, _ in launches] == ["blockIdx.x", "threadIdx.x"]
    grid, block = (value for _, value in launches)
    assert int(block) == 128  # the widest branch: 32 x 4
    for n in (0, 1, 7, 1000):  # n blocks of branch a, then ceil(64 n / 128) of branch b
        assert _evaluate(grid, n=n) == max(n + (64 * n + 127) // 128, 1)
    script = merged.script()
    assert "threadIdx_x < 64" in script  # branch a (64 threads) runs on the first 64
    assert script.count("blockIdx_x < ") == 2  # one range test per group


def test_launches_of_one_rank_share_a_group():
    """Equal ranks: one group whose blocks run body a, then body b; it spans the more blocks
    of the two, and each body runs on its own count of them."""
    merged = _lower(ranked(two_branches(threads_a=64, tx_b=32, ty_b=4), 0, 0))
    grid, block = (value for _, value in _launches(merged))
    assert int(block) == 128
    for n in (0, 1, 7, 1000):  # n blocks of a, ceil(64 n / 128) of b, side by side
        assert _evaluate(grid, n=n) == max(n, (64 * n + 127) // 128, 1)
    script = merged.script()
    assert script.count("blockIdx_x < ") == 3  # the group's range, the bodies' own counts
    assert script.index("T.float32(2.0)") < script.index("T.float32(1.0)")  # a, then b


def test_ranks_order_separate_groups():
    merged = _lower(ranked(two_branches(threads_a=64, tx_b=32, ty_b=4), 1, 0)).script()
    assert merged.count("blockIdx_x < ") == 2
    assert merged.index("T.float32(1.0)") < merged.index("T.float32(2.0)")  # b's group first


def test_single_launch_is_left_alone():
    @T.prim_func(s_tir=True)
    def one(a: T.Buffer((8, 32), "float32"), b: T.Buffer((8, 32), "float32")):
        for bx in T.thread_binding(8, thread="blockIdx.x"):
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("c"):
                    vi, vj = T.axis.remap("SS", [bx, tx])
                    b[vi, vj] = a[vi, vj]

    lowered = _lower(one)
    assert [int(v) for _, v in _launches(lowered)] == [8, 32]


def test_a_function_that_does_not_ask_keeps_its_launches():
    launches = _launches(_lower(two_branches(shared=None)))
    assert [tag for tag, _ in launches].count("blockIdx.x") == 2


def test_dependent_launches_are_refused():
    """Branch b reads what branch a writes: as separate launches b sees a's results; in one
    grid it would not. Refused, unless the function names out_a as written by several."""
    with pytest.raises(Exception, match=r"launch 0 writes \['out_a'\], which launch 1 also"):
        _lower(two_branches(b_reads_a_output=True))
    merged = _lower(two_branches(b_reads_a_output=True, shared=["out_a"]))
    assert [tag for tag, _ in _launches(merged)] == ["blockIdx.x", "threadIdx.x"]


def test_a_write_through_a_view_counts_as_the_tensor():
    """The op's definition names the cache and kv_output as written by several branches
    (other columns of the same rows, through views); its q output is checked: a schedule
    whose q branch also wrote into the cache would be refused. Here the op's own function,
    asking for none to be shared, is refused for the cache's views."""
    form = Form()
    target = cuda_target()
    mod = schedules.scheduled_module(form, target, schedules.default_config(form, target))
    func = mod["fused_rope_rmsnorm"].with_attr(BLOCK_GROUPS, ["kv_output"])
    with pytest.raises(Exception, match=r"writes \['k_cache'\], which launch \d also"):
        lower(tvm.IRModule({"fused_rope_rmsnorm": func}), target)


def test_a_list_of_names_is_required():
    with pytest.raises(Exception, match="must list the names of tensors"):
        _lower(two_branches(shared=None).with_attr(BLOCK_GROUPS, "vouched"))


def test_a_function_lowered_out_of_order_is_refused():
    """Before the thread bindings are lowered there is no launch to merge: the pass says
    where it belongs instead of doing nothing."""
    func = two_branches().with_attr("global_symbol", "main").with_attr("target", cuda_target())
    with pytest.raises(Exception, match="run the pass after the thread bindings are lowered"):
        MergeBlockGroups(tvm.IRModule({"main": func}))


def test_barrier_in_a_predicated_branch_is_rejected():
    with pytest.raises(Exception, match="synchronizes its block"):
        _lower(two_branches(threads_a=256, tx_b=32, ty_b=4, shared_reduce_b=True))


def test_barrier_in_a_full_width_branch_is_accepted():
    merged = _lower(two_branches(threads_a=64, tx_b=32, ty_b=4, shared_reduce_b=True))
    assert "tvm_storage_sync" in merged.script()


def test_cuda_source_has_one_kernel():
    source = kernel_source(tvm.IRModule({"main": two_branches().with_attr("global_symbol",
                                                                          "main")}),
                           cuda_target())
    assert source.count("__global__ void") == 2  # the declaration and the definition
    assert "__launch_bounds__(128)" in source


@pytest.mark.gpu
@pytest.mark.parametrize("shared_group", [False, True], ids=["two-groups", "one-group"])
@pytest.mark.parametrize("shared_reduce_b", [False, True], ids=["plain", "with-barrier"])
def test_merged_launch_runs_both_branches_on_the_gpu(shared_reduce_b, shared_group):
    import torch

    func = two_branches(shared_reduce_b=shared_reduce_b)
    if shared_group:
        func = ranked(func, 0, 0)
    executable = build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                       cuda_target())
    for n in (1, 5, 300):
        a = torch.randn(n, 64, device="cuda")
        out_a, out_b = torch.full_like(a, -1), torch.full_like(a, -1)
        executable["main"](a, out_a, out_b)
        torch.cuda.synchronize()
        assert torch.equal(out_a, a * 2)
        if shared_reduce_b:  # each thread reads its neighbour's value, within its block of 128
            flat = a.flatten().view(-1, 1)
            padded = torch.cat([flat, flat.new_zeros((-len(flat)) % 128, 1)]).view(-1, 128)
            expected = padded.roll(-1, dims=1).flatten()[:a.numel()].view_as(a)
        else:
            expected = a + 1
        assert torch.equal(out_b, expected)
