"""One lookup per call: from the call's signature to the ready kernel for its token count.

The signature is what shapes the kernel and is known on the host without a sync: device,
dtypes, static dims, pairing, alignment class and the schedule override (None: the tuning
decisions). Its first call resolves it once: the op config, the target, the config of
each token bucket (``tuning/decisions.py``: the decided one, else the hand-written default,
bucket by bucket), each kernel built or loaded through the one
kernel cache (``compiler/kernel_cache.py``), and the token counts where one bucket's kernel
takes over from the next. Later calls cost one dict lookup and a bisect.

Building the signature costs about as much host time as the launch itself, so a call first
tries the kernels last resolved under its quick key (``recent_kernel``: what no compiled entry
can check, plus q's heads and the cache dtype); the kernel's entry checks the rest (dtypes,
static dims, alignment) and refuses, before launching, tensors it was not built for.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable

import torch

from .compiler.build import device_target
from .compiler.config import OpConfig, dtype_name
from .compiler.kernel_cache import get_kernel
from .schedules import default_schedule_config
from .tuning import decisions
from .tuning.buckets import thresholds
from .tuning.layout import default_logs_dir

EARLY_INDICES = "early-indices"  # pdl=: the index tensors are read before PDL's wait


def signature(device: torch.device, q_rope: torch.Tensor, freqs: torch.Tensor,
              gamma: torch.Tensor, k_cache: torch.Tensor, indices: tuple, options: tuple,
              write_through: bool, kv_output: bool, alignment: int, schedule) -> tuple:
    """What shapes the kernel of a call on ``device``, as a plain tuple (cheap to build and
    hash):
    ``indices`` are the addressing's index tensors (offsets first: the dtypes of the first
    two count; a page table of another dtype is refused by the kernel's entry), ``options``
    the addressing, pairing, table layout, norm rounding and PDL."""
    shape = q_rope.shape
    return (device, q_rope.dtype, freqs.dtype, gamma.dtype, k_cache.dtype, shape[1],
            shape[2], gamma.shape[0], k_cache.shape[1], (indices[0].dtype, indices[1].dtype),
            *options, write_through, kv_output, alignment, schedule)


def _op(signature: tuple) -> OpConfig:
    (device, dtype, freqs_dtype, gamma_dtype, cache_dtype, heads, rope_dim, kv_norm_dim,
     page_size, index_dtypes, addressing, interleaved, freqs_layout, norm_rounding, pdl,
     write_through, kv_output, alignment, _) = signature
    if pdl not in (False, True, EARLY_INDICES):
        raise ValueError(f"pdl must be False, True or {EARLY_INDICES!r}, got {pdl!r}")
    names = [dtype_name(d) for d in index_dtypes]
    index = ({"positions_dtype": names[0], "slots_dtype": names[1]} if addressing == "slots"
             else {"offsets_dtype": names[0]})
    return OpConfig(num_q_heads=heads, rope_dim=rope_dim, kv_norm_dim=kv_norm_dim,
                    page_size=page_size, dtype=dtype_name(dtype),
                    freqs_dtype=dtype_name(freqs_dtype), gamma_dtype=dtype_name(gamma_dtype),
                    addressing=addressing, interleaved=interleaved, freqs_layout=freqs_layout,
                    norm_rounding=norm_rounding, pdl=bool(pdl) and device.type == "cuda",
                    pdl_early_indices=pdl == EARLY_INDICES and device.type == "cuda",
                    write_through=write_through, kv_output=kv_output,
                    cache_dtype=None if cache_dtype == dtype else dtype_name(cache_dtype),
                    alignment=alignment, **index)


@dataclasses.dataclass(frozen=True)
class _Kernels:
    """The kernel of each bucket, and the token counts from which the next one serves."""

    thresholds: tuple[int, ...]
    kernels: tuple[Callable, ...]

    def for_tokens(self, tokens: int) -> Callable:
        return self.kernels[bisect.bisect_right(self.thresholds, tokens)]


_ready: dict[tuple, _Kernels] = {}
_recent: dict[tuple, _Kernels] = {}  # quick key -> the kernels last resolved under it


def _resolve(signature: tuple) -> _Kernels:
    device, schedule = signature[0], signature[-1]
    op, target = _op(signature), device_target(device)
    if op.pdl and torch.cuda.get_device_capability(device) < (9, 0):
        raise ValueError(f"pdl needs a GPU of compute capability 9.0 or newer, got "
                         f"{torch.cuda.get_device_name(device)}")
    if schedule is not None or device.type != "cuda":
        return _Kernels((), (get_kernel(op, target, schedule),))
    configs = decisions.with_defaults(
        decisions.for_gpu(str(default_logs_dir()), torch.cuda.get_device_name(device), op),
        lambda tokens: default_schedule_config(target, op, tokens))
    buckets = sorted(configs)
    return _Kernels(thresholds(buckets),
                    tuple(get_kernel(op, target, configs[b]) for b in buckets))


def kernel(signature: tuple, tokens: int, quick: tuple | None = None) -> Callable:
    """The kernel for a call of ``tokens`` tokens with this signature (built on first use);
    remembered under the ``quick`` key if given."""
    ready = _ready.get(signature)
    if ready is None:
        ready = _ready[signature] = _resolve(signature)
    if quick is not None:
        _recent[quick] = ready
    return ready.for_tokens(tokens)


def recent_kernel(quick: tuple, tokens: int) -> Callable | None:
    """The kernel for ``tokens`` tokens of the signature last remembered under the quick key
    ``quick``, or None. The quick key selects what no compiled entry can check: ``(device
    index, q heads, cache dtype, options, write_through, kv_output, schedule)``, ``options``
    being the addressing, pairing, table layout, norm rounding and PDL (heads and the cache
    dtype so that calls alternating between two head counts or caches each find theirs).
    The kernel's compiled entry refuses tensors of another signature before launching."""
    ready = _recent.get(quick)
    return None if ready is None else ready.for_tokens(tokens)
