"""GroupNorm, alone and fused with SiLU, forward and backward on the GPU.

What it is: the GPU twin of ``ddpm_ref/ops/norm.py`` (Wu & He 2018; read its docstring for the
derivation). One block per (sample n, group g) slab of ``K = C/G * S`` contiguous values (NCHW keeps a
group's channels adjacent):

forward   pass 1: mu = mean(x); pass 2: var = mean((x - mu)^2) (float64 sums, two passes: stable);
          pass 3: y = gamma[c] xhat + beta[c], xhat = (x - mu) r, r = 1/sqrt(var + eps), and with
          SiLU fused y = z sigmoid(z). Only y and the (N, G) statistics are written; xhat is not.
backward  recomputes xhat and z from x and the statistics; dz = dy (or dy s (1 + z (1 - s)) for the
          fused SiLU, s = sigmoid(z)); per channel c of the slab, a block reduction gives
          ``sum dz`` and ``sum dz xhat`` (= this sample's share of dbeta[c] and dgamma[c]);
          the slab's ``mean(dxhat)`` and ``mean(dxhat xhat)`` follow as gamma-weighted sums of those
          (dxhat = gamma[c] dz); then dx = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
          The per-sample dgamma/dbeta shares (N, C) are summed over N afterwards (CuPy reduction).

What it is not: a Welford single-pass kernel; x is read three times in the forward pass and twice in
the backward pass (the slab is small: 4 x 1024 floats on the CIFAR shapes, so the rereads hit L2).
"""
from __future__ import annotations

import math

import numpy as np

from . import runtime as _b
from ._jit import cuda, device, kernel
from numba import float32, float64

__all__ = ["group_norm_forward", "group_norm_backward", "group_norm_silu_forward",
           "group_norm_silu_backward"]

_THREADS = 256
_F3 = "float32[:, :, ::1]"
_F2 = "float32[:, ::1]"
_F1 = "float32[::1]"


@device
def _block_sum(sh, tid, nthreads, value):
    """Sum ``value`` over the block through shared ``sh`` (float64); every thread gets the total."""
    sh[tid] = value
    cuda.syncthreads()
    s = nthreads // 2
    while s > 0:
        if tid < s:
            sh[tid] += sh[tid + s]
        cuda.syncthreads()
        s //= 2
    total = sh[0]
    cuda.syncthreads()
    return total


@device
def _sigmoid(z):
    """1 / (1 + exp(-z)), the exponent clamped below float32 overflow (s ~ 6e-39 instead of 0)."""
    return float32(1.0) / (float32(1.0) + math.exp(min(-z, float32(88.0))))


@kernel(f"void({_F3}, {_F1}, {_F1}, {_F3}, {_F2}, {_F2}, int32, float64, int32)")
def group_norm_fwd_kernel(x3, gamma, beta, y3, mean, rstd, spatial, eps, silu):
    """x3, y3 (N, G, K); mean, rstd (N, G); channel of slab element e is g * (K / S) + e // S."""
    sh = cuda.shared.array(_THREADS, float64)
    N = x3.shape[0]
    G = x3.shape[1]
    K = x3.shape[2]
    cg = K // spatial
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for slab in range(cuda.blockIdx.x, N * G, cuda.gridDim.x):
        n = slab // G
        g = slab - n * G
        s = 0.0
        for e in range(tid, K, nt):
            s += float64(x3[n, g, e])
        mu = _block_sum(sh, tid, nt, s) / K
        s = 0.0
        for e in range(tid, K, nt):
            d = float64(x3[n, g, e]) - mu
            s += d * d
        var = _block_sum(sh, tid, nt, s) / K
        r = float32(1.0 / math.sqrt(var + eps))
        mu32 = float32(mu)
        if tid == 0:
            mean[n, g] = mu32
            rstd[n, g] = r
        for e in range(tid, K, nt):
            c = g * cg + e // spatial
            z = gamma[c] * ((x3[n, g, e] - mu32) * r) + beta[c]
            if silu != 0:
                z = z * _sigmoid(z)
            y3[n, g, e] = z


@kernel(f"void({_F3}, {_F3}, {_F1}, {_F1}, {_F2}, {_F2}, int32, int32, {_F3}, {_F2}, {_F2})")
def group_norm_bwd_kernel(dy3, x3, gamma, beta, mean, rstd, spatial, silu, dx3, dgamma_n, dbeta_n):
    """dx3 (N, G, K) and the per-sample shares dgamma_n, dbeta_n (N, C)."""
    sh = cuda.shared.array(_THREADS, float64)
    N = x3.shape[0]
    G = x3.shape[1]
    K = x3.shape[2]
    cg = K // spatial
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for slab in range(cuda.blockIdx.x, N * G, cuda.gridDim.x):
        n = slab // G
        g = slab - n * G
        mu = mean[n, g]
        r = rstd[n, g]
        sum_dxhat = 0.0          # sum over the slab of dxhat = gamma[c] dz
        sum_dxhat_xhat = 0.0     # sum over the slab of dxhat * xhat
        for ci in range(cg):
            c = g * cg + ci
            gc = gamma[c]
            bc = beta[c]
            s_dz = 0.0
            s_dzx = 0.0
            for sp in range(tid, spatial, nt):
                e = ci * spatial + sp
                xhat = (x3[n, g, e] - mu) * r
                dz = dy3[n, g, e]
                if silu != 0:
                    z = gc * xhat + bc
                    sg = _sigmoid(z)
                    dz = dz * (sg * (float32(1.0) + z * (float32(1.0) - sg)))
                s_dz += float64(dz)
                s_dzx += float64(dz) * float64(xhat)
            t_dz = _block_sum(sh, tid, nt, s_dz)
            t_dzx = _block_sum(sh, tid, nt, s_dzx)
            if tid == 0:
                dbeta_n[n, c] = float32(t_dz)
                dgamma_n[n, c] = float32(t_dzx)
            sum_dxhat += float64(gc) * t_dz
            sum_dxhat_xhat += float64(gc) * t_dzx
        m1 = float32(sum_dxhat / K)
        m2 = float32(sum_dxhat_xhat / K)
        for e in range(tid, K, nt):
            c = g * cg + e // spatial
            gc = gamma[c]
            xhat = (x3[n, g, e] - mu) * r
            dz = dy3[n, g, e]
            if silu != 0:
                z = gc * xhat + beta[c]
                sg = _sigmoid(z)
                dz = dz * (sg * (float32(1.0) + z * (float32(1.0) - sg)))
            dx3[n, g, e] = r * (dz * gc - m1 - xhat * m2)


def _launch(slabs):
    if _b.is_simulator():
        return min(slabs, 2), 32
    return max(1, min(slabs, 65535)), _THREADS


def _forward(x, gamma, beta, groups, eps, silu):
    _b.check_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"group norm expects x of shape (N, C, ...), got shape {tuple(x.shape)}")
    N, C = int(x.shape[0]), int(x.shape[1])
    groups = int(groups)
    if groups < 1 or C % groups:
        raise ValueError(f"groups must divide the {C} channels, got groups={groups}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _b.check_array(gamma, "gamma", shape=(C,))
    _b.check_array(beta, "beta", shape=(C,))
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    if N * C * spatial == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    xp = _b.xp()
    K = C // groups * spatial
    y = xp.empty_like(x)
    mean = xp.empty((N, groups), dtype=xp.float32)
    rstd = xp.empty((N, groups), dtype=xp.float32)
    blocks, threads = _launch(N * groups)
    group_norm_fwd_kernel[blocks, threads](x.reshape(N, groups, K), gamma, beta, y.reshape(N, groups, K),
                                           mean, rstd, np.int32(spatial), np.float64(eps),
                                           np.int32(1 if silu else 0))
    cache = {"x": x, "gamma": gamma, "beta": beta, "mean": mean, "rstd": rstd, "groups": groups,
             "spatial": spatial, "silu": silu, "shape": tuple(x.shape)}
    return y, cache


def _backward(dy, cache, silu):
    if cache["silu"] != silu:
        raise ValueError("this cache came from the other group-norm variant (fused SiLU or not)")
    x = cache["x"]
    _b.check_array(dy, "dy", shape=cache["shape"])
    N, C = x.shape[0], x.shape[1]
    G = cache["groups"]
    K = C // G * cache["spatial"]
    xp = _b.xp()
    dx = xp.empty_like(x)
    dgamma_n = xp.empty((N, C), dtype=xp.float32)
    dbeta_n = xp.empty((N, C), dtype=xp.float32)
    blocks, threads = _launch(N * G)
    group_norm_bwd_kernel[blocks, threads](dy.reshape(N, G, K), x.reshape(N, G, K), cache["gamma"],
                                           cache["beta"], cache["mean"], cache["rstd"],
                                           np.int32(cache["spatial"]), np.int32(1 if silu else 0),
                                           dx.reshape(N, G, K), dgamma_n, dbeta_n)
    return dx, dgamma_n.sum(axis=0), dbeta_n.sum(axis=0)


def group_norm_forward(x, gamma, beta, groups, eps=1e-5):
    """GroupNorm of x (N, C, ...) with per-channel gamma, beta (C,); returns ``(y, cache)``."""
    return _forward(x, gamma, beta, groups, eps, False)


def group_norm_backward(dy, cache):
    """``(dx, dgamma, dbeta)`` of :func:`group_norm_forward`."""
    return _backward(dy, cache, False)


def group_norm_silu_forward(x, gamma, beta, groups, eps=1e-5):
    """``silu(group_norm(x))`` in one kernel; returns ``(y, cache)``."""
    return _forward(x, gamma, beta, groups, eps, True)


def group_norm_silu_backward(dy, cache):
    """``(dx, dgamma, dbeta)`` of :func:`group_norm_silu_forward`, SiLU's derivative fused."""
    return _backward(dy, cache, True)
