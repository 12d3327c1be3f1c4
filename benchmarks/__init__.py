"""The benchmarks of tvm-fused, beside the package (run from a checkout): the suite
(``suite``: every provider checked, then timed, on the GPU), its report (``report``: tables
and a plot from the CSV) and the peers the suite compares with (``peers``).
``python -m benchmarks --help``."""
