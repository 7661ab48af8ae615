"""Softmax attention on the GPU: cuBLAS for the four matmuls, our kernels for the softmax and its
backward.

What it is: the GPU twin of ``ddpm_ref/ops/attention.py`` (Vaswani et al. 2017, the single-head
self-attention of the DDPM U-Net at 16x16: B = batch, L = 256 pixels, d = channels):

    S = q k^T / sqrt(d),  P = softmax(S) (rows),  out = P v
    dv = P^T dout,  dP = dout v^T,  dS = P (dP - rowsum(dP P)) / sqrt(d),  dq = dS k,  dk = dS^T q

The four batched GEMMs go to cuBLAS through CuPy's ``matmul`` (NumPy's in the simulator): at these
sizes (L = 256, d = 256) a library GEMM is honestly the best tool we have, and writing our own would
only reproduce it more slowly. The row softmax (with the 1/sqrt(d) scale folded in) and the softmax
backward (with the row sum, the product and the scale fused) are our kernels, one block per row.

What it is not: FlashAttention. P (B, L, L) is materialised (B * 256 KB in float32 for the CIFAR
shapes), as the reference does; a fused tiled attention kernel would be the next version.
"""
from __future__ import annotations

import math

import numpy as np

from . import runtime as _b
from ._jit import cuda, kernel
from numba import float32

__all__ = ["attention_forward", "attention_backward", "softmax"]

_THREADS = 256
_F2 = "float32[:, ::1]"


@kernel(f"void({_F2}, float32)")
def softmax_rows_kernel(s, scale):
    """In place, one block per row: s <- softmax(scale * s) along the row (max-subtracted)."""
    red = cuda.shared.array(_THREADS, float32)
    rows = s.shape[0]
    L = s.shape[1]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for row in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        m = float32(-math.inf)
        for j in range(tid, L, nt):
            m = max(m, s[row, j] * scale)
        red[tid] = m
        cuda.syncthreads()
        h = nt // 2
        while h > 0:
            if tid < h:
                red[tid] = max(red[tid], red[tid + h])
            cuda.syncthreads()
            h //= 2
        m = red[0]
        cuda.syncthreads()
        acc = float32(0.0)
        for j in range(tid, L, nt):
            e = math.exp(s[row, j] * scale - m)
            s[row, j] = e
            acc += e
        red[tid] = acc
        cuda.syncthreads()
        h = nt // 2
        while h > 0:
            if tid < h:
                red[tid] += red[tid + h]
            cuda.syncthreads()
            h //= 2
        inv = float32(1.0) / red[0]
        cuda.syncthreads()
        for j in range(tid, L, nt):
            s[row, j] = s[row, j] * inv


@kernel(f"void({_F2}, {_F2}, float32)")
def softmax_backward_rows_kernel(dp, p, scale):
    """In place, one block per row: dp <- scale * P (dP - rowsum(dP P))."""
    red = cuda.shared.array(_THREADS, float32)
    rows = p.shape[0]
    L = p.shape[1]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for row in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        acc = float32(0.0)
        for j in range(tid, L, nt):
            acc += dp[row, j] * p[row, j]
        red[tid] = acc
        cuda.syncthreads()
        h = nt // 2
        while h > 0:
            if tid < h:
                red[tid] += red[tid + h]
            cuda.syncthreads()
            h //= 2
        total = red[0]
        cuda.syncthreads()
        for j in range(tid, L, nt):
            dp[row, j] = (p[row, j] * (dp[row, j] - total)) * scale


def _row_launch(rows):
    if _b.is_simulator():
        return min(rows, 2), 32
    return max(1, min(rows, 65535)), _THREADS


def _softmax_rows(s, scale):
    """In place: the row softmax of ``scale * s`` over the last axis of a C-contiguous float32 device
    array (one block per row); returns ``s``. What attention_forward runs, the scale folded in."""
    L = int(s.shape[-1])
    rows = int(s.size // max(L, 1))
    if rows:
        blocks, threads = _row_launch(rows)
        softmax_rows_kernel[blocks, threads](s.reshape(rows, L), np.float32(scale))
    return s


def softmax(s, axis=-1):
    """Numerically stable softmax of a float32 device array along ``axis``: a new array, ``s`` is not
    modified (the reference's signature and semantics, ``ddpm_ref.ops.attention.softmax``)."""
    _b.check_array(s, "s", contiguous=False)
    if s.ndim == 0:
        raise ValueError("softmax needs an array with at least one axis, got a 0-d array")
    ax = int(axis)
    if not -s.ndim <= ax < s.ndim:
        raise ValueError(f"softmax: axis {axis} is out of range for an array of shape {tuple(s.shape)}")
    xp = _b.xp()
    p = xp.array(xp.moveaxis(s, ax, -1), order="C", copy=True)        # the copy the result is written in
    return xp.ascontiguousarray(xp.moveaxis(_softmax_rows(p, 1.0), -1, ax))


def attention_forward(q, k, v):
    """``q (B, Lq, d)``, ``k (B, Lk, d)``, ``v (B, Lk, dv)`` -> ``(out (B, Lq, dv), cache)``.

    The cache holds q, k, v and the attention weights P (B, Lq, Lk), as the reference.
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        _b.check_array(a, name, ndim=3)
    B, Lq, d = (int(s) for s in q.shape)
    if k.shape[0] != B or k.shape[2] != d:
        raise ValueError(f"attention: k has shape {tuple(k.shape)}, expected ({B}, Lk, {d}) to match q {tuple(q.shape)}")
    if tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"attention: v has shape {tuple(v.shape)}, expected ({B}, {k.shape[1]}, dv) to match k {tuple(k.shape)}")
    xp = _b.xp()
    scale = np.float32(1.0 / np.sqrt(d))
    s = xp.ascontiguousarray(xp.matmul(q, k.transpose(0, 2, 1)))     # (B, Lq, Lk)  cuBLAS
    p = _softmax_rows(s, scale)                                       # our kernel, scale folded in
    out = xp.matmul(p, v)                                             # (B, Lq, dv)  cuBLAS
    return out, {"q": q, "k": k, "v": v, "p": p, "scale": scale}


def attention_backward(dout, cache):
    """Gradients of :func:`attention_forward`: ``(dq, dk, dv)``."""
    q, k, v, p = cache["q"], cache["k"], cache["v"], cache["p"]
    _b.check_array(dout, "dout", shape=(q.shape[0], q.shape[1], v.shape[2]))
    xp = _b.xp()
    dv = xp.matmul(p.transpose(0, 2, 1), dout)                        # (B, Lk, dv)  P^T dout
    ds = xp.ascontiguousarray(xp.matmul(dout, v.transpose(0, 2, 1)))  # (B, Lq, Lk)  dP
    rows, L = int(p.shape[0] * p.shape[1]), int(p.shape[2])
    blocks, threads = _row_launch(rows)
    softmax_backward_rows_kernel[blocks, threads](ds.reshape(rows, L), p.reshape(rows, L),
                                                  np.float32(cache["scale"]))
    dq = xp.matmul(ds, k)                                             # (B, Lq, d)
    dk = xp.matmul(ds.transpose(0, 2, 1), q)                          # (B, Lk, d)
    return dq, dk, dv
