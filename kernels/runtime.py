"""Choosing the GPU backend, and the small array helpers every kernel launcher shares.

What it is: the one place that decides whether ``ddpm_ref.kernels`` can run, and on what.

* ``"cuda"``: a real NVIDIA GPU. Arrays are CuPy arrays; kernels are Numba CUDA (``numba-cuda``)
  kernels launched on them through the CUDA array interface; CuPy supplies the memory pool and cuBLAS.
* ``"simulator"``: ``NUMBA_ENABLE_CUDASIM=1``. Numba runs the *same* kernels on the CPU, one Python
  thread per CUDA thread, on NumPy arrays. This is how CI tests every kernel without a GPU (slowly:
  about 0.5 ms per thread on the CI machine, so simulator tests use tiny shapes).

What it is not: a device abstraction layer. There is no CPU fallback here; the NumPy reference is
``ddpm_ref`` itself. Nothing in this module imports CuPy or Numba at import time, so the rest of the
package works without them; :func:`require_gpu` fails with one message naming what is missing.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = [
    "GPUUnavailableError", "backend", "require_gpu", "is_simulator", "xp", "to_device", "to_host",
    "check_array", "launch_1d", "cuda_module", "simulate_unless_disabled", "tuned", "tuning_report",
    "sm_count", "event_times",
]

_INSTALL_HINT = "install the `gpu` extra: pip install 'ddpm-ref[gpu]' (cupy-cuda12x, numba-cuda)"


class GPUUnavailableError(RuntimeError):
    """Raised when the GPU backend is chosen but CuPy, numba-cuda or a CUDA driver/GPU is missing."""


def is_simulator() -> bool:
    """True when Numba's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1``).

    Once ``numba.cuda`` has been imported its own setting wins (it is fixed at import time);
    before that the environment variable decides.
    """
    import sys
    mod = sys.modules.get("numba.cuda")
    if mod is not None and getattr(mod, "config", None) is not None:
        return bool(int(getattr(mod.config, "ENABLE_CUDASIM", 0)))
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def simulate_unless_disabled() -> bool:
    """For test modules: switch Numba's CUDA simulator on unless ``NUMBA_ENABLE_CUDASIM=0`` was set.

    Works even when plain ``numba`` was imported earlier in the process (its config is read at that
    import, so the environment variable alone would come too late); it cannot once ``numba.cuda``
    itself is imported. Returns whether the simulator is (or will be) on.
    """
    import sys
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "") == "0":
        return False
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules and "numba.cuda" not in sys.modules:
        from numba.core import config
        config.ENABLE_CUDASIM = 1
    return is_simulator()


def _probe() -> tuple[str | None, list[str]]:
    """Return (backend name or None, list of missing pieces described in words)."""
    missing = []
    try:
        import numba_cuda  # noqa: F401  (the numba-cuda package; numba.cuda redirects to it)
        from numba import cuda as _cuda  # noqa: F401
        have_numba = True
    except ImportError:
        have_numba = False
        missing.append("numba-cuda (the Numba CUDA target) is not installed")
    if have_numba and is_simulator():
        return "simulator", []
    try:
        import cupy
        have_cupy = True
    except ImportError:
        cupy = None
        have_cupy = False
        missing.append("CuPy is not installed")
    if have_cupy:
        try:
            count = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:  # CUDARuntimeError and friends: no driver / no device
            count = 0
            missing.append(f"no usable CUDA driver or GPU ({type(exc).__name__}: {exc})")
        else:
            if count < 1:
                missing.append("the CUDA driver reports no GPU")
    elif have_numba:
        # Without CuPy we cannot ask the runtime; ask numba whether a driver answers, for a fuller message.
        try:
            from numba import cuda as numba_cuda_module
            if not numba_cuda_module.is_available():
                missing.append("no usable CUDA driver or GPU (numba.cuda.is_available() is False)")
        except Exception as exc:  # pragma: no cover - depends on the machine
            missing.append(f"no usable CUDA driver or GPU ({type(exc).__name__}: {exc})")
    if missing:
        return None, missing
    return "cuda", []


_FOUND: list = []    # the backend once found (a working GPU stays working; failures are re-probed)


def backend() -> str:
    """Name of the usable GPU backend: ``"cuda"`` or ``"simulator"``; raises GPUUnavailableError otherwise."""
    if _FOUND:
        return _FOUND[0]
    name, missing = _probe()
    if name is None:
        # the simulator needs numba-cuda too: suggest it only where it would help
        sim = ("" if is_simulator() or any(m.startswith("numba-cuda") for m in missing) else
               " (or set NUMBA_ENABLE_CUDASIM=1 to run the kernels in Numba's CPU simulator)")
        raise GPUUnavailableError(
            "the GPU backend is unavailable: " + "; ".join(missing) + f". To use it, {_INSTALL_HINT}, "
            f"on a machine with an NVIDIA driver{sim}.")
    _FOUND.append(name)
    return name


def require_gpu() -> str:
    """Fail with one clear message unless the GPU backend can run; return its name."""
    return backend()


def cuda_module():
    """``numba.cuda``, or GPUUnavailableError naming the missing numba-cuda package.

    Sets ``NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0`` unless the caller chose otherwise (it only takes
    effect if Numba is imported here first): CuPy and our kernels share the default stream, so
    Numba's per-argument synchronisation on the exporter's stream would only stall the GPU.
    """
    os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
    try:
        import numba_cuda  # noqa: F401
        from numba import cuda
    except ImportError as exc:
        raise GPUUnavailableError(
            f"the GPU kernels need numba-cuda, which is not installed ({exc}); {_INSTALL_HINT}") from exc
    return cuda


def xp():
    """The array module of the backend: CuPy on a GPU, NumPy in the simulator."""
    name = backend()
    if name == "simulator":
        return np
    import cupy
    return cupy


def to_device(a, dtype=None):
    """Copy a host array to the backend (a CuPy array; in the simulator a C-contiguous NumPy copy)."""
    mod = xp()
    if mod is np:
        return np.array(a, dtype=dtype, order="C")      # a writable copy (the simulator writes back)
    return mod.ascontiguousarray(mod.asarray(a, dtype=dtype))


def to_host(a) -> np.ndarray:
    """Copy a backend array to a NumPy array (a no-op copy in the simulator)."""
    if isinstance(a, np.ndarray):
        return a.copy()
    get = getattr(a, "get", None)
    if get is not None:
        return get()
    return np.asarray(a)


def check_array(a, name: str, dtype=np.float32, ndim: int | None = None, shape=None, contiguous=True):
    """Fail fast unless ``a`` is a (C-contiguous, unless ``contiguous=False``) device array of the
    expected dtype and shape."""
    if not hasattr(a, "__cuda_array_interface__"):
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{name} must be a CuPy (or, in the simulator, NumPy) array, got {type(a).__name__}")
        if not is_simulator():                 # on a GPU a host array would need a hidden copy
            raise ValueError(f"{name} is a host NumPy array; the GPU kernels need a device array "
                             "(copy it with ddpm_ref.kernels.runtime.to_device, or Backend.asarray)")
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (call ascontiguousarray first)")
    return a


# Elementwise kernels use grid-stride loops. On a GPU the grid covers the work (up to a cap); in the
# simulator, where every thread costs about half a millisecond, a small grid does the same work.
_SIM_MAX_THREADS = 64
_GPU_MAX_BLOCKS = 65535


_SMS: dict = {}


def sm_count() -> int:
    """Multiprocessors of the current GPU (cached per device); 1 in the simulator (small, so that
    the simulator exercises the convolution's split-K path)."""
    if is_simulator():
        return 1
    import cupy
    dev = cupy.cuda.Device()
    if dev.id not in _SMS:
        _SMS[dev.id] = int(dev.attributes["MultiProcessorCount"])
    return _SMS[dev.id]


def launch_1d(n: int, threads: int = 256) -> tuple[int, int]:
    """(blocks, threads) for a grid-stride loop over ``n`` items (ceil-div, at least one block)."""
    n = int(n)
    if is_simulator():
        threads = min(threads, _SIM_MAX_THREADS)
        return 1, threads
    blocks = max(1, min(_GPU_MAX_BLOCKS, (n + threads - 1) // threads))
    return blocks, threads


# ---------------------------------------------------------------------------------------------
# Autotuning: choosing between launch variants that compute the same numbers
# ---------------------------------------------------------------------------------------------
# Some kernels come in variants that write bit-identical outputs from the same inputs (a convolution's
# inner-loop variants; a noise kernel's grid shapes, since every element's value is fixed by its
# counter, and its register-capped twins). Which is fastest depends on the GPU and the shape, so
# on a real GPU the first launch of each distinct problem times every variant (CUDA events) and
# later launches run the fastest, as cuDNN's benchmark mode does. The choice can change only the
# time, never a result (each family of variants has a bit-identity test in the simulator).
# ``DDPM_AUTOTUNE=0`` always runs the first variant; the simulator always does.
AUTOTUNE = os.environ.get("DDPM_AUTOTUNE", "1") != "0"
_TUNED: dict = {}       # key -> (chosen variant's label, the variant)


def event_times(fn, repeats, warmup=1):
    """Seconds of each of ``repeats`` calls of ``fn``, timed on the GPU between two CUDA events, after
    ``warmup`` untimed calls (the first also compiles a kernel on its first use)."""
    import cupy
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return times


def _event_timer(fn, repeats=3):
    """The autotuner's timer: the fastest of ``repeats`` event timings after one untimed call."""
    return min(event_times(fn, repeats))


def tuned(key, variants, launch, label=str, timer=None):
    """Run ``launch(v)`` for the fastest of ``variants`` on this problem (``key``: hashable, naming the
    kernel and everything its time depends on) and return that variant.

    The first call with a new key times each variant with ``timer(fn) -> seconds`` (default: CUDA
    events; the timing runs launch the kernel, which must therefore be idempotent: same inputs, same
    outputs), remembers the fastest, and launches it once more; later calls launch it directly.
    Without a timer (the simulator, or ``DDPM_AUTOTUNE=0``) and for a single variant: the first."""
    variants = list(variants)
    if timer is None and (len(variants) == 1 or not AUTOTUNE or is_simulator()):
        launch(variants[0])
        return variants[0]
    hit = _TUNED.get(key)
    if hit is None:
        timer = timer or _event_timer
        times = [(timer(lambda v=v: launch(v)), i) for i, v in enumerate(variants)]
        best = variants[min(times)[1]]
        hit = _TUNED[key] = (label(best), best)
    launch(hit[1])
    return hit[1]


def tuning_report() -> dict:
    """What the autotuner chose so far: {kernel name (a key's first item): {variant label: count}}."""
    out: dict = {}
    for key, (lab, _) in _TUNED.items():
        name = key[0] if isinstance(key, tuple) else str(key)
        d = out.setdefault(name, {})
        d[lab] = d.get(lab, 0) + 1
    return out
