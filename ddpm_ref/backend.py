"""Which ops and arrays a model runs on: the NumPy reference ("cpu") or our CUDA kernels ("gpu").

What it is: one small record, :class:`Backend`, naming the op modules a model composes and the array
module they work on. The U-Net (:mod:`ddpm_ref.models.unet`) calls ``B.conv.conv2d_forward``,
``B.norm.group_norm_silu_forward``, ``B.xp.zeros`` ... through it, so one forward and one backward
pass serve both backends (the MLP for the 2-D toys calls :mod:`ddpm_ref.ops` directly and runs on the
CPU only):

* ``"cpu"``: :mod:`ddpm_ref.ops` on NumPy arrays (the reference);
* ``"gpu"``: :mod:`ddpm_ref.kernels` (Numba CUDA kernels on CuPy arrays; the same file and function
  names and signatures as ``ddpm_ref.ops``), or, with ``NUMBA_ENABLE_CUDASIM=1``, the same kernels
  in Numba's CPU simulator on NumPy arrays.

What it is not: a device abstraction layer or an array API. Only the handful of array calls the
models make between ops go through ``xp`` (CuPy and NumPy agree on them); everything else is an op.
Choosing ``"gpu"`` without CuPy, numba-cuda or a driver raises
:class:`ddpm_ref.kernels.GPUUnavailableError` with one message naming what is missing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np

__all__ = ["Backend", "get_backend", "DEVICES"]

DEVICES = ("cpu", "gpu")
_OPS = ("conv", "norm", "attention", "activation", "resample", "linear", "embedding", "loss")


@dataclass(frozen=True)
class Backend:
    """The op modules of one backend and its array module ``xp`` (NumPy or CuPy)."""

    name: str
    xp: ModuleType
    conv: ModuleType
    norm: ModuleType
    attention: ModuleType
    activation: ModuleType
    resample: ModuleType
    linear: ModuleType
    embedding: ModuleType
    loss: ModuleType

    @property
    def on_device(self) -> bool:
        """True for the GPU backend (real or simulated)."""
        return self.name == "gpu"

    def asarray(self, a, dtype=None):
        """``a`` as an array of this backend (a host array is copied to the GPU; device arrays pass)."""
        if self.xp is np:                   # the CPU, or the GPU simulator (kernels need C order, as on a GPU)
            a = np.asarray(a, dtype=dtype)
            return np.ascontiguousarray(a) if self.on_device else a
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        """``a`` as a NumPy array (copied from the GPU; host arrays pass unchanged)."""
        if isinstance(a, np.ndarray):
            return a
        get = getattr(a, "get", None)
        return get() if get is not None else np.asarray(a)

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, xp={self.xp.__name__})"


_CACHE: dict = {}


def get_backend(device="cpu") -> Backend:
    """The :class:`Backend` for ``device``: ``"cpu"`` (default) or ``"gpu"``; a Backend passes through."""
    if isinstance(device, Backend):
        return device
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device in _CACHE:
        return _CACHE[device]
    if device == "cpu":
        pkg, xp = "ddpm_ref.ops", np
    else:
        from ddpm_ref.kernels import runtime
        runtime.require_gpu()            # one clear message naming CuPy, numba-cuda or the driver
        pkg, xp = "ddpm_ref.kernels", runtime.xp()
    mods = {name: importlib.import_module(f"{pkg}.{name}") for name in _OPS}
    backend = Backend(name=device, xp=xp, **mods)
    _CACHE[device] = backend
    return backend
