"""AdamW, global-norm clipping and the EMA of the weights as one pass over the flat parameter buffer.

What it is: the GPU twin of ``ddpm_ref/optim.py`` (read its docstring for the maths: AdamW,
Loshchilov & Hutter 2019, algorithm 2, with Adam's bias correction, Kingma & Ba 2015; clipping at
global norm, Pascanu et al. 2013; the EMA of DDPM appendix B). Two kernels per update:

1. :func:`grad_sq_norm_kernel`: the squared global norm of the gradient, each block summing its
   grid-stride share in float64 into one slot (deterministic: no atomics; the slots are summed by CuPy).
2. :func:`adamw_ema_kernel`: for each element, in registers, ``g *= clip``; decoupled weight decay;
   ``m, v`` updates; the parameter update; and ``ema <- d ema + (1 - d) theta``: the parameters, the
   moments and the EMA are each read and written once.

The float32 arithmetic is written in the reference's order, so the simulator reproduces the
reference to the bit; a GPU may contract ``a * b + c`` into one FMA (one rounding fewer), which the
tests allow for.

What it is not: a general optimiser. The host keeps the step counter, the warmup and the scalars.
"""
from __future__ import annotations

import math

import numpy as np

from . import runtime as _b
from ._jit import cuda, kernel
from ddpm_ref.optim import _adamw_settings, _max_norm_arg, _real_arg, check_state, scheduled_lr

__all__ = ["AdamW", "global_norm", "clip_grad_norm", "ema_update", "adamw_ema_kernel",
           "grad_sq_norm_kernel"]

_THREADS = 256
_F32_1D = "float32[::1]"


@kernel(f"void({_F32_1D}, float64[::1])")
def grad_sq_norm_kernel(g, partial):
    """partial[block] = sum of g^2 over this block's grid-stride share (float64)."""
    acc = cuda.shared.array(_THREADS, dtype=np.float64)
    tid = cuda.threadIdx.x
    s = 0.0
    for i in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        x = np.float64(g[i])
        s += x * x
    acc[tid] = s
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            acc[tid] += acc[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        partial[cuda.blockIdx.x] = acc[0]


@kernel(f"void({_F32_1D}, {_F32_1D}, {_F32_1D}, {_F32_1D}, {_F32_1D}, uint8[::1], float32, float32, "
        "float32, float32, float32, float32, float32, float32, float32, float32, float32, int32)")
def adamw_ema_kernel(params, grad, m, v, ema, decay_mask, clip, decay_factor, b1, one_minus_b1,
                     b2, one_minus_b2, sqrt_bc2, eps, step_size, ema_d, ema_one_minus_d, flags):
    """One fused AdamW(+EMA) update of every element (flags: 1 weight decay, 2 use mask, 4 EMA, 8 clip).

    g = grad * clip (written back: the reference clips in place); theta *= decay_factor where decayed;
    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; theta -= step_size * m / (sqrt(v) / sqrt(bc2)
    + eps); ema = d ema + (1 - d) theta. Scalars arrive precomputed in float64 and cast once, as the
    reference casts them (``np.float32(1.0 - d)``, ``np.float32(lr / bc1)``).
    """
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        g = grad[i]
        if flags & 8:
            g = g * clip
            grad[i] = g
        p = params[i]
        if flags & 1:
            if (flags & 2) == 0 or decay_mask[i] != 0:
                p = p * decay_factor
        mi = m[i] * b1 + g * one_minus_b1
        vi = v[i] * b2 + (g * g) * one_minus_b2
        m[i] = mi
        v[i] = vi
        denom = math.sqrt(vi) / sqrt_bc2 + eps
        p = p - (mi / denom) * step_size
        params[i] = p
        if flags & 4:
            ema[i] = ema[i] * ema_d + ema_one_minus_d * p


@kernel(f"void({_F32_1D}, {_F32_1D}, float32, float32)")
def ema_kernel(ema, params, d, one_minus_d):
    """ema <- d * ema + (1 - d) * params."""
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
        ema[i] = ema[i] * d + one_minus_d * params[i]


def _flat(a, name):
    _b.check_array(a, name, ndim=1)
    return a


def global_norm(g) -> float:
    """||g||_2 of a flat device float32 buffer, squares summed in float64 (as the reference)."""
    _flat(g, "grad")
    xp = _b.xp()
    blocks, threads = _b.launch_1d(g.shape[0], _THREADS)
    blocks = min(blocks, 1024)           # a few partial sums per SM are plenty
    partial = xp.zeros(blocks, dtype=xp.float64)
    grad_sq_norm_kernel[blocks, threads](g, partial)
    return math.sqrt(float(_b.to_host(partial.sum())))


def _clip_scale(norm: float, max_norm) -> float | None:
    if max_norm is None:
        return None
    if math.isfinite(norm) and norm > max_norm:
        return max_norm / (norm + 1e-6)
    return None


def clip_grad_norm(g, max_norm) -> float:
    """Scale the device gradient in place so that ``||g|| <= max_norm``; return the norm before."""
    max_norm = _max_norm_arg("max_norm", max_norm)     # the reference's check, before any work
    norm = global_norm(g)
    scale = _clip_scale(norm, max_norm)
    if scale is not None:
        g *= np.float32(scale)
    return norm


def ema_update(ema, params, d: float) -> None:
    """In place on device buffers: ``ema <- d * ema + (1 - d) * params``."""
    _flat(ema, "ema")
    _flat(params, "params")
    if ema.shape != params.shape:
        raise ValueError(f"ema shape {tuple(ema.shape)} does not match params shape {tuple(params.shape)}")
    d = _real_arg("EMA decay", d, 0.0, 1.0)
    blocks, threads = _b.launch_1d(params.shape[0], _THREADS)
    ema_kernel[blocks, threads](ema, params, np.float32(d), np.float32(1.0 - d))


class AdamW:
    """``ddpm_ref.optim.AdamW`` on device buffers, the EMA update optionally fused into the same pass.

    Same constructor, same ``lr_at``, ``state_dict`` (host arrays) and ``load_state_dict``.
    ``opt.step(params, grad, ema=None, ema_d=None)`` updates ``params`` (and ``ema`` with decay
    ``ema_d``) in place and returns ``{"lr": lr_k, "grad_norm": ||g|| before clipping, "skipped": bool}``;
    a non-finite gradient norm skips the update (nothing changes, ``skipped`` True), as the reference.
    """

    def __init__(self, size: int, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup: int = 0,
                 max_grad_norm: float | None = None, decay_mask=None, schedule: str = "constant",
                 total: int | None = None):
        # The reference's checks and normalisation (ddpm_ref.optim._adamw_settings): the same values
        # are refused with the same messages; lr_at is the reference's scheduled_lr.
        c = _adamw_settings(size, lr, beta1, beta2, eps, weight_decay, warmup, max_grad_norm, decay_mask,
                            schedule, total)
        self.size, self.lr, self.beta1, self.beta2 = c["size"], c["lr"], c["beta1"], c["beta2"]
        self.eps, self.weight_decay, self.warmup, self.max_grad_norm = (c["eps"], c["weight_decay"], c["warmup"],
                                                                        c["max_grad_norm"])
        self.schedule, self.total = c["schedule"], c["total"]
        xp = _b.xp()
        self.m = xp.zeros(self.size, dtype=xp.float32)
        self.v = xp.zeros(self.size, dtype=xp.float32)
        if c["decay_mask"] is None:
            self.decay_mask = xp.zeros(1, dtype=xp.uint8)
            self._use_mask = False
        else:
            self.decay_mask = _b.to_device(c["decay_mask"].astype(np.uint8))
            self._use_mask = True
        self._no_ema = xp.zeros(1, dtype=xp.float32)
        self.step_count = 0

    def lr_at(self, k: int) -> float:
        """Learning rate of the k-th update (1-based), as the reference."""
        return scheduled_lr(self.lr, k, self.warmup, self.schedule, self.total)

    def step(self, params, grad, ema=None, ema_d: float | None = None) -> dict:
        """One fused AdamW update of ``params`` from ``grad`` (clipped in place), plus the EMA if given."""
        _flat(params, "params")
        _flat(grad, "grad")
        if params.shape[0] != self.size or grad.shape[0] != self.size:
            raise ValueError(f"params/grad sizes {params.shape[0]}/{grad.shape[0]} do not match the "
                             f"optimizer size {self.size}")
        flags = 0
        if ema is not None:
            _flat(ema, "ema")
            if ema.shape != params.shape:
                raise ValueError(f"ema shape {tuple(ema.shape)} does not match params {tuple(params.shape)}")
            if ema_d is None:
                raise ValueError("ema_d must be a decay in [0, 1] when ema is given, got None")
            ema_d = _real_arg("ema_d (the EMA decay)", ema_d, 0.0, 1.0)
            flags |= 4
        else:
            ema = self._no_ema           # placeholder, never touched without flag 4
            ema_d = 0.0
        norm = global_norm(grad)
        if not math.isfinite(norm):      # as the reference: a NaN/inf gradient changes nothing
            return {"lr": self.lr_at(self.step_count + 1), "grad_norm": norm, "skipped": True}
        scale = _clip_scale(norm, self.max_grad_norm)
        if scale is not None:
            flags |= 8
        k = self.step_count + 1
        lr = self.lr_at(k)
        b1, b2 = self.beta1, self.beta2
        if self.weight_decay:
            flags |= 1
            if self._use_mask:
                flags |= 2
        bc1 = 1.0 - b1 ** k
        bc2 = 1.0 - b2 ** k
        f32 = np.float32
        blocks, threads = _b.launch_1d(self.size, _THREADS)
        adamw_ema_kernel[blocks, threads](
            params, grad, self.m, self.v, ema, self.decay_mask, f32(scale if scale is not None else 1.0),
            f32(1.0 - lr * self.weight_decay), f32(b1), f32(1.0 - b1), f32(b2), f32(1.0 - b2),
            f32(math.sqrt(bc2)), f32(self.eps), f32(lr / bc1), f32(ema_d), f32(1.0 - ema_d), np.int32(flags))
        self.step_count = k
        return {"lr": lr, "grad_norm": norm, "skipped": False}

    def state_dict(self) -> dict:
        """``{"m": float32 (P,), "v": float32 (P,), "step": int}`` as host copies (the reference's format)."""
        return {"m": _b.to_host(self.m), "v": _b.to_host(self.v), "step": int(self.step_count)}

    def load_state_dict(self, state: dict) -> None:
        m, v, step = check_state(state, self.size)     # the reference's rules; nothing changes on error
        m_d, v_d = _b.to_device(m), _b.to_device(v)
        self.m[...] = m_d
        self.v[...] = v_d
        self.step_count = step
