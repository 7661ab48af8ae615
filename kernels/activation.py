"""SiLU and dropout on the GPU; the dropout mask lives in registers, never in memory.

What it is: the GPU twin of ``ddpm_ref/ops/activation.py``:

* SiLU (Elfwing et al. 2018; the DDPM U-Net's nonlinearity): ``y = x sigmoid(x)``,
  ``dx = dy s (1 + x (1 - s))``, ``s = sigmoid(x)``, elementwise kernels.
* Inverted dropout (Srivastava et al. 2014; DDPM uses p = 0.1 in every residual block): element ``e``
  of sample ``index[n]`` is kept where ``rng.uniform(seed, Stream.DROPOUT, index, step, sub=layer)
  >= p``, decided from the raw Philox word as ``ddpm_ref.ops.activation.dropout_mask`` does
  (``w >= (T & ~1) << 8``, ``T = ceil(float32(p) 2^24)``). The forward kernel draws the word in
  registers; the backward kernel draws it again from the same address instead of reading a stored
  mask: the cache holds only the address (seed, index, step, layer), so dropout costs no memory.

What it is not: a fused conv+dropout (the U-Net applies dropout between GroupNorm+SiLU and the second
conv; fusing it into the conv's gather is a possible next version).
"""
from __future__ import annotations

import math

import numpy as np

from . import runtime as _b
from ._jit import cuda, kernel
from .rng import philox4x32_10
from numba import float32, uint64

__all__ = ["silu_forward", "silu_backward", "dropout_forward", "dropout_backward"]

_THREADS = 256
_F1 = "float32[::1]"
_F2 = "float32[:, ::1]"


@kernel(f"void({_F1}, {_F1}, {_F1}, int32)")
def silu_kernel(x, dy, out, backward):
    """forward (0): out = x / (1 + exp(-x)); backward (1): out = dy s (1 + x (1 - s))."""
    one = float32(1.0)
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        v = x[i]
        # exp(-v) clamped below float32's overflow (e^88 ~ 1.7e38): for v < -88, y and s are
        # ~1e-37 instead of the reference's exact 0, and the simulator's float64 exp never overflows.
        e = math.exp(min(-v, float32(88.0)))
        if backward == 0:
            out[i] = v / (one + e)
        else:
            s = one / (one + e)
            out[i] = dy[i] * (s * (one + v * (one - s)))


@kernel(f"void({_F2}, {_F2}, uint32[::1], uint32, uint32, uint32, uint32, uint64, float32)")
def dropout_kernel(x, y, index, step, layer, seed, stream, threshold, scale):
    """y[n, e] = x[n, e] * scale where Philox word(n, e) >= threshold, else 0 (forward and backward)."""
    n = x.shape[0]
    size = x.shape[1]
    nb = (size + 3) // 4
    for g in range(cuda.grid(1), n * nb, cuda.gridsize(1)):
        i = g // nb
        blk = g - i * nb
        w0, w1, w2, w3 = philox4x32_10(blk, index[i], step, layer, seed, stream)
        e = blk * 4
        for j in range(4):
            if e + j < size:
                if j == 0:
                    w = w0
                elif j == 1:
                    w = w1
                elif j == 2:
                    w = w2
                else:
                    w = w3
                if uint64(w) >= threshold:
                    y[i, e + j] = x[i, e + j] * scale
                else:
                    y[i, e + j] = float32(0.0)


def _silu(x, dy, backward):
    _b.check_array(x, "x")
    xp = _b.xp()
    out = xp.empty_like(x)
    n = int(x.size)
    if n:
        blocks, threads = _b.launch_1d(n, _THREADS)
        silu_kernel[blocks, threads](x.reshape(n), (dy if dy is not None else x).reshape(n), out.reshape(n),
                                     np.int32(1 if backward else 0))
    return out


def silu_forward(x):
    """``y = x sigmoid(x)``; the cache is x."""
    return _silu(x, None, False), {"x": x}


def silu_backward(dy, cache):
    """``dx = dy s (1 + x (1 - s))``, s recomputed from the cached x."""
    _b.check_array(dy, "dy", shape=cache["x"].shape)
    return _silu(cache["x"], dy, True)


def _threshold(p: float) -> int:
    """The uint32 word threshold of ``u >= p`` (see ddpm_ref.ops.activation.dropout_mask); 2**32 = drop all."""
    t = math.ceil(float(np.float32(p)) * 2.0 ** 24)
    return min((t & ~1) << 8, 2**32)


def _dropout(x, cache):
    xp = _b.xp()
    n = int(x.shape[0])
    x2 = x.reshape(n, -1)
    y = xp.empty_like(x2)
    if x2.size:
        blocks, threads = _b.launch_1d(n * ((x2.shape[1] + 3) // 4), _THREADS)
        dropout_kernel[blocks, threads](x2, y, _b.to_device(cache["index"]), cache["step"], cache["layer"],
                                        cache["seed"], cache["stream"], np.uint64(cache["threshold"]),
                                        np.float32(cache["scale"]))
    return y.reshape(x.shape)


def dropout_forward(x, p, seed, index, step, layer, train=True):
    """Inverted dropout, mask drawn in registers; identity when ``p == 0`` or not train.

    Returns ``(y, cache)``; the cache holds the mask's address, not the mask.
    """
    from ddpm_ref.rng import Stream, check_seed
    _b.check_array(x, "x")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    if x.ndim < 1:
        raise ValueError(f"dropout expects x of shape (N, ...), got shape {tuple(x.shape)}")
    if p == 0.0 or not train:
        return x, {"identity": True, "shape": tuple(x.shape)}
    index = np.asarray(index)
    if index.ndim != 1 or index.shape[0] != x.shape[0] or index.dtype.kind not in "iu" or \
            (index.size and (index.min() < 0 or index.max() > 0xFFFFFFFF)):
        raise ValueError(f"dropout index must be integers in [0, 2**32) of shape ({x.shape[0]},), got "
                         f"{index.dtype} {index.shape}")
    for name, v in (("step", step), ("layer", layer)):
        if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2**32:
            raise ValueError(f"dropout {name} must be an integer in [0, 2**32), got {v!r}")
    cache = {"identity": False, "shape": tuple(x.shape), "index": index.astype(np.uint32),
             "step": np.uint32(step), "layer": np.uint32(layer), "seed": np.uint32(check_seed(seed)),
             "stream": np.uint32(Stream.DROPOUT), "threshold": _threshold(p), "scale": 1.0 / (1.0 - p)}
    return _dropout(x, cache), cache


def dropout_backward(dy, cache):
    """``dx = dy m / (1 - p)``, the mask m drawn again from its address; ``dy`` for the identity."""
    _b.check_array(dy, "dy", shape=cache["shape"])
    if cache["identity"]:
        return dy
    return _dropout(dy, cache)
