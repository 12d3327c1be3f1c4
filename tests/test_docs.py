"""The API docstring's example runs (on the CPU)."""

import doctest

import tvm_fused.api


def test_api_docstring_example():
    results = doctest.testmod(tvm_fused.api, extraglobs={"torch": __import__("torch")})
    assert results.attempted > 0 and results.failed == 0
