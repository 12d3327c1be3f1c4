"""CUDA C++ source of a lowered device module, from TVM's CUDA codegen in a worker process.

TVM 0.27's CUDA codegen (``target.build.cuda``) hands the source it generates to the CUDA
runtime's module factory, which compiles it at once through TVM's global callback
``tvm_callback_cuda_compile``: with NVRTC unless the environment says nvcc, and with
``--use_fast_math``. We compile with flags of our own (``cuda.py``), and neither this
process's environment nor TVM's globals may change for that, so codegen runs in a worker
process started with ``TVM_COMPILE_FORCE_FALLBACK=1``, in which TVM keeps the source instead
of compiling it. The worker (``python -m tvm_fused.compiler.codegen_worker``) starts on the
first request and serves one request per line (the device module as TVM's JSON) until this
process closes its end of the pipe.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading

import tvm

_lock = threading.Lock()
_worker: dict = {}  # "process" and "pid" (of the process that started it: forks start anew)


def _start() -> subprocess.Popen:
    env = {**os.environ, "TVM_COMPILE_FORCE_FALLBACK": "1",
           "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    return subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)


@atexit.register
def _stop() -> None:
    """Close the worker's pipe and wait for it to exit (it exits at the end of its input)."""
    process = _worker.pop("process", None)
    if process is not None and _worker.pop("pid", None) == os.getpid():
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


def generate(device: tvm.IRModule) -> str:
    """The CUDA source TVM generates for ``device`` (lowered, finalized, target-bound)."""
    request = json.dumps({"module": tvm.ir.save_json(device)}) + "\n"
    with _lock:
        process = _worker.get("process")
        if process is None or process.poll() is not None or _worker["pid"] != os.getpid():
            process = _worker["process"] = _start()
            _worker["pid"] = os.getpid()
        process.stdin.write(request)
        process.stdin.flush()
        reply = process.stdout.readline()
    if not reply:
        raise RuntimeError("tvm_fused: the CUDA codegen worker exited (see its output above)")
    reply = json.loads(reply)
    if "error" in reply:
        raise RuntimeError(f"tvm_fused: CUDA codegen failed: {reply['error']}")
    return reply["source"]


def _serve() -> None:
    """Answer requests from stdin on stdout; anything else that writes to stdout (TVM's
    logs) goes to stderr."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    codegen = tvm.get_global_func("target.build.cuda")
    for line in sys.stdin:
        try:
            device = tvm.ir.load_json(json.loads(line)["module"])
            target = next(iter(device.functions.values())).attrs["target"]
            reply = {"source": str(codegen(device, target).inspect_source("cuda"))}
        except Exception as error:  # reported to the requester, which raises it
            reply = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve()
