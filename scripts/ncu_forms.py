"""The kernels ncu should profile for the forms (GPU): tvm-fused's default schedule in place,
write-through into a bf16 cache and into an fp8 (e4m3, k_scale 0.5) cache, at 128 and 16
heads, 32768 tokens (the prefill bucket's batch). Warms each up (compiles), then inside
cudaProfilerStart/Stop launches each once, in the printed order (ncu's rows follow it).

Usage: ncu --profile-from-start off --metrics ... python scripts/ncu_forms.py
"""

import torch

from tvm_fused import fused_rope_rmsnorm
from tvm_fused.testing.inputs import make_inputs
from tvm_fused.tuning.buckets import bucket_case

CASES = {"in-place": {}, "write-through": {"write_through": True},
         "fp8": {"write_through": True, "cache_dtype": torch.float8_e4m3fn, "k_scale": 0.5}}

calls = []
for heads in (128, 16):
    for name, options in CASES.items():
        x = make_inputs(*bucket_case(32768), num_q_heads=heads, device="cuda", **options)
        out = torch.empty_like(x.q_rope)

        def call(x=x, out=out):
            fused_rope_rmsnorm(*x.args(), out=out, validate=False, **x.latent())

        call()
        calls.append((f"{heads} heads {name}", call))
torch.cuda.synchronize()
print("launch order:", ", ".join(label for label, _ in calls))
torch.cuda.cudart().cudaProfilerStart()
for _, call in calls:
    call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
