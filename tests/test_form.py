"""The one description of a form: its choices, its key (every field), its CLI options, and
the key of a call made from it."""

import argparse
import dataclasses

import pytest
import torch

from tvm_fused import form as forms
from tvm_fused.dispatch import CallKey, form_of, key_of
from tvm_fused.form import Form
from tvm_fused.tuning.layout import default_logs_dir

# a valid value other than the default for every field (with what it needs of the others)
CHANGES = {
    "dtype": ("float16", {}), "num_q_heads": (16, {}), "rope_dim": (32, {}),
    "kv_norm_dim": (256, {}), "page_size": (64, {}), "interleaved": (False, {}),
    "write_through": (True, {}), "kv_output": (True, {"write_through": True}),
    "cache_dtype": ("float8_e4m3fn", {"write_through": True}), "pdl": (True, {}),
    "pdl_early_indices": (True, {"pdl": True}), "addressing": ("slots", {}),
    "freqs_layout": ("split", {}), "norm_rounding": ("once", {}),
    "freqs_dtype": ("bfloat16", {}), "gamma_dtype": ("float32", {}),
    "offsets_dtype": ("int32", {}), "positions_dtype": ("int32", {"addressing": "slots"}),
    "slots_dtype": ("int32", {"addressing": "slots"}), "alignment": (4, {}),
    "index_bits": (64, {}),
    "cache_format": ("fp8_ds_mla", {"write_through": True}),
    "tile_scale": ("pow2", {"write_through": True, "cache_format": "fp8_ds_mla"}),
    "out_dtype": ("float8_e5m2", {}), "q_nope": (True, {}),
}


def test_every_field_has_a_change():
    assert set(CHANGES) == {field.name for field in dataclasses.fields(Form)}


@pytest.mark.parametrize("name", CHANGES)
def test_the_key_covers_every_field(name):
    """Changing any one field of a form changes its key (its tuning records folder)."""
    value, needs = CHANGES[name]
    base = Form(**needs)
    changed = Form(**{**needs, name: value})
    assert changed.key() != base.key(), name


def test_common_forms_keep_short_keys():
    assert Form().key() == "bfloat16-h128-r64-d512-p128-gptj"
    assert Form(num_q_heads=16, write_through=True, cache_dtype="float8_e4m3fn").key() == \
        "bfloat16-h16-r64-d512-p128-gptj-write-through-float8_e4m3fn"


def test_committed_record_folders_are_named_by_their_forms_key():
    import json

    for metadata in default_logs_dir().glob("*/*/metadata.json"):
        form = Form(**json.loads(metadata.read_text())["op"])
        assert metadata.parent.name == form.key()


@pytest.mark.parametrize("field, value, message", [
    ("freqs_layout", "diagonal", "freqs_layout must be one of"),
    ("dtype", "int8", "dtype must be one of"),
    ("page_size", 24, "page_size must be a power of two"),
    ("kv_output", True, "kv_output needs the write-through form"),
    ("cache_format", "fp8_ds_mla", "needs the write-through form"),
    ("tile_scale", "pow2", "tile_scale applies to the fp8_ds_mla cache format only"),
    ("rope_dim", -2, "rope_dim must be 0 or positive"),
    ("cache_dtype", "float8_e5m2", "an fp8 cache needs the write-through form"),
    ("pdl_early_indices", True, "pdl_early_indices needs pdl"),
])
def test_a_bad_form_names_its_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        Form(**{field: value})


def _parsed(*argv) -> Form:
    parser = argparse.ArgumentParser()
    forms.add_cli_options(parser)
    return forms.from_cli(parser.parse_args(argv))


def test_cli_options_are_the_forms_fields():
    """Every field has an option, with the field's default: no option gives ``Form()``."""
    assert _parsed() == Form()
    parser = argparse.ArgumentParser()
    forms.add_cli_options(parser)
    dests = {action.dest for action in parser._actions if action.dest != "help"}
    assert dests == {field.name for field in dataclasses.fields(Form)}


@pytest.mark.parametrize("argv, expected", [
    (("--heads", "16", "--neox"), Form(num_q_heads=16, interleaved=False)),
    (("--slots", "--split-table", "--norm-once"),
     Form(addressing="slots", freqs_layout="split", norm_rounding="once")),
    (("--addressing", "slots", "--positions-dtype", "int32"),
     Form(addressing="slots", positions_dtype="int32")),
    (("--write-through", "--kv-output", "--cache-dtype", "float8_e5m2", "--pdl",
      "--pdl-early-indices"),
     Form(write_through=True, kv_output=True, cache_dtype="float8_e5m2", pdl=True,
          pdl_early_indices=True)),
    (("--dtype", "float16"), Form(dtype="float16", gamma_dtype="float16")),
    (("--dtype", "float16", "--gamma-dtype", "float32", "--alignment", "2"),
     Form(dtype="float16", gamma_dtype="float32", alignment=2)),
])
def test_cli_options_make_the_form(argv, expected):
    assert _parsed(*argv) == expected


FORMS = [Form(), Form(num_q_heads=16, dtype="float16", interleaved=False, alignment=8),
         Form(write_through=True, kv_output=True, cache_dtype="float8_e4m3fn",
              offsets_dtype="int32"),
         Form(addressing="slots", freqs_layout="split", norm_rounding="once",
              positions_dtype="int32", freqs_dtype="bfloat16", gamma_dtype="float32")]


@pytest.mark.parametrize("form", FORMS, ids=lambda form: form.key())
def test_a_forms_call_key_gives_the_form_back(form):
    """``prepare`` files a form's kernels under ``key_of(form)``, which calls must find:
    the key describes exactly the form (on the CPU, PDL is dropped: no launch)."""
    key = key_of(form, torch.device("cpu"))
    assert form_of(key) == dataclasses.replace(form, pdl=False, pdl_early_indices=False)
    assert isinstance(key, CallKey) and key == tuple(key)
