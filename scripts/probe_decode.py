"""Where a decode call's time goes (GPU): cold vs warm L2, the launch floor, host time.

Prints GPU time of the op at 1 and 64 tokens (128 heads) on a cold and a warm L2, of an
empty kernel launched the same way (the floor any implementation pays), and the host time of
one Python call split into its parts (the argument checks, the kernel map's entry of the
call's key and its kernel, the kernel alone), next to the host time of a trivial TVM kernel
taking as many tensors (the floor of a call through TVM's FFI).
"""

import torch
import tvm
import tvm_ffi
from tvm.script import tirx as T

from benchmarks.suite import host_us
from tvm_fused import dispatch, fused_rope_rmsnorm
from tvm_fused.arguments import check_arguments
from tvm_fused.compiler.build import cuda_target
from tvm_fused.form import OFFSETS, Form
from tvm_fused.timing import time_cuda
from tvm_fused.tuning.workload import bucket_inputs

print(torch.cuda.get_device_name(), "torch", torch.__version__, "tvm-ffi", tvm_ffi.__version__,
      "DLPack C exchange API:", hasattr(torch.Tensor, "__dlpack_c_exchange_api__"))


@T.prim_func
def touch(a: T.Buffer((1,), "float32"), b: T.Buffer((1,), "float32"),
          c: T.Buffer((1,), "float32"), d: T.Buffer((1,), "float32"),
          e: T.Buffer((1,), "float32"), f: T.Buffer((1,), "float32"),
          g: T.Buffer((1,), "float32"), h: T.Buffer((1,), "float32")):
    T.func_attr({"global_symbol": "touch"})
    for i in T.thread_binding(1, thread="threadIdx.x"):
        a[i] = b[i] + c[i] + d[i] + e[i] + f[i] + g[i] + h[i]


with cuda_target() as target:
    touch_kernel = tvm.compile(tvm.IRModule({"touch": touch}), target=target)["touch"]
buffers = [torch.zeros(1, device="cuda") for _ in range(8)]
print(f"host per call of a trivial TVM kernel with 8 tensors: "
      f"{host_us(lambda: touch_kernel(*buffers), calls=300):5.2f} us")
empty = torch.empty(0, device="cuda")
for label, fn in (("empty kernel", lambda: torch.cuda._sleep(0)),):
    print(f"{label:28s} cold {time_cuda(fn, reps=200).median_us:6.2f} us   "
          f"warm {time_cuda(fn, reps=200, cold=False).median_us:6.2f} us")


def probe(tokens):
    form = Form()
    x = bucket_inputs(form, tokens, device="cuda")
    out = torch.empty_like(x.q_rope)
    args = x.args()
    q = x.q_rope
    indices = (x.input_row_offsets, x.lookup_table, x.cache_lengths)

    def call():
        fused_rope_rmsnorm(*args, out=out, validate=False)

    def checked():
        fused_rope_rmsnorm(*args, out=out)

    call()  # builds the kernel, under the key the entry point built from these tensors
    key = dispatch.key_of(form, q.device)
    if key not in dispatch.KERNELS:
        raise SystemExit(f"the call's key is not {key}: the inputs are not of {form}")
    errors = torch.zeros(1, dtype=torch.int32, device="cuda")
    given = {"q_rope": q, "q_rope_output": out, "offsets": x.input_row_offsets,
             "freqs_cis": x.freqs_cis, "gamma": x.gamma, "k_cache": x.k_cache,
             "lookup_table": x.lookup_table, "cache_lengths": x.cache_lengths,
             "errors": errors, "epsilon": 1e-6}
    values = tuple(given.get(name) for name in dispatch.PARAMETERS)  # as the entry points
    entry = dispatch.lookup(key)
    kernel, arguments = entry.kernel(tokens), entry.arguments(values)

    def mapped():  # what the entry point does once it has the key
        found = dispatch.KERNELS[key]
        found.kernel(tokens)(*found.arguments(values))

    def raw():
        kernel(*arguments)

    print(f"{tokens:3d} tok op              cold {time_cuda(call, reps=200).median_us:6.2f} us"
          f"   warm {time_cuda(call, reps=200, cold=False).median_us:6.2f} us")
    checks = host_us(lambda: check_arguments(q, x.freqs_cis, x.gamma, x.k_cache,
                                             dict(zip(OFFSETS, indices)), out=out))
    print(f"{tokens:3d} tok host per call: validate=False {host_us(call, calls=300):5.2f} us, "
          f"default checks {host_us(checked, calls=300):5.2f} us, map entry + kernel "
          f"{host_us(mapped, calls=300):5.2f} us, kernel only {host_us(raw, calls=300):5.2f} us, "
          f"check_arguments {checks:5.2f} us, torch add_ {host_us(lambda: empty.add_(1)):5.2f} us")


for tokens in (1, 64):
    probe(tokens)
