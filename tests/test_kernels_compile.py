"""Every GPU kernel compiles to PTX for sm_90 (H100) with the simulator off, in its own process.

The simulator runs kernels as Python, so a kernel can pass every simulator test and still fail to
compile (a type Numba cannot infer, an integer promotion to float64, an unsupported call). This test
runs ``python -m ddpm_ref.kernels.compile_check --cc 9.0`` in a subprocess with
NUMBA_ENABLE_CUDASIM=0 and requires every registered kernel to compile. It needs NVVM and NVRTC but
no GPU; where that toolchain is missing it is skipped with the reason (install the ``nvidia-cuda-nvrtc``
wheel, and ``nvidia-nvvm`` on machines without a CUDA toolkit).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba_cuda", reason="the GPU kernel tests need numba-cuda (the `test` extra)")

EXPECTED = {  # every kernel the launchers use; a kernel added without being compiled here fails
    "noise.philox_bits_kernel", "noise.philox_float_kernel", "noise.q_sample_kernel",
    "noise.mse_noise_kernel", "noise.reverse_step_kernel", "optim.grad_sq_norm_kernel",
    "optim.adamw_ema_kernel", "optim.ema_kernel", "conv.conv2d_db_kernel",
    *(f"conv.conv2d_{kind}_kernel_{v}" for kind in ("fwd", "dx", "dw") for v in ("v1", "v2")), "norm.group_norm_fwd_kernel",
    "norm.group_norm_bwd_kernel", "attention.softmax_rows_kernel",
    "attention.softmax_backward_rows_kernel", "loss.mse_kernel", "loss.mse_grad_kernel",
    "activation.silu_kernel", "activation.dropout_kernel", "resample.upsample_nearest2x_kernel",
    "embedding.embedding_gather_kernel", "embedding.embedding_scatter_kernel",
}


def test_every_kernel_compiles_for_sm90():
    # Two shards in two processes at once: the machine has 2 cores and compiling is single-threaded.
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    procs = [subprocess.Popen([sys.executable, "-m", "ddpm_ref.kernels.compile_check", "--cc", "9.0",
                               "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    compiled, failed = {}, {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"compile_check printed no result (rc {proc.returncode}): {err[-3000:]}"
        result = json.loads(lines[-1])
        if proc.returncode == 3:
            pytest.skip(f"no CUDA compiler toolchain here (NVVM/NVRTC): {result['toolchain']}")
        assert proc.returncode in (0, 1), err[-3000:]
        compiled.update(result["compiled"])
        failed.update(result["failed"])
    assert failed == {}, failed
    assert set(compiled) >= EXPECTED, sorted(EXPECTED - set(compiled))
    assert all(n > 1000 for n in compiled.values())   # real PTX, not an empty module
