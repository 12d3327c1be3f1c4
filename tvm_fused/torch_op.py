"""The op as torch custom ops (``torch.ops.tvm_fused.*``), so that it composes with
``torch.compile`` and CUDA graphs; importing this module registers them.

They are generated from one table, the entry points' own signatures (``ENTRY_POINTS``), in
three variants each (``VARIANTS``):

- ``<entry>(...) -> Tensor``: the roped q as a new tensor;
- ``<entry>_out(..., *, Tensor(a!) out, ...) -> ()``: the roped q written to ``out``;
- ``<entry>_(Tensor(a!) q_rope, ...) -> ()``: ``q_rope`` roped in place.

Every option of the entry point is an argument of each variant, keyword-only after the
tensors the entry point takes positionally, with the entry point's default; ``pdl`` is a
string there (``"off"``, ``"on"``, ``"early-indices"``). Every variant mutates ``k_cache`` and,
when given, ``kv_output`` and ``errors``; the ops never validate in Python (no host sync):
the compiled kernel's entry still refuses malformed and overlapping tensors, and bad
indices are skipped and counted in ``errors``. Each has a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through it.

    torch.ops.tvm_fused.fused_rope_rmsnorm_slots_(
        q[..., 128:], positions, slot_mapping, cos_sin_cache, gamma, kv_cache,
        kv_input=qkv[:, 1536:], k_scale=k_scale, freqs_layout="split")
"""

from __future__ import annotations

import inspect

import torch

from .api import fused_rope_rmsnorm, fused_rope_rmsnorm_slots
from .form import EARLY_INDICES

NAMESPACE = "tvm_fused"
ENTRY_POINTS = (fused_rope_rmsnorm, fused_rope_rmsnorm_slots)
# what every variant writes (those given), besides q's output
MUTATED = ("k_cache", "kv_output", "q_nope_out", "errors")
NOT_IN_OPS = ("out", "validate", "schedule")  # per variant, or Python-only
PDL = {"off": False, "on": True, EARLY_INDICES: EARLY_INDICES}
# annotation of an entry point's parameter -> its type in a schema
SCHEMA_TYPES = {"torch.Tensor": "Tensor", "torch.Tensor | None": "Tensor?", "float": "float",
                "bool": "bool", "str": "str", "bool | str": "str"}
# variant -> (op name suffix, q's output, what it returns)
VARIANTS = {"new": ("", None, "Tensor"), "out": ("_out", "out", "()"),
            "in_place": ("_", "q_rope", "()")}


def _argument(param: inspect.Parameter, mutated: set, alias: iter) -> str:
    """One argument of a schema, for an entry point's parameter."""
    kind = SCHEMA_TYPES[param.annotation]
    if param.name in mutated:
        kind = kind.replace("Tensor", f"Tensor({next(alias)}!)")
    text = f"{kind} {param.name}"
    if param.default is not inspect.Parameter.empty:
        default = "off" if param.name == "pdl" else param.default
        text += "=" + (f'"{default}"' if isinstance(default, str) else repr(default))
    return text


def schema(entry, variant: str) -> str:
    """The schema of ``entry``'s op in ``variant``: its parameters (but ``NOT_IN_OPS``), the
    positional ones first, then ``*`` and the keyword-only ones (``out`` first, for the
    out variant)."""
    _, output, returns = VARIANTS[variant]
    mutated, alias = {*MUTATED, output}, iter("abcdefgh")
    params = [p for p in inspect.signature(entry).parameters.values()
              if p.name not in NOT_IN_OPS]
    positional = [_argument(p, mutated, alias) for p in params if p.kind != p.KEYWORD_ONLY]
    keyword = [_argument(p, mutated, alias) for p in params if p.kind == p.KEYWORD_ONLY]
    if output == "out":
        keyword.insert(0, f"Tensor({next(alias)}!) out")
    return f"({', '.join(positional)}, *, {', '.join(keyword)}) -> {returns}"


def _implementation(entry, output: str | None):
    """The op's body: ``entry`` on the op's arguments, q's output as ``output`` says."""

    def run(*args, pdl="off", **kwargs):
        if pdl not in PDL:
            raise ValueError(f"pdl must be one of {sorted(PDL)}, got {pdl!r}")
        if output == "q_rope":
            kwargs["out"] = args[0]
        out = entry(*args, **kwargs, pdl=PDL[pdl], validate=False)
        return out if output is None else None

    return run


def _fake(output: str | None):
    def fake(q_rope, *args, **kwargs):
        return torch.empty(q_rope.shape, dtype=q_rope.dtype, device=q_rope.device) if (
            output is None) else None

    return fake


def _register() -> None:
    for entry in ENTRY_POINTS:
        for variant, (suffix, output, _) in VARIANTS.items():
            name = f"{NAMESPACE}::{entry.__name__}{suffix}"
            torch.library.define(name, schema(entry, variant))
            torch.library.impl(name, ("CPU", "CUDA"), _implementation(entry, output))
            torch.library.register_fake(name, _fake(output))


_register()
