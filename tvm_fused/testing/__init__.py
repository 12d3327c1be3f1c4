"""Helpers for testing the op and code that uses it, like ``torch.testing``: the float64
reference (``reference``), random realistic inputs with guard regions (``inputs``), checking
a run against the reference (``compare``) and the randomized differential fuzzer
(``fuzz``)."""
