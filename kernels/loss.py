"""The weighted MSE loss of DDPM (eq. 14, L_simple) and its gradient on the GPU.

What it is: the GPU twin of ``ddpm_ref/ops/loss.py``:

    per_sample[n] = mean_e (pred[n, e] - target[n, e])^2
    loss          = mean_n w[n] per_sample[n]
    dpred[n, e]   = dloss * w[n] * 2 (pred - target) / (N D)

:func:`mse_forward` runs one block per sample: a float64 block reduction of the squared differences
(the reference also sums in float64). :func:`mse_backward` is one elementwise pass recomputing
``pred - target`` from the cached inputs (nothing else is stored). :func:`mse_forward_backward` does
both in the same pass, which is what a training step wants. The fused variant that also regenerates
the noise (so the target never touches memory) is ``noise.mse_noise_loss``.

What it is not: other losses (the hybrid VB term lives in ``ddpm_ref.diffusion``).
"""
from __future__ import annotations

import numpy as np

from . import runtime as _b
from ._jit import cuda, kernel
from numba import float64

__all__ = ["mse_forward", "mse_backward", "mse_forward_backward"]

_THREADS = 256
_F2 = "float32[:, ::1]"


@kernel(f"void({_F2}, {_F2}, float32[::1], {_F2}, int32, float64[::1])")
def mse_kernel(pred, target, coef, dpred, want_grad, sq_sum):
    """One block per sample: sq_sum[n] = sum (pred - target)^2 in float64; dpred = coef[n] * diff."""
    partial = cuda.shared.array(_THREADS, float64)
    N = pred.shape[0]
    D = pred.shape[1]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        cn = coef[n]
        acc = 0.0
        for e in range(tid, D, nt):
            d = pred[n, e] - target[n, e]
            acc += float64(d) * float64(d)
            if want_grad != 0:
                dpred[n, e] = d * cn
        partial[tid] = acc
        cuda.syncthreads()
        s = nt // 2
        while s > 0:
            if tid < s:
                partial[tid] += partial[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            sq_sum[n] = partial[0]
        cuda.syncthreads()


@kernel(f"void({_F2}, {_F2}, float32[::1], {_F2})")
def mse_grad_kernel(pred, target, coef, dpred):
    """dpred[n, e] = coef[n] * (pred - target), elementwise (grid-stride)."""
    N = pred.shape[0]
    D = pred.shape[1]
    for g in range(cuda.grid(1), N * D, cuda.gridsize(1)):
        n = g // D
        e = g - n * D
        dpred[n, e] = (pred[n, e] - target[n, e]) * coef[n]


def _weights(weights, n):
    if weights is None:
        return None
    w = np.asarray(weights if isinstance(weights, np.ndarray) else _b.to_host(weights))
    if w.shape != (n,) or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"mse: weights must be a float array of shape ({n},), got {w.dtype} with shape {w.shape}")
    return w.astype(np.float64)


def _check(pred, target):
    _b.check_array(pred, "pred")
    if pred.ndim < 1 or pred.shape[0] == 0:
        raise ValueError(f"mse expects pred of shape (N, ...) with N >= 1, got shape {tuple(pred.shape)}")
    _b.check_array(target, "target", shape=pred.shape)
    n = int(pred.shape[0])
    return n, int(pred.size // n)


def _coef(n, d, w, dloss):
    """dloss * 2 w[n] / (N D) in float64, cast once to float32 (as the reference)."""
    ww = np.ones(n) if w is None else w
    return ((float(dloss) * 2.0 / (n * max(d, 1))) * ww).astype(np.float32)


def _row_launch(n):
    if _b.is_simulator():
        return min(n, 2), 32
    return max(1, min(n, 65535)), _THREADS


def _run(pred, target, weights, dloss, want_grad):
    n, d = _check(pred, target)
    w = _weights(weights, n)
    xp = _b.xp()
    p2, t2 = pred.reshape(n, d), target.reshape(n, d)
    dpred = xp.empty_like(p2) if want_grad else xp.empty((1, 1), dtype=xp.float32)
    sq_sum = xp.zeros(n, dtype=xp.float64)
    blocks, threads = _row_launch(n)
    mse_kernel[blocks, threads](p2, t2, _b.to_device(_coef(n, d, w, dloss)), dpred,
                                np.int32(1 if want_grad else 0), sq_sum)
    per_sample = sq_sum / max(d, 1)                                  # (N,) float64
    ww = xp.ones(n, dtype=xp.float64) if w is None else _b.to_device(w)
    loss = float(_b.to_host((ww * per_sample).mean()))
    cache = {"pred": pred, "target": target, "weights": w, "per_sample": per_sample, "D": d}
    return loss, cache, (dpred.reshape(pred.shape) if want_grad else None)


def mse_forward(pred, target, weights=None):
    """``(loss, cache)``: loss a Python float; ``cache["per_sample"]`` the unweighted (N,) float64 means."""
    loss, cache, _ = _run(pred, target, weights, 1.0, False)
    return loss, cache


def mse_backward(cache, dloss=1.0):
    """``dpred = dloss * w_n * 2 (pred - target) / (N D)``, recomputed from the cached inputs."""
    pred, target = cache["pred"], cache["target"]
    n, d = _check(pred, target)
    xp = _b.xp()
    dpred = xp.empty_like(pred)
    blocks, threads = _b.launch_1d(n * d, _THREADS)
    mse_grad_kernel[blocks, threads](pred.reshape(n, d), target.reshape(n, d),
                                     _b.to_device(_coef(n, d, cache["weights"], dloss)),
                                     dpred.reshape(n, d))
    return dpred


def mse_forward_backward(pred, target, weights=None, dloss=1.0):
    """Loss, cache and dpred from one pass over pred and target: ``(loss, cache, dpred)``."""
    return _run(pred, target, weights, dloss, True)
