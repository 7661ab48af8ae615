"""Embeddings: sinusoidal timestep features, their differentiable form, and a label lookup table.

What it is:
* ``timestep_embedding``: DDPM's sinusoidal embedding of the timestep t (Ho et al. 2020, appendix
  B, "Transformer sinusoidal position embedding", Vaswani et al. 2017), computed step for step as
  diffusers' ``get_timestep_embedding`` does in float32 (the DDPM CIFAR-10 weights use
  ``flip_sin_to_cos=False, freq_shift=1``):

      half = dim // 2
      f_k  = exp(-ln(max_period) * k / (half - freq_shift)),   k = 0 .. half-1
      emb  = [sin(scale t f), cos(scale t f)]    ([cos, sin] when flip_sin_to_cos), zero column
                                                  appended when dim is odd.
  No gradient: t is an integer timestep (or a constant).
* ``sinusoidal_forward/backward``: the same features of a continuous input x of any shape, with the
  gradient (the MLP denoiser embeds each data coordinate this way):

      d/dx sin(s x f) = s f cos(s x f),   d/dx cos(s x f) = -s f sin(s x f)
      dx = sum_k s f_k (dy_sin_k cos(s x f_k) - dy_cos_k sin(s x f_k))

* ``embedding_forward/backward``: a table lookup ``y = table[ids]`` (class labels for conditional
  models); the backward pass scatter-adds dy into the rows that were read (a row read twice gets
  both gradients): ``dtable[r] = sum_{i: ids_i = r} dy_i``.

What it is not: no learned projection after the sinusoid (the model's MLP does that).
"""
import math

import numpy as np

from ._checks import check_int as _check_int

__all__ = ["timestep_frequencies", "timestep_embedding", "sinusoidal_forward", "sinusoidal_backward",
           "embedding_forward", "embedding_backward"]


def timestep_frequencies(dim, freq_shift=1, max_period=10000, dtype=np.float32):
    """The ``dim // 2`` frequencies ``f_k``, rounded step by step in ``dtype`` as diffusers does."""
    dim = _check_int("sinusoidal embedding dim", dim, 2)
    half = dim // 2
    denom = half - freq_shift
    if denom <= 0:
        raise ValueError(f"sinusoidal embedding: dim // 2 - freq_shift must be positive, got dim={dim}, "
                         f"freq_shift={freq_shift}")
    if not max_period > 0:
        raise ValueError(f"max_period must be positive, got {max_period}")
    dt = np.dtype(dtype).type
    exponent = dt(-math.log(max_period)) * np.arange(half, dtype=dtype)      # (half,)
    exponent = exponent / dt(denom)
    # exp in float64, rounded once: the correctly rounded value, which is what torch.exp returns
    # for these float32 exponents (NumPy's float32 exp is off by one ulp on some of them).
    return np.exp(exponent.astype(np.float64)).astype(dtype)                 # (half,)


def timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=1, max_period=10000, scale=1.0):
    """Sinusoidal embedding of timesteps ``t (N,)`` (int or float) -> float32 ``(N, dim)``.

    Matches ``diffusers.models.embeddings.get_timestep_embedding(t, dim, flip_sin_to_cos,
    downscale_freq_shift=freq_shift, scale=scale, max_period=max_period)``.
    """
    t = np.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (N,), got shape {t.shape}")
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise ValueError(f"timestep_embedding expects numeric timesteps, got dtype {t.dtype}")
    freqs = timestep_frequencies(dim, freq_shift, max_period, np.float32)    # (half,)
    arg = t.astype(np.float32)[:, None] * freqs[None, :]                      # (N, half), float32 product
    if scale != 1:
        arg = np.float32(scale) * arg
    half = freqs.shape[0]
    emb = np.zeros((t.shape[0], int(dim)), dtype=np.float32)                 # (N, dim), odd dim: last col 0
    first, second = (np.cos, np.sin) if flip_sin_to_cos else (np.sin, np.cos)
    # sin/cos of the float32 argument evaluated in float64 and rounded once: the exact features
    # of that argument (torch's float32 sin is off by up to ~3e-5 for arguments near 1000).
    arg64 = arg.astype(np.float64)                                           # (N, half)
    emb[:, :half] = first(arg64)
    emb[:, half:2 * half] = second(arg64)
    return emb


def sinusoidal_forward(x, dim, flip_sin_to_cos=False, freq_shift=1, max_period=10000, scale=1.0):
    """Sinusoidal features of a continuous ``x`` (any shape, float) -> ``(y x.shape + (dim,), cache)``.

    Same frequencies and layout as ``timestep_embedding``, but dtype follows x and the op has a
    gradient (``sinusoidal_backward``).
    """
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"sinusoidal_forward expects a floating-point array x, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} with shape {np.shape(x)}")
    dt = x.dtype
    freqs = timestep_frequencies(dim, freq_shift, max_period, dt) * dt.type(scale)   # (half,) s f
    half = freqs.shape[0]
    arg = x[..., None] * freqs                                               # (..., half)
    s, c = np.sin(arg), np.cos(arg)                                          # (..., half) each
    y = np.zeros(x.shape + (int(dim),), dtype=dt)                            # (..., dim)
    y[..., :half], y[..., half:2 * half] = (c, s) if flip_sin_to_cos else (s, c)
    return y, {"freqs": freqs, "sin": s, "cos": c, "flip": bool(flip_sin_to_cos), "shape": x.shape,
               "dim": int(dim)}


def sinusoidal_backward(dy, cache):
    """``dx = sum_k s f_k (dy_sin_k cos(s x f_k) - dy_cos_k sin(s x f_k))``, shape of x."""
    if not isinstance(dy, np.ndarray) or not np.issubdtype(dy.dtype, np.floating):
        raise ValueError(f"sinusoidal_backward expects a floating-point dy, got {getattr(dy, 'dtype', None)}")
    expected = cache["shape"] + (cache["dim"],)
    if dy.shape != expected:
        raise ValueError(f"sinusoidal_backward: dy has shape {dy.shape}, expected {expected}")
    half = cache["freqs"].shape[0]
    d_first, d_second = dy[..., :half], dy[..., half:2 * half]              # (..., half) each
    dsin, dcos = (d_second, d_first) if cache["flip"] else (d_first, d_second)
    # d sin(a)/dx = f cos(a),  d cos(a)/dx = -f sin(a),  a = s x f (freqs already hold s f)
    g = dsin * cache["cos"] - dcos * cache["sin"]                            # (..., half)
    return g @ cache["freqs"].astype(dy.dtype, copy=False)                   # (...,)


def embedding_forward(ids, table):
    """Rows of ``table (num, dim)`` picked by integer ``ids`` (any shape) -> ``(y ids.shape + (dim,), cache)``."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"embedding ids must be integers, got dtype {ids.dtype} with shape {ids.shape}")
    if not isinstance(table, np.ndarray) or not np.issubdtype(table.dtype, np.floating) or table.ndim != 2:
        raise ValueError(f"embedding table must be a floating-point (num, dim) array, got "
                         f"{getattr(table, 'dtype', type(table).__name__)} with shape {np.shape(table)}")
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(f"embedding ids must lie in [0, {table.shape[0]}), got values in "
                         f"[{ids.min()}, {ids.max()}]")
    return table[ids], {"ids": ids, "table_shape": table.shape}


def embedding_backward(dy, cache):
    """``dtable[r] = sum of dy over the positions whose id is r`` (np.add.at: repeated ids add up)."""
    ids = cache["ids"]
    num, dim = cache["table_shape"]
    if not isinstance(dy, np.ndarray) or dy.shape != ids.shape + (dim,):
        raise ValueError(f"embedding_backward: dy has shape {np.shape(dy)}, expected {ids.shape + (dim,)}")
    dtable = np.zeros((num, dim), dtype=dy.dtype)                            # (num, dim)
    np.add.at(dtable, ids.reshape(-1), dy.reshape(-1, dim))
    return dtable
