"""CUDA code generation without a GPU: one kernel in four block groups, built by nvcc."""

import dataclasses
import itertools
import os
import re
import shutil
import subprocess

import pytest
import tvm
import tvm_ffi
from tvm import s_tir
from tvm.script import tirx as T

from tvm_fused import Form, build, cuda_source, schedules
from tvm_fused.compiler import cuda, vector_stores
from tvm_fused.compiler.block_groups import GROUP_ORDER
from tvm_fused.compiler.branches import nope_staged
from tvm_fused.compiler.build import cuda_target, kernel_source
from tvm_fused.compiler.definition import fused_rope_rmsnorm_func
from tvm_fused.compiler.pipeline import lower
from tvm_fused.schedules import ScheduleConfig
from tvm_fused.schedules.config import default_for_tokens
from tvm_fused.schedules.cpu import CpuScheduleConfig
from tvm_fused.schedules.fused import apply_block_group_schedule, block_groups

from .cases import thinned

CONFIGS = {
    "deepseek-v3": Form(num_q_heads=128),
    "v2-lite-fp16": Form(num_q_heads=16, dtype="float16", gamma_dtype="float16"),
    "one-head-fp32-neox": Form(num_q_heads=1, dtype="float32", gamma_dtype="float32",
                                   page_size=1, interleaved=False),
    "v3-neox": Form(num_q_heads=128, interleaved=False),
    "unaligned-int32-offsets": Form(num_q_heads=64, offsets_dtype="int32",
                                        freqs_dtype="bfloat16", alignment=2),
    "write-through": Form(num_q_heads=128, write_through=True, kv_output=True),
    "write-through-fp8-e4m3": Form(num_q_heads=128, write_through=True,
                                       cache_dtype="float8_e4m3fn"),
    "write-through-fp8-e5m2-neox": Form(num_q_heads=16, write_through=True,
                                            cache_dtype="float8_e5m2", interleaved=False),
    "pdl": Form(num_q_heads=128, pdl=True),
    "slots-split-fp8-pdl-early": Form(num_q_heads=16, addressing="slots",
                                          freqs_layout="split", write_through=True,
                                          cache_dtype="float8_e4m3fn", pdl=True,
                                          pdl_early_indices=True),
    "pdl-early": Form(num_q_heads=128, pdl=True, pdl_early_indices=True),
    "ds-mla": Form(num_q_heads=128, write_through=True, kv_output=True,
                   cache_format="fp8_ds_mla"),
    "ds-mla-pow2-slots-fp8-query": Form(num_q_heads=16, addressing="slots",
                                        freqs_layout="split", write_through=True,
                                        cache_format="fp8_ds_mla", tile_scale="pow2",
                                        out_dtype="float8_e4m3fn", q_nope=True),
    "fp8-query-e5m2": Form(num_q_heads=128, write_through=True, cache_dtype="float8_e4m3fn",
                           out_dtype="float8_e5m2", q_nope=True),
    "bf16-query": Form(num_q_heads=6, q_nope=True),
    "nope-mla": Form(num_q_heads=12, rope_dim=0, write_through=True, q_nope=True),
    "96-heads-neox": Form(num_q_heads=96, interleaved=False),
}


def _nvcc():
    path = shutil.which("nvcc")
    if path is None:
        if os.environ.get("TVM_FUSED_REQUIRE_NVCC"):
            pytest.fail("nvcc is required here (TVM_FUSED_REQUIRE_NVCC is set)")
        pytest.skip("nvcc not found")
    return path


@pytest.fixture(scope="module", params=thinned(sorted(CONFIGS), sorted(CONFIGS), every=2))
def source(request):
    return request.param, cuda_source(CONFIGS[request.param])


INDEX_BUFFERS = {f"{name}_ptr" for name in ("offsets", "lookup_table", "cache_lengths",
                                             "positions", "slot_mapping")}
# a group's first test (the slots locate's own tests compare blockIdx.x with m and s)
# a group's test: its body opens with its block index, after a test of the threads it uses
# where it uses fewer than the block's (an index test inside a group does not)
BLOCK_GROUP = re.compile(r"if \(\(\(int\)blockIdx\.x\) < [^\n]*\{\n"
                         r"(?=(?: *if \(\(\(int\)threadIdx\.x\) < \d+\) \{\n)? *int blockIdx_x)")
MEMORY_ACCESS = re.compile(r"\b(\w+_ptr)\[|\*\(\w+\*\)\((\w+_ptr)|__stwb\(\(\w+\*\)\((\w+_ptr)"
                           r"|atomic_add\(")


def test_one_kernel_in_its_block_groups(source):
    """One kernel, with a block group per branch: q rope, [nope,] k rope, norm and error
    count (no rope groups without rope dims)."""
    name, src = source
    assert src.count("__global__ void") == 2  # declaration + definition: a single kernel
    groups = block_groups(ScheduleConfig(), CONFIGS[name])
    assert len(BLOCK_GROUP.findall(src)) == len(groups), groups
    assert "__launch_bounds__(128)" in src


def test_branches_stay_in_their_groups(source):
    """The q rope group reads q, only the norm group reduces (the sum of squares, and
    fp8_ds_mla's tile maxima), and only the count group (last) adds to the error counter,
    atomically."""
    name, src = source
    op = CONFIGS[name]
    kernel = src[src.rindex('extern "C" __global__'):]
    starts = [m.start() for m in BLOCK_GROUP.finditer(kernel)]
    order = [group[0] for group in block_groups(ScheduleConfig(), op)]

    def group_at(position: int) -> str:
        return order[max(i for i, start in enumerate(starts) if start <= position)]

    if op.rope_dim:
        first_q_access = min(i for i in (kernel.find("(q_pairs_ptr"),
                                         kernel.find("q_pairs_ptr[")) if i >= 0)
        assert group_at(first_q_access) == "q_store"
    shuffles = [m.start() for m in re.finditer("__shfl_down_sync", kernel)]
    # the sum of squares; fp8_ds_mla adds one interleaved chain per tile's maximum
    chains = 1 + (op.scale_tiles if op.ds_mla else 0)
    assert len(shuffles) == 5 * chains  # warp reductions: 32 -> 1
    assert {group_at(position) for position in shuffles} == {"norm_store"}
    assert kernel.count("atomic_add(") == 1
    assert group_at(kernel.index("atomic_add(")) == "count_locate"
    assert "errors_ptr[0] =" not in kernel


def test_aligned_configs_use_16_byte_accesses(source):
    """16-byte-aligned kernels move vectors whole: no vector is gathered element by element
    through a vector of indices (what CUDA's codegen emits where it cannot prove a vector
    access aligned)."""
    name, src = source
    if CONFIGS[name].alignment < 16:
        assert "uint4" not in src.replace("make_uint4", "")
    else:
        assert src.count("*(uint4*)") + src.count("*(float4*)") >= 6
        assert not re.search(r"make_(?:longlong|int)\d\(", src)


def test_request_guess_loads_leave_together(source):
    """Each locate by offsets loads its guess's first token, the next request's and the
    cache length with ``__ldg`` (a volatile ``ld.global.nc``), before it compares any: NVVM
    predicated the last two on the first comparison (a second dependent round of loads
    before every block's position, sm_90a SASS), which it may not do to these."""
    name, src = source
    kernel = src[src.rindex('extern "C" __global__'):]
    locates = re.findall(r"int guess_first\w* = [^;]*;\s*int guess_next\w* = [^;]*;\s*"
                         r"int guess_length\w* = [^;]*;\s*bool hit", kernel)
    if CONFIGS[name].addressing == "slots":
        assert not locates and "__ldg(" not in kernel
        return
    assert locates and len(locates) == kernel.count("bool hit")
    for locate in locates:
        assert locate.count("__ldg((&(offsets_ptr[") == 2, locate
        assert locate.count("__ldg((&(cache_lengths_ptr[") == 1, locate


def _group_sources(kernel: str) -> list[str]:
    """The kernel's source cut at each block group's first test."""
    starts = [match.start() for match in BLOCK_GROUP.finditer(kernel)] + [len(kernel)]
    return [kernel[a:b] for a, b in itertools.pairwise(starts)]


ROW_LOADS = re.compile(r"\*\(\w+\*\)\((?:q_pairs|q_nope_words|q_nope|input_rows|input_pairs)_ptr "
                       r"\+|\b(?:q_pairs|q_nope|input_rows|input_pairs)_ptr\[")
INDEX_LOADS = re.compile(r"\b(?:offsets|cache_lengths|lookup_table|positions|slot_mapping)_ptr\[")


@pytest.mark.parametrize("op", [CONFIGS["deepseek-v3"], CONFIGS["write-through"]])
def test_the_kernel_indexes_in_32_bits_unless_built_for_64(op):
    """``index_bits=32`` (the default): the grid, the loops and every offset in 32-bit
    integers; 64-bit ones only where the locate computes and checks a position or a slot
    (an index past 2^31 must not wrap into range). ``index_bits=64``: 64-bit arithmetic
    from the block index on."""
    config = default_for_tokens(64, op)

    def body(form):
        code = cuda_source(form, schedule=config)
        return code[code.rindex('extern "C" __global__'):].split(") {\n", 1)[1]

    narrow, wide = body(op), body(dataclasses.replace(op, index_bits=64))
    assert "((int)blockIdx.x)" in narrow and "(int64_t)blockIdx.x)" not in narrow
    assert "((int64_t)blockIdx.x)" in wide
    wide_lines = [line for line in narrow.splitlines() if "int64_t" in line]
    assert wide_lines and all(re.search(r"\b(p|row|positioned|listed|condval)(_\d+)?\b", line)
                              or "_slot_local_ptr[0] = " in line
                              for line in wide_lines), wide_lines


def test_rows_load_before_the_token_is_located(source):
    """Every group that reads rows of q, ``q_nope`` (staged in registers) or ``kv_input``
    issues their loads before its first index load (they need no index: the tensors have
    ``n`` rows), so that they are in flight while the token is located; with PDL's early
    index reads, the index loads come first (before the wait). A one-element scale is read
    once per group, into a register, before any reduction's shuffle."""
    name, src = source
    op = CONFIGS[name]
    kernel = src[src.rindex('extern "C" __global__'):]
    checked = 0
    for group in _group_sources(kernel):
        if "nope_state" in group and not nope_staged(op):
            continue  # the plain copy of q_nope reads it in its guarded store
        row, index = ROW_LOADS.search(group), INDEX_LOADS.search(group)
        if row is not None and index is not None:
            checked += 1
            assert (row.start() > index.start()) == op.pdl_early_indices, group[:3000]
        for scale in ("k_scale_ptr[0]", "q_scale_ptr[0]"):
            assert group.count(scale) <= 1, scale
            if scale in group and "__shfl" in group:
                assert group.index(scale) < group.index("__shfl"), scale
    # the q group (with a rope part), and the norm group's kv_input
    assert checked >= (op.rope_dim > 0) + op.write_through


def test_fp8_caches_divide_exactly_and_store_half_width(source):
    """``value / k_scale`` is ``quantizer_div`` (exact for fp8 whatever the compiler's flags,
    without ``__fdiv_rn``'s branch per value: the divisor's reciprocal once, fused
    multiply-adds per value), converted by CUDA's saturating fp8 constructors (one
    instruction, not the CPU's integer arithmetic on the bits: its 23-bit significand
    mask), and the cache stores of a 16-byte-aligned fp8 kernel are 8 bytes wide (the bf16
    values they come from are 16)."""
    name, src = source
    op = CONFIGS[name]
    kernel = src[src.rindex('extern "C" __global__'):]
    divides = op.cache_dtype is not None or op.out_dtype is not None or op.ds_mla
    assert "__fdiv_rn(" not in kernel
    assert ("__frcp_rn(" in kernel) == divides
    if op.cache_dtype is not None:
        assert kernel.count("__fmaf_rn(") >= 4 * 8  # a row's vector of 8 values at least
        assert str(0x7FFFFF) not in kernel  # the integer lowering's significand mask
    cache_stores = re.findall(r"\*\((\w+)\*\)\(k_(?:rows|pairs)_ptr", kernel)
    if op.cache_dtype is not None and op.alignment == 16:
        assert set(cache_stores) == {"uint2"}, cache_stores


def _ptxas_report(src: str, tmp_path) -> str:
    """nvcc's ptxas report (``-Xptxas -v``) of ``src`` built for sm_90a; fails if it does not
    build."""
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    result = subprocess.run(
        [_nvcc(), "-cubin", "-arch=sm_90a", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
         str(cu)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_nvcc_builds_sm90a_with_no_local_memory(source, tmp_path):
    report = _ptxas_report(source[1], tmp_path)
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in report, report


@pytest.mark.parametrize("heads", [16, 128])
def test_write_through_prefill_kernels_fill_an_sm(heads, tmp_path):
    """The write-through kernel of the default prefill schedule (bf16, 128-thread blocks)
    uses at most 32 registers a thread, so that 16 blocks fill an SM: with gamma's vectors
    loaded before the locate, the norm group held them and the row across the locate's
    search, 48 registers and 10 blocks an SM, and the 16-head form fell from 92% to 85% of
    the copy bandwidth at 32768 tokens on an H100."""
    form = Form(num_q_heads=heads, write_through=True)
    report = _ptxas_report(cuda_source(form, schedule=default_for_tokens(32768, form)),
                           tmp_path)
    assert int(re.findall(r"Used (\d+) registers", report)[-1]) <= 32, report


def test_kernels_compile_with_ieee_float32(source, tmp_path):
    """TVM compiles CUDA with --use_fast_math, whose flush of float32 subnormals to zero
    turned bf16 subnormal inputs into zeros of the wrong sign on an H200: our nvcc command
    (``cuda.NVCC_FLAGS``) leaves it out. The PTX of our command has no ``.ftz`` instruction;
    with the flag added back, the same source has some."""
    _nvcc()
    _, src = source
    (tmp_path / "k.cu").write_text(src)

    def ptx(*extra):
        command = cuda.nvcc_command("sm_90a", str(tmp_path / "k.ptx"), str(tmp_path / "k.cu"),
                                    kind="ptx")
        result = subprocess.run([*command[:-1], *extra, command[-1]], capture_output=True,
                                text=True, check=False)
        assert result.returncode == 0, result.stderr
        return (tmp_path / "k.ptx").read_text()

    assert ".ftz" not in ptx()
    assert ".ftz" in ptx("--use_fast_math")


def _global_state() -> dict:
    """What a build must leave as it was: the environment, TVM's global functions and TIR
    pipelines, and the pass constructors of TVM's transform modules."""
    return {"environ": dict(os.environ),
            "functions": set(tvm_ffi.registry.list_global_func_names()),
            "pipelines": dict(tvm.tirx.compilation_pipeline.PIPELINE_MAP),
            "passes": {name: getattr(tvm.tirx.transform, name)
                       for name in dir(tvm.tirx.transform) if not name.startswith("_")}}


def test_building_leaves_no_global_state_behind():
    """A build writes no environment variable, registers no global function or pipeline and
    patches none of TVM's passes (its codegen runs in a worker process)."""
    before = _global_state()
    cuda_source(Form(num_q_heads=2, pdl=True))
    build(Form(num_q_heads=2, page_size=4))
    assert _global_state() == before


def test_pipeline_mirrors_tvm_default_on_a_single_launch():
    @T.prim_func(s_tir=True)
    def copy(a: T.Buffer((64, 128), "float16"), b: T.Buffer((64, 128), "float16")):
        for bx in T.thread_binding(64, thread="blockIdx.x"):
            for tx in T.thread_binding(16, thread="threadIdx.x"):
                for v in T.vectorized(8):
                    with T.sblock("copy"):
                        i = T.axis.spatial(64, bx)
                        j = T.axis.spatial(128, tx * 8 + v)
                        b[i, j] = a[i, j] * T.float16(2)

    target = cuda_target()
    ours = kernel_source(tvm.IRModule({"main": copy}), target)
    with target:
        theirs = tvm.compile(copy, target=target).mod.imports[0].inspect_source()
    assert ours == vector_stores.rewrite_vector_stores(theirs)


ACCESS_BYTES = {"uint4": 16, "float4": 16, "uint2": 8, "float2": 8, "nv_bfloat164": 8,
                "half4": 8, "uint": 4, "nv_bfloat162": 4, "half2": 4, "__nv_fp8x4_e4m3": 4,
                "__nv_fp8x2_e4m3": 2}


FORMS = {"in-place": {}, "write-through": {"write_through": True, "kv_output": True},
         "fp8": {"write_through": True, "kv_output": True, "cache_dtype": "float8_e4m3fn"}}


@pytest.mark.parametrize("alignment", [2, 4, 8, 16])
@pytest.mark.parametrize("dtype", thinned(["bfloat16", "float32", "float16"], every=2))
@pytest.mark.parametrize("interleaved", thinned([True, False], ["gptj", "neox"], every=2))
@pytest.mark.parametrize("form", FORMS)
def test_no_global_access_is_wider_than_the_alignment(alignment, dtype, interleaved, form):
    """A kernel built for ``alignment`` bytes never reads or writes global memory wider than
    that (an interleaved pair is two scalar accesses when a pair-wide one would be
    misaligned): the wider access ended in ``misaligned address`` on a GPU."""
    op = Form(num_q_heads=4, page_size=16, alignment=alignment, dtype=dtype,
                  gamma_dtype=dtype, interleaved=interleaved, **FORMS[form])
    src = cuda_source(op)
    kernel = src[src.rindex('extern "C" __global__'):]
    accesses = re.findall(r"\*\((\w+)\*\)\((\w+?)_ptr", kernel)
    widths = {ACCESS_BYTES[kind] for kind, name in accesses if not name.endswith("_local")}
    assert all(width <= max(alignment, 4 if dtype == "float32" else 2) for width in widths), \
        sorted(set(accesses))
    if alignment == 16:  # fp8 stores of 16-byte vectors of q's dtype are narrower
        assert widths == {16} or (form == "fp8" and 16 in widths), sorted(set(accesses))


@pytest.mark.parametrize("form", FORMS)
def test_rope_part_vectors_respect_the_latent_offset(form):
    """The rope part of a row starts kv_norm_dim elements in: with 500 bf16 latent elements
    (1000 bytes, a multiple of 8 but not 16) its accesses are at most 8 bytes wide, while q's
    stay 16."""
    op = Form(num_q_heads=4, page_size=16, kv_norm_dim=500, **FORMS[form])
    src = cuda_source(op)
    kernel = src[src.rindex('extern "C" __global__'):]
    accesses = re.findall(r"\*\((\w+)\*\)\((\w+?)_ptr", kernel)
    rope_part = {ACCESS_BYTES[kind] for kind, name in accesses if name == "k_in_pairs"
                 or name in ("k_pairs", "input_pairs", "output_pairs")}
    assert rope_part and max(rope_part) <= 8, sorted(set(accesses))
    assert 16 in {ACCESS_BYTES[kind] for kind, name in accesses if name in ("q_pairs",
                                                                               "out_pairs")}


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize("items", [2, 4])
def test_q_threads_load_all_their_heads_first(items, interleaved):
    """With several heads per q-rope thread, the thread loads exactly its heads (its lane's
    vectors of each, no head in between) and issues every load before its first rotation, so
    that many loads are in flight at once."""
    op = Form(num_q_heads=128, interleaved=interleaved)
    src = cuda_source(op, schedule=ScheduleConfig(rope_vectors_per_thread=items))
    kernel = src[src.rindex('extern "C" __global__'):]
    q_group = kernel[:[m.start() for m in BLOCK_GROUP.finditer(kernel)][1]]
    per_head = 8 if interleaved else 16  # a lane's vector, or one from each half (NeoX)
    assert f"nv_bfloat16 q_in_local_ptr[{items * per_head}];" in q_group
    first_rotation = q_group.index("q_out_local_ptr[0] =")
    loads = [m.start() for m in re.finditer(r"= \*\(uint4\*\)\(q_pairs_ptr", q_group)]
    assert loads and max(loads) < first_rotation


WAIT, LAUNCH_DEPENDENTS = ("tvm_builtin_ptx_griddepcontrol_wait();",
                           "tvm_builtin_ptx_griddepcontrol_launch_dependents();")


def test_pdl_waits_before_any_access_or_after_the_index_reads(source):
    """With PDL each block group waits for the kernel before (``griddepcontrol.wait``)
    before it touches memory, or with ``pdl_early_indices`` it reads its index tensors,
    then waits, then touches q, the latent, the table, the cache or the error counter; the
    launch lets the next kernel start at once. Without PDL: no griddepcontrol."""
    name, src = source
    kernel = src[src.rindex('extern "C" __global__'):]
    if not CONFIGS[name].pdl:
        assert "griddepcontrol" not in kernel
        return
    _assert_each_group_waits(CONFIGS[name], kernel, groups=4)


@pytest.mark.parametrize("name", ["pdl", "pdl-early"])
def test_pdl_waits_once_in_the_cache_rows_shared_group(name):
    """``k_rope_in_norm_group``: the shared group waits before its first body's data (the k
    rope's), which covers the norm body after it."""
    src = cuda_source(CONFIGS[name], schedule=ScheduleConfig(k_rope_in_norm_group=True))
    _assert_each_group_waits(CONFIGS[name], src[src.rindex('extern "C" __global__'):],
                             groups=3)


def _assert_each_group_waits(op: Form, kernel: str, groups: int) -> None:
    """Each of the ``groups`` block groups of ``kernel`` waits once, before its first data
    access (with ``pdl_early_indices``: after an index read), after the one launch of the
    dependents."""
    starts = [m.start() for m in BLOCK_GROUP.finditer(kernel)]
    assert len(starts) == groups
    assert kernel.count(LAUNCH_DEPENDENTS) == 1 and kernel.index(LAUNCH_DEPENDENTS) < starts[0]
    assert kernel.count(WAIT) == groups
    registers = set(re.findall(r"alignas\(\d+\) [\w ]+? (\w+_ptr)\[", kernel))
    for start, end in zip(starts, [*starts[1:], len(kernel)]):
        group = kernel[start:end]
        accesses = [(m.start(), m.group(1) or m.group(2) or m.group(3) or "atomic")
                    for m in MEMORY_ACCESS.finditer(group)]
        data = [i for i, buffer in accesses if buffer not in registers | INDEX_BUFFERS]
        index = [i for i, buffer in accesses if buffer in INDEX_BUFFERS]
        wait = group.find(WAIT)
        if op.pdl_early_indices:
            assert index and data and 0 < min(index) < wait < min(data), group[:wait + 200]
        else:
            assert index and data and 0 < wait < min(index + data), group[:wait + 200]


def test_pdl_kernels_are_tagged_for_a_dependent_launch():
    """TVM's CUDA runtime launches a kernel with programmatic stream serialization when its
    launch parameters carry ``tirx.use_programtic_dependent_launch`` (TVM's spelling): the
    pipeline tags exactly the kernels that wait."""
    from tvm_fused.compiler.grid_dependency import LAUNCH_PARAMS, PDL_LAUNCH_TAG

    tags = []

    @tvm.instrument.pass_instrument
    class LaunchParams:
        def run_after_pass(self, mod, info):
            if info.name == "tvm_fused.LaunchWithGridDependency":
                tags.extend([str(p) for p in f.attrs[LAUNCH_PARAMS]]
                            for f in mod.functions.values()
                            if f.attrs is not None and LAUNCH_PARAMS in f.attrs)

    target = cuda_target("sm_90a")
    for pdl in (True, False):
        form = Form(num_q_heads=16, pdl=pdl)
        mod = schedules.scheduled_module(form, target, schedules.default_config(form, target))
        with tvm.transform.PassContext(instruments=[LaunchParams()]):
            lower(mod, target)
    assert tags == [[PDL_LAUNCH_TAG, "blockIdx.x", "threadIdx.x"], ["blockIdx.x", "threadIdx.x"]]


def test_the_cpu_build_ignores_pdl():
    """PDL is a property of a GPU launch: the llvm build of a PDL op is the plain one."""
    from tvm_fused.compiler.build import CPU_TARGET, as_target

    target = as_target(CPU_TARGET)
    plain, pdl = (schedules.scheduled_module(Form(num_q_heads=2, pdl=flag), target,
                                             CpuScheduleConfig()) for flag in (False, True))
    assert tvm_ffi.structural_equal(plain, pdl)


def _store_widths(ptx: str) -> set[int]:
    """Bytes per ``st.global`` of a PTX listing (vector lanes times element size)."""
    widths = set()
    for vector, kind in re.findall(r"st\.global(?:\.wb)?(?:\.v(\d))?\.[a-z](\d+)", ptx):
        widths.add(int(vector or 1) * int(kind) // 8)
    return widths


@pytest.mark.parametrize("schedule", thinned(
    [None, ScheduleConfig(rope_vectors_per_thread=2), ScheduleConfig(norm_first=True),
     ScheduleConfig(grid_blocks=1024), ScheduleConfig(k_rope_in_norm_group=True)],
    ["default", "two-vectors", "norm-first", "persistent", "k-rope-in-norm-group"], every=5))
def test_16_byte_stores_stay_whole(source, schedule, tmp_path):
    """NVVM splits some of TVM's ``*(uint4*)(p) = v`` stores into 4-byte pieces; through
    ``__stwb`` every store of a 16-byte-aligned kernel keeps its vector's width: 16 bytes,
    or 8 for an fp8 cache's half-width vectors."""
    name, src = source
    op = CONFIGS[name]
    if op.alignment < 16:
        pytest.skip("narrower kernels use narrower accesses")
    cu = tmp_path / "k.cu"
    # the default schedule's source is the fixture's: not generated twice
    cu.write_text(src if schedule is None else cuda_source(op, schedule=schedule))
    result = subprocess.run([_nvcc(), "-ptx", "-arch=sm_90a", "-o", str(tmp_path / "k.ptx"),
                             str(cu)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    widths = _store_widths((tmp_path / "k.ptx").read_text())
    fp8 = op.cache_dtype or op.out_dtype or op.ds_mla
    # fp8_ds_mla's scales are 4-byte stores; an fp8 q_nope_out, 8-byte vectors like q's
    whole = not (op.cache_dtype and op.out_dtype) or op.kv_output  # a 16-bit value stored
    assert widths == {*([16] if whole else []), *([8] if fp8 else []),
                      *([4] if op.ds_mla else [])}, widths


def test_vector_store_rewrite_touches_only_global_stores():
    code = ('extern "C" __global__ void __launch_bounds__(128) k(nv_bfloat16* __restrict__ '
            'out_ptr, nv_bfloat16* __restrict__ in_ptr) {\n'
            '  alignas(64) nv_bfloat16 x_local_ptr[8];\n'
            '  *(uint4*)(x_local_ptr + 0) = *(uint4*)(in_ptr + (i * 8));\n'
            '  *(uint4*)(out_ptr + ((i + 1) * 8)) = *(uint4*)(x_local_ptr + 0);\n'
            '  *(uint2*)(out_ptr + 4) = v;\n}\n')
    rewritten = vector_stores.rewrite_vector_stores(code)
    assert rewritten == code.replace(
        "*(uint4*)(out_ptr + ((i + 1) * 8)) = *(uint4*)(x_local_ptr + 0);",
        "__stwb((uint4*)(out_ptr + ((i + 1) * 8)), *(uint4*)(x_local_ptr + 0));")


def test_norm_first_orders_the_groups_norm_k_q_count():
    """``norm_first``: the norm group (the one that reduces) opens the grid, the q rope group
    (the one that reads q) is third, the error count still last."""
    kernel = cuda_source(Form(), schedule=ScheduleConfig(norm_first=True))
    kernel = kernel[kernel.rindex('extern "C" __global__'):]
    groups = [m.start() for m in BLOCK_GROUP.finditer(kernel)]
    assert len(groups) == 4
    assert groups[0] < kernel.index("__shfl_down_sync") < groups[1]
    q_access = kernel.index("*(uint4*)(q_pairs_ptr")
    assert groups[2] < q_access < groups[3] < kernel.index("atomic_add(")


@pytest.mark.parametrize("norm_first", [False, True], ids=["q-first", "norm-first"])
def test_k_rope_in_norm_group_shares_the_norm_blocks(norm_first):
    """``k_rope_in_norm_group``: three groups, q rope and the cache rows (in
    ``norm_first``'s order), then the count; the cache rows' blocks store each row's rope
    part from the first 8 threads of its warp, then normalize it, on one count of blocks (no
    guard of either body)."""
    kernel = cuda_source(Form(), schedule=ScheduleConfig(k_rope_in_norm_group=True,
                                                             norm_first=norm_first))
    kernel = kernel[kernel.rindex('extern "C" __global__'):]
    groups = [m.start() for m in BLOCK_GROUP.finditer(kernel)]
    assert len(groups) == 3
    rows, rope = (0, 1) if norm_first else (1, 0)
    rows_end = groups[rows + 1]
    assert groups[rope] < kernel.index("__stwb((uint4*)(out_pairs_ptr") < groups[rope + 1]
    k_store = kernel.index("__stwb((uint4*)(k_pairs_ptr")
    first_lanes = kernel.index("(((int)threadIdx.x) & 31) < 8)")
    assert groups[rows] < first_lanes < k_store < kernel.index("__shfl_down_sync") < rows_end
    assert kernel.index("__stwb((uint4*)(k_rows_ptr") < rows_end
    assert not re.search(r"if \(\(\(\(int\)blockIdx\.x\) - ", kernel)  # no guard


@pytest.mark.parametrize("schedule", [
    ScheduleConfig(block_threads=256, norm_threads_per_row=128, vector_bytes=4,
                   k_rope_in_norm_group=True),
    ScheduleConfig(norm_rows_per_thread=2, grid_blocks=1024, k_rope_in_norm_group=True)],
    ids=["multi-warp-rows", "two-rows-persistent"])
@pytest.mark.parametrize("name", ["deepseek-v3", "write-through-fp8-e4m3"])
def test_k_rope_in_norm_group_compiles_with_other_row_shapes(name, schedule, tmp_path):
    """The k rope on the norm's rows of 128 threads (its 32 lanes on the first warp of each)
    and on two rows per thread in a persistent grid: nvcc builds both."""
    cu = tmp_path / "k.cu"
    cu.write_text(cuda_source(CONFIGS[name], schedule=schedule))
    result = subprocess.run([_nvcc(), "-ptx", "-arch=sm_90a", "-o", str(tmp_path / "k.ptx"),
                             str(cu)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_group_order_marks_must_rank_every_launch():
    op = Form()
    sch = s_tir.Schedule(fused_rope_rmsnorm_func(op))
    apply_block_group_schedule(sch, op, ScheduleConfig())
    sch.annotate(sch.get_sblock("norm_store"), GROUP_ORDER, 0)
    with pytest.raises(ValueError, match="every launch a rank"):
        lower(sch.mod, cuda_target())


def test_persistent_grid_gives_each_group_grid_blocks_blocks():
    """``grid_blocks``: the q rope, k rope and norm groups each span exactly that many
    blocks (constant group bounds), whatever the token count; the count group follows."""
    kernel = cuda_source(Form(), schedule=ScheduleConfig(grid_blocks=1024))
    kernel = kernel[kernel.rindex('extern "C" __global__'):]
    bounds = re.findall(r"if \(\(\(int\)blockIdx\.x\) < (\d+)\)", kernel)
    assert bounds == ["1024", "2048", "3072"], bounds
