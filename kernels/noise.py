"""Fused noise kernels: the forward-process sample, the training target and the loss, with the
Philox noise generated in registers; and the fused DDPM / DDIM reverse steps.

What it is (Ho et al. 2020, arXiv 2006.11239; Song et al. 2021 for DDIM):

* :func:`random_bits`, :func:`uniform`, :func:`normal`: ``ddpm_ref.rng``'s draws on the GPU, the same
  uint32 words bit for bit, the same float32 normals within 1e-6 (float64 libm vs libdevice).
* :func:`q_sample_target`: one pass over ``x0`` writing ``x_t = sqrt(alpha_bar_t) x0 +
  sqrt(1 - alpha_bar_t) eps`` (eq. 4) and the training target (``eps``; ``x0``; or
  ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0``, Salimans & Ho 2022), ``eps`` drawn in
  registers from ``rng.normal(seed, stream, index, step, x0.shape[1:], sub)``. With
  ``store_target=False`` only ``x_t`` is written: the noise never touches memory.
* :func:`mse_noise_loss`: the matching loss kernel that regenerates the same ``eps`` (and from it the
  target), and returns the weighted MSE of eq. 14 (L_simple), the per-sample losses and ``dL/dpred``
  in one pass over ``pred`` and ``x0``.
* :func:`ddpm_step`, :func:`ddim_step`: the reverse-process update in one kernel per step: x0
  prediction from the model output, clipping, the posterior mean (eq. 7), the variance and the fresh
  noise ``z = rng.normal(seed, Stream.SAMPLE_STEP, index, t, shape)``.

Versions (side by side, each tested against ``ddpm_ref.rng`` / ``ddpm_ref.diffusion``; the public
names point at v2):

* v1: one thread per Philox block of 4 elements, grid-stride over ``(sample, block)`` with a 64-bit
  division per item; each thread reads and writes its 4 consecutive elements (a warp's access spans
  4x the cache lines it uses); float64 Box-Muller; five per-sample arrays copied to the device per call.
* v2: a 2-D grid, ``blockIdx.y`` over samples and ``blockIdx.x`` over tiles of ``4 * blockDim``
  elements of one sample (no division). Each thread draws one Philox block (uint32 Philox, float32
  Box-Muller with a float64 tail: ``rng.py``, version 2) into a padded shared-memory tile (conflict
  free), then the block reads x0 and writes x_t / the target *coalesced* (thread ``tid`` handles
  elements ``tid + k blockDim``); the reads are issued before the Philox arithmetic, so their
  latency overlaps it. The per-sample scalars travel as one packed float64 array
  ``(N, 6)``: ``a, b, coef, index, step, sub`` (uint32 values and float32 coefficients are exact in
  float64), one host-to-device copy per call. Normals within 1e-6 of the reference (the bound is
  derived in ``rng.py``); words still bit-identical.

What it is not: the reference. Every per-step or per-sample *scalar* (square roots of alpha_bar,
posterior coefficients, sigma) is computed on the host in float64 from the ``Schedule`` tables and
handed to the kernel as float32, exactly once; the kernels do the per-element work in float32.
"""
from __future__ import annotations

import math

import numpy as np

from . import runtime as _b
from ._jit import capped as _jit_capped, cuda, device, kernel
from numba import float32, float64, uint32, uint64  # noqa: E402  (numba is importable once ._jit imported)
from .rng import philox4x32_10, philox4x32_10_v2, philox_normal4, philox_normal4_v2, word_to_uniform

__all__ = [
    "random_bits", "uniform", "normal", "q_sample_target", "mse_noise_loss", "PREDICTIONS",
    "ddpm_step", "ddim_step", "sample", "normal_v1", "normal_v2", "uniform_v1", "uniform_v2",
    "q_sample_target_v1", "q_sample_target_v2", "mse_noise_loss_v1", "mse_noise_loss_v2",
    "random_bits_v1", "random_bits_v2",
]

PREDICTIONS = {"epsilon": 0, "sample": 1, "v": 2}
_THREADS = 256          # threads per block for the elementwise kernels
_RED_THREADS = 256      # threads per block (and shared-memory length) for per-sample reductions

_U32_1D = "uint32[::1]"
_F32_1D = "float32[::1]"
_F32_2D = "float32[:, ::1]"


# ---------------------------------------------------------------------------------------------
# Raw draws (for tests and for anyone who wants the numbers themselves)
# ---------------------------------------------------------------------------------------------

@kernel(f"void(uint32[:, ::1], {_U32_1D}, {_U32_1D}, {_U32_1D}, uint32, uint32)")
def philox_bits_kernel(out, index, step, sub, seed, stream):
    """out (N, size) uint32: word ``e % 4`` of Philox block ``e // 4`` of sample ``index[i]``."""
    n = out.shape[0]
    size = out.shape[1]
    nb = (size + 3) // 4
    for g in range(cuda.grid(1), n * nb, cuda.gridsize(1)):
        i = g // nb
        blk = g - i * nb
        w0, w1, w2, w3 = philox4x32_10(blk, index[i], step[i], sub[i], seed, stream)
        e = blk * 4
        out[i, e] = w0
        if e + 1 < size:
            out[i, e + 1] = w1
        if e + 2 < size:
            out[i, e + 2] = w2
        if e + 3 < size:
            out[i, e + 3] = w3


@kernel(f"void({_F32_2D}, {_U32_1D}, {_U32_1D}, {_U32_1D}, uint32, uint32, int32)")
def philox_float_kernel(out, index, step, sub, seed, stream, kind):
    """out (N, size) float32: normals (kind 0) or uniforms (kind 1) of ``ddpm_ref.rng``."""
    n = out.shape[0]
    size = out.shape[1]
    nb = (size + 3) // 4
    for g in range(cuda.grid(1), n * nb, cuda.gridsize(1)):
        i = g // nb
        blk = g - i * nb
        if kind == 0:
            z0, z1, z2, z3 = philox_normal4(blk, index[i], step[i], sub[i], seed, stream)
        else:
            w0, w1, w2, w3 = philox4x32_10(blk, index[i], step[i], sub[i], seed, stream)
            z0 = word_to_uniform(w0)
            z1 = word_to_uniform(w1)
            z2 = word_to_uniform(w2)
            z3 = word_to_uniform(w3)
        e = blk * 4
        out[i, e] = z0
        if e + 1 < size:
            out[i, e + 1] = z1
        if e + 2 < size:
            out[i, e + 2] = z2
        if e + 3 < size:
            out[i, e + 3] = z3


def _u32(a, name):
    arr = np.atleast_1d(np.asarray(a))
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers in [0, 2**32), got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise ValueError(f"{name} must hold values in [0, 2**32), got range [{arr.min()}, {arr.max()}]")
    return arr


def _address(seed, stream, index, step, sub):
    """Validate a draw's address as ddpm_ref.rng does; return host (seed, stream, index, step, sub)
    with index, step and sub as writable uint32 arrays of shape (N,)."""
    from ddpm_ref.rng import check_seed
    seed = check_seed(seed)
    if isinstance(stream, (bool, np.bool_)) or not isinstance(stream, (int, np.integer)) \
            or not 0 <= int(stream) < 2**32:
        raise ValueError(f"stream must be an integer in [0, 2**32), got {stream!r}")
    index = _u32(index, "index")
    if index.ndim != 1:
        raise ValueError(f"index must be a 1-D array of sample indices, got shape {index.shape}")
    n = index.shape[0]
    out = []
    for name, v in (("step", step), ("sub", sub)):
        arr = np.asarray(v)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
            raise ValueError(f"{name} must be a scalar or have shape ({n},), got {arr.shape}")
        arr = _u32(arr, name)
        out.append(np.array(np.broadcast_to(arr, (n,)), dtype=np.uint32))   # writable copies
    return np.uint32(seed), np.uint32(int(stream)), np.array(index, dtype=np.uint32), out[0], out[1]


def _shape_size(shape):
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    return shape, int(np.prod(shape, dtype=np.int64))


def random_bits_v1(seed, stream, index, step=0, shape=(), sub=0):
    """Device uint32 words ``(len(index),) + shape``, bit-identical to ``ddpm_ref.rng.random_bits``."""
    seed, stream, index, step, sub = _address(seed, stream, index, step, sub)
    shape, size = _shape_size(shape)
    xp = _b.xp()
    out = xp.empty((index.shape[0], size), dtype=xp.uint32)
    if out.size:
        blocks, threads = _b.launch_1d(index.shape[0] * ((size + 3) // 4), _THREADS)
        philox_bits_kernel[blocks, threads](out, _b.to_device(index), _b.to_device(step),
                                            _b.to_device(sub), seed, stream)
    return out.reshape((index.shape[0],) + shape)


def _floats(kind, seed, stream, index, step, shape, sub):
    seed, stream, index, step, sub = _address(seed, stream, index, step, sub)
    shape, size = _shape_size(shape)
    xp = _b.xp()
    out = xp.empty((index.shape[0], size), dtype=xp.float32)
    if out.size:
        blocks, threads = _b.launch_1d(index.shape[0] * ((size + 3) // 4), _THREADS)
        philox_float_kernel[blocks, threads](out, _b.to_device(index), _b.to_device(step),
                                             _b.to_device(sub), seed, stream, np.int32(kind))
    return out.reshape((index.shape[0],) + shape)


def normal_v1(seed, stream, index, step=0, shape=(), sub=0):
    """Device float32 normals ``(len(index),) + shape``, as ``ddpm_ref.rng.normal``."""
    return _floats(0, seed, stream, index, step, shape, sub)


def uniform_v1(seed, stream, index, step=0, shape=(), sub=0):
    """Device float32 uniforms in (0, 1), ``(len(index),) + shape``, as ``ddpm_ref.rng.uniform``."""
    return _floats(1, seed, stream, index, step, shape, sub)


# ---------------------------------------------------------------------------------------------
# Forward process, fused: x_t and the target in one pass (eq. 4), noise in registers
# ---------------------------------------------------------------------------------------------

@device
def _target_of(x0, eps, a, b, mode):
    """The training target of one element: eps (mode 0), x0 (1) or v = a eps - b x0 (2)."""
    if mode == 0:
        return eps
    if mode == 1:
        return x0
    return a * eps - b * x0


@device
def _q_one(x0, xt, target, i, e, eps, a, b, mode, store_target):
    v = x0[i, e]
    xt[i, e] = a * v + b * eps                     # eq. 4: sqrt(ab) x0 + sqrt(1 - ab) eps
    if store_target != 0:
        target[i, e] = _target_of(v, eps, a, b, mode)


@kernel(f"void({_F32_2D}, {_F32_2D}, {_F32_2D}, {_F32_1D}, {_F32_1D}, {_U32_1D}, {_U32_1D}, "
        f"{_U32_1D}, uint32, uint32, int32, int32)")
def q_sample_kernel(x0, xt, target, a, b, index, step, sub, seed, stream, mode, store_target):
    """x0, xt, target (N, D); a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t) per sample (N,)."""
    n = x0.shape[0]
    size = x0.shape[1]
    nb = (size + 3) // 4
    for g in range(cuda.grid(1), n * nb, cuda.gridsize(1)):
        i = g // nb
        blk = g - i * nb
        z0, z1, z2, z3 = philox_normal4(blk, index[i], step[i], sub[i], seed, stream)
        ai = a[i]
        bi = b[i]
        e = blk * 4
        _q_one(x0, xt, target, i, e, z0, ai, bi, mode, store_target)
        if e + 1 < size:
            _q_one(x0, xt, target, i, e + 1, z1, ai, bi, mode, store_target)
        if e + 2 < size:
            _q_one(x0, xt, target, i, e + 2, z2, ai, bi, mode, store_target)
        if e + 3 < size:
            _q_one(x0, xt, target, i, e + 3, z3, ai, bi, mode, store_target)


def _check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {sorted(PREDICTIONS)}, got {prediction!r}")
    return np.int32(PREDICTIONS[prediction])


def _forward_coefficients(schedule, t, n):
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) per sample: float64 tables, one cast to float32."""
    t = np.asarray(t)
    if t.shape != (n,) or t.dtype.kind not in "iu":
        raise ValueError(f"t must be an integer array of shape ({n},), got {t.dtype} {t.shape}")
    if n and (t.min() < 0 or t.max() >= schedule.T):
        raise ValueError(f"t must lie in [0, {schedule.T}), got range [{t.min()}, {t.max()}]")
    a = np.asarray(schedule.sqrt_alpha_bar, dtype=np.float64)[t].astype(np.float32)
    b = np.asarray(schedule.sqrt_one_minus_alpha_bar, dtype=np.float64)[t].astype(np.float32)
    return a, b


def q_sample_target_v1(schedule, x0, t, seed, index, step=0, prediction="epsilon",
                    stream=None, sub=0, store_target=True):
    """Fused forward process: ``(x_t, target)`` from ``x0`` in one pass, eps drawn in registers.

    schedule: ``ddpm_ref.schedule.Schedule``; x0 device float32 (N, ...); t int (N,) on the host;
    eps = ``rng.normal(seed, stream, index, step, x0.shape[1:], sub)`` with ``stream`` defaulting to
    ``Stream.TRAIN_NOISE``. Returns device ``(xt, target)``, target ``None`` when ``store_target`` is
    False (then :func:`mse_noise_loss` regenerates it). Equals ``diffusion.q_sample`` and
    ``diffusion.training_target`` with that noise.
    """
    from ddpm_ref.rng import Stream
    stream = Stream.TRAIN_NOISE if stream is None else stream
    mode = _check_prediction(prediction)
    _b.check_array(x0, "x0")
    n = x0.shape[0]
    seed, stream, index, step, sub = _address(seed, stream, index, step, sub)
    if index.shape[0] != n:
        raise ValueError(f"index must have one entry per sample ({n}), got {index.shape[0]}")
    a, b = _forward_coefficients(schedule, t, n)
    xp = _b.xp()
    x2 = x0.reshape(n, -1)                                 # (N, D)
    xt = xp.empty_like(x2)
    # Unused placeholder when not stored (a distinct array: the simulator copies arguments back).
    target = xp.empty_like(x2) if store_target else xp.empty((1, 1), dtype=xp.float32)
    if x2.size:
        blocks, threads = _b.launch_1d(n * ((x2.shape[1] + 3) // 4), _THREADS)
        q_sample_kernel[blocks, threads](x2, xt, target, _b.to_device(a), _b.to_device(b),
                                         _b.to_device(index), _b.to_device(step), _b.to_device(sub),
                                         seed, stream, mode, np.int32(1 if store_target else 0))
    xt = xt.reshape(x0.shape)
    return xt, (target.reshape(x0.shape) if store_target else None)


# ---------------------------------------------------------------------------------------------
# The loss, fused with the noise: regenerate eps, form the target, MSE and its gradient (eq. 14)
# ---------------------------------------------------------------------------------------------

@kernel(f"void({_F32_2D}, {_F32_2D}, {_F32_1D}, {_F32_1D}, {_F32_1D}, {_U32_1D}, {_U32_1D}, "
        f"{_U32_1D}, uint32, uint32, int32, {_F32_2D}, float64[::1])")
def mse_noise_kernel(pred, x0, a, b, coef, index, step, sub, seed, stream, mode, dpred, sq_sum):
    """One block per sample: sq_sum[i] = sum_e (pred - target)^2 (float64 accumulation) and
    dpred = coef[i] (pred - target), coef = dloss 2 w / (N D) (float64, cast once, as the
    reference's mse_backward); target rebuilt from the regenerated eps."""
    partial = cuda.shared.array(_RED_THREADS, dtype=np.float64)
    n = pred.shape[0]
    size = pred.shape[1]
    nb = (size + 3) // 4
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        ai = a[i]
        bi = b[i]
        gi = coef[i]
        acc = 0.0
        for blk in range(tid, nb, nthreads):
            z0, z1, z2, z3 = philox_normal4(blk, index[i], step[i], sub[i], seed, stream)
            e = blk * 4
            for j in range(4):
                if e + j < size:
                    if j == 0:
                        eps = z0
                    elif j == 1:
                        eps = z1
                    elif j == 2:
                        eps = z2
                    else:
                        eps = z3
                    d = pred[i, e + j] - _target_of(x0[i, e + j], eps, ai, bi, mode)
                    acc += float64(d) * float64(d)
                    dpred[i, e + j] = gi * d
        partial[tid] = acc
        cuda.syncthreads()
        s = nthreads // 2
        while s > 0:                                   # tree reduction (blockDim is a power of two)
            if tid < s:
                partial[tid] += partial[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            sq_sum[i] = partial[0]
        cuda.syncthreads()


def _row_launch(n_rows):
    """(blocks, threads) for one-block-per-row reductions (grid-stride over rows)."""
    if _b.is_simulator():
        return min(max(n_rows, 1), 2), 32
    return max(1, min(n_rows, 65535)), _RED_THREADS


# Persistent grids: about this many blocks per multiprocessor in all (the kernels loop over samples
# with the block index as the start and the grid size as the stride, so any grid computes the same
# numbers).
_PERSISTENT_BLOCKS_PER_SM = (32, 8)


def _row_launches(n_rows):
    """:func:`_row_launch` first, then persistent grids (``_PERSISTENT_BLOCKS_PER_SM``), same block size."""
    out = [_row_launch(n_rows)]
    if not _b.is_simulator():
        for per_sm in _PERSISTENT_BLOCKS_PER_SM:
            blocks = max(1, min(n_rows, 65535, per_sm * _b.sm_count()))
            if all(blocks != b for b, _ in out):
                out.append((blocks, _RED_THREADS))
    return out


def mse_noise_loss_v1(schedule, pred, x0, t, seed, index, step=0, prediction="epsilon", weights=None,
                   stream=None, sub=0, dloss=1.0):
    """Fused L_simple (eq. 14) with the noise regenerated in registers (nothing read but pred, x0).

    Loss = mean_i( w_i * mean_e (pred - target)^2 ), target = eps, x0 or v built from
    eps = ``rng.normal(seed, stream, index, step, x0.shape[1:], sub)`` exactly as
    :func:`q_sample_target` drew it. Returns ``(loss (float), per_sample (N,) device float32 unweighted
    means, dpred device float32 like pred)`` where ``dpred = dloss * dL/dpred``. Equals
    ``ops.mse_forward(pred, target, weights)`` / ``ops.mse_backward``.
    """
    from ddpm_ref.rng import Stream
    stream = Stream.TRAIN_NOISE if stream is None else stream
    mode = _check_prediction(prediction)
    _b.check_array(pred, "pred")
    _b.check_array(x0, "x0", shape=pred.shape)
    n = pred.shape[0]
    seed, stream, index, step, sub = _address(seed, stream, index, step, sub)
    if index.shape[0] != n:
        raise ValueError(f"index must have one entry per sample ({n}), got {index.shape[0]}")
    a, b = _forward_coefficients(schedule, t, n)
    if weights is None:
        w = np.ones(n, dtype=np.float32)
    else:
        w = np.asarray(_b.to_host(weights) if not isinstance(weights, np.ndarray) else weights,
                       dtype=np.float32)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    xp = _b.xp()
    p2 = pred.reshape(n, -1)
    size = p2.shape[1]
    if n == 0 or size == 0:
        raise ValueError(f"pred must be non-empty, got shape {tuple(pred.shape)}")
    dpred = xp.empty_like(p2)
    sq_sum = xp.zeros(n, dtype=xp.float64)
    coef = ((float(dloss) * 2.0 / (n * size)) * w.astype(np.float64)).astype(np.float32)
    blocks, threads = _row_launch(n)
    mse_noise_kernel[blocks, threads](p2, x0.reshape(n, -1), _b.to_device(a), _b.to_device(b),
                                      _b.to_device(coef), _b.to_device(index), _b.to_device(step),
                                      _b.to_device(sub), seed, stream, mode, dpred, sq_sum)
    per_sample = sq_sum / size                                     # (N,) float64
    loss = float(_b.to_host((per_sample * xp.asarray(w, dtype=xp.float64)).mean()))
    return loss, per_sample.astype(xp.float32), dpred.reshape(pred.shape)


# ---------------------------------------------------------------------------------------------
# Version 2: 2-D grid, shared-memory tile of normals, coalesced accesses, one packed argument array
# ---------------------------------------------------------------------------------------------

_P_A, _P_B, _P_COEF, _P_INDEX, _P_STEP, _P_SUB = range(6)   # columns of the packed (N, 6) float64
_TILE_SHARED = 4 * _THREADS + _THREADS // 8                  # 4 words per thread + 1 pad per 32


@device
def _tile_slot(p):
    """Shared-memory slot of tile element ``p``: one pad word per 32, so both the Philox writes
    (``p = 4 tid + j``) and the coalesced reads (``p = tid + k blockDim``) are conflict-free."""
    return p + (p >> 5)


@device
def _normals_to_tile(buf, t0, nb, idx, st, sb, seed, stream, kind):
    """Thread ``tid`` draws Philox block ``t0 + tid`` of the sample into the tile: normals (kind 0)
    or uniforms (kind 1)."""
    tid = cuda.threadIdx.x
    blk = t0 + tid
    if blk < nb:
        if kind == 0:
            z0, z1, z2, z3 = philox_normal4_v2(blk, idx, st, sb, seed, stream)
        else:
            w0, w1, w2, w3 = philox4x32_10_v2(blk, idx, st, sb, seed, stream)
            z0 = word_to_uniform(w0)
            z1 = word_to_uniform(w1)
            z2 = word_to_uniform(w2)
            z3 = word_to_uniform(w3)
        p = 4 * tid
        buf[uint64(_tile_slot(p))] = z0
        buf[uint64(_tile_slot(p + 1))] = z1
        buf[uint64(_tile_slot(p + 2))] = z2
        buf[uint64(_tile_slot(p + 3))] = z3


@device
def _load_or_zero(a, i, e, size):
    """a[i, e] when e < size, else 0 (a tile's tail)."""
    v = float32(0.0)
    if e < size:
        v = a[uint64(i), uint64(e)]                  # unsigned: no negative-index wraparound code
    return v


@kernel(f"void({_F32_2D}, float64[:, ::1], uint32, uint32, int32)")
def philox_float_kernel_v2(out, params, seed, stream, kind):
    """out (N, size) float32: normals (kind 0) or uniforms (kind 1); params (N, 6) packed."""
    buf = cuda.shared.array(_TILE_SHARED, dtype=float32)
    n = out.shape[0]
    size = out.shape[1]
    nb = (size + 3) // 4
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for i in range(cuda.blockIdx.y, n, cuda.gridDim.y):
        idx = uint32(params[i, _P_INDEX])
        st = uint32(params[i, _P_STEP])
        sb = uint32(params[i, _P_SUB])
        t0 = cuda.blockIdx.x * nt
        while t0 < nb:                     # a while loop: no trip-count division per sample
            _normals_to_tile(buf, t0, nb, idx, st, sb, seed, stream, kind)
            cuda.syncthreads()
            e0 = 4 * t0
            for k in range(4):
                p = tid + k * nt
                if e0 + p < size:
                    out[uint64(i), uint64(e0 + p)] = buf[uint64(_tile_slot(p))]
            cuda.syncthreads()
            t0 += cuda.gridDim.x * nt


@kernel(f"void({_F32_2D}, {_F32_2D}, {_F32_2D}, float64[:, ::1], uint32, uint32, int32, int32)")
def q_sample_kernel_v2(x0, xt, target, params, seed, stream, mode, store_target):
    """x0, xt, target (N, D): x_t = a x0 + b eps (eq. 4) and the target, eps from the tile."""
    buf = cuda.shared.array(_TILE_SHARED, dtype=float32)
    n = x0.shape[0]
    size = x0.shape[1]
    nb = (size + 3) // 4
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for i in range(cuda.blockIdx.y, n, cuda.gridDim.y):
        ai = float32(params[i, _P_A])
        bi = float32(params[i, _P_B])
        idx = uint32(params[i, _P_INDEX])
        st = uint32(params[i, _P_STEP])
        sb = uint32(params[i, _P_SUB])
        t0 = cuda.blockIdx.x * nt
        while t0 < nb:
            e0 = 4 * t0
            # x0's four coalesced values first: their loads are in flight while Philox runs.
            v0 = _load_or_zero(x0, i, e0 + tid, size)
            v1 = _load_or_zero(x0, i, e0 + tid + nt, size)
            v2 = _load_or_zero(x0, i, e0 + tid + 2 * nt, size)
            v3 = _load_or_zero(x0, i, e0 + tid + 3 * nt, size)
            _normals_to_tile(buf, t0, nb, idx, st, sb, seed, stream, 0)
            cuda.syncthreads()
            for k in range(4):
                p = tid + k * nt
                e = e0 + p
                if e < size:
                    eps = buf[uint64(_tile_slot(p))]
                    if k == 0:
                        v = v0
                    elif k == 1:
                        v = v1
                    elif k == 2:
                        v = v2
                    else:
                        v = v3
                    xt[uint64(i), uint64(e)] = ai * v + bi * eps          # eq. 4: sqrt(ab) x0 + sqrt(1 - ab) eps
                    if store_target != 0:
                        target[uint64(i), uint64(e)] = _target_of(v, eps, ai, bi, mode)
            cuda.syncthreads()
            t0 += cuda.gridDim.x * nt


@kernel(f"void({_F32_2D}, {_F32_2D}, float64[:, ::1], uint32, uint32, int32, {_F32_2D}, float64[::1])")
def mse_noise_kernel_v2(pred, x0, params, seed, stream, mode, dpred, sq_sum):
    """One block per sample (grid-stride): sq_sum[i] = sum_e (pred - target)^2 (each thread adds its
    4 squares of a tile in float32, then accumulates in float64; a float64 tree across the block)
    and dpred = coef[i] (pred - target), target rebuilt from the regenerated eps. Deterministic."""
    buf = cuda.shared.array(_TILE_SHARED, dtype=float32)
    partial = cuda.shared.array(_RED_THREADS, dtype=float64)
    n = pred.shape[0]
    size = pred.shape[1]
    nb = (size + 3) // 4
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        ai = float32(params[i, _P_A])
        bi = float32(params[i, _P_B])
        gi = float32(params[i, _P_COEF])
        idx = uint32(params[i, _P_INDEX])
        st = uint32(params[i, _P_STEP])
        sb = uint32(params[i, _P_SUB])
        acc = float64(0.0)
        t0 = 0
        while t0 < nb:
            e0 = 4 * t0
            # pred's and x0's coalesced values first: their loads are in flight while Philox runs.
            p0 = _load_or_zero(pred, i, e0 + tid, size)
            p1 = _load_or_zero(pred, i, e0 + tid + nt, size)
            p2 = _load_or_zero(pred, i, e0 + tid + 2 * nt, size)
            p3 = _load_or_zero(pred, i, e0 + tid + 3 * nt, size)
            v0 = _load_or_zero(x0, i, e0 + tid, size)
            v1 = _load_or_zero(x0, i, e0 + tid + nt, size)
            v2 = _load_or_zero(x0, i, e0 + tid + 2 * nt, size)
            v3 = _load_or_zero(x0, i, e0 + tid + 3 * nt, size)
            _normals_to_tile(buf, t0, nb, idx, st, sb, seed, stream, 0)
            cuda.syncthreads()
            s4 = float32(0.0)
            for k in range(4):
                p = tid + k * nt
                e = e0 + p
                if e < size:
                    if k == 0:
                        pv, v = p0, v0
                    elif k == 1:
                        pv, v = p1, v1
                    elif k == 2:
                        pv, v = p2, v2
                    else:
                        pv, v = p3, v3
                    d = pv - _target_of(v, buf[uint64(_tile_slot(p))], ai, bi, mode)
                    s4 += d * d
                    dpred[uint64(i), uint64(e)] = gi * d
            acc += float64(s4)
            cuda.syncthreads()
            t0 += nt
        partial[tid] = acc
        cuda.syncthreads()
        s = nt // 2
        while s > 0:                                   # tree reduction (blockDim is a power of two)
            if tid < s:
                partial[tid] += partial[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            sq_sum[i] = partial[0]
        cuda.syncthreads()


# Register-capped twins (``_jit.capped``) of the v2 kernels, for the autotuner. Unbounded, ptxas gives
# the normal and q_sample kernels 50-52 registers on sm_90 (four 256-thread blocks, half the warps a
# multiprocessor holds; Nsight Compute on an H200: about 10 cycles between a warp's instructions, 77%
# of issue slots used); capped at 40 (six blocks, no spills) and 32 (eight, 8 to 60 bytes of spills).
# The loss kernel: 66 registers unbounded, 64 and 48 capped (12 bytes of spills).
_TILE_CAPS = ((_THREADS, 6), (_THREADS, 8))
_NORMAL_KERNELS = (philox_float_kernel_v2,) + tuple(_jit_capped(philox_float_kernel_v2, c) for c in _TILE_CAPS)
_Q_SAMPLE_KERNELS = (q_sample_kernel_v2,) + tuple(_jit_capped(q_sample_kernel_v2, c) for c in _TILE_CAPS)
_MSE_KERNELS = (mse_noise_kernel_v2,) + tuple(_jit_capped(mse_noise_kernel_v2, c)
                                               for c in ((_RED_THREADS, 4), (_RED_THREADS, 5)))


def _packed(n, index, step, sub, a=None, b=None, coef=None):
    """The per-sample scalars as one (N, 6) float64 device array (one host-to-device copy)."""
    params = np.zeros((n, 6), dtype=np.float64)
    params[:, _P_INDEX] = index
    params[:, _P_STEP] = step
    params[:, _P_SUB] = sub
    for col, v in ((_P_A, a), (_P_B, b), (_P_COEF, coef)):
        if v is not None:
            params[:, col] = np.asarray(v, dtype=np.float32)        # float32 values, exact in float64
    return _b.to_device(params)


def _tile_launches(n, nb):
    """The launch shapes the autotuner chooses from, the plain one first: one block row per sample
    (up to 65535), then persistent grids whose blocks loop over many samples (fewer block starts,
    and each block's prologue, including a 64-bit division for the sample loop, is paid once per
    many samples instead of once per sample). The simulator: one small grid."""
    if _b.is_simulator():
        return [((1, min(max(n, 1), 2)), 32)]
    x = max(1, min(_b._GPU_MAX_BLOCKS, (nb + _THREADS - 1) // _THREADS))
    out = [((x, max(1, min(n, 65535))), _THREADS)]
    for per_sm in _PERSISTENT_BLOCKS_PER_SM:
        y = max(1, min(n, 65535, (per_sm * _b.sm_count() + x - 1) // x))
        if all(y != g[1] for (g, _) in out):
            out.append(((x, y), _THREADS))
    return out


def _variant_label(kern, grid):
    bounds = getattr(kern, "_ddpm_bounds", None)
    return f"grid {grid[0]}x{grid[1]}" + (f", launch bounds {bounds}" if bounds else "")


def _launch_tiles(name, kernels, n, nb, args, timer=None):
    """Launch a v2 tile kernel over n samples of nb Philox blocks: the fastest, for this problem, of
    its register variants (``kernels``, the unbounded one first) on each launch shape
    (:func:`_tile_launches`), chosen by ``runtime.tuned`` (keyed by the kernel name, n and nb). Every
    variant writes the same outputs: the code is the same, and each value is fixed by its counter."""
    variants = [(k, g, th) for (g, th) in _tile_launches(n, nb) for k in kernels]
    return _b.tuned((f"noise.{name}", n, nb), variants, lambda v: v[0][v[1], v[2]](*args),
                    label=lambda v: _variant_label(v[0], v[1]), timer=timer)


@kernel("void(uint32[:, ::1], float64[:, ::1], uint32, uint32)")
def philox_bits_kernel_v2(out, params, seed, stream):
    """out (N, size) uint32 with the uint32-state Philox (version 2); params (N, 6) packed."""
    n = out.shape[0]
    size = out.shape[1]
    nb = (size + 3) // 4
    for i in range(cuda.blockIdx.y, n, cuda.gridDim.y):
        idx = uint32(params[i, _P_INDEX])
        st = uint32(params[i, _P_STEP])
        sb = uint32(params[i, _P_SUB])
        for blk in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, nb,
                         cuda.gridDim.x * cuda.blockDim.x):
            w0, w1, w2, w3 = philox4x32_10_v2(blk, idx, st, sb, seed, stream)
            e = blk * 4
            out[i, e] = w0
            if e + 1 < size:
                out[i, e + 1] = w1
            if e + 2 < size:
                out[i, e + 2] = w2
            if e + 3 < size:
                out[i, e + 3] = w3


_BITS_KERNELS = (philox_bits_kernel_v2,) + tuple(_jit_capped(philox_bits_kernel_v2, c) for c in _TILE_CAPS[:1])


def random_bits_v2(seed, stream, index, step=0, shape=(), sub=0):
    """Device uint32 words ``(len(index),) + shape``, bit-identical to ``ddpm_ref.rng.random_bits``."""
    seed, stream, index, step, sub = _address(seed, stream, index, step, sub)
    shape, size = _shape_size(shape)
    xp = _b.xp()
    n = index.shape[0]
    out = xp.empty((n, size), dtype=xp.uint32)
    if out.size:
        _launch_tiles("random_bits", _BITS_KERNELS, n, (size + 3) // 4,
                      (out, _packed(n, index, step, sub), seed, stream))
    return out.reshape((n,) + shape)


def _floats_v2(kind, seed, stream, index, step, shape, sub):
    seed, stream, index, step, sub = _address(seed, stream, index, step, sub)
    shape, size = _shape_size(shape)
    xp = _b.xp()
    n = index.shape[0]
    out = xp.empty((n, size), dtype=xp.float32)
    if out.size:
        _launch_tiles("normal" if kind == 0 else "uniform", _NORMAL_KERNELS, n, (size + 3) // 4,
                      (out, _packed(n, index, step, sub), seed, stream, np.int32(kind)))
    return out.reshape((n,) + shape)


def normal_v2(seed, stream, index, step=0, shape=(), sub=0):
    """Device float32 normals ``(len(index),) + shape``, as ``ddpm_ref.rng.normal`` (within 1e-6)."""
    return _floats_v2(0, seed, stream, index, step, shape, sub)


def uniform_v2(seed, stream, index, step=0, shape=(), sub=0):
    """Device float32 uniforms in (0, 1), ``(len(index),) + shape``, as ``ddpm_ref.rng.uniform`` (exact)."""
    return _floats_v2(1, seed, stream, index, step, shape, sub)


def _q_sample_plan(schedule, x0, t, seed, index, step, prediction, stream, sub, store_target):
    """Validate and allocate: returns (launch, xt, target) where ``launch()`` runs the v2 kernel."""
    from ddpm_ref.rng import Stream
    stream = Stream.TRAIN_NOISE if stream is None else stream
    mode = _check_prediction(prediction)
    _b.check_array(x0, "x0")
    n = x0.shape[0]
    seed, stream, index, step, sub = _address(seed, stream, index, step, sub)
    if index.shape[0] != n:
        raise ValueError(f"index must have one entry per sample ({n}), got {index.shape[0]}")
    a, b = _forward_coefficients(schedule, t, n)
    xp = _b.xp()
    x2 = x0.reshape(n, -1)                                 # (N, D)
    xt = xp.empty_like(x2)
    target = xp.empty_like(x2) if store_target else xp.empty((1, 1), dtype=xp.float32)
    params = _packed(n, index, step, sub, a, b)
    store = np.int32(1 if store_target else 0)

    def launch():
        if x2.size:
            _launch_tiles(f"q_sample/{int(mode)}/{int(store)}", _Q_SAMPLE_KERNELS, n, (x2.shape[1] + 3) // 4,
                          (x2, xt, target, params, seed, stream, mode, store))
    return launch, xt.reshape(x0.shape), (target.reshape(x0.shape) if store_target else None)


def q_sample_target_v2(schedule, x0, t, seed, index, step=0, prediction="epsilon",
                       stream=None, sub=0, store_target=True):
    """Fused forward process: ``(x_t, target)`` from ``x0`` in one pass, eps drawn in registers.

    schedule: ``ddpm_ref.schedule.Schedule``; x0 device float32 (N, ...); t int (N,) on the host;
    eps = ``rng.normal(seed, stream, index, step, x0.shape[1:], sub)`` with ``stream`` defaulting to
    ``Stream.TRAIN_NOISE``. Returns device ``(xt, target)``, target ``None`` when ``store_target`` is
    False (then :func:`mse_noise_loss` regenerates it). Equals ``diffusion.q_sample`` and
    ``diffusion.training_target`` with that noise: ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 -
    alpha_bar_t) eps`` (eq. 4), target eps, x0 or ``v = sqrt(ab) eps - sqrt(1 - ab) x0``.
    """
    launch, xt, target = _q_sample_plan(schedule, x0, t, seed, index, step, prediction, stream, sub,
                                        store_target)
    launch()
    return xt, target


def _mse_plan(schedule, pred, x0, t, seed, index, step, prediction, weights, stream, sub, dloss):
    """Validate and allocate: returns (launch, finish) for the v2 loss kernel; finish() -> results."""
    from ddpm_ref.rng import Stream
    stream = Stream.TRAIN_NOISE if stream is None else stream
    mode = _check_prediction(prediction)
    _b.check_array(pred, "pred")
    _b.check_array(x0, "x0", shape=pred.shape)
    n = pred.shape[0]
    seed, stream, index, step, sub = _address(seed, stream, index, step, sub)
    if index.shape[0] != n:
        raise ValueError(f"index must have one entry per sample ({n}), got {index.shape[0]}")
    a, b = _forward_coefficients(schedule, t, n)
    if weights is None:
        w = np.ones(n, dtype=np.float32)
    else:
        w = np.asarray(_b.to_host(weights) if not isinstance(weights, np.ndarray) else weights,
                       dtype=np.float32)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    xp = _b.xp()
    p2 = pred.reshape(n, -1)
    size = p2.shape[1]
    if n == 0 or size == 0:
        raise ValueError(f"pred must be non-empty, got shape {tuple(pred.shape)}")
    dpred = xp.empty_like(p2)
    sq_sum = xp.empty(n, dtype=xp.float64)                          # every row is written
    coef = ((float(dloss) * 2.0 / (n * size)) * w.astype(np.float64)).astype(np.float32)
    params = _packed(n, index, step, sub, a, b, coef)
    x2 = x0.reshape(n, -1)
    variants = [(k, blocks, threads) for (blocks, threads) in _row_launches(n) for k in _MSE_KERNELS]
    args = (p2, x2, params, seed, stream, mode, dpred, sq_sum)

    def launch():
        # The variants (grid sizes, register caps) give the same numbers: a block sums its
        # sample's tiles in one fixed order whatever the grid, with a fixed block size.
        _b.tuned(("noise.mse_loss", n, size), variants, lambda v: v[0][v[1], v[2]](*args),
                 label=lambda v: _variant_label(v[0], (v[1], 1)))

    def finish():
        per_sample = sq_sum / size                                 # (N,) float64
        loss = float(_b.to_host((per_sample * xp.asarray(w, dtype=xp.float64)).mean()))
        return loss, per_sample.astype(xp.float32), dpred.reshape(pred.shape)
    return launch, finish


def mse_noise_loss_v2(schedule, pred, x0, t, seed, index, step=0, prediction="epsilon", weights=None,
                      stream=None, sub=0, dloss=1.0):
    """Fused L_simple (eq. 14) with the noise regenerated in registers (nothing read but pred, x0).

    Loss = mean_i( w_i * mean_e (pred - target)^2 ), target = eps, x0 or v built from
    eps = ``rng.normal(seed, stream, index, step, x0.shape[1:], sub)`` exactly as
    :func:`q_sample_target` drew it. Returns ``(loss (float), per_sample (N,) device float32 unweighted
    means, dpred device float32 like pred)`` where ``dpred = dloss * dL/dpred``. Equals
    ``ops.mse_forward(pred, target, weights)`` / ``ops.mse_backward``.
    """
    launch, finish = _mse_plan(schedule, pred, x0, t, seed, index, step, prediction, weights, stream,
                               sub, dloss)
    launch()
    return finish()


# The public names: the best version (v2; see the module docstring).
random_bits = random_bits_v2
normal = normal_v2
uniform = uniform_v2
q_sample_target = q_sample_target_v2
mse_noise_loss = mse_noise_loss_v2


# ---------------------------------------------------------------------------------------------
# The reverse process, fused: one kernel per DDPM or DDIM step (eq. 11 / Algorithm 2; DDIM eq. 12)
# ---------------------------------------------------------------------------------------------

# Per-sample float64 coefficient columns handed to the step kernel.
_C_SAB, _C_S1AB, _C_A, _C_B, _C_SIGMA, _C_LOGBETA, _C_LOGTILDE, _C_NOISE = range(8)
_F_DDIM, _F_CLIP, _F_LEARNED, _F_GEN, _F_ARRAY = 1, 8, 16, 32, 64


@device
def _step_one(mo, xt, xprev, x0out, noise, coef, i, e, z, size, flags, pred_mode):
    """One element of a reverse step, in float64 like the reference; one rounding to float32."""
    sab = coef[i, 0]
    s1ab = coef[i, 1]
    out = float64(mo[i, e])
    x = float64(xt[i, e])
    if pred_mode == 0:                     # epsilon: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
        x0 = (x - s1ab * out) / sab
        eps = out
    elif pred_mode == 1:                   # sample: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        x0 = out
        eps = (x - sab * x0) / s1ab
    else:                                  # v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v, eps = sqrt(1-ab) x_t + sqrt(ab) v
        x0 = sab * x - s1ab * out
        eps = s1ab * x + sab * out
    if flags & 8:                          # clip to the data range, eps made consistent again
        x0 = min(max(x0, -1.0), 1.0)
        eps = (x - sab * x0) / s1ab
    if flags & 1:                          # DDIM: sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps
        xn = coef[i, 2] * x0 + coef[i, 3] * eps
    else:                                  # DDPM: posterior mean (eq. 7) at x0_hat
        xn = coef[i, 2] * x0 + coef[i, 3] * x
    if coef[i, 7] != 0.0:                  # this sample adds noise
        if flags & 16:                     # learned range (Nichol & Dhariwal eq. 15)
            frac = (float64(mo[i, size + e]) + 1.0) / 2.0
            sigma = math.exp(0.5 * (frac * coef[i, 5] + (1.0 - frac) * coef[i, 6]))
        else:
            sigma = coef[i, 4]
        if flags & 64:
            zz = float64(noise[i, e])
        else:
            zz = float64(z)
        xn = xn + sigma * zz
    xprev[i, e] = float32(xn)
    x0out[i, e] = float32(x0)


@kernel(f"void({_F32_2D}, {_F32_2D}, {_F32_2D}, {_F32_2D}, {_F32_2D}, float64[:, ::1], {_U32_1D}, "
        f"{_U32_1D}, uint32, uint32, int32, int32)")
def reverse_step_kernel(mo, xt, xprev, x0out, noise, coef, index, step, seed, stream, flags, pred_mode):
    """mo (N, D) or (N, 2D) with learned variance; xt, xprev, x0out (N, D); coef (N, 8) float64.

    The fresh noise z is generated in registers (flags & 32) from ``rng.normal(seed, stream,
    index, step)`` or read from ``noise`` (flags & 64)."""
    n = xt.shape[0]
    size = xt.shape[1]
    nb = (size + 3) // 4
    for g in range(cuda.grid(1), n * nb, cuda.gridsize(1)):
        i = g // nb
        blk = g - i * nb
        z0 = float32(0.0)
        z1 = float32(0.0)
        z2 = float32(0.0)
        z3 = float32(0.0)
        if (flags & 32) != 0 and coef[i, 7] != 0.0:
            z0, z1, z2, z3 = philox_normal4(blk, index[i], step[i], uint32(0), seed, stream)
        e = blk * 4
        for j in range(4):                 # one element per Philox word (j is unrolled by the compiler)
            if e + j < size:
                if j == 0:
                    z = z0
                elif j == 1:
                    z = z1
                elif j == 2:
                    z = z2
                else:
                    z = z3
                _step_one(mo, xt, xprev, x0out, noise, coef, i, e + j, z, size, flags, pred_mode)


_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _step_common(schedule, model_output, xt, t, t_prev, prediction, clip):
    from ddpm_ref import samplers
    pred_mode = _check_prediction(prediction)
    if clip == "dynamic":
        raise ValueError("clip='dynamic' (a per-sample percentile) is not fused into the GPU step; "
                         "use clip=True or False here, or ddpm_ref.samplers on the host")
    if clip not in (True, False):
        raise ValueError(f"clip must be True or False for the fused GPU step, got {clip!r}")
    _b.check_array(xt, "xt")
    _b.check_array(model_output, "model_output")
    n = int(xt.shape[0])
    t_arr = np.broadcast_to(np.asarray(t), (n,)) if np.ndim(t) == 0 else np.asarray(t)
    tp_arr = np.broadcast_to(np.asarray(t_prev), (n,)) if np.ndim(t_prev) == 0 else np.asarray(t_prev)
    c = samplers.step_coefficients(schedule, t_arr, tp_arr)        # validates t, t_prev (float64)
    t_arr = t_arr.astype(np.int64)
    tp_arr = tp_arr.astype(np.int64)
    coef = np.zeros((n, 8), dtype=np.float64)
    coef[:, _C_SAB] = schedule.sqrt_alpha_bar[t_arr]
    coef[:, _C_S1AB] = schedule.sqrt_one_minus_alpha_bar[t_arr]
    return pred_mode, c, coef, t_arr, tp_arr, n


def _launch_step(schedule, model_output, xt, coef, flags, pred_mode, noise, seed, index, t_arr, n):
    xp = _b.xp()
    size = int(xt.size // max(n, 1))
    needs_noise = bool(np.any(coef[:, _C_NOISE] != 0.0))
    noise_arr = xp.zeros((1, 1), dtype=xp.float32)
    seed32, stream32 = np.uint32(0), np.uint32(0)
    idx = np.zeros(n, np.uint32)
    if noise is not None:
        _b.check_array(noise, "noise", shape=xt.shape)
        noise_arr = noise.reshape(n, size)
        flags |= _F_ARRAY
    elif needs_noise:
        if seed is None or index is None:
            raise ValueError("noise is required: this step adds noise; pass a noise array, or seed and "
                             "index to draw z = rng.normal(seed, Stream.SAMPLE_STEP, index, t) in the kernel")
        from ddpm_ref.rng import Stream
        seed32, stream32, idx, _, _ = _address(seed, Stream.SAMPLE_STEP, index, 0, 0)
        if idx.shape[0] != n:
            raise ValueError(f"index must have one entry per sample ({n}), got {idx.shape[0]}")
        flags |= _F_GEN
    mo2 = model_output.reshape(n, -1)
    x_prev = xp.empty((n, size), dtype=xp.float32)
    x0_hat = xp.empty((n, size), dtype=xp.float32)
    if n and size:
        blocks, threads = _b.launch_1d(n * ((size + 3) // 4), _THREADS)
        reverse_step_kernel[blocks, threads](mo2, xt.reshape(n, size), x_prev, x0_hat, noise_arr,
                                             _b.to_device(coef), _b.to_device(idx),
                                             _b.to_device(t_arr.astype(np.uint32)), seed32, stream32,
                                             np.int32(flags), pred_mode)
    return x_prev.reshape(xt.shape), x0_hat.reshape(xt.shape)


def ddpm_step(schedule, model_output, xt, t, t_prev, noise=None, prediction="epsilon",
              variance="fixed_small", clip=True, seed=None, index=None):
    """``ddpm_ref.samplers.ddpm_step`` in one kernel: returns device ``(x_prev, x0_hat)``.

    The same arguments, on device arrays; the fresh noise is either ``noise`` (a device array) or,
    with ``noise=None`` and ``seed``/``index`` given, drawn in registers as
    ``rng.normal(seed, Stream.SAMPLE_STEP, index, t, xt.shape[1:])`` (the sampler's contract).
    Per element, in float64 as the reference: x0_hat from the model output, clip, posterior mean
    ``coef_x0 x0_hat + coef_xt x_t`` (eq. 7), ``+ sigma z`` unless t_prev = -1.
    """
    if variance not in _VARIANCES:
        raise ValueError(f"variance must be one of {_VARIANCES}, got {variance!r}")
    pred_mode, c, coef, t_arr, tp_arr, n = _step_common(schedule, model_output, xt, t, t_prev,
                                                        prediction, clip)
    channels_out = xt.shape[1] * (2 if variance == "learned_range" else 1) if xt.ndim > 1 else None
    want = (n, channels_out) + tuple(xt.shape[2:]) if channels_out else tuple(xt.shape)
    if tuple(model_output.shape) != want:
        raise ValueError(f"the model output must have shape {want} (variance={variance!r}), "
                         f"got {tuple(model_output.shape)}")
    final = tp_arr < 0
    safe_beta = np.where(final, 1.0, c["beta"])
    safe_tilde = np.where(final, 1.0, c["posterior_variance"])
    coef[:, _C_A] = c["coef_x0"]
    coef[:, _C_B] = c["coef_xt"]
    coef[:, _C_SIGMA] = np.sqrt(safe_tilde) if variance == "fixed_small" else np.sqrt(safe_beta)
    coef[:, _C_LOGBETA] = np.log(safe_beta)
    coef[:, _C_LOGTILDE] = np.log(safe_tilde)
    coef[:, _C_NOISE] = (~final).astype(np.float64)
    # With learned_range the kernel reads the variance half at offset D of each (N, 2C * S) row.
    flags = (_F_CLIP if clip else 0) | (_F_LEARNED if variance == "learned_range" else 0)
    return _launch_step(schedule, model_output, xt, coef, flags, pred_mode, noise, seed, index, t_arr, n)


def ddim_step(schedule, model_output, xt, t, t_prev, eta, noise=None, prediction="epsilon", clip=True,
              seed=None, index=None):
    """``ddpm_ref.samplers.ddim_step`` in one kernel: returns device ``(x_prev, x0_hat)``.

    ``x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z`` (eq. 12),
    ``sigma = eta sqrt(beta~)`` (eq. 16); noise as in :func:`ddpm_step`.
    """
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}") from None
    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    pred_mode, c, coef, t_arr, tp_arr, n = _step_common(schedule, model_output, xt, t, t_prev,
                                                        prediction, clip)
    if tuple(model_output.shape) != tuple(xt.shape):
        raise ValueError(f"model_output must have xt's shape {tuple(xt.shape)}, got {tuple(model_output.shape)}")
    ab_prev = c["alpha_bar_prev"]
    sigma = eta * np.sqrt(c["posterior_variance"])
    coef[:, _C_A] = np.sqrt(ab_prev)
    coef[:, _C_B] = np.sqrt(np.maximum(1.0 - ab_prev - sigma ** 2, 0.0))
    coef[:, _C_SIGMA] = sigma
    coef[:, _C_NOISE] = (sigma > 0).astype(np.float64)
    flags = _F_DDIM | (_F_CLIP if clip else 0)
    return _launch_step(schedule, model_output, xt, coef, flags, pred_mode, noise, seed, index, t_arr, n)


def sample(denoiser, schedule, shape, n, seed, sampler="ddpm", num_steps=None, spacing="leading",
           eta=0.0, prediction="epsilon", variance="fixed_small", clip=True, index_offset=0):
    """``ddpm_ref.samplers.sample`` on the GPU (no guidance, no trajectory): device float32 (n, *shape).

    ``denoiser(x, t)`` takes and returns device arrays (x (n, *shape) float32, t int64 (n,) on the
    host). x_T is drawn by :func:`normal` with ``Stream.SAMPLE_INIT`` and every step's noise in the
    step kernel, both following the sampler's noise contract, so a sample equals the reference's.
    """
    from ddpm_ref import samplers
    from ddpm_ref.rng import Stream
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    ts = samplers.timesteps(schedule.T, schedule.T if num_steps is None else num_steps, spacing)
    ts_prev = samplers.previous_timesteps(ts)
    index = int(index_offset) + np.arange(n, dtype=np.int64)
    x = normal(seed, Stream.SAMPLE_INIT, index, 0, shape)
    for t, t_prev in zip(ts.tolist(), ts_prev.tolist()):
        tt = np.full(n, t, dtype=np.int64)
        out = denoiser(x, tt)
        if sampler == "ddpm":
            x, _ = ddpm_step(schedule, out, x, tt, t_prev, None, prediction, variance, clip, seed, index)
        else:
            if variance == "learned_range":
                out = _b.xp().ascontiguousarray(out[:, : out.shape[1] // 2])
            x, _ = ddim_step(schedule, out, x, tt, t_prev, eta, None, prediction, clip, seed, index)
    return x
