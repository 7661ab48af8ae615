"""Optimisation on flat float32 buffers: AdamW, linear warmup, global-norm clipping, EMA of weights.

What it is: the update rules DDPM training uses (Ho et al. 2020, appendix B: Adam, learning-rate
warmup, gradient clipping at global norm 1, an exponential moving average of the weights used for
sampling), written for the one flat parameter buffer of ``ddpm_ref.params`` so that a whole model
updates in a handful of vectorised NumPy calls, in place, without per-tensor Python loops.
What it is not: a general optimiser library (no parameter groups, no schedulers beyond warmup and
one decay to zero).

AdamW (Loshchilov & Hutter 2019, "Decoupled weight decay regularization", algorithm 2), with the
bias correction of Adam (Kingma & Ba 2015, algorithm 1). At update k = 1, 2, ... with gradient g:

    theta <- theta * (1 - lr_k * lambda)                  (decoupled weight decay)
    m     <- beta1 * m + (1 - beta1) * g
    v     <- beta2 * v + (1 - beta2) * g^2
    theta <- theta - lr_k / (1 - beta1^k) * m / (sqrt(v) / sqrt(1 - beta2^k) + eps)

which is exactly the arithmetic of ``torch.optim.AdamW`` (the test compares against it).

Warmup: ``lr_k = lr * min(1, k / warmup)`` for the k-th update (1-based), so the first update is
not wasted at lr 0; ``warmup = 0`` means the constant rate ``lr``.

Decay (optional, ``schedule`` "cosine" or "linear", over ``total`` updates): after the warmup the rate
falls from ``lr`` towards 0 with progress ``p = (k - warmup) / (total + 1 - warmup)``, clipped to
[0, 1]: cosine ``lr * (1 + cos(pi p)) / 2`` (Loshchilov & Hutter 2017, SGDR, without restarts),
linear ``lr * (1 - p)``. The ``+ 1`` keeps the last update (k = total) at a small non-zero rate
rather than wasting it at exactly 0; updates beyond ``total`` get 0. ``schedule`` "constant" (the
default) is warmup only, as before.

Clipping (Pascanu et al. 2013): the global norm ``||g||_2`` over the whole flat buffer is summed in
float64 (chunked, so no full float64 copy is made); when it exceeds ``max_norm`` the gradient is
scaled by ``max_norm / (norm + 1e-6)``, torch's ``clip_grad_norm_`` rule. The norm before clipping is
returned (a non-finite norm is returned unchanged and the gradient is left alone: the caller stops).

EMA (DDPM appendix B, decay 0.9999 for CIFAR-10) with warmup: after update k the EMA moves by
``ema <- d * ema + (1 - d) * theta`` with ``d = min(decay, (1 + s) / (10 + s))``, ``s = k - 1``
(the warmup of TensorFlow's ExponentialMovingAverage ``num_updates`` and of diffusers' EMAModel):
early on the EMA follows the weights closely (d = 0.1 at the first update) instead of staying near
the random initialisation for ~1/(1 - decay) steps.

Speed: every rule above is elementwise, so AdamW's update and the EMA run over the flat buffer
chunk by chunk (``_UPDATE_CHUNK`` values): the ~14 NumPy passes of an update work on a chunk that
stays in cache, and each array crosses main memory once per update instead of once per pass. The
numbers are exactly those of whole-buffer passes (each element sees the same float32 operations).

State (for checkpoints) is plain float32 arrays plus ints: ``AdamW.state_dict()`` gives
``{"m": (P,), "v": (P,), "step": int}``.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["AdamW", "check_state", "global_norm", "clip_grad_norm", "warmup_lr", "scheduled_lr", "LR_SCHEDULES",
           "ema_decay", "ema_update"]

LR_SCHEDULES = ("constant", "cosine", "linear")

# Chunk sizes (elements) of the passes over the flat buffer, measured on cifar's 35.7 M parameters
# (one thread, benchmarks/bench_ops.py "adamw" row): the float64 squares of global_norm go through
# one reused buffer of _CHUNK values (25 ms, against 75 ms for a fresh 8 MB float64 copy per 1M
# chunk); AdamW's update runs _UPDATE_CHUNK values at a time, so its ~14 passes over a chunk hit the
# cache (1.5x faster than whole-buffer passes at 2^15; 2^14 and 2^16 to 2^18 were 10-20% slower).
_CHUNK = 1 << 16
_UPDATE_CHUNK = 1 << 15


def _check_flat(name: str, a) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != np.float32:
        desc = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a flat (1-D) float32 array, got {desc}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (in-place updates need a flat buffer)")
    return a


def global_norm(g: np.ndarray) -> float:
    """||g||_2 of a flat buffer, squares summed in float64 chunk by chunk (exact to ~1e-15 relative)."""
    g = np.asarray(g).reshape(-1)
    buf = np.empty(min(g.size, _CHUNK), np.float64)
    total = 0.0
    for i in range(0, g.size, _CHUNK):
        c = buf[:min(_CHUNK, g.size - i)]
        np.copyto(c, g[i:i + _CHUNK])
        total += float(np.dot(c, c))
    return math.sqrt(total)


def clip_grad_norm(g: np.ndarray, max_norm: float | None) -> float:
    """Scale the flat gradient ``g`` in place so that ``||g|| <= max_norm``; return the norm before.

    ``max_norm`` None (or inf) only measures. The scale is ``max_norm / (norm + 1e-6)`` when the
    norm exceeds ``max_norm`` (torch.nn.utils.clip_grad_norm_). A non-finite norm leaves ``g`` as is.
    """
    _check_flat("grad", g)
    norm = global_norm(g)
    if max_norm is not None:
        max_norm = float(max_norm)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 (or None), got {max_norm}")
        if math.isfinite(norm) and norm > max_norm:
            g *= np.float32(max_norm / (norm + 1e-6))
    return norm


def warmup_lr(lr: float, k: int, warmup: int) -> float:
    """Learning rate of the k-th update (1-based): ``lr * min(1, k / warmup)``; ``warmup`` 0 -> lr."""
    if warmup <= 0:
        return float(lr)
    return float(lr) * min(1.0, k / warmup)


def scheduled_lr(lr: float, k: int, warmup: int, schedule: str = "constant", total: int | None = None) -> float:
    """Learning rate of the k-th update (1-based): warmup, then ``schedule``'s decay to 0 at ``total``.

    "constant": ``warmup_lr``. "cosine" / "linear" (module docstring): after the warmup, progress
    ``p = clip((k - warmup) / (total + 1 - warmup), 0, 1)`` and the rate ``lr (1 + cos(pi p)) / 2``
    or ``lr (1 - p)``. ``total`` (the number of updates of the run, > warmup) is needed for a decay.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    base = warmup_lr(lr, k, warmup)
    if schedule == "constant" or k <= warmup:
        return base
    if total is None or int(total) <= warmup:
        raise ValueError(f"lr schedule {schedule!r} needs total > warmup = {warmup} updates, got total={total!r}")
    p = min(1.0, max(0.0, (k - warmup) / (int(total) + 1 - warmup)))
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * p))
    return base * (1.0 - p)


def ema_decay(decay: float, k: int, warmup: bool = True) -> float:
    """EMA decay used after the k-th update (1-based): ``min(decay, (1 + s) / (10 + s))``, s = k - 1."""
    if not warmup:
        return float(decay)
    s = k - 1
    return min(float(decay), (1.0 + s) / (10.0 + s))


def ema_update(ema: np.ndarray, params: np.ndarray, d: float) -> None:
    """In place: ``ema <- d * ema + (1 - d) * params`` (float32), chunk by chunk as AdamW's update,
    with one chunk-sized scratch buffer for the products (128 KB: allocating it per call costs
    nothing measurable). Same signature as its GPU mirror, ``ddpm_ref.kernels.optim.ema_update``.
    """
    _check_flat("ema", ema)
    _check_flat("params", params)
    if ema.shape != params.shape:
        raise ValueError(f"ema shape {ema.shape} does not match params shape {params.shape}")
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {d}")
    buf = np.empty(min(ema.size, _UPDATE_CHUNK), np.float32)
    e_all, p_all = ema.reshape(-1), params.reshape(-1)
    d32, c32 = np.float32(d), np.float32(1.0 - d)
    for lo in range(0, ema.size, _UPDATE_CHUNK):
        hi = min(ema.size, lo + _UPDATE_CHUNK)
        e, tmp = e_all[lo:hi], buf[:hi - lo]
        e *= d32
        np.multiply(p_all[lo:hi], c32, out=tmp)
        e += tmp


def check_state(state: dict, size: int):
    """Validate an AdamW ``state_dict`` for ``size`` parameters; returns ``(m, v, step)``.

    Shared by this optimizer and the GPU one (``ddpm_ref.kernels.optim``), whose state has the same format.
    """
    m = np.asarray(state["m"])
    v = np.asarray(state["v"])
    step = int(state["step"])
    for name, a in (("m", m), ("v", v)):
        if a.shape != (size,) or a.dtype != np.float32:
            raise ValueError(f"optimizer state {name!r} must be float32 ({size},), got {a.dtype} {a.shape}")
    if step < 0:
        raise ValueError(f"optimizer step must be >= 0, got {step}")
    return m, v, step


class AdamW:
    """AdamW with bias correction, linear warmup and optional global-norm clipping, on a flat buffer.

    ``opt = AdamW(P, lr=1e-3)``; each ``opt.step(params, grad)`` updates ``params`` in place (float32)
    and returns ``{"lr": lr_k, "grad_norm": ||g|| before clipping, "skipped": bool}``. ``grad`` is
    clipped in place. A non-finite gradient norm skips the update entirely (params, moments and the
    count unchanged, ``skipped`` True) so that the caller can stop on a clean state.
    ``decay_mask`` (optional bool (P,)) restricts weight decay to the marked entries.
    ``schedule`` / ``total``: the learning-rate decay after the warmup (``scheduled_lr``); the default
    "constant" is warmup only.
    """

    def __init__(self, size: int, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup: int = 0,
                 max_grad_norm: float | None = None, decay_mask: np.ndarray | None = None,
                 schedule: str = "constant", total: int | None = None):
        size = int(size)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {b}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if int(warmup) < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
        if schedule != "constant" and (total is None or isinstance(total, bool) or int(total) != total
                                       or int(total) <= int(warmup)):
            raise ValueError(f"schedule {schedule!r} needs an integer total > warmup = {int(warmup)} updates, "
                             f"got total={total!r}")
        if decay_mask is not None:
            decay_mask = np.asarray(decay_mask, dtype=bool)
            if decay_mask.shape != (size,):
                raise ValueError(f"decay_mask must have shape ({size},), got {decay_mask.shape}")
        self.size = size
        self.lr = float(lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.warmup = int(warmup)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.decay_mask = decay_mask
        self.schedule = schedule
        self.total = None if total is None else int(total)
        self.m = np.zeros(size, np.float32)       # first moment (P,)
        self.v = np.zeros(size, np.float32)       # second moment (P,)
        self.step_count = 0                       # updates done so far
        self._tmp = np.empty(min(size, _UPDATE_CHUNK), np.float32)   # scratch: an update allocates nothing

    def lr_at(self, k: int) -> float:
        """Learning rate of the k-th update (1-based): warmup, then the decay of ``schedule``."""
        return scheduled_lr(self.lr, k, self.warmup, self.schedule, self.total)

    def step(self, params: np.ndarray, grad: np.ndarray) -> dict:
        """One AdamW update of ``params`` in place from ``grad`` (clipped in place first)."""
        _check_flat("params", params)
        _check_flat("grad", grad)
        if params.size != self.size or grad.size != self.size:
            raise ValueError(f"params/grad sizes {params.size}/{grad.size} do not match the optimizer "
                             f"size {self.size}")
        norm = clip_grad_norm(grad, self.max_grad_norm)
        if not math.isfinite(norm):               # NaN/inf gradient: change nothing, let the caller stop
            return {"lr": self.lr_at(self.step_count + 1), "grad_norm": norm, "skipped": True}
        k = self.step_count + 1
        lr = self.lr_at(k)
        b1, b2 = self.beta1, self.beta2
        bc1 = 1.0 - b1 ** k
        bc2 = 1.0 - b2 ** k
        f32 = np.float32
        decay = f32(1.0 - lr * self.weight_decay) if self.weight_decay else None
        b1_32, b2_32, c1, c2 = f32(b1), f32(b2), f32(1.0 - b1), f32(1.0 - b2)
        rbc2, eps, step = f32(math.sqrt(bc2)), f32(self.eps), f32(lr / bc1)
        # Chunk by chunk (module docstring, "Speed"): the same numbers as whole-buffer passes.
        for lo in range(0, self.size, _UPDATE_CHUNK):
            hi = min(self.size, lo + _UPDATE_CHUNK)
            p, g, m, v = params[lo:hi], grad[lo:hi], self.m[lo:hi], self.v[lo:hi]
            tmp = self._tmp[:hi - lo]
            if decay is not None:                 # theta <- theta * (1 - lr * lambda)
                if self.decay_mask is None:
                    p *= decay
                else:
                    np.multiply(p, decay, out=p, where=self.decay_mask[lo:hi])
            m *= b1_32                            # m <- b1 m + (1 - b1) g
            np.multiply(g, c1, out=tmp)
            m += tmp
            v *= b2_32                            # v <- b2 v + (1 - b2) g^2
            np.multiply(g, g, out=tmp)
            tmp *= c2
            v += tmp
            # denom = sqrt(v) / sqrt(bc2) + eps; theta -= (lr / bc1) * m / denom
            np.sqrt(v, out=tmp)
            tmp /= rbc2
            tmp += eps
            np.divide(m, tmp, out=tmp)
            tmp *= step
            p -= tmp
        self.step_count = k
        return {"lr": lr, "grad_norm": norm, "skipped": False}

    def state_dict(self) -> dict:
        """Plain arrays and ints: ``{"m": float32 (P,), "v": float32 (P,), "step": int}`` (copies)."""
        return {"m": self.m.copy(), "v": self.v.copy(), "step": int(self.step_count)}

    def load_state_dict(self, state: dict) -> None:
        m, v, step = check_state(state, self.size)
        self.m[...] = m
        self.v[...] = v
        self.step_count = step
