"""Triton, when it is installed. Kernel files import ``triton``/``tl`` from here.

On a machine without Triton the kernel files still import (their ops keep their CPU reference and
fake impls); launching a Triton kernel then raises a clear error. With ``TRITON_INTERPRET=1`` (set
by the test suite on machines without CUDA) Triton runs the kernels on the CPU, which is how the CPU
suite checks kernels bit for bit against their references.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"fusionpasses.{op} needs Triton for its GPU kernel: pip install 'fusionpasses[triton]'")


def jit(fn):
    """``triton.jit`` when Triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn
