"""ddpm_ref.kernels: the GPU backend, our own fused CUDA kernels (Numba CUDA on CuPy arrays).

Installed from the ``kernels/`` folder as ``ddpm_ref.kernels`` (the bare name ``kernels`` is taken on
PyPI). It mirrors ``ddpm_ref/ops`` file for file and name for name (``conv.py``, ``norm.py``,
``attention.py``, ``loss.py``, ``activation.py``, ``resample.py``, ``linear.py``,
``embedding.py``), with the same signatures and the same ``(y, cache)`` / ``backward(dy, cache)``
contract on device arrays (CuPy on a GPU, NumPy in the simulator), plus:

* ``noise.py``: Philox noise in registers (bit-identical to ``ddpm_ref.rng``), the fused forward
  process ``x_t`` + training target, the loss kernel that regenerates the noise, and the fused DDPM
  and DDIM reverse steps;
* ``optim.py``: AdamW and the EMA update as one kernel over the flat parameter buffer;
* ``compile_check.py``: every kernel compiled to PTX for sm_90 without a GPU;
* ``runtime.py``: :func:`backend` / :func:`require_gpu` (one clear message naming what is missing:
  CuPy, numba-cuda, or a driver), ``xp()``, ``to_device``/``to_host``.

Nothing here imports CuPy or Numba until a kernel module is imported, so ``import ddpm_ref.kernels``
always works; ``ddpm_ref.kernels.noise`` etc. import Numba and fail with the same clear message when
it is missing. Set ``NUMBA_ENABLE_CUDASIM=1`` (before Numba is imported) to run every kernel in
Numba's CPU simulator on NumPy arrays.
"""
from .runtime import GPUUnavailableError, backend, is_simulator, require_gpu, to_device, to_host, xp

__all__ = ["GPUUnavailableError", "backend", "require_gpu", "is_simulator", "xp", "to_device", "to_host",
           "MODULES"]

# The kernel modules, in the order the compile check builds them.
MODULES = ("noise", "optim", "conv", "norm", "attention", "loss", "activation", "resample", "linear",
           "embedding")
