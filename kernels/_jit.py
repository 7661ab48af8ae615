"""The kernel registry: every ``@kernel`` is a lazily compiled Numba CUDA kernel plus the signatures
its launcher uses, so the compile check (tests/test_kernels_compile.py) can build each one to PTX for
sm_90 without a GPU. Not a public API."""
from __future__ import annotations

import types

from .runtime import cuda_module, is_simulator

cuda = cuda_module()

REGISTRY: list = []   # (module, name, python function, (signature, ...))


def kernel(*signatures, name=None, register=True, launch_bounds=None):
    """Decorator: ``cuda.jit`` (lazy, specialised at launch) and record the launch signatures.

    ``name`` renames the function first (kernels built by a factory, one per tile configuration);
    ``register=False`` keeps a test-only configuration out of the compile check. ``launch_bounds``
    ``(max threads per block, min blocks per multiprocessor)`` caps the registers the compiler may
    use (``.maxntid`` / ``.minnctapersm`` in the PTX); kept on the function as ``_launch_bounds`` for
    the compile check, and ignored by the simulator, which has no registers."""
    def deco(func):
        if name is not None:
            func.__name__ = func.__qualname__ = name
        func._launch_bounds = launch_bounds
        if register:
            REGISTRY.append((func.__module__, func.__name__, func, tuple(signatures)))
        if launch_bounds is None or is_simulator():
            disp = cuda.jit(func)
        else:
            disp = cuda.jit(func, launch_bounds=launch_bounds)
        disp._ddpm_py, disp._ddpm_sigs, disp._ddpm_bounds = func, tuple(signatures), launch_bounds
        return disp
    return deco


def capped(dispatcher, launch_bounds, register=True):
    """A twin of a ``@kernel`` kernel compiled under ``launch_bounds`` (fewer registers, more resident
    warps): the same Python function under the name ``<name>_lb<min blocks>``, so the same numbers.
    Registered for the compile check like any kernel."""
    py = dispatcher._ddpm_py
    name = f"{py.__name__}_lb{launch_bounds[1]}"
    twin = types.FunctionType(py.__code__, py.__globals__, name, py.__defaults__, py.__closure__)
    twin.__doc__ = py.__doc__
    return kernel(*dispatcher._ddpm_sigs, name=name, register=register, launch_bounds=launch_bounds)(twin)


def device(func):
    """Decorator: an inlined device function."""
    return cuda.jit(device=True, inline=True)(func)
