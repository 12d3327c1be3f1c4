"""tvm-fused's write-through form into an fp8 cache against FlashInfer's fused MLA rope +
quantize + append kernel after Liger's RMSNorm (benchmarks/peers/flashinfer_rope.py), on the
GPU machine, same inputs, same run.

For 128 and 16 heads at 1, 64, 4096 and 32768 tokens (the tuning buckets' batches), bf16 q,
an e4m3 cache with k_scale 0.5: both run once on copies of the inputs and their cache rows
are compared byte by byte (FlashInfer quantizes the roped value without first rounding it to
bf16, so a few bytes may differ by one fp8 step); then each is timed on a cold L2
(``timing.time_cuda``, median), FlashInfer also without the norm kernel and with a real
q_nope (its kernel quantizes one too: ``q nope bytes`` more than the op's bytes). Prints one
JSON line per point.

Usage: FLASHINFER_ROPE_LIB=lib.so python scripts/bench_flashinfer.py
"""

import json

import torch

from benchmarks.peers.flashinfer_rope import FlashInferMLAppend
from benchmarks.peers.torch_eager import token_pages
from tvm_fused import Form, fused_rope_rmsnorm
from tvm_fused.testing.inputs import inputs_for
from tvm_fused.timing import bytes_moved, time_cuda
from tvm_fused.tuning.buckets import bucket_case

K_SCALE = 0.5

print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
for heads in (128, 16):
    for tokens in (1, 64, 4096, 32768):
        form = Form(num_q_heads=heads, write_through=True, cache_dtype="float8_e4m3fn")
        base = inputs_for(form, *bucket_case(tokens), k_scale=K_SCALE, device="cuda")
        n = int(base.input_row_offsets[-1])
        ours, theirs = base.clone(), base.clone()
        out = torch.empty_like(ours.q_rope)

        def tvm_fused_call(x=ours, out=out):
            fused_rope_rmsnorm(*x.args(), out=out, validate=False, **x.latent())

        flashinfer, real = (FlashInferMLAppend(*theirs.args(), theirs.kv_input, K_SCALE,
                                               num_tokens=n, real_q_nope=real_q_nope)
                            for real_q_nope in (False, True))
        tvm_fused_call()
        flashinfer()
        _, page, slot = token_pages(base.input_row_offsets, base.lookup_table,
                                    base.cache_lengths, base.k_cache.shape[1], n)
        a = ours.k_cache[page, slot].view(torch.uint8).to(torch.int16)
        b = theirs.k_cache[page, slot].view(torch.uint8).to(torch.int16)
        row = {"heads": heads, "tokens": n,
               "cache_bytes_equal": round(float((a == b).float().mean()), 6),
               "cache_max_byte_step": int((a - b).abs().max())}
        for name, fn in (("tvm-fused write-through fp8", tvm_fused_call),
                         ("flashinfer rope+quant+append after liger rmsnorm", flashinfer),
                         ("flashinfer kernel alone (latent not normalized)",
                          lambda f=flashinfer: f.append(f.kv_input[:, :f.gamma.shape[0]])),
                         ("flashinfer, real q_nope", real)):
            row[name] = round(time_cuda(fn, reps=200 if tokens <= 4096 else 60).median_us, 2)
        row["op bytes"] = bytes_moved(form, n)
        row["q_nope bytes"] = real.q_nope_bytes
        print(json.dumps(row), flush=True)
