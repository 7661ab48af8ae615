"""Dense layers on the GPU: cuBLAS through CuPy, and nothing of ours.

What it is: the GPU twin of ``ddpm_ref/ops/linear.py`` (``y = x w^T + b``; ``dx = dy w``,
``dw = dy^T x``, ``db = sum dy``). In the DDPM U-Net these are the time-embedding MLP and the
per-block time projections: (128 x 512) by (512 x 512) GEMMs, and the attention projections
(32768 x 256 by 256 x 256). A library GEMM is honestly the best tool for them, so this file calls
``matmul`` (cuBLAS on a GPU, NumPy's BLAS in the simulator) and CuPy's reductions; it launches no
kernel of ours.
"""
from __future__ import annotations

from . import runtime as _b

__all__ = ["linear_forward", "linear_backward"]


def linear_forward(x, w, b=None):
    """``x (..., in)``, ``w (out, in)``, ``b (out,)`` or None -> ``(y (..., out), cache)``."""
    _b.check_array(x, "x", contiguous=False)            # matmul takes any strides (no kernel of ours)
    _b.check_array(w, "w", ndim=2)
    if x.ndim < 1 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"linear weight shape {tuple(w.shape)} expects {w.shape[1]} input features, "
                         f"x has shape {tuple(x.shape)}")
    if b is not None:
        _b.check_array(b, "b", shape=(w.shape[0],))
    xp = _b.xp()
    y = xp.matmul(x, w.T)                                          # (..., out)
    if b is not None:
        y += b
    return y, {"x": x, "w": w, "has_bias": b is not None}


def linear_backward(dy, cache):
    """``(dx, dw, db)`` of :func:`linear_forward` (db None without bias)."""
    x, w = cache["x"], cache["w"]
    _b.check_array(dy, "dy", shape=tuple(x.shape[:-1]) + (w.shape[0],), contiguous=False)
    xp = _b.xp()
    dx = xp.matmul(dy, w)                                          # (..., in)
    dy2 = dy.reshape(-1, w.shape[0])
    dw = xp.matmul(dy2.T, x.reshape(-1, w.shape[1]))               # (out, in)
    db = dy2.sum(axis=0) if cache["has_bias"] else None
    return dx, dw, db
