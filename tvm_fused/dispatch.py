"""The kernel map: one dictionary from a call's key to its form's kernels on its device.

A call's key (``CallKey``) holds what shapes its kernel and is known on the host without a
sync: the device, the dtypes, the static dims, the entry point's options, the tensors'
alignment class, the index arithmetic they need (32 or 64 bits) and a schedule override.
The entry points build it as a plain tuple in ``CallKey``'s field order (a tuple costs
nothing to build; ``CallKey`` names its fields); ``prepare`` builds it from a ``Form``.
The map's value, ``Prepared``, holds the form, the scratch tensors of calls that pass no
error counter or scale, the schedule config of each token bucket (the GPU's tuning
decisions, else the hand-written default) and each bucket's kernel, built (or loaded from
the disk cache) when a call first needs it, or all at once by ``prepare``. A call costs
one dictionary lookup and a bisect.
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import kernels, schedules
from .compiler.build import device_target
from .compiler.definition import PARAMETERS, parameters
from .form import EARLY_INDICES, Form, dtype_name
from .tuning import decisions
from .tuning.buckets import thresholds


class CallKey(NamedTuple):
    """What shapes the kernel of a call (torch dtypes as torch gives them)."""

    device: int  # ``Tensor.get_device()``: -1 for the CPU
    dtype: torch.dtype
    num_q_heads: int
    rope_dim: int
    kv_norm_dim: int
    page_size: int
    cache_dtype: torch.dtype
    out_dtype: torch.dtype
    freqs_dtype: torch.dtype
    gamma_dtype: torch.dtype
    index_dtypes: tuple  # of the first two index tensors (offsets and table, or positions
    # and slots)
    addressing: str
    interleaved: bool
    freqs_layout: str
    norm_rounding: str
    pdl: bool | str
    cache_format: str
    tile_scale: str
    write_through: bool
    kv_output: bool
    q_nope: bool
    alignment: int
    index_bits: int  # 64 where a tensor has 2^31 elements or more, or its strides span as many
    schedule: object  # a schedule config to use instead of the decided one, or None


def form_of(key: CallKey) -> Form:
    """The form of a call with ``key`` (ValueError for an option it does not take)."""
    if key.pdl not in (False, True, EARLY_INDICES):
        raise ValueError(f"pdl must be False, True or {EARLY_INDICES!r}, got {key.pdl!r}")
    if not isinstance(key.interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {key.interleaved!r}")
    if (key.cache_dtype == torch.uint8) != (key.cache_format == "fp8_ds_mla"):
        raise TypeError("k_cache must be uint8 exactly for cache_format='fp8_ds_mla' (its "
                        f"656-byte rows), got {dtype_name(key.cache_dtype)} with "
                        f"cache_format={key.cache_format!r}")
    first, second = (dtype_name(d) for d in key.index_dtypes)
    index = ({"positions_dtype": first, "slots_dtype": second} if key.addressing == "slots"
             else {"offsets_dtype": first})
    gpu = key.device >= 0
    return Form(
        dtype=dtype_name(key.dtype), num_q_heads=key.num_q_heads, rope_dim=key.rope_dim,
        kv_norm_dim=key.kv_norm_dim, page_size=key.page_size, interleaved=key.interleaved,
        write_through=key.write_through, kv_output=key.kv_output,
        cache_dtype=None if key.cache_dtype in (key.dtype, torch.uint8) else dtype_name(
            key.cache_dtype),
        cache_format=key.cache_format, tile_scale=key.tile_scale,
        out_dtype=None if key.out_dtype == key.dtype else dtype_name(key.out_dtype),
        q_nope=key.q_nope,
        pdl=bool(key.pdl) and gpu, pdl_early_indices=key.pdl == EARLY_INDICES and gpu,
        addressing=key.addressing, freqs_layout=key.freqs_layout,
        norm_rounding=key.norm_rounding, freqs_dtype=dtype_name(key.freqs_dtype),
        gamma_dtype=dtype_name(key.gamma_dtype), alignment=key.alignment,
        index_bits=key.index_bits, **index)


def key_of(form: Form, device: torch.device, schedule=None) -> CallKey:
    """The key of ``form``'s calls on ``device`` (``form_of``'s inverse)."""
    index = ((form.positions_dtype, form.slots_dtype) if form.addressing == "slots"
             else (form.offsets_dtype, "int32"))
    return CallKey(
        -1 if device.type == "cpu" else device.index, getattr(torch, form.dtype),
        form.num_q_heads, form.rope_dim, form.kv_norm_dim, form.page_size,
        getattr(torch, form.cache_element), getattr(torch, form.out_element),
        getattr(torch, form.freqs_dtype), getattr(torch, form.gamma_dtype),
        tuple(getattr(torch, d) for d in index), form.addressing, form.interleaved,
        form.freqs_layout, form.norm_rounding, form.pdl_mode, form.cache_format,
        form.tile_scale, form.write_through, form.kv_output, form.q_nope, form.alignment,
        form.index_bits, schedule)


@dataclasses.dataclass
class Prepared:
    """A form on one device: what its calls need besides their tensors."""

    form: Form
    target: object  # tvm.target.Target
    errors: torch.Tensor  # the error counter of calls that pass none (its count is not read)
    unit_scales: dict  # the scales the form takes (``k_scale``, ``q_scale``) -> 1, for calls
    # that pass none
    arguments: Callable  # PARAMETERS-ordered values -> the kernel's arguments
    thresholds: tuple[int, ...]  # token counts from which the next bucket serves
    configs: tuple  # the schedule config of each bucket
    kernels: list  # the kernel of each bucket, None until built
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def scale(self, name: str, given: torch.Tensor | None) -> torch.Tensor | None:
        """The scale tensor ``name`` a call passes as the kernel takes it (1 if not given);
        ValueError if the form takes none."""
        unit = self.unit_scales.get(name)
        if given is None:
            return unit
        if unit is None:
            raise ValueError(f"{name} applies to an fp8 {SCALED[name]} only")
        return given if given.dim() == 1 else given.reshape(1)

    def kernel(self, tokens: int) -> Callable:
        """The kernel of the bucket of ``tokens`` tokens (built on first use)."""
        bucket = bisect.bisect_right(self.thresholds, tokens)
        kernel = self.kernels[bucket]
        return kernel if kernel is not None else self.build(bucket)

    def build(self, bucket: int) -> Callable:
        """Build (or load) the kernel of ``bucket``; refused under CUDA graph capture."""
        with self.lock:
            if self.kernels[bucket] is None:
                _refuse_under_capture(self.form)
                self.kernels[bucket] = kernels.kernel(self.form, self.target,
                                                      self.configs[bucket])
        return self.kernels[bucket]


KERNELS: dict[tuple, Prepared] = {}  # the kernel map
SCALED = {"k_scale": "k_cache", "q_scale": "out"}  # what each scale divides
_preparing = threading.Lock()


def _refuse_under_capture(form: Form) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"tvm_fused: the first call of {form} is being captured into a CUDA graph, but "
            "its kernel is not built yet and its scratch tensors are not allocated: call "
            "tvm_fused.prepare(form, device) before capturing")


def _bucket_configs(form: Form, device: torch.device, target, schedule) -> dict:
    """Bucket -> schedule config: ``schedule`` for every call if given; on a GPU the tuning
    decisions of its model, else the hand-written default, bucket by bucket."""
    if schedule is not None or device.type != "cuda":
        return {0: schedule or schedules.default_config(form, target)}
    decided = decisions.for_gpu(torch.cuda.get_device_name(device), form)
    return decisions.with_defaults(
        decided, lambda tokens: schedules.default_config(form, target, tokens))


def _prepared(key: CallKey) -> Prepared:
    """A new ``Prepared`` entry for ``key`` (no kernel built yet)."""
    form = form_of(key)
    device = torch.device("cpu") if key.device < 0 else torch.device("cuda", key.device)
    if form.pdl and torch.cuda.get_device_capability(device) < (9, 0):
        raise ValueError(f"pdl needs a GPU of compute capability 9.0 or newer, got "
                         f"{torch.cuda.get_device_name(device)}")
    _refuse_under_capture(form)
    target = device_target(device)
    configs = _bucket_configs(form, device, target, key.schedule)
    buckets = sorted(configs)
    picked = [PARAMETERS.index(name) for name in parameters(form)]
    scales = {name: torch.ones(1, dtype=torch.float32, device=device)
              for name in SCALED if name in parameters(form)}
    return Prepared(
        form, target, torch.zeros(1, dtype=torch.int32, device=device), scales,
        operator.itemgetter(*picked), thresholds(buckets),
        tuple(configs[b] for b in buckets), [None] * len(buckets))


def lookup(key: tuple) -> Prepared:
    """The entry of a call's key (a ``CallKey`` or a plain tuple in its order), made on the
    first call with it."""
    entry = KERNELS.get(key)
    if entry is None:
        with _preparing:
            entry = KERNELS.get(key)
            if entry is None:
                entry = KERNELS[key] = _prepared(CallKey(*key))
    return entry


def prepare(form: Form, device: str | torch.device = "cuda", schedule=None) -> None:
    """Build every kernel of ``form``'s calls on ``device`` and allocate their scratch
    tensors, so that a later call, captured into a CUDA graph or not, builds and allocates
    nothing (``schedule``: as the calls pass it)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    entry = lookup(key_of(form, device, schedule))
    for bucket in range(len(entry.kernels)):
        entry.build(bucket)
