"""The cold start an engine pays for each form: its first call in a fresh process, once with an
empty kernel cache (every bucket kernel the call needs is generated and compiled) and once
with the disk cache that run left (loaded, not compiled), then the second call.

Each measurement is a fresh Python process (``--child``) with ``TVM_FUSED_CACHE_DIR`` set to a
folder of this run; the import of ``tvm_fused`` and torch is timed apart (light: TVM itself is
imported by the first call, which counts it). On the GPU if there is one, else on the CPU.
Prints one CSV row per form and cache state.

    python scripts/cold_start.py [--tokens 1] [--heads 128] [--forms in-place,fp8,ds-mla]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMS = {  # name -> Form fields
    "in-place": {},
    "write-through": {"write_through": True},
    "fp8": {"write_through": True, "cache_dtype": "float8_e4m3fn"},
    "ds-mla": {"write_through": True, "cache_format": "fp8_ds_mla"},
    "fp8-query": {"write_through": True, "cache_dtype": "float8_e4m3fn",
                  "out_dtype": "float8_e4m3fn", "q_nope": True},
}


def child(form_fields: dict, heads: int, tokens: int) -> dict:
    """In a fresh process: import, then the first and second call of the form, seconds."""
    started = time.perf_counter()
    import torch

    from tvm_fused import Form
    from tvm_fused.testing.inputs import inputs_for
    imported = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    form = Form(num_q_heads=heads, **form_fields)
    inputs = inputs_for(form, [tokens], [100], device=device)
    query = {}
    if form.q_nope:
        query = {"q_nope": inputs.q_nope, "q_nope_out": torch.empty(
            inputs.q_nope.shape, dtype=getattr(torch, form.out_element), device=device)}
    out = torch.empty(inputs.q_rope.shape, dtype=getattr(torch, form.out_element),
                      device=device)
    times = []
    for _ in range(2):
        begin = time.perf_counter()
        inputs.call(out=out, **query)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (llvm)",
            "import_s": imported - started, "first_call_s": times[0], "second_call_s": times[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.heads, args.tokens)))
        return 0
    print("form,cache,device,import_s,first_call_s,second_call_s")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.forms.split(","):
            cache = Path(folder) / name
            for state in ("empty", "warm disk"):
                result = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(FORMS[name]),
                     "--heads", str(args.heads), "--tokens", str(args.tokens)],
                    env=dict(os.environ, TVM_FUSED_CACHE_DIR=str(cache)),
                    capture_output=True, text=True, check=True)
                row = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"{name},{state},{row['device']},{row['import_s']:.2f},"
                      f"{row['first_call_s']:.3f},{row['second_call_s']:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
