"""Fully connected layer ``y = x w^T + b`` (torch.nn.Linear's layout) as a forward/backward pair.

What it is: the affine map used by the timestep-embedding MLP, the per-block time projections and
the attention projections of the DDPM U-Net, and by the MLP denoiser. What it is not: no
activation, no autograd, no stored state (the cache is returned).

    y[..., o] = sum_i x[..., i] w[o, i] + b[o]
    dx = dy w,   dw = sum_rows dy^T x,   db = sum_rows dy

where "rows" are all leading axes of ``x`` flattened together.
"""
import numpy as np

from ._checks import check_float as _check_float

__all__ = ["linear_forward", "linear_backward"]


def linear_forward(x, w, b=None):
    """``x (..., in)``, ``w (out, in)``, ``b (out,)`` or None -> ``(y (..., out), cache)``.

    dtype follows ``x``; the cache holds ``x`` and ``w`` (what the backward GEMMs read).
    """
    _check_float("x", x)
    _check_float("w", w)
    if x.ndim < 1:
        raise ValueError(f"linear expects x of shape (..., in), got shape {x.shape}")
    if w.ndim != 2:
        raise ValueError(f"linear expects w of shape (out, in), got shape {w.shape}")
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"linear weight shape {w.shape} expects {w.shape[1]} input features, "
                         f"x has shape {x.shape}")
    if b is not None:
        _check_float("b", b)
        if b.shape != (w.shape[0],):
            raise ValueError(f"linear bias must have shape ({w.shape[0]},), got {b.shape}")
    dt = x.dtype
    w = w.astype(dt, copy=False)
    # One GEMM over all rows (not one per leading index, as a batched matmul would do).
    y = x.reshape(-1, w.shape[1]) @ w.T                     # (rows, out)
    if b is not None:
        y += b.astype(dt, copy=False)
    y = y.reshape(x.shape[:-1] + (w.shape[0],))             # (..., out)
    return y, {"x": x, "w": w, "has_bias": b is not None}


def linear_backward(dy, cache):
    """Gradients of ``linear_forward``: ``(dx, dw, db)`` shaped like ``x, w, b`` (db None if no b)."""
    _check_float("dy", dy)
    x, w = cache["x"], cache["w"]
    if dy.shape != x.shape[:-1] + (w.shape[0],):
        raise ValueError(f"linear_backward: dy has shape {dy.shape}, expected {x.shape[:-1] + (w.shape[0],)}")
    dt = dy.dtype
    w = w.astype(dt, copy=False)
    dy2 = dy.reshape(-1, w.shape[0])                        # (rows, out)
    dx = (dy2 @ w).reshape(x.shape)                         # (..., in)
    x2 = x.reshape(-1, w.shape[1]).astype(dt, copy=False)   # (rows, in)
    dw = dy2.T @ x2                                         # (out, in)
    db = dy2.sum(axis=0) if cache["has_bias"] else None     # (out,)
    return dx, dw, db
