"""tvm-fused: DeepSeek-style MLA RoPE + RMSNorm prologue as one TensorIR kernel.

Layers: ``definition`` (the TensorIR compute), ``schedules`` (GPU block-group schedule),
``block_groups`` + ``pipeline`` (the compiler pass that merges branch launches), ``build`` /
``cache`` (compile and keep kernels), ``api`` (the torch entry point), ``reference`` (an
independent torch oracle).
"""

from .api import fused_rope_rmsnorm
from .build import build, cuda_source, cuda_target
from .config import OpConfig
from .definition import OP_NAME, fused_rope_rmsnorm_func
from .reference import fused_rope_rmsnorm_reference

__all__ = [
    "OP_NAME",
    "OpConfig",
    "build",
    "cuda_source",
    "cuda_target",
    "fused_rope_rmsnorm",
    "fused_rope_rmsnorm_func",
    "fused_rope_rmsnorm_reference",
]
