import time, tempfile, os
import torch, tvm
from tvm_fused.form import Form
from tvm_fused import kernels
from tvm_fused.compiler.build import device_target
from tvm_fused.testing.inputs import make_inputs
from tvm_fused.testing.compare import check_run, whole_storage
dev = torch.device("cuda")
target = device_target(dev)
for form in (Form(), Form(num_q_heads=16, write_through=True, cache_dtype="float8_e4m3fn", pdl=True)):
    t0 = time.time()
    mod = kernels.build(form, target)
    t1 = time.time()
    path = tempfile.mktemp(suffix=".so"); mod.export_library(path)
    fn = tvm.runtime.load_module(path)["fused_rope_rmsnorm"]
    t2 = time.time()
    print(form.key(), f"build {t1-t0:.1f}s export+load {t2-t1:.1f}s", flush=True)
    inputs = make_inputs([1, 5, 300], [7, 1000, 64], num_q_heads=form.num_q_heads, write_through=form.write_through,
                         cache_dtype=getattr(torch, form.cache_element), device="cuda")
    before = inputs.clone()
    out = torch.empty_like(inputs.q_rope)
    out_before = whole_storage(out).clone()
    errors = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = [inputs.kv_input] if form.write_through else []
    scale = [torch.ones(1, device="cuda")] if form.cache_dtype else []
    fn(inputs.q_rope, out, *rows, inputs.input_row_offsets, inputs.freqs_cis, inputs.gamma, inputs.k_cache, *scale,
       inputs.lookup_table, inputs.cache_lengths, errors, 1e-6)
    torch.cuda.synchronize()
    report = check_run(before, inputs, out, out_before, errors_counted=int(errors.item()))
    print(report.summary(), flush=True)
    print(mod.imports[0].inspect_source("cuda")[:80].replace("\n"," "))
