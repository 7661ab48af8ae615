"""Shared setup of the GPU kernel tests (tests/test_kernels_*.py), imported first by each of them.

* Skips the importing module, with a reason, when numba-cuda is missing (the ``test`` extra).
* Runs the kernels in Numba's CUDA simulator unless ``NUMBA_ENABLE_CUDASIM=0`` asks for a real GPU
  (``benchmarks/gpu_check.sh`` does); this must happen before ``numba.cuda`` is first imported.
* Skips the module when the simulator is off and there is no usable GPU.
* ``SIM``: running in the simulator; ``FULL``: a real GPU asked to run the full-size shapes
  (``DDPM_KERNELS_FULL=1``).
* ``fast_simulator_barriers``: an autouse fixture for the importing module (import it by name).
"""
import os
import sys

import pytest

pytest.importorskip("numba_cuda", reason="the GPU kernel tests need numba-cuda (the `test` extra)")

from ddpm_ref.kernels import runtime as kb  # noqa: E402

kb.simulate_unless_disabled()   # before numba.cuda is imported (NUMBA_ENABLE_CUDASIM=0: a real GPU)

try:
    kb.require_gpu()
except kb.GPUUnavailableError as exc:  # numba.cuda imported earlier without the simulator, no GPU
    pytest.skip(f"no GPU and the simulator is off in this process: {exc}", allow_module_level=True)

SIM = kb.is_simulator()
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
