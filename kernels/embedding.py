"""Timestep and class embeddings on the GPU.

What it is: the GPU twin of ``ddpm_ref/ops/embedding.py``:

* ``timestep_embedding(t, dim, ...)``: the sinusoidal features of DDPM (Ho et al. 2020, appendix B;
  Vaswani et al. 2017), an (N, dim) table for the batch's timesteps. The timesteps live on the host
  (they are drawn there), the table is tiny (128 x 128 float32 = 64 KB for CIFAR), and the
  reference evaluates sin/cos in float64 for exactness, so it is computed by ``ddpm_ref`` on the host
  and copied: no kernel of ours would be faster than that copy, or as exact.
* ``embedding_forward(ids, table)`` / ``embedding_backward``: the class-label embedding. The forward
  pass is a row gather kernel; the backward pass sums ``dy`` rows per id with one thread per table
  entry looping over the ids in order, so repeated ids add up deterministically (no atomics).

What it is not: ``sinusoidal_forward`` for continuous inputs (used by the MLP denoiser on toy data,
which runs on the CPU).
"""
from __future__ import annotations

import numpy as np

from . import runtime as _b
from ._jit import cuda, kernel

__all__ = ["timestep_embedding", "embedding_forward", "embedding_backward"]

_THREADS = 256


@kernel("void(int64[::1], float32[:, ::1], float32[:, ::1])")
def embedding_gather_kernel(ids, table, y):
    """y[n, j] = table[ids[n], j]."""
    n = ids.shape[0]
    dim = table.shape[1]
    for g in range(cuda.grid(1), n * dim, cuda.gridsize(1)):
        i = g // dim
        y[i, g - i * dim] = table[ids[i], g - i * dim]


@kernel("void(int64[::1], float32[:, ::1], float32[:, ::1])")
def embedding_scatter_kernel(ids, dy, dtable):
    """dtable[r, j] = sum over n with ids[n] == r of dy[n, j], in the order of n."""
    num = dtable.shape[0]
    dim = dtable.shape[1]
    for g in range(cuda.grid(1), num * dim, cuda.gridsize(1)):
        r = g // dim
        j = g - r * dim
        acc = np.float32(0.0)
        for n in range(ids.shape[0]):
            if ids[n] == r:
                acc += dy[n, j]
        dtable[r, j] = acc


def timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=1, max_period=10000, scale=1.0):
    """``ddpm_ref.ops.embedding.timestep_embedding`` of host timesteps, as a device (N, dim) array."""
    from ddpm_ref.ops import embedding as ref
    return _b.to_device(ref.timestep_embedding(_b.to_host(t) if not isinstance(t, np.ndarray) else t, dim,
                                               flip_sin_to_cos, freq_shift, max_period, scale))


def embedding_forward(ids, table):
    """Rows of ``table (num, dim)`` picked by host integer ``ids`` (any shape): ``(y, cache)``."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"embedding ids must be integers, got dtype {ids.dtype} with shape {ids.shape}")
    _b.check_array(table, "table", ndim=2)
    num, dim = (int(s) for s in table.shape)
    if ids.size and (ids.min() < 0 or ids.max() >= num):
        raise ValueError(f"embedding ids must lie in [0, {num}), got values in [{ids.min()}, {ids.max()}]")
    flat = _b.to_device(ids.reshape(-1).astype(np.int64))
    y = _b.xp().empty((flat.shape[0], dim), dtype=np.float32)
    if y.size:
        blocks, threads = _b.launch_1d(y.size, _THREADS)
        embedding_gather_kernel[blocks, threads](flat, table, y)
    return y.reshape(ids.shape + (dim,)), {"ids": flat, "shape": ids.shape, "table_shape": (num, dim)}


def embedding_backward(dy, cache):
    """``dtable[r]`` = the sum of dy over the positions whose id is r."""
    num, dim = cache["table_shape"]
    _b.check_array(dy, "dy", shape=tuple(cache["shape"]) + (dim,))
    dtable = _b.xp().empty((num, dim), dtype=np.float32)
    blocks, threads = _b.launch_1d(num * dim, _THREADS)
    embedding_scatter_kernel[blocks, threads](cache["ids"], dy.reshape(-1, dim), dtable)
    return dtable
