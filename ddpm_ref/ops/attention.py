"""Scaled dot-product attention core (Vaswani et al. 2017) as a forward/backward pair.

What it is: ``out = softmax(q k^T / sqrt(d)) v`` on batched sequences, the core of the DDPM U-Net's
self-attention blocks over spatial positions (Ho et al. 2020, appendix B: attention at 16x16 on
CIFAR-10; diffusers' Attention with one head). The model does the rest: GroupNorm, the q/k/v/out
projections (ops.linear), the reshape of (N, C, H, W) into (N*heads, H*W, C/heads) sequences
(heads folded into the batch axis B) and the residual connection. What it is not: no masking,
no projections, no dropout on the attention weights.

Forward, per batch element (softmax over the last axis, stabilised by subtracting the row max,
which leaves it unchanged: softmax(s - m) = softmax(s)):

    S = q k^T / sqrt(d)          (B, Lq, Lk)
    P = softmax(S)               (B, Lq, Lk)
    out = P v                    (B, Lq, dv)

Backward (dout given):

    dv = P^T dout
    dP = dout v^T
    dS = P * (dP - rowsum(dP * P))        softmax Jacobian: dS_ij = P_ij (dP_ij - sum_k dP_ik P_ik)
    dq = dS k / sqrt(d),   dk = dS^T q / sqrt(d)
"""
import numpy as np

from ._checks import check_float as _check_float

__all__ = ["softmax", "attention_forward", "attention_backward"]


def softmax(s, axis=-1):
    """Numerically stable softmax along ``axis`` (a new array; ``s`` is not modified)."""
    _check_float("s", s)
    p = s - s.max(axis=axis, keepdims=True)      # largest entry 0: exp never overflows
    np.exp(p, out=p)
    p /= p.sum(axis=axis, keepdims=True)         # the max's term is 1, so the sum is >= 1
    return p


def _softmax_inplace(s, axis=-1):
    """:func:`softmax` written over ``s`` itself (returned): no second (B, Lq, Lk) array."""
    s -= s.max(axis=axis, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=axis, keepdims=True)
    return s


def attention_forward(q, k, v):
    """``q (B, Lq, d)``, ``k (B, Lk, d)``, ``v (B, Lk, dv)`` -> ``(out (B, Lq, dv), cache)``.

    The cache holds q, k, v and the attention weights P (B, Lq, Lk).
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        _check_float(name, a)
        if a.ndim != 3:
            raise ValueError(f"attention expects {name} of shape (B, L, d), got shape {a.shape}")
    B, Lq, d = q.shape
    if k.shape[0] != B or k.shape[2] != d:
        raise ValueError(f"attention: k has shape {k.shape}, expected ({B}, Lk, {d}) to match q {q.shape}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention: v has shape {v.shape}, expected ({B}, {k.shape[1]}, dv) to match k {k.shape}")
    dt = q.dtype
    k = k.astype(dt, copy=False)
    v = v.astype(dt, copy=False)
    scale = dt.type(1.0 / np.sqrt(d))
    s = q @ k.transpose(0, 2, 1)                  # (B, Lq, Lk)
    s *= scale
    p = _softmax_inplace(s)                       # (B, Lq, Lk), s's memory: s is ours alone
    out = p @ v                                   # (B, Lq, dv)
    return out, {"q": q, "k": k, "v": v, "p": p, "scale": scale}


def attention_backward(dout, cache):
    """Gradients of ``attention_forward``: ``(dq, dk, dv)`` shaped like ``q, k, v``."""
    _check_float("dout", dout)
    q, k, v, p = cache["q"], cache["k"], cache["v"], cache["p"]
    if dout.shape != (q.shape[0], q.shape[1], v.shape[2]):
        raise ValueError(f"attention_backward: dout has shape {dout.shape}, expected "
                         f"{(q.shape[0], q.shape[1], v.shape[2])}")
    dt = dout.dtype
    q, k, v, p = (a.astype(dt, copy=False) for a in (q, k, v, p))
    scale = dt.type(cache["scale"])
    dv = p.transpose(0, 2, 1) @ dout              # (B, Lk, dv)   P^T dout
    ds = dout @ v.transpose(0, 2, 1)              # (B, Lq, Lk)   dP = dout v^T
    row = np.einsum("bij,bij->bi", ds, p)[..., None]   # (B, Lq, 1) rowsum(dP * P)
    ds -= row
    ds *= p                                       # dS = P (dP - rowsum(dP P))
    ds *= scale                                   # fold the 1/sqrt(d) of S = q k^T / sqrt(d)
    dq = ds @ k                                   # (B, Lq, d)
    dk = ds.transpose(0, 2, 1) @ q                # (B, Lk, d)
    return dq, dk, dv
