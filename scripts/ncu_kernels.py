"""The kernels ncu should profile (run under scripts/ncu_kernels.sh on the GPU machine).

Warms up (compiles, autotunes) the fused op of tvm-fused and of the Triton peer at several
token counts (128 heads, GPT-J, bf16, the benchmark's inputs), then, inside
cudaProfilerStart/Stop, launches an empty kernel and each provider once per token count, in
the order printed: ncu's rows follow it.
"""

import torch

from benchmarks.suite import engine_addressing, new_call, providers, sweep_inputs
from tvm_fused.form import Form

TOKENS = (1, 8, 64, 256, 4096, 32768)
NAMES = ("tvm-fused default", "triton fused")

form = Form()
cases = []
for tokens in TOKENS:
    inputs = sweep_inputs(form, tokens)
    call = new_call(inputs, form, engine_addressing(inputs))
    for name, provider in providers(form, tokens, NAMES).items():
        for _ in range(3):
            provider(call)
        cases.append((f"{name} {tokens}", lambda p=provider, c=call: p(c)))
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
torch.cuda._sleep(0)
print("launch order: empty kernel,", ", ".join(label for label, _ in cases))
for _, call in cases:
    call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
