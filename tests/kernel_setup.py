"""Shared setup of the GPU kernel tests (tests/test_kernels_*.py), imported first by each of them.

* Skips the importing module, with a reason, when numba-cuda is missing (the ``test`` extra).
* Runs the kernels in Numba's CUDA simulator unless ``NUMBA_ENABLE_CUDASIM=0`` asks for a real GPU
  (``benchmarks/gpu_check.sh`` does); this must happen before ``numba.cuda`` is first imported.
* Skips the module when the simulator is off and there is no usable GPU.
* ``SIM``: running in the simulator; ``FULL``: a real GPU asked to run the full-size shapes
  (``DDPM_KERNELS_FULL=1``).
* ``fast_simulator_barriers``: an autouse fixture for the importing module (import it by name).
* ``small_conv_tiles``: a fixture (import it by name, then use it) that runs every convolution on
  small version-3 tiles in the simulator, for tests of whole models and training steps.
* ``_make_simulator_shared_arrays_atomic``: the simulator's ``cuda.shared.array`` looks up and
  stores a block's array in a dict without a lock, so two threads of a block that reach the line
  together can each allocate their own (uninitialised) array and never see each other's writes.
  The short GIL switch interval below makes that likely (1 full run in ~5 failed with values
  ~1e35 in v2 noise/conv kernels); the patch makes the lookup atomic.
"""
import os
import sys
import threading

import numpy as np

import pytest

pytest.importorskip("numba_cuda", reason="the GPU kernel tests need numba-cuda (the `test` extra)")

from ddpm_ref.kernels import runtime as kb  # noqa: E402

kb.simulate_unless_disabled()   # before numba.cuda is imported (NUMBA_ENABLE_CUDASIM=0: a real GPU)

try:
    kb.require_gpu()
except kb.GPUUnavailableError as exc:  # numba.cuda imported earlier without the simulator, no GPU
    pytest.skip(f"no GPU and the simulator is off in this process: {exc}", allow_module_level=True)

SIM = kb.is_simulator()


def _make_simulator_shared_arrays_atomic():
    """Replace ``FakeCUDAShared.array`` with a locked copy (idempotent); see the module docstring.
    Static arrays are keyed, as in the simulator, by the calling kernel line (file, line number);
    a wrapper calling the original would key every array by the wrapper's line and alias them."""
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "_ddpm_atomic", False):
        return
    unlocked = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:       # errors and dynamic shared memory: no lookup
            return unlocked(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    array._ddpm_atomic = True
    shared.array = array


if SIM:
    _make_simulator_shared_arrays_atomic()

FULL = os.environ.get("DDPM_KERNELS_FULL", "0") == "1" and not SIM


@pytest.fixture(autouse=True, scope="module")
def fast_simulator_barriers():
    """The simulator runs one Python thread per CUDA thread and polls them at every syncthreads();
    a shorter GIL switch interval makes those barriers about 5x cheaper. Restored afterwards."""
    old = sys.getswitchinterval()
    if SIM:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture()
def small_conv_tiles(monkeypatch):
    """In the simulator, every convolution on small version-3 tiles (16 x 16 on 4 x 4 threads,
    ``kernels.conv.FORCED_TILES``), restored afterwards: a model's dozens of launches then cost
    seconds, where the production tiles' 256 simulated threads per block cost minutes. The
    production tiles have tests of their own (tests/test_kernels_conv.py). On a GPU: no change."""
    if SIM:
        from ddpm_ref.kernels import conv
        monkeypatch.setattr(conv, "FORCED_TILES",
                            conv._tiled_kernels_v3("small3", 16, 16, 4, tx=4, ty=4, register=False))
