"""How our passes read and rewrite TIR: TVM FFI's structural walk and map, behind three
functions, so that no pass carries a walker of its own."""

from __future__ import annotations

from collections.abc import Callable

import tvm_ffi


def find(root, kind: type, where: Callable = lambda node: True) -> list:
    """Every node of type ``kind`` under ``root`` (``root`` included) for which ``where``
    holds, outermost first."""
    found = []
    tvm_ffi.structural_walk(root, [(kind, lambda node: found.append(node) if where(node)
                                    else None)], order="pre")
    return found


def contains(root, kind: type, where: Callable = lambda node: True) -> bool:
    """Whether ``root`` holds a node of type ``kind`` for which ``where`` holds."""
    return bool(find(root, kind, where))


def replace(root, kind: type, rewrite: Callable):
    """``root`` with every node of type ``kind`` replaced by ``rewrite(node)`` (which returns
    the node itself to keep it), innermost first: a node's rewrite sees its rewritten
    children."""
    return tvm_ffi.structural_map(root, [(kind, rewrite)])
