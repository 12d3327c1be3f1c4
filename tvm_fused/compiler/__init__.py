"""The compiler of the op: the TensorIR definition (``definition``, ``config``), the passes
we add to TVM's pipeline (``block_groups``, ``atomic_add``, ``alignment_check``,
``pipeline``), compilation (``build``) and the cache of built kernels (``kernel_cache``).
The schedules live in ``tvm_fused.schedules``."""
