"""Other implementations of the op, for the benchmarks: what a user could pick instead.

Each module imports its framework (Triton, ...) itself, so importing ``tvm_fused`` never
needs them.
"""
