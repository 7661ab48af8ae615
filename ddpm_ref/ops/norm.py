"""Group normalisation (Wu & He 2018) with affine parameters, alone and fused with SiLU.

What it is: torch.nn.GroupNorm's function on ``x (N, C, *spatial)``: the channels are split into
``groups`` contiguous groups, each (sample, group) slab of ``K = C/groups * prod(spatial)`` values is
normalised to zero mean and unit variance (biased variance, as torch), then scaled and shifted per
channel. The DDPM U-Net (Ho et al. 2020, appendix B) uses it in front of every convolution and
attention block, almost always followed by SiLU, hence the fused pair. What it is not: no running
statistics (there are none in GroupNorm), no autograd.

Forward, per (n, g) over its K elements:

    mu = mean(x),  var = mean((x - mu)^2),  r = 1 / sqrt(var + eps)       (two passes, stable)
    xhat = (x - mu) r,   z = gamma[c] xhat + beta[c],   [fused: y = silu(z) = z sigmoid(z)]

Backward (dz given; for the fused op dz = dy * s (1 + z (1 - s)), s = sigmoid(z)):

    dbeta[c]  = sum_{n, spatial} dz
    dgamma[c] = sum_{n, spatial} dz * xhat
    dxhat     = dz * gamma[c]
    dx        = r * (dxhat - mean_K(dxhat) - xhat * mean_K(dxhat * xhat))

The last line: xhat depends on every x of its slab through mu and r; d mu / dx = 1/K gives the
``- mean(dxhat)`` term and d r / dx = -r^3 (x - mu) / K gives the ``- xhat mean(dxhat xhat)`` term.
Both means are assembled from per-(n, c) sums (``sum dz`` and ``sum dz xhat``, the same sums that
give dbeta and dgamma; ``sum dz xhat = r sum dz (x - mu)``), so the backward pass reads dz and the
cached centred input once each for the reductions.

float32 statistics, two passes: the mean is a pairwise sum (NumPy's reduction along a contiguous
axis), the variance a BLAS dot product of the centred values with themselves (no cancellation:
every term is non-negative), both accurate to a few ulps for the K used here. (One pass,
``var = mean(x^2) - mu^2``, would save the centring pass but cancels catastrophically in float32
when |mu| >> std, and the centred values are cached for the backward pass anyway.)

Passes over the data (each a NumPy loop; inference time at the sampling shapes is dominated by
them, not by arithmetic): the forward pass reads x for the mean, writes the centred ``xc = x - mu``
(the cache), reads it for the variance and writes ``z = xc (r gamma[c]) + beta[c]`` in two passes,
the 1/std folded into the per-(n, c) scale ``r gamma[c]`` so that ``xhat = xc r`` is never formed
(the backward pass folds r into its per-(n, c) coefficients instead, at no extra pass). The fused
SiLU then costs one exp and two passes: it computes ``zn = -z`` directly (scale ``-r gamma``, shift
``-beta``: exact negations) and ``y = zn / (-1 - exp(zn))``, which equals ``z / (1 + exp(-z))`` bit
for bit, without a separate negation pass. The exp is the most expensive pass (about three times
an add on this machine's NumPy), so the backward pass does not redo it: it takes
``sigmoid(z) = -1 / den`` from the denominator ``den = -(1 + exp(zn))`` that the forward pass
kept (one more cached array; measured 0.7x the backward's time at small's shapes, with the same
bits). float32 is kept throughout: float64 would double the bytes of every
pass and NumPy's float64 exp measured ~10x slower than its float32 one.
"""
import math

import numpy as np

from ._checks import check_float as _check_float
from ._checks import check_int as _check_int

__all__ = ["group_norm_forward", "group_norm_backward", "group_norm_silu_forward", "group_norm_silu_backward"]


def _normalize(x, gamma, beta, groups, eps, negate=False):
    """Shared forward: returns (z, xc (N, G, K), rstd (N, G, 1)); ``-z`` when ``negate``.

    ``xc = x - mu`` is the centred input (the normalised ``xhat = xc * rstd`` is never formed).
    """
    _check_float("x", x)
    _check_float("gamma", gamma)
    _check_float("beta", beta)
    if x.ndim < 2:
        raise ValueError(f"group_norm expects x of shape (N, C, ...), got shape {x.shape}")
    N, C = x.shape[:2]
    groups = _check_int("group_norm: groups", groups, 1)
    if C % groups:
        raise ValueError(f"group_norm: {C} channels of x with shape {x.shape} cannot be divided into "
                         f"{groups} groups")
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(f"group_norm: gamma and beta must have shape ({C},), got {gamma.shape} and {beta.shape}")
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"group_norm: eps must be positive, got {eps}")
    dt = x.dtype
    S = math.prod(x.shape[2:])                           # spatial size
    x3 = x.reshape(N, groups, -1)                        # (N, G, K)
    mu = x3.mean(axis=-1, keepdims=True)                 # (N, G, 1), pairwise sum
    xc = x3 - mu                                         # (N, G, K), centred
    K = xc.shape[-1]
    # Second pass on the centred values: sum of squares as one BLAS dot per (n, g), reading
    # xc once without writing a squared copy.
    var = (xc[:, :, None, :] @ xc[:, :, :, None])[:, :, 0] / dt.type(K)   # (N, G, 1)
    rstd = 1.0 / np.sqrt(var + dt.type(eps))             # (N, G, 1)
    g = gamma.astype(dt, copy=False)
    b = beta.astype(dt, copy=False)
    if negate:
        g, b = -g, -b
    scale = (rstd * g.reshape(groups, -1)).reshape(N, C, 1)   # (N, C, 1)  r gamma[c]
    z = np.empty(x.shape, dtype=dt)                      # (N, C, ...) the output
    zc = z.reshape(N, C, S)                              # (N, C, S) view
    np.multiply(xc.reshape(N, C, S), scale, out=zc)      # xc r gamma = xhat gamma
    zc += b[:, None]                                     # z = gamma xhat + beta
    return z, xc, rstd


def group_norm_forward(x, gamma, beta, groups, eps=1e-5):
    """``x (N, C, ...)``, ``gamma, beta (C,)`` -> ``(y, cache)``, y like x (torch.nn.GroupNorm).

    ValueError when x has fewer than 2 axes, C is not divisible by ``groups``, or gamma/beta are
    not (C,). The cache holds the centred input x - mu (one array the size of x) and the per-group
    1/std.
    """
    z, xc, rstd = _normalize(x, gamma, beta, groups, eps)
    return z, {"xc": xc, "rstd": rstd, "gamma": gamma, "shape": x.shape, "silu": False}


def group_norm_silu_forward(x, gamma, beta, groups, eps=1e-5):
    """``silu(group_norm(x))`` in one call: same arguments and output shape as group_norm_forward.

    The cache also holds the SiLU's denominator ``den = -(1 + exp(-z))``, which the forward pass
    computes anyway, so that the backward pass gets ``sigmoid(z) = -1 / den`` without an exp (the
    costliest pass) for one more activation-sized array; z itself is recomputed from the centred
    input (two cheap passes).
    """
    zn, xc, rstd = _normalize(x, gamma, beta, groups, eps, negate=True)   # zn = -z
    den = np.empty_like(zn)
    with np.errstate(over="ignore", under="ignore"):
        np.exp(zn, out=den)                              # exp(-z), inf for z << 0
    np.subtract(-1, den, out=den)                        # -(1 + exp(-z))
    np.divide(zn, den, out=zn)                           # -z / -(1 + exp(-z)) = z sigmoid(z); 0 at inf
    return zn, {"xc": xc, "rstd": rstd, "gamma": gamma, "beta": beta, "shape": x.shape, "silu": True,
                "den": den}


def _backward(dz, cache):
    xc, rstd = cache["xc"], cache["rstd"]                # (N, G, K) x - mu, (N, G, 1)
    N, G, K = xc.shape
    C = cache["shape"][1]
    S = K * G // C
    dt = dz.dtype
    gamma = cache["gamma"].astype(dt, copy=False)
    xc = xc.astype(dt, copy=False)
    rstd = rstd.astype(dt, copy=False)
    r_c = np.repeat(rstd.reshape(N, G), C // G, axis=1)  # (N, C)  r of each channel's group
    dz3 = dz.reshape(N, C, S)                            # (N, C, S)
    sum_dz = dz3.sum(axis=-1)                            # (N, C)  sum_s dz
    # sum_s dz xhat = r sum_s dz xc (r is constant over the slab)
    sum_dzx = np.einsum("ncs,ncs->nc", dz3, xc.reshape(N, C, S)) * r_c   # (N, C)
    dbeta = sum_dz.sum(axis=0)                           # (C,)
    dgamma = sum_dzx.sum(axis=0)                         # (C,)
    # Group means of dxhat = gamma dz and of dxhat * xhat, per (n, g).
    mean_dxhat = (sum_dz * gamma).reshape(N, G, -1).sum(-1, keepdims=True) / K       # (N, G, 1)
    mean_dxhat_xhat = (sum_dzx * gamma).reshape(N, G, -1).sum(-1, keepdims=True) / K  # (N, G, 1)
    # dx = r (gamma dz - mean_dxhat - xhat mean_dxhat_xhat), xhat = xc r, written as three passes.
    coef = (r_c * gamma).reshape(N, C, 1)                # (N, C, 1) r gamma
    # dx is allocated C-contiguous (a ufunc's output would follow dy's layout, e.g. channels-last),
    # so that dx3 below is a view of it and the in-place corrections land in dx
    dx = np.multiply(dz3, coef, out=np.empty((N, C, S), dtype=dt))   # (N, C, S)  r gamma dz
    dx3 = dx.reshape(N, G, K)
    tmp = np.multiply(xc, rstd * rstd * mean_dxhat_xhat)  # (N, G, K)  r xhat mean(dxhat xhat)
    dx3 -= tmp
    dx3 -= rstd * mean_dxhat                             # r mean(dxhat)
    return dx.reshape(cache["shape"]), dgamma, dbeta


def group_norm_backward(dy, cache):
    """Gradients of ``group_norm_forward``: ``(dx, dgamma, dbeta)`` shaped like ``x, gamma, beta``."""
    _check_float("dy", dy)
    if dy.shape != cache["shape"]:
        raise ValueError(f"group_norm_backward: dy has shape {dy.shape}, expected {cache['shape']}")
    return _backward(dy, cache)


def group_norm_silu_backward(dy, cache):
    """Gradients of ``group_norm_silu_forward``: ``(dx, dgamma, dbeta)``.

    dz = dy * s (1 + z (1 - s)), with z = gamma xhat + beta recomputed and s = sigmoid(z) from the
    cached denominator.
    """
    _check_float("dy", dy)
    shape = cache["shape"]
    if dy.shape != shape:
        raise ValueError(f"group_norm_silu_backward: dy has shape {dy.shape}, expected {shape}")
    dt = dy.dtype
    N, C = shape[:2]
    xc, rstd = cache["xc"], cache["rstd"].astype(dt, copy=False)         # (N, G, K), (N, G, 1)
    G = xc.shape[1]
    scale = (rstd * cache["gamma"].astype(dt, copy=False).reshape(G, -1)).reshape(N, C, 1)  # r gamma
    z = np.multiply(xc.astype(dt, copy=False).reshape(N, C, -1), scale)  # (N, C, S)  gamma xhat
    z += cache["beta"].astype(dt, copy=False)[:, None]   # z = gamma xhat + beta
    # sigmoid(z) = 1 / (1 + exp(-z)) = -1 / den, bit for bit (den is its negated denominator)
    s = np.divide(-1, cache["den"].astype(dt, copy=False).reshape(z.shape))   # (N, C, S)
    dz = np.subtract(1, s)                               # 1 - s
    dz *= z                                              # z (1 - s)
    del z
    dz += 1                                              # 1 + z (1 - s)
    dz *= s                                              # silu'(z)
    del s
    dz *= dy.reshape(dz.shape)                           # dz = dy silu'(z)
    return _backward(dz.reshape(shape), cache)
