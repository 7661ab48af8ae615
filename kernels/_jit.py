"""The kernel registry: every ``@kernel`` is a lazily compiled Numba CUDA kernel plus the signatures
its launcher uses, so the compile check (tests/test_kernels_compile.py) can build each one to PTX for
sm_90 without a GPU. Not a public API."""
from __future__ import annotations

from .runtime import cuda_module

cuda = cuda_module()

REGISTRY: list = []   # (module, name, python function, (signature, ...))


def kernel(*signatures, name=None, register=True):
    """Decorator: ``cuda.jit`` (lazy, specialised at launch) and record the launch signatures.

    ``name`` renames the function first (kernels built by a factory, one per tile configuration);
    ``register=False`` keeps a test-only configuration out of the compile check."""
    def deco(func):
        if name is not None:
            func.__name__ = func.__qualname__ = name
        if register:
            REGISTRY.append((func.__module__, func.__name__, func, tuple(signatures)))
        return cuda.jit(func)
    return deco


def device(func):
    """Decorator: an inlined device function."""
    return cuda.jit(device=True, inline=True)(func)
