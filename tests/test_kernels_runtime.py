"""Choosing the GPU backend: one clear message naming what is missing, and nothing else breaks.

Each case runs in its own Python process, with the missing piece hidden from the import system
(``sys.modules[name] = None`` makes ``import name`` raise ImportError), because Numba fixes the
simulator setting at import time and CuPy is not installed on CI machines anyway.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba_cuda", reason="the GPU kernel tests need numba-cuda (the `test` extra)")


def _run(code, sim="0"):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM=sim)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PROBE = """
import json
import ddpm_ref, ddpm_ref.kernels as k
from ddpm_ref import diffusion, rng, samplers, schedule, ops   # the package works without the GPU stack
try:
    name = k.backend()
    msg = None
except k.GPUUnavailableError as exc:
    name, msg = None, str(exc)
try:
    import ddpm_ref.kernels.conv
    conv_import = "ok"
except k.GPUUnavailableError as exc:
    conv_import = str(exc)
try:
    import numba.cuda
    driver = bool(numba.cuda.is_available()) and not numba.cuda.config.ENABLE_CUDASIM
except ImportError:
    driver = None
print(json.dumps({"backend": name, "message": msg, "conv_import": conv_import, "driver": driver}))
"""


def test_no_cupy_and_no_driver():
    out = _run("import sys; sys.modules['cupy'] = None\n" + _PROBE)
    assert out["backend"] is None
    msg = out["message"]
    assert msg.startswith("the GPU backend is unavailable: ")
    assert "CuPy is not installed" in msg
    # On a GPU machine the driver is there and only CuPy is named; elsewhere both are.
    assert ("no usable CUDA driver or GPU" in msg) == (not out["driver"])
    assert "numba-cuda (the Numba CUDA target) is not installed" not in msg
    assert "pip install 'ddpm-ref[gpu]'" in msg and msg.count("\n") == 0     # one line, one message
    assert "NUMBA_ENABLE_CUDASIM=1" in msg     # numba-cuda is there, so the simulator is an option
    assert out["conv_import"] == "ok"          # the kernels import; only running them needs a GPU


def test_no_numba_cuda():
    out = _run("import sys; sys.modules['numba_cuda'] = None; sys.modules['numba.cuda'] = None\n"
               "sys.modules['cupy'] = None\n" + _PROBE)
    msg = out["message"]
    assert "numba-cuda (the Numba CUDA target) is not installed" in msg and "CuPy is not installed" in msg
    assert "NUMBA_ENABLE_CUDASIM" not in msg   # the simulator needs numba-cuda too: no such advice
    assert "numba-cuda" in out["conv_import"] and "pip install 'ddpm-ref[gpu]'" in out["conv_import"]


def test_cupy_without_driver():
    fake = """
import sys, types
cupy = types.ModuleType("cupy"); cupy.cuda = types.SimpleNamespace()
class CUDARuntimeError(RuntimeError):
    pass
def _count():
    raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
cupy.cuda.runtime = types.SimpleNamespace(getDeviceCount=_count)
sys.modules["cupy"] = cupy
"""
    out = _run(fake + _PROBE)
    msg = out["message"]
    assert "CuPy is not installed" not in msg
    assert "no usable CUDA driver or GPU (CUDARuntimeError: cudaErrorInsufficientDriver" in msg


def test_simulator_backend():
    out = _run("import sys; sys.modules['cupy'] = None\n" + _PROBE, sim="1")
    assert out == {"backend": "simulator", "message": None, "conv_import": "ok", "driver": False}


def test_device_arrays_are_c_contiguous_and_host_arrays_are_refused_on_a_gpu():
    out = _run("""
import json, numpy as np
from ddpm_ref.backend import get_backend
from ddpm_ref.kernels import runtime
f = np.asfortranarray(np.ones((2, 3), np.float32))
gpu, cpu = get_backend("gpu"), get_backend("cpu")
res = {"gpu_c": bool(gpu.asarray(f).flags.c_contiguous), "cpu_same": cpu.asarray(f) is f}
runtime.check_array(np.zeros((2, 3), np.float32), "x")          # the simulator's arrays are NumPy
runtime.is_simulator = lambda: False                           # as on a real GPU
try:
    runtime.check_array(np.zeros((2, 3), np.float32), "x")
    res["host_on_gpu"] = "accepted"
except ValueError as e:
    res["host_on_gpu"] = str(e)
print(json.dumps(res))
""", sim="1")
    # the simulated GPU backend copies to C order as a real one does (kernels refuse other layouts);
    # the CPU backend keeps the caller's array (its ops take any layout)
    assert out["gpu_c"] and out["cpu_same"]
    assert out["host_on_gpu"].startswith("x is a host NumPy array")


def test_bench_conv_shapes_cover_the_cifar_unet():
    # The conv benchmark enumerates the cifar preset's convolutions by hand (diffusers' block
    # structure); it must list exactly the U-Net's 65 conv weights (31,234,816 parameters).
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.bench_kernels import cifar_conv_shapes
    from ddpm_ref.models import UNet
    convs = [shape for _, shape in UNet.from_preset("cifar").layout.to_list() if len(shape) == 4]
    rows = cifar_conv_shapes()
    assert sum(r[0] for r in rows) == len(convs) == 65
    assert sum(n * o * c * k * k for n, c, o, h, k, st, p in rows) == sum(int(np.prod(s)) for s in convs)
