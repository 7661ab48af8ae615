"""Activations: SiLU (swish) and dropout with a counter-RNG mask, as forward/backward pairs.

What it is: the two element-wise layers of the DDPM residual block (Ho et al. 2020, appendix B:
"swish" nonlinearity, dropout 0.1 on CIFAR-10). What it is not: no in-place variants, no
global random state: the dropout mask is a pure function of (seed, sample index, step, layer)
drawn from ddpm_ref.rng (stream DROPOUT), so it does not depend on the batch size or order, a
resumed run draws the same masks, and the GPU backend can reproduce them bit for bit.

    silu(x)  = x * sigmoid(x),   silu'(x) = s + x s (1 - s) = s (1 + x (1 - s)),  s = sigmoid(x)
    dropout(x)[n, ...] = x[n, ...] * m[n, ...] / (1 - p),  m = [u >= p],
        u = rng.uniform(seed, Stream.DROPOUT, index, step, x.shape[1:], sub=layer)
"""
import math

import numpy as np

from .. import rng as _rng
from ._checks import check_float as _check_float

__all__ = ["sigmoid", "silu_forward", "silu_backward", "dropout_mask", "dropout_forward", "dropout_backward"]


def sigmoid(x, out=None):
    """Logistic function ``1 / (1 + exp(-x))``; exp overflows to inf for x << 0, giving exactly 0."""
    _check_float("x", x)
    out = np.negative(x, out=out)
    with np.errstate(over="ignore", under="ignore"):
        np.exp(out, out=out)
    out += 1
    np.reciprocal(out, out=out)
    return out


def silu_forward(x):
    """``y = x * sigmoid(x)``, same shape and dtype as ``x``; the cache is ``x``."""
    _check_float("x", x)
    y = np.negative(x)
    with np.errstate(over="ignore", under="ignore"):
        np.exp(y, out=y)                     # exp(-x), inf for very negative x
    y += 1
    np.divide(x, y, out=y)                   # x / (1 + exp(-x)) = x sigmoid(x); x / inf = 0
    return y, {"x": x}


def silu_backward(dy, cache):
    """``dx = dy * s * (1 + x * (1 - s))`` with ``s = sigmoid(x)`` recomputed from the cached x."""
    _check_float("dy", dy)
    x = cache["x"]
    if dy.shape != x.shape:
        raise ValueError(f"silu_backward: dy has shape {dy.shape}, expected {x.shape}")
    s = sigmoid(x.astype(dy.dtype, copy=False))  # s
    dx = np.subtract(1, s)                       # 1 - s
    dx *= x                                      # x (1 - s)
    dx += 1                                      # 1 + x (1 - s)
    dx *= s                                      # silu'(x)
    dx *= dy
    return dx


def dropout_mask(shape, p, seed, index, step, layer):
    """Boolean keep-mask ``(N,) + shape[1:]``: ``uniform(seed, DROPOUT, index, step, sub=layer) >= p``.

    Element ``e`` of sample ``index[n]`` depends only on (seed, index[n], step, layer, e).
    Evaluated on the raw Philox words, without forming the floats: rng's uniform is
    ``u = k 2^-24`` with ``k = (w >> 8) | 1`` (exact in float32), so with ``T = ceil(float32(p) 2^24)``
    ``u >= p  <=>  k >= T  <=>  (w >> 8) >= T & ~1`` (k is odd: for even T, k >= T means
    w >> 8 >= T; for odd T it means w >> 8 >= T - 1)  ``<=>  w >= (T & ~1) << 8``.
    One comparison per element instead of a shift, an or, a float conversion and a multiply.
    """
    index = np.asarray(index)
    if index.ndim != 1 or index.shape[0] != shape[0]:
        raise ValueError(f"dropout index must have shape ({shape[0]},) (one per sample), got {index.shape}")
    words = _rng.random_bits(seed, _rng.Stream.DROPOUT, index, step, tuple(shape[1:]), sub=layer)
    T = math.ceil(float(np.float32(p)) * 2.0 ** 24)
    threshold = (T & ~1) << 8
    if threshold > 0xFFFFFFFF:            # float32(p) rounds to 1: no u in (0, 1) reaches it
        return np.zeros(words.shape, dtype=bool)
    return words >= np.uint32(threshold)


def dropout_forward(x, p, seed, index, step, layer, train=True):
    """Inverted dropout: kept values scaled by ``1 / (1 - p)``; identity when ``p == 0`` or not train.

    ``x (N, ...)``; ``index`` (N,) the samples' indices (data-set indices while training), ``step``
    the training step, ``layer`` a number unique to this dropout layer within the model.
    Returns ``(y, cache)``; the cache holds the boolean mask (None for the identity).
    """
    _check_float("x", x)
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    if x.ndim < 1:
        raise ValueError(f"dropout expects x of shape (N, ...), got shape {x.shape}")
    if p == 0.0 or not train:
        return x, {"mask": None, "scale": 1.0, "shape": x.shape}
    mask = dropout_mask(x.shape, p, seed, index, step, layer)   # (N, ...) bool
    scale = 1.0 / (1.0 - p)
    y = x * x.dtype.type(scale)
    y *= mask
    return y, {"mask": mask, "scale": scale, "shape": x.shape}


def dropout_backward(dy, cache):
    """``dx = dy * m / (1 - p)`` (the same mask as the forward pass), or ``dy`` for the identity."""
    _check_float("dy", dy)
    if dy.shape != cache["shape"]:
        raise ValueError(f"dropout_backward: dy has shape {dy.shape}, expected {cache['shape']}")
    if cache["mask"] is None:
        return dy
    dx = dy * dy.dtype.type(cache["scale"])
    dx *= cache["mask"]
    return dx
