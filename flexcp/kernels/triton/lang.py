"""Triton import shim: kernel modules import ``triton``/``tl``/``jit`` from here.

Without Triton installed the kernel modules still import (so the package, its docs and
CPU tests never need Triton or a GPU); launching a kernel then raises a clear error.
"""

from __future__ import annotations

from typing import Any, Callable

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    HAS_TRITON = False

    class _LangStub:
        """Enough of ``triton.language`` for kernel signatures to be defined."""

        constexpr = Any

    tl = _LangStub()


def jit(fn: Callable) -> Any:
    """``triton.jit`` when Triton is installed, else a stand-in that refuses to launch."""
    if HAS_TRITON:
        return triton.jit(fn)

    class _Missing:
        def __getitem__(self, grid):
            raise RuntimeError(f"{fn.__name__} needs Triton: pip install triton (and a CUDA GPU)")

    return _Missing()
