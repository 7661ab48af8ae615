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

What it is not: the reference. Every per-step or per-sample *scalar* (square roots of alpha_bar,
posterior coefficients, sigma) is computed on the host in float64 from the ``Schedule`` tables and
handed to the kernel as float32, exactly once; the kernels do the per-element work in float32.
"""
from __future__ import annotations

import numpy as np

from . import runtime as _b
from ._jit import cuda, device, kernel
from numba import float64  # noqa: E402  (numba is importable once ._jit imported)
from .rng import philox4x32_10, philox_normal4, word_to_uniform

__all__ = [
    "random_bits", "uniform", "normal", "q_sample_target", "mse_noise_loss", "PREDICTIONS",
    "ddpm_step", "ddim_step",
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


def random_bits(seed, stream, index, step=0, shape=(), sub=0):
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


def normal(seed, stream, index, step=0, shape=(), sub=0):
    """Device float32 normals ``(len(index),) + shape``, as ``ddpm_ref.rng.normal``."""
    return _floats(0, seed, stream, index, step, shape, sub)


def uniform(seed, stream, index, step=0, shape=(), sub=0):
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


def q_sample_target(schedule, x0, t, seed, index, step=0, prediction="epsilon",
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


def mse_noise_loss(schedule, pred, x0, t, seed, index, step=0, prediction="epsilon", weights=None,
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
