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
give dbeta and dgamma), so the backward pass reads dz and xhat once each for the reductions.

float32 statistics, two passes: the mean is a pairwise sum (NumPy's reduction along a contiguous
axis), the variance a BLAS dot product of the centred values with themselves (no cancellation:
every term is non-negative), both accurate to a few ulps for the K used here.
"""
import numpy as np

from .activation import sigmoid

__all__ = ["group_norm_forward", "group_norm_backward", "group_norm_silu_forward", "group_norm_silu_backward"]


def _check_float(name, a):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {a.dtype} with shape {a.shape}")


def _normalize(x, gamma, beta, groups, eps):
    """Shared forward: returns (z, xhat (N, G, K), rstd (N, G, 1))."""
    _check_float("x", x)
    _check_float("gamma", gamma)
    _check_float("beta", beta)
    if x.ndim < 2:
        raise ValueError(f"group_norm expects x of shape (N, C, ...), got shape {x.shape}")
    N, C = x.shape[:2]
    groups = int(groups)
    if groups < 1 or C % groups:
        raise ValueError(f"group_norm: {C} channels of x with shape {x.shape} cannot be divided into "
                         f"{groups} groups")
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(f"group_norm: gamma and beta must have shape ({C},), got {gamma.shape} and {beta.shape}")
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"group_norm: eps must be positive, got {eps}")
    dt = x.dtype
    S = int(np.prod(x.shape[2:], dtype=np.int64))       # spatial size
    x3 = x.reshape(N, groups, -1)                        # (N, G, K)
    mu = x3.mean(axis=-1, keepdims=True)                 # (N, G, 1), pairwise sum
    xhat = x3 - mu                                       # (N, G, K), centred
    K = xhat.shape[-1]
    # Second pass on the centred values: sum of squares as one BLAS dot per (n, g), reading
    # xhat once without writing a squared copy.
    var = (xhat[:, :, None, :] @ xhat[:, :, :, None])[:, :, 0] / dt.type(K)   # (N, G, 1)
    rstd = 1.0 / np.sqrt(var + dt.type(eps))             # (N, G, 1)
    z = np.empty(x.shape, dtype=dt)                      # (N, C, ...) the output
    xhat *= rstd                                         # (N, G, K) normalised
    zc = z.reshape(N, C, S)                              # (N, C, S) view
    np.multiply(xhat.reshape(N, C, S), gamma.astype(dt, copy=False)[:, None], out=zc)
    zc += beta.astype(dt, copy=False)[:, None]           # z = gamma xhat + beta
    return z, xhat, rstd


def group_norm_forward(x, gamma, beta, groups, eps=1e-5):
    """``x (N, C, ...)``, ``gamma, beta (C,)`` -> ``(y, cache)``, y like x (torch.nn.GroupNorm).

    ValueError when x has fewer than 2 axes, C is not divisible by ``groups``, or gamma/beta are
    not (C,). The cache holds xhat (one array the size of x) and the per-group 1/std.
    """
    z, xhat, rstd = _normalize(x, gamma, beta, groups, eps)
    return z, {"xhat": xhat, "rstd": rstd, "gamma": gamma, "shape": x.shape, "silu": False}


def group_norm_silu_forward(x, gamma, beta, groups, eps=1e-5):
    """``silu(group_norm(x))`` in one call: same arguments and output shape as group_norm_forward.

    The pre-activation z is not cached: the backward pass recomputes it from xhat (two cheap
    passes) instead of keeping a second activation-sized array alive.
    """
    z, xhat, rstd = _normalize(x, gamma, beta, groups, eps)
    y = np.negative(z)
    with np.errstate(over="ignore", under="ignore"):
        np.exp(y, out=y)                                 # exp(-z)
    y += 1
    np.divide(z, y, out=y)                               # z sigmoid(z)
    return y, {"xhat": xhat, "rstd": rstd, "gamma": gamma, "beta": beta, "shape": x.shape, "silu": True}


def _backward(dz, cache):
    xhat, rstd = cache["xhat"], cache["rstd"]            # (N, G, K), (N, G, 1)
    N, G, K = xhat.shape
    C = cache["shape"][1]
    S = K * G // C
    dt = dz.dtype
    gamma = cache["gamma"].astype(dt, copy=False)
    xhat = xhat.astype(dt, copy=False)
    dz3 = dz.reshape(N, C, S)                            # (N, C, S)
    xh3 = xhat.reshape(N, C, S)                          # (N, C, S)
    sum_dz = dz3.sum(axis=-1)                            # (N, C)  sum_s dz
    sum_dzx = np.einsum("ncs,ncs->nc", dz3, xh3)         # (N, C)  sum_s dz xhat
    dbeta = sum_dz.sum(axis=0)                           # (C,)
    dgamma = sum_dzx.sum(axis=0)                         # (C,)
    # Group means of dxhat = gamma dz and of dxhat * xhat, per (n, g).
    mean_dxhat = (sum_dz * gamma).reshape(N, G, -1).sum(-1, keepdims=True) / K       # (N, G, 1)
    mean_dxhat_xhat = (sum_dzx * gamma).reshape(N, G, -1).sum(-1, keepdims=True) / K  # (N, G, 1)
    # dx = r (gamma dz - mean_dxhat - xhat mean_dxhat_xhat), written as three passes.
    coef = (rstd.reshape(N, G, 1) * gamma.reshape(1, G, -1)).reshape(N, C, 1)          # (N, C, 1) r gamma
    dx = np.multiply(dz3, coef)                          # (N, C, S)  r gamma dz
    dx3 = dx.reshape(N, G, K)
    tmp = np.multiply(xhat, rstd * mean_dxhat_xhat)      # (N, G, K)  r xhat mean(dxhat xhat)
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

    dz = dy * s (1 + z (1 - s)), with z = gamma xhat + beta and s = sigmoid(z) recomputed.
    """
    _check_float("dy", dy)
    shape = cache["shape"]
    if dy.shape != shape:
        raise ValueError(f"group_norm_silu_backward: dy has shape {dy.shape}, expected {shape}")
    dt = dy.dtype
    N, C = shape[:2]
    xhat = cache["xhat"]
    z = np.multiply(xhat.reshape(N, C, -1), cache["gamma"].astype(dt, copy=False)[:, None])  # (N, C, S)
    z += cache["beta"].astype(dt, copy=False)[:, None]   # z = gamma xhat + beta
    s = sigmoid(z)                                       # (N, C, S)
    dz = np.subtract(1, s)                               # 1 - s
    dz *= z                                              # z (1 - s)
    del z
    dz += 1                                              # 1 + z (1 - s)
    dz *= s                                              # silu'(z)
    del s
    dz *= dy.reshape(dz.shape)                           # dz = dy silu'(z)
    return _backward(dz.reshape(shape), cache)
