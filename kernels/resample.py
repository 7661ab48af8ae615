"""Nearest 2x upsampling (the U-Net's upsampler, before its conv) and channel concatenation on the GPU.

What it is: the GPU twin of ``ddpm_ref/ops/resample.py`` for the two resampling ops the DDPM U-Net
uses on its decoder path: ``upsample_nearest2x`` (one gather kernel forward, one 2x2-sum kernel
backward) and ``concat`` along channels (the skip connections; a strided copy, done by CuPy, which is
the honest tool for a copy).

What it is not: average pooling (the DDPM U-Net downsamples with a strided conv, conv.py).
"""
from __future__ import annotations

import numpy as np

from . import runtime as _b
from ._jit import cuda, kernel

__all__ = ["upsample_nearest2x_forward", "upsample_nearest2x_backward", "concat_forward", "concat_backward"]

_THREADS = 256
_F4 = "float32[:, :, :, ::1]"


@kernel(f"void({_F4}, {_F4}, int32)")
def upsample_nearest2x_kernel(a, b, backward):
    """forward (0): b (N, C, 2H, 2W) = a[..., h // 2, w // 2]; backward (1): b (N, C, H, W) = 2x2 sums of a."""
    N = b.shape[0]
    C = b.shape[1]
    H = b.shape[2]
    W = b.shape[3]
    for g in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        w = g % W
        r = g // W
        h = r % H
        r //= H
        c = r % C
        n = r // C
        if backward == 0:
            b[n, c, h, w] = a[n, c, h // 2, w // 2]
        else:
            b[n, c, h, w] = (a[n, c, 2 * h, 2 * w] + a[n, c, 2 * h, 2 * w + 1]) + \
                            (a[n, c, 2 * h + 1, 2 * w] + a[n, c, 2 * h + 1, 2 * w + 1])


def upsample_nearest2x_forward(x):
    """``x (N, C, H, W)`` -> ``(y (N, C, 2H, 2W), cache)``."""
    _b.check_array(x, "x", ndim=4)
    N, C, H, W = (int(s) for s in x.shape)
    y = _b.xp().empty((N, C, 2 * H, 2 * W), dtype=np.float32)
    if y.size:
        blocks, threads = _b.launch_1d(y.size, _THREADS)
        upsample_nearest2x_kernel[blocks, threads](x, y, np.int32(0))
    return y, {"shape": (N, C, H, W)}


def upsample_nearest2x_backward(dy, cache):
    """``dx[n, c, h, w]`` = the sum of the 2x2 block of dy it was copied to."""
    N, C, H, W = cache["shape"]
    _b.check_array(dy, "dy", shape=(N, C, 2 * H, 2 * W))
    dx = _b.xp().empty((N, C, H, W), dtype=np.float32)
    if dx.size:
        blocks, threads = _b.launch_1d(dx.size, _THREADS)
        upsample_nearest2x_kernel[blocks, threads](dy, dx, np.int32(1))
    return dx


def concat_forward(xs, axis=1):
    """Concatenate device arrays along ``axis``; the cache holds the split sizes."""
    if not xs:
        raise ValueError("concat needs at least one array")
    for i, a in enumerate(xs):
        _b.check_array(a, f"xs[{i}]")
    axis = int(axis) % xs[0].ndim
    return _b.xp().concatenate(xs, axis=axis), {"sizes": [int(a.shape[axis]) for a in xs], "axis": axis}


def concat_backward(dy, cache):
    """Split dy back into the pieces' gradients (contiguous copies)."""
    xp = _b.xp()
    edges = np.cumsum(cache["sizes"])[:-1].tolist()
    return [xp.ascontiguousarray(part) for part in xp.split(dy, edges, axis=cache["axis"])]
