"""The benchmark suite: its inputs, providers, checks, bytes and command line (CPU), and one
small suite run end to end (GPU)."""

import dataclasses
import math

import pytest
import torch

from benchmarks.__main__ import main, parser, suite_parts
from benchmarks.peers.torch_eager import write_cache_rows
from benchmarks.suite import (
    COPY_THEN_IN_PLACE,
    DECODE_MAX,
    DECODE_TOKENS,
    ENGINE_CHAIN,
    FLASHINFER,
    FP8_K_SCALE,
    PEER_OPTIONS,
    PREFILL_TOKENS,
    PROVIDERS,
    SUITE,
    Part,
    cache_name,
    check_provider,
    copy_then_in_place,
    form_name,
    providers,
    sweep_inputs,
    tvm_provider,
)
from tvm_fused.form import Form
from tvm_fused.timing import bytes_moved

from .test_engine_triton import SHIMS, _interpret


def _form(write_through=False, cache_dtype=None, heads=2, kv_output=False) -> Form:
    return Part(heads, True, (), (), write_through=write_through, cache_dtype=cache_dtype,
                kv_output=kv_output).form(Form())


@pytest.mark.parametrize("tokens", [1, DECODE_MAX])
def test_decode_sizes_are_one_token_per_long_request(tokens):
    inputs = sweep_inputs(Form(num_q_heads=2), tokens, device="cpu")
    offsets = inputs.input_row_offsets.to(torch.int64)
    assert offsets.tolist() == list(range(tokens + 1))
    assert int(inputs.cache_lengths.min()) >= 1024
    assert inputs.q_rope.stride(1) > inputs.q_rope.shape[2]  # the rope view of a full q
    assert inputs.kv_input is None and inputs.k_scale is None


def test_prefill_sizes_are_few_long_requests():
    inputs = sweep_inputs(Form(num_q_heads=2), 4096, device="cpu")
    counts = (inputs.input_row_offsets[1:].to(torch.int64)
              - inputs.input_row_offsets[:-1].to(torch.int64))
    assert int(counts.sum()) == 4096 and len(counts) <= 8 and int(counts.min()) >= 512


def test_write_through_inputs_are_the_latent_columns_of_a_projection_output():
    inputs = sweep_inputs(_form(True, "float8_e4m3fn"), 8, device="cpu")
    assert inputs.kv_input.shape == (8, 576)
    assert inputs.kv_input.stride() == (1536 + 576, 1)  # q_a | kv_a
    assert inputs.k_cache.dtype == torch.float8_e4m3fn
    assert inputs.k_scale.tolist() == [FP8_K_SCALE]


def test_bytes_per_op_follow_the_form():
    """Per token, 128 heads, bf16: q read and written, the row read and written (fp8: one
    byte an element written), kv_output written; freqs row; gamma once."""
    q, row, freqs, gamma = 2 * 128 * 64 * 2, 576 * 2, 64 * 4, 512 * 2
    in_place = bytes_moved(_form(heads=128), 3)
    assert in_place == 3 * (q + 2 * row + freqs) + gamma
    assert bytes_moved(_form(True, heads=128), 3) == in_place
    assert bytes_moved(_form(True, heads=128, kv_output=True), 3) == in_place + 3 * row
    assert bytes_moved(_form(True, "float8_e4m3fn", heads=128), 3) == in_place - 3 * 576
    ds_mla = Form(num_q_heads=128, write_through=True, cache_format="fp8_ds_mla")
    assert bytes_moved(ds_mla, 3) == in_place - 3 * (row - 656)
    fp8_query = Form(num_q_heads=128, out_dtype="float8_e4m3fn", q_nope=True)
    assert bytes_moved(fp8_query, 3) == in_place - 3 * q // 4 + 3 * 128 * 512 * (2 + 1)


NAMES = ("tvm-fused default", COPY_THEN_IN_PLACE, "triton fused", "torch.compile",
         "torch eager")
ALL_NAMES = (*NAMES, "liger", ENGINE_CHAIN, FLASHINFER)


@pytest.mark.parametrize("write_through, cache_dtype, kv_output, copy", [
    (False, None, False, False),
    (True, None, False, True),
    (True, None, True, False),
    (True, "float8_e4m3fn", False, False),
], ids=["in-place", "write-through", "kv_output", "fp8"])
def test_each_form_has_its_providers(write_through, cache_dtype, kv_output, copy):
    """The copy before the in-place op exists only where the in-place op can do the rest:
    a cache of q's dtype, no ``kv_output``."""
    pytest.importorskip("triton", reason="the Triton peer: pip install -e '.[bench]'")
    found = providers(_form(write_through, cache_dtype, kv_output=kv_output), 8, NAMES)
    assert list(found) == [name for name in NAMES if name != COPY_THEN_IN_PLACE or copy]


@pytest.mark.parametrize("option, value, triton", [
    ("addressing", "slots", True), ("freqs_layout", "split", True),
    ("norm_rounding", "once", False)])
def test_peers_exist_only_in_the_options_they_take(option, value, triton):
    """The Triton fused peer takes either addressing and table layout; the other peers MAX's
    addressing and interleaved table; none the RMSNorm rounded once."""
    if triton:
        pytest.importorskip("triton", reason="the Triton peer: pip install -e '.[bench]'")
    form = dataclasses.replace(_form(True), **{option: value})
    assert value != PEER_OPTIONS[option]
    assert list(providers(form, 8, NAMES)) == ["tvm-fused default", COPY_THEN_IN_PLACE,
                                               *["triton fused"] * triton]


def _format_form(cache_format="fp8_ds_mla", cache_dtype=None, fp8_query=False,
                 heads=4) -> Form:
    return Part(heads, True, (), (), write_through=True, cache_dtype=cache_dtype,
                cache_format=cache_format, fp8_query=fp8_query).form(Form())


FORMAT_FORMS = {"ds_mla": ("fp8_ds_mla", None, False),
                "fp8-query-ds_mla": ("fp8_ds_mla", None, True),
                "fp8-query-fp8": ("plain", "float8_e4m3fn", True)}


@pytest.mark.parametrize("form_args", FORMAT_FORMS.values(), ids=FORMAT_FORMS)
def test_format_forms_have_tvm_fused_and_vllms_chain(form_args, monkeypatch):
    """DeepSeek-V3.2's row and the fp8 attention query: tvm-fused and vLLM's chain, no fused
    peer (they write neither); FlashInfer's launch only for the fp8 query into a per-tensor
    fp8 cache, and only with its library built (``$FLASHINFER_ROPE_LIB``)."""
    pytest.importorskip("triton", reason="vLLM's chain in Triton: pip install -e '.[bench]'")
    form = _format_form(*form_args)
    assert form_name(form) == ("fp8-query" if form.q_nope else "write-through")
    monkeypatch.delenv("FLASHINFER_ROPE_LIB", raising=False)
    assert list(providers(form, 8, ALL_NAMES)) == ["tvm-fused default", ENGINE_CHAIN]
    monkeypatch.setenv("FLASHINFER_ROPE_LIB", "/nonexistent/flashinfer_rope.so")
    flashinfer = form.q_nope and form.cache_dtype == "float8_e4m3fn"
    assert list(providers(form, 8, ALL_NAMES)) == ["tvm-fused default", ENGINE_CHAIN,
                                                   *[FLASHINFER] * flashinfer]


@pytest.mark.parametrize("tokens", [3, 600])
@pytest.mark.parametrize("form_args", FORMAT_FORMS.values(), ids=FORMAT_FORMS)
def test_tvm_fused_passes_the_suites_check_in_the_new_formats(form_args, tokens):
    """The suite's call of tvm-fused (its CPU schedule) writes the fp8_ds_mla rows and the
    fp8 query into its head-padded buffer as the float64 reference says."""
    form = _format_form(*form_args)
    base = sweep_inputs(form, tokens, device="cpu")
    call, report = check_provider("tvm-fused", tvm_provider(form), base, form)
    assert report.ok and (call.q_nope_out is not None) == form.q_nope
    if form.q_nope:
        assert call.out.dtype == torch.float8_e4m3fn and call.query().shape[-1] == 576


ENGINE_CHAIN_CHECK = SHIMS + """
import dataclasses
from benchmarks.suite import Part, check_provider, engine_chain, sweep_inputs
from tvm_fused.form import Form

for cache_format, cache_dtype, fp8_query, interleaved in [
        ("fp8_ds_mla", None, False, True), ("fp8_ds_mla", None, True, False),
        ("plain", "float8_e4m3fn", True, True), ("plain", None, False, True)]:
    form = Part(4, interleaved, (), (), write_through=True, cache_dtype=cache_dtype,
                cache_format=cache_format, fp8_query=fp8_query).form(Form())
    base = sweep_inputs(form, 3, device="cpu")
    _, report = check_provider("chain", engine_chain(form), base, form)
    assert report.ok, report.summary()
    print(cache_format, cache_dtype, fp8_query, "ok")
"""


def test_vllms_chain_passes_the_suites_check_in_the_interpreter():
    """vLLM's chain (Liger's RMSNorm, the Triton rotary, the row writer, and for the fp8
    query Inductor's concat + quantize) in Triton's CPU interpreter: the suite's check
    against the float64 reference passes for each cache format, both pairings."""
    assert _interpret(ENGINE_CHAIN_CHECK).count(" ok") == 4


@pytest.mark.parametrize("cache_dtype, kv_output, tokens", [
    (None, False, 600), (None, True, 3), ("float8_e4m3fn", False, 3),
    ("float8_e5m2", True, 600),
], ids=["bf16", "bf16-kv_output", "fp8-e4m3", "fp8-e5m2-kv_output"])
def test_write_through_providers_pass_their_check_on_the_cpu(cache_dtype, kv_output, tokens):
    """The suite's check of the torch compositions (eager, compiled) and of tvm-fused
    (its CPU schedule) in the write-through form, decode and prefill sizes."""
    form = _form(True, cache_dtype, heads=4, kv_output=kv_output)
    base = sweep_inputs(form, tokens, device="cpu")
    named = providers(form, tokens, ("torch.compile", "torch eager"))
    named["tvm-fused"] = tvm_provider(form)
    assert len(named) == 3
    for name, provider in named.items():
        call, report = check_provider(name, provider, base, form)
        assert report.ok and (call.kv_output is not None) == kv_output, name


def test_tvm_provider_calls_in_the_form_of_its_inputs():
    """tvm-fused in a form no peer takes (slots, the split table, the norm rounded once,
    PDL: ignored on the CPU): the inputs and the call both follow the form."""
    form = dataclasses.replace(_form(True, heads=4), addressing="slots", freqs_layout="split",
                               norm_rounding="once", pdl=True, pdl_early_indices=True)
    base = sweep_inputs(form, 5, device="cpu")
    assert base.engine and base.freqs_layout == "split" and base.norm_rounding == "once"
    _, report = check_provider("tvm-fused", tvm_provider(form), base, form)
    assert report.ok


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_copy_then_in_place_is_the_write_through_op(interleaved):
    form = Part(4, interleaved, (), (), write_through=True).form(Form())
    base = sweep_inputs(form, 5, device="cpu")
    _, report = check_provider(COPY_THEN_IN_PLACE, copy_then_in_place(form), base, form)
    assert report.ok


def test_a_wrong_provider_fails_its_check():
    """The copy alone leaves the latent un-normed and unroped in the cache."""
    def copy_only(call):
        write_cache_rows(call.inputs.k_cache, call.slots, call.inputs.kv_input[:5])
        call.out.copy_(call.inputs.q_rope)

    form = _form(True)
    base = sweep_inputs(form, 5, device="cpu")
    with pytest.raises(AssertionError, match="copy only is wrong at 5 tokens"):
        check_provider("copy only", copy_only, base, form)


def test_parts_check_their_form():
    """A part is a form: what no form has is refused when the part is made."""
    with pytest.raises(ValueError, match="write-through"):
        Part(2, True, (1,), (), kv_output=True)
    with pytest.raises(ValueError, match="write-through"):
        Part(2, True, (1,), (), cache_dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="cache_dtype"):
        Part(2, True, (1,), (), write_through=True, cache_dtype="float16")
    with pytest.raises(TypeError):
        Part(2, True, (1,), (), "write-through")  # the form's options are keywords
    part = Part(2, False, (1,), (), write_through=True, cache_dtype="float8_e5m2",
                kv_output=True)
    assert part.form(Form(page_size=16)) == Form(
        num_q_heads=2, page_size=16, interleaved=False, write_through=True,
        cache_dtype="float8_e5m2", kv_output=True)


def _parts(*argv):
    return suite_parts(parser().parse_args(["suite", *argv]))


def test_command_line_parts():
    assert _parts() == SUITE
    parts = _parts("--form", "in-place,write-through", "--cache-dtype",
                   "bfloat16,float8_e4m3fn", "--heads", "128,16", "--kv-output")
    assert [(p.heads, form_name(p.form(Form())), p.cache_dtype, p.kv_output)
            for p in parts] == [
        (heads, form, cache, form == "write-through") for heads in (128, 16)
        for form, cache in (("in-place", None), ("write-through", None),
                            ("write-through", "float8_e4m3fn"))]
    assert all(p.tokens == DECODE_TOKENS + PREFILL_TOKENS
               and p.providers == PROVIDERS[form_name(p.form(Form()))] and p.interleaved
               for p in parts)
    [part] = _parts("--form", "write-through", "--providers", "torch eager,triton fused",
                    "--tokens", "1,64", "--neox")
    assert part == Part(128, False, (1, 64), ("torch eager", "triton fused"),
                        write_through=True)
    assert [(form_name(p.form(Form())), cache_name(p.form(Form())))
            for p in _parts("--form", "write-through,fp8-query", "--cache-dtype",
                            "float8_e4m3fn,fp8_ds_mla")] == [
        (form, cache) for form in ("write-through", "fp8-query")
        for cache in ("float8_e4m3fn", "fp8_ds_mla")]


@pytest.mark.parametrize("argv, message", [
    (("--cache-dtype", "fp8_ds_mla"), "an fp8 or fp8_ds_mla cache needs --form write-through"),
    (("--form", "write-through", "--cache-dtype", "float16"), "unknown cache dtype float16"),
    (("--providers", "tvm-fused default,vllm"), "unknown provider vllm"),
    (("--form", "out-of-place"), "unknown form out-of-place"),
])
def test_command_line_refuses_what_has_no_part(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        _parts(*argv)
    assert main(["suite", *argv]) == 2
    assert message in capsys.readouterr().err


FORM_PROVIDERS = ("tvm-fused default", COPY_THEN_IN_PLACE, "triton fused", "torch.compile",
                  "torch eager")


@pytest.mark.gpu
def test_small_suite_checks_and_times_every_provider(tmp_path):
    from benchmarks.report import Group, groups, read_rows
    from benchmarks.suite import run_suite

    csv = tmp_path / "bench.csv"
    parts = [Part(4, True, (1, 2048), FORM_PROVIDERS),
             Part(4, True, (1, 2048), FORM_PROVIDERS, write_through=True),
             Part(4, False, (2,), FORM_PROVIDERS, write_through=True,
                  cache_dtype="float8_e4m3fn", kv_output=True)]
    rows, failures = run_suite(parts, Form(), csv, reps=5, log=lambda _: None)
    assert not failures
    no_copy = [name for name in FORM_PROVIDERS if name != COPY_THEN_IN_PLACE]
    assert sorted((r.form, r.cache_dtype, r.kv_output, r.provider, r.tokens) for r in rows) == \
        sorted([("in-place", "bfloat16", False, p, t) for p in no_copy for t in (1, 2048)]
               + [("write-through", "bfloat16", False, p, t) for p in FORM_PROVIDERS
                  for t in (1, 2048)]
               + [("write-through", "float8_e4m3fn", True, p, 2) for p in no_copy])
    assert all(r.checked and r.median_us > 0 and r.copy_fraction > 0 for r in rows)
    assert len(read_rows(csv)) == len(rows)
    assert groups(read_rows(csv)) == [Group(), Group("write-through"),
                                      Group("write-through", "float8_e4m3fn", True)]


def test_suite_rows_carry_the_form_on_the_cpu(tmp_path, monkeypatch):
    """``run_suite`` with the GPU's timers replaced: every provider checked and timed, one
    row per part and provider with the part's form, cache dtype, pairing and regime, and
    the bytes of its form (``bytes_moved``) to the CSV; the report's groups read back."""
    from benchmarks import suite
    from benchmarks.report import Group, groups, read_rows
    from tvm_fused.timing import Timing

    def timed(fn, reps=50):
        fn()
        return Timing(10.0, 9.0, 11.0, reps)

    def graph_timed(fn, reps=50, calls=1):
        return Timing(10.0 * calls, 9.0 * calls, 11.0 * calls, reps)

    sweep = suite.sweep_inputs
    monkeypatch.setattr(suite, "sweep_inputs", lambda form, tokens: sweep(form, tokens, "cpu"))
    monkeypatch.setattr(suite, "copy_us", lambda nbytes, reps: nbytes / 2e6)
    monkeypatch.setattr(suite, "time_cuda", timed)
    monkeypatch.setattr(suite, "time_graph", graph_timed)
    monkeypatch.setattr(suite, "host_us", lambda fn: 5.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "CPU")
    # tvm-fused runs as "tvm-fused tuned", the runtime's choice of schedule (on the CPU, its
    # CPU schedule), which the suite offers where this GPU has decisions: pretend it has.
    # "tvm-fused default" is left out: it passes the GPU's hand-written block-group config
    # as ``schedule=``, which a CPU build cannot apply (the CPU has a schedule of its own)
    monkeypatch.setattr(suite.decisions, "for_gpu", lambda gpu, form: {1: "decided"})
    csv = tmp_path / "bench.csv"
    names = ("tvm-fused tuned", "torch eager")
    parts = [Part(2, True, (2,), names),
             Part(2, False, (2,), names, write_through=True),
             Part(2, True, (300,), names, write_through=True, cache_dtype="float8_e5m2",
                  kv_output=True)]
    rows, failures = suite.run_suite(parts, Form(), csv, reps=3, log=lambda _: None)
    assert failures == []

    def key(form: Form) -> tuple:
        return form_name(form), form.cache_element, form.kv_output

    expected = {}  # (form, cache dtype, kv_output) -> what each of its rows says
    for part in parts:
        form = part.form(Form())
        tokens = part.tokens[0]
        moved = bytes_moved(form, tokens)
        expected[key(form)] = {
            "providers": set(names), "heads": 2, "tokens": tokens,
            "pairing": "gptj" if part.interleaved else "neox",
            "regime": "decode" if tokens <= DECODE_MAX else "prefill",
            "same_bytes_copy_us": moved / 2e6, "tb_per_s": moved / 10.0 / 1e6}
    got = {}
    for r in rows:
        assert r.checked and r.median_us == 10.0, r
        decode_only = (r.graph_us, r.steady_us, r.host_us)  # measured at decode sizes only
        assert (decode_only == (10.0, 10.0, 5.0) if r.regime == "decode"
                else all(math.isnan(v) for v in decode_only)), r
        assert 0 <= r.q_error_of_tolerance <= 1 and 0 <= r.norm_error_of_tolerance <= 1, r
        seen = got.setdefault((r.form, r.cache_dtype, r.kv_output), {
            "providers": set(), "heads": r.heads, "tokens": r.tokens, "pairing": r.pairing,
            "regime": r.regime, "same_bytes_copy_us": r.same_bytes_copy_us,
            "tb_per_s": r.tb_per_s})
        seen["providers"].add(r.provider)
        assert {k: getattr(r, k) for k in seen if k != "providers"} == {
            k: v for k, v in seen.items() if k != "providers"}, r  # the same in every row
    assert got == expected
    assert len(rows) == sum(len(e["providers"]) for e in expected.values())
    written = read_rows(csv)
    assert sorted((r["form"], r["cache_dtype"], r["kv_output"], r["provider"])
                  for r in written) == sorted((r.form, r.cache_dtype, str(r.kv_output),
                                               r.provider) for r in rows)
    assert set(groups(written)) == {Group(), Group("write-through"),
                                    Group("write-through", "float8_e5m2", True)}


def test_suite_says_when_tuned_is_left_out(tmp_path, monkeypatch):
    """Asked for "tvm-fused tuned" on a GPU without decisions for the form, the suite says
    so once per part (the row would otherwise be missing without a word)."""
    from benchmarks import suite
    from tvm_fused.timing import Timing

    sweep = suite.sweep_inputs
    monkeypatch.setattr(suite, "sweep_inputs", lambda form, tokens: sweep(form, tokens, "cpu"))
    monkeypatch.setattr(suite, "copy_us", lambda nbytes, reps: 1.0)
    monkeypatch.setattr(suite, "copy_bandwidth", lambda: 1.0)
    monkeypatch.setattr(suite, "time_cuda", lambda fn, reps=50: Timing(10.0, 9.0, 11.0, reps))
    monkeypatch.setattr(suite, "time_graph",
                        lambda fn, reps=50, calls=1: Timing(10.0, 9.0, 11.0, reps))
    monkeypatch.setattr(suite, "host_us", lambda fn: 5.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "CPU")
    monkeypatch.setattr(suite.decisions, "for_gpu", lambda gpu, form: {})
    lines = []
    parts = [Part(2, True, (1, 2), ("tvm-fused tuned", "torch eager"))]
    rows, failures = suite.run_suite(parts, Form(), None, reps=3, log=lines.append)
    assert failures == [] and {r.provider for r in rows} == {"torch eager"}
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "'tvm-fused tuned' is left out" in notes[0]
