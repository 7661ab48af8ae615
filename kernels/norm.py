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

The public functions run version 2 (below: threads mapped to channels, loads four deep, one
segmented reduction per round of channels); ``group_norm_forward_v1`` / ``group_norm_silu_forward_v1``
keep version 1 for the benchmarks. On an H200 at (128, 128, 32, 32) with SiLU (Nsight Compute,
benchmarks/profile_gpu.py): forward 117 us (version 1: 151), backward 131 us (440).

What it is not: a Welford single-pass kernel; x is read three times in the forward pass and twice in
the backward pass (the slab is small: 4 x 1024 floats on the CIFAR shapes, so the rereads hit L2).
Both versions are latency-bound, not bandwidth-bound (about 20% and 30% of DRAM bandwidth, 30% and
35% occupancy): holding the slab in registers would cut the rereads and their waits.
"""
from __future__ import annotations

import math

import numpy as np

from . import runtime as _b
from ._jit import cuda, device, kernel
from numba import float32, float64

from ddpm_ref.ops._checks import check_int

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


# ---------------------------------------------------------------------------------------------
# Version 2: channel-major thread mapping, loads four deep, one segmented reduction per round
# ---------------------------------------------------------------------------------------------
#
# Version 1 above strides each thread over the whole slab one element at a time: every thread has a
# single load in flight behind a dependent add, so a block waits about one memory latency per element
# it reads (three passes forward, and per channel in the backward pass, with two full block
# reductions per channel). Version 2 maps threads to channels: the block's ``nt`` threads are split
# into ``cpb = min(cg, nt)`` runs of ``tpc = nt // cpb`` lanes, run ``ci`` takes channels ``ci, ci +
# cpb, ...`` of the group, and lane ``l`` of a run reads spatial positions ``l, l + tpc, ...`` of its
# channel (consecutive lanes, consecutive addresses: coalesced). Then
#
# * each thread issues four independent loads before it adds (four deep in flight, not one);
# * gamma and beta are read once per channel and thread, and the channel of an element is known
#   without a division;
# * the backward pass reduces the per-channel sums of every run at once, with one segmented tree
#   of ``log2(tpc)`` steps per round of ``cpb`` channels (version 1: two full block reductions, each
#   ``log2(nt)`` steps, per channel);
# * the block size follows the slab (``nt = K / 16`` rounded up to a power of two, 32 to 128), so
#   small slabs (4 x 4 images) do not leave most of a 256-thread block idle.
#
# The arithmetic per element is version 1's (float64 sums, the same float32 formulas), only the order
# of the float64 additions differs. x and dy are still read twice (statistics, then output); the
# second read of a slab (at most 48 KB on the cifar shapes) comes from L2.


@device
def _split(cg, nt, tid):
    """(cpb, tpc, ci, lane) of the channel-major mapping (see above)."""
    cpb = min(cg, nt)
    tpc = nt // cpb
    ci = tid // tpc
    return cpb, tpc, ci, tid - ci * tpc


@device
def _run_sum(x3, n, g, base, lane, tpc, spatial, shift, square):
    """float64 sum over j = lane, lane + tpc, ... < spatial of v = x3[n, g, base + j] - shift (v*v when
    ``square``), four loads in flight."""
    s = 0.0
    j = lane
    while j + 3 * tpc < spatial:
        a0 = float64(x3[n, g, base + j]) - shift
        a1 = float64(x3[n, g, base + j + tpc]) - shift
        a2 = float64(x3[n, g, base + j + 2 * tpc]) - shift
        a3 = float64(x3[n, g, base + j + 3 * tpc]) - shift
        if square:
            s += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
        else:
            s += (a0 + a1) + (a2 + a3)
        j += 4 * tpc
    while j < spatial:
        a0 = float64(x3[n, g, base + j]) - shift
        s += a0 * a0 if square else a0
        j += tpc
    return s


@device
def _slab_sum(x3, n, g, cg, spatial, tid, nt, shift, square):
    """This thread's share of the slab's sum (of x - shift, or its square) under the mapping."""
    cpb, tpc, ci, lane = _split(cg, nt, tid)
    s = 0.0
    if ci < cpb:
        for c0 in range(0, cg, cpb):
            c = c0 + ci
            if c < cg:
                s += _run_sum(x3, n, g, c * spatial, lane, tpc, spatial, shift, square)
    return s


@device
def _load4(a3, n, g, i, tpc):
    """a3[n, g, i + k tpc] for k = 0..3: four independent loads, issued together."""
    return a3[n, g, i], a3[n, g, i + tpc], a3[n, g, i + 2 * tpc], a3[n, g, i + 3 * tpc]


@device
def _store4(a3, n, g, i, tpc, v0, v1, v2, v3):
    a3[n, g, i] = v0
    a3[n, g, i + tpc] = v1
    a3[n, g, i + 2 * tpc] = v2
    a3[n, g, i + 3 * tpc] = v3


@device
def _normalize(xv, mu, r, gc, bc, silu):
    z = gc * ((xv - mu) * r) + bc
    if silu != 0:
        z = z * _sigmoid(z)
    return z


@kernel(f"void({_F3}, {_F1}, {_F1}, {_F3}, {_F2}, {_F2}, int32, float64, int32)")
def group_norm_fwd_kernel_v2(x3, gamma, beta, y3, mean, rstd, spatial, eps, silu):
    """As :func:`group_norm_fwd_kernel`, channel-major (version 2)."""
    sh = cuda.shared.array(_THREADS, float64)
    N = x3.shape[0]
    G = x3.shape[1]
    K = x3.shape[2]
    cg = K // spatial
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    cpb, tpc, ci, lane = _split(cg, nt, tid)
    for slab in range(cuda.blockIdx.x, N * G, cuda.gridDim.x):
        n = slab // G
        g = slab - n * G
        mu = _block_sum(sh, tid, nt, _slab_sum(x3, n, g, cg, spatial, tid, nt, 0.0, False)) / K
        var = _block_sum(sh, tid, nt, _slab_sum(x3, n, g, cg, spatial, tid, nt, mu, True)) / K
        r = float32(1.0 / math.sqrt(var + eps))
        mu32 = float32(mu)
        if tid == 0:
            mean[n, g] = mu32
            rstd[n, g] = r
        if ci < cpb:
            for c0 in range(0, cg, cpb):
                c = c0 + ci
                if c < cg:
                    gc = gamma[g * cg + c]
                    bc = beta[g * cg + c]
                    base = c * spatial
                    j = lane
                    while j + 3 * tpc < spatial:
                        v0, v1, v2, v3 = _load4(x3, n, g, base + j, tpc)
                        _store4(y3, n, g, base + j, tpc, _normalize(v0, mu32, r, gc, bc, silu),
                                _normalize(v1, mu32, r, gc, bc, silu), _normalize(v2, mu32, r, gc, bc, silu),
                                _normalize(v3, mu32, r, gc, bc, silu))
                        j += 4 * tpc
                    while j < spatial:
                        y3[n, g, base + j] = _normalize(x3[n, g, base + j], mu32, r, gc, bc, silu)
                        j += tpc


@device
def _dz_xhat(xv, dv, mu, r, gc, bc, silu):
    """(dz, xhat) of one element: dz = dy, times SiLU's derivative at z = gamma xhat + beta if fused."""
    xhat = (xv - mu) * r
    dz = dv
    if silu != 0:
        z = gc * xhat + bc
        sg = _sigmoid(z)
        dz = dz * (sg * (float32(1.0) + z * (float32(1.0) - sg)))
    return dz, xhat


@device
def _add_dz(s_dz, s_dzx, xv, dv, mu, r, gc, bc, silu):
    """(s_dz + dz, s_dzx + dz xhat) in float64 for one element."""
    dz, xhat = _dz_xhat(xv, dv, mu, r, gc, bc, silu)
    return s_dz + float64(dz), s_dzx + float64(dz) * float64(xhat)


@device
def _dx_of(xv, dv, mu, r, gc, bc, silu, m1, m2):
    dz, xhat = _dz_xhat(xv, dv, mu, r, gc, bc, silu)
    return r * (dz * gc - m1 - xhat * m2)


# At most 80 registers (unbounded, ptxas takes 146 for sm_90: three 128-thread blocks a
# multiprocessor instead of six). No spills at this bound.
@kernel(f"void({_F3}, {_F3}, {_F1}, {_F1}, {_F2}, {_F2}, int32, int32, {_F3}, {_F2}, {_F2})",
        launch_bounds=(_THREADS, 3))
def group_norm_bwd_kernel_v2(dy3, x3, gamma, beta, mean, rstd, spatial, silu, dx3, dgamma_n, dbeta_n):
    """As :func:`group_norm_bwd_kernel`, channel-major (version 2): per round of ``cpb`` channels, each
    run's ``sum dz`` and ``sum dz xhat`` by one segmented tree over its ``tpc`` lanes."""
    sh1 = cuda.shared.array(_THREADS, float64)
    sh2 = cuda.shared.array(_THREADS, float64)
    N = x3.shape[0]
    G = x3.shape[1]
    K = x3.shape[2]
    cg = K // spatial
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    cpb, tpc, ci, lane = _split(cg, nt, tid)
    p2 = 1
    while p2 < tpc:
        p2 *= 2
    for slab in range(cuda.blockIdx.x, N * G, cuda.gridDim.x):
        n = slab // G
        g = slab - n * G
        mu = mean[n, g]
        r = rstd[n, g]
        sum_dxhat = 0.0          # thread 0: sum over the slab of dxhat = gamma[c] dz
        sum_dxhat_xhat = 0.0     # thread 0: sum over the slab of dxhat * xhat
        for c0 in range(0, cg, cpb):
            c = c0 + ci
            s_dz = 0.0
            s_dzx = 0.0
            if ci < cpb and c < cg:
                gc = gamma[g * cg + c]
                bc = beta[g * cg + c]
                base = c * spatial
                j = lane
                while j + 3 * tpc < spatial:
                    x0, x1, x2, xq = _load4(x3, n, g, base + j, tpc)
                    d0, d1, d2, dq = _load4(dy3, n, g, base + j, tpc)
                    s_dz, s_dzx = _add_dz(s_dz, s_dzx, x0, d0, mu, r, gc, bc, silu)
                    s_dz, s_dzx = _add_dz(s_dz, s_dzx, x1, d1, mu, r, gc, bc, silu)
                    s_dz, s_dzx = _add_dz(s_dz, s_dzx, x2, d2, mu, r, gc, bc, silu)
                    s_dz, s_dzx = _add_dz(s_dz, s_dzx, xq, dq, mu, r, gc, bc, silu)
                    j += 4 * tpc
                while j < spatial:
                    s_dz, s_dzx = _add_dz(s_dz, s_dzx, x3[n, g, base + j], dy3[n, g, base + j], mu, r, gc, bc,
                                          silu)
                    j += tpc
            sh1[tid] = s_dz
            sh2[tid] = s_dzx
            cuda.syncthreads()
            stride = p2 // 2
            while stride > 0:                     # segmented tree: each run sums its tpc lanes
                if ci < cpb and lane < stride and lane + stride < tpc:
                    sh1[tid] += sh1[tid + stride]
                    sh2[tid] += sh2[tid + stride]
                cuda.syncthreads()
                stride //= 2
            if lane == 0 and ci < cpb and c < cg:
                dbeta_n[n, g * cg + c] = float32(sh1[tid])
                dgamma_n[n, g * cg + c] = float32(sh2[tid])
            if tid == 0:                          # the gamma-weighted slab sums, in channel order
                for k in range(cpb):
                    if c0 + k < cg:
                        gk = float64(gamma[g * cg + c0 + k])
                        sum_dxhat += gk * sh1[k * tpc]
                        sum_dxhat_xhat += gk * sh2[k * tpc]
            cuda.syncthreads()
        if tid == 0:
            sh1[0] = sum_dxhat
            sh2[0] = sum_dxhat_xhat
        cuda.syncthreads()
        m1 = float32(sh1[0] / K)
        m2 = float32(sh2[0] / K)
        cuda.syncthreads()                        # every thread has read them before sh1 is reused
        if ci < cpb:
            for c0 in range(0, cg, cpb):
                c = c0 + ci
                if c < cg:
                    gc = gamma[g * cg + c]
                    bc = beta[g * cg + c]
                    base = c * spatial
                    j = lane
                    while j + 3 * tpc < spatial:
                        x0, x1, x2, xq = _load4(x3, n, g, base + j, tpc)
                        d0, d1, d2, dq = _load4(dy3, n, g, base + j, tpc)
                        _store4(dx3, n, g, base + j, tpc,
                                _dx_of(x0, d0, mu, r, gc, bc, silu, m1, m2),
                                _dx_of(x1, d1, mu, r, gc, bc, silu, m1, m2),
                                _dx_of(x2, d2, mu, r, gc, bc, silu, m1, m2),
                                _dx_of(xq, dq, mu, r, gc, bc, silu, m1, m2))
                        j += 4 * tpc
                    while j < spatial:
                        dx3[n, g, base + j] = _dx_of(x3[n, g, base + j], dy3[n, g, base + j], mu, r, gc, bc,
                                                     silu, m1, m2)
                        j += tpc


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# Version 2's block size: about 16 values per thread (four rounds of four-deep loads), 32 to 128
# threads. Not larger: at 96 (forward) and 80 (backward) registers a thread, 128-thread blocks fit five
# and six to a multiprocessor (20 and 24 warps) where 256-thread blocks fit two and three (16 and 24).
# Fixed, not autotuned: the float64 partial sums, and so the last bits, depend on the block size.
_V2_MAX_THREADS = 128


def _launch(slabs, K=None):
    """(blocks, threads) for ``slabs`` slabs of K values: version 1 (K None) always 256 threads;
    version 2 see ``_V2_MAX_THREADS``. The simulator: 2 blocks of 32."""
    if _b.is_simulator():
        return min(slabs, 2), 32
    threads = _THREADS if K is None else min(_V2_MAX_THREADS, max(32, _pow2_at_least(K // 16)))
    return max(1, min(slabs, 65535)), threads


def _forward(x, gamma, beta, groups, eps, silu, version=2):
    _b.check_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"group norm expects x of shape (N, C, ...), got shape {tuple(x.shape)}")
    N, C = int(x.shape[0]), int(x.shape[1])
    groups = check_int("group norm: groups", groups, 1)   # as the reference: refused, not truncated
    if C % groups:
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
    blocks, threads = _launch(N * groups, K if version == 2 else None)
    fwd = group_norm_fwd_kernel_v2 if version == 2 else group_norm_fwd_kernel
    fwd[blocks, threads](x.reshape(N, groups, K), gamma, beta, y.reshape(N, groups, K), mean, rstd,
                         np.int32(spatial), np.float64(eps), np.int32(1 if silu else 0))
    cache = {"x": x, "gamma": gamma, "beta": beta, "mean": mean, "rstd": rstd, "groups": groups,
             "spatial": spatial, "silu": silu, "shape": tuple(x.shape), "version": version}
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
    version = cache.get("version", 2)
    blocks, threads = _launch(N * G, K if version == 2 else None)
    bwd = group_norm_bwd_kernel_v2 if version == 2 else group_norm_bwd_kernel
    bwd[blocks, threads](dy.reshape(N, G, K), x.reshape(N, G, K), cache["gamma"], cache["beta"],
                         cache["mean"], cache["rstd"], np.int32(cache["spatial"]),
                         np.int32(1 if silu else 0), dx.reshape(N, G, K), dgamma_n, dbeta_n)
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


def group_norm_forward_v1(x, gamma, beta, groups, eps=1e-5):
    """:func:`group_norm_forward` on version 1's kernels (for the benchmarks); its cache's backward
    pass runs version 1 too."""
    return _forward(x, gamma, beta, groups, eps, False, version=1)


def group_norm_silu_forward_v1(x, gamma, beta, groups, eps=1e-5):
    """:func:`group_norm_silu_forward` on version 1's kernels (for the benchmarks)."""
    return _forward(x, gamma, beta, groups, eps, True, version=1)
