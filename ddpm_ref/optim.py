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
import numbers

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


def _int_arg(name: str, v, lo: int = 0) -> int:
    """``v`` as an int >= ``lo``: a Python or NumPy integer, not a bool, float or string (no truncation)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r} ({type(v).__name__})")
    if v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _real_arg(name: str, v, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
              allow_inf: bool = False) -> float:
    """``v`` as a float in the range ``lo..hi`` (ends open or closed): a Python or NumPy real number,
    not a bool or string, finite unless ``allow_inf`` (then +inf only where the range allows it)."""
    if hi == math.inf:
        rng = f"{'>' if lo_open else '>='} {lo:g}" + (" (inf allowed)" if allow_inf else "")
    else:
        rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    what = "number" if allow_inf else "finite number"
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a {what} {rng}, got {v!r} ({type(v).__name__})")
    f = float(v)
    if math.isnan(f) or (math.isinf(f) and not allow_inf) or f < lo or f > hi \
            or (lo_open and f == lo) or (hi_open and f == hi):
        raise ValueError(f"{name} must be a {what} {rng}, got {v!r}")
    return f


def _max_norm_arg(name: str, v) -> float | None:
    """A clipping limit: None (no clipping) or a number > 0; +inf is allowed and means no clipping."""
    if v is None:
        return None
    return _real_arg(name, v, 0.0, lo_open=True, allow_inf=True)


def _adamw_settings(size, lr, beta1, beta2, eps, weight_decay, warmup, max_grad_norm, decay_mask, schedule,
                    total) -> dict:
    """Check AdamW's constructor arguments and return them normalised (ints, floats, a private bool
    mask). Shared with the GPU twin (``ddpm_ref.kernels.optim.AdamW``) so that both refuse the same
    values with the same messages."""
    size = _int_arg("size", size, 1)
    out = {"size": size, "lr": _real_arg("lr", lr, 0.0, lo_open=True)}
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        out[name] = _real_arg(name, b, 0.0, 1.0, hi_open=True)
    out["eps"] = _real_arg("eps", eps, 0.0, lo_open=True)
    out["weight_decay"] = _real_arg("weight_decay", weight_decay, 0.0)
    out["warmup"] = warmup = _int_arg("warmup", warmup, 0)
    out["max_grad_norm"] = _max_norm_arg("max_grad_norm", max_grad_norm)
    if not isinstance(schedule, str) or schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    out["schedule"] = schedule
    if total is not None:
        if isinstance(total, (bool, np.bool_)) or not isinstance(total, numbers.Integral):
            raise ValueError(f"total must be an integer number of updates or None, got {total!r}")
        total = int(total)
    if schedule != "constant" and (total is None or total <= warmup):
        raise ValueError(f"schedule {schedule!r} needs an integer total > warmup = {warmup} updates, "
                         f"got total={total!r}")
    if total is not None and total < 1:
        raise ValueError(f"total must be an integer >= 1 (updates) or None, got {total!r}")
    out["total"] = total
    if decay_mask is not None:
        a = np.asarray(decay_mask)
        if a.dtype != np.bool_ or a.shape != (size,):
            raise ValueError(f"decay_mask must be a bool array of shape ({size},), got {a.dtype} array of "
                             f"shape {a.shape}")
        decay_mask = a.copy()              # the optimizer's own: a later edit of the caller's changes nothing
    out["decay_mask"] = decay_mask
    return out


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
    max_norm = _max_norm_arg("max_norm", max_norm)
    if max_norm is not None and not g.flags.writeable:
        raise ValueError("grad is read-only, but clipping scales it in place")
    norm = global_norm(g)
    if max_norm is not None and math.isfinite(norm) and norm > max_norm:
        g *= np.float32(max_norm / (norm + 1e-6))
    return norm


def warmup_lr(lr: float, k: int, warmup: int) -> float:
    """Learning rate of the k-th update (1-based): ``lr * min(1, k / warmup)``; ``warmup`` 0 -> lr.

    ``lr`` a finite number >= 0, ``k`` an integer >= 1, ``warmup`` an integer >= 0 (ValueError otherwise).
    """
    lr = _real_arg("lr", lr, 0.0)
    k = _int_arg("k (the 1-based update number)", k, 1)
    warmup = _int_arg("warmup", warmup, 0)
    if warmup == 0:
        return lr
    return lr * min(1.0, k / warmup)


def scheduled_lr(lr: float, k: int, warmup: int, schedule: str = "constant", total: int | None = None) -> float:
    """Learning rate of the k-th update (1-based): warmup, then ``schedule``'s decay to 0 at ``total``.

    "constant": ``warmup_lr``. "cosine" / "linear" (module docstring): after the warmup, progress
    ``p = clip((k - warmup) / (total + 1 - warmup), 0, 1)`` and the rate ``lr (1 + cos(pi p)) / 2``
    or ``lr (1 - p)``. ``total`` (the number of updates of the run, an integer > warmup) is needed for
    a decay; given with "constant" it must still be an integer >= 1 (or None).
    """
    if not isinstance(schedule, str) or schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    base = warmup_lr(lr, k, warmup)             # checks lr, k and warmup
    if total is not None:
        if isinstance(total, (bool, np.bool_)) or not isinstance(total, numbers.Integral) or total < 1:
            raise ValueError(f"total must be an integer >= 1 (updates) or None, got total={total!r}")
        total = int(total)
    if schedule == "constant":
        return base
    if total is None or total <= warmup:
        raise ValueError(f"lr schedule {schedule!r} needs total > warmup = {warmup} updates, got total={total!r}")
    if k <= warmup:
        return base
    p = min(1.0, max(0.0, (k - warmup) / (total + 1 - warmup)))
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * p))
    return base * (1.0 - p)


def ema_decay(decay: float, k: int, warmup: bool = True) -> float:
    """EMA decay used after the k-th update (1-based): ``min(decay, (1 + s) / (10 + s))``, s = k - 1.

    ``decay`` a number in [0, 1], ``k`` an integer >= 1, ``warmup`` True or False (ValueError otherwise).
    """
    decay = _real_arg("EMA decay", decay, 0.0, 1.0)
    k = _int_arg("k (the 1-based update number)", k, 1)
    if not isinstance(warmup, (bool, np.bool_)):
        raise ValueError(f"EMA warmup must be True or False, got {warmup!r}")
    if not warmup:
        return decay
    s = k - 1
    return min(decay, (1.0 + s) / (10.0 + s))


def ema_update(ema: np.ndarray, params: np.ndarray, d: float) -> None:
    """In place: ``ema <- d * ema + (1 - d) * params`` (float32), chunk by chunk as AdamW's update,
    with one chunk-sized scratch buffer for the products (128 KB: allocating it per call costs
    nothing measurable). Same signature as its GPU mirror, ``ddpm_ref.kernels.optim.ema_update``.
    """
    _check_flat("ema", ema)
    _check_flat("params", params)
    if ema.shape != params.shape:
        raise ValueError(f"ema shape {ema.shape} does not match params shape {params.shape}")
    d = _real_arg("EMA decay", d, 0.0, 1.0)
    if not ema.flags.writeable:
        raise ValueError("ema is read-only, but the EMA update writes it in place")
    buf = np.empty(min(ema.size, _UPDATE_CHUNK), np.float32)
    e_all, p_all = ema.reshape(-1), params.reshape(-1)
    d32, c32 = np.float32(d), np.float32(1.0 - d)
    for lo in range(0, ema.size, _UPDATE_CHUNK):
        hi = min(ema.size, lo + _UPDATE_CHUNK)
        e, tmp = e_all[lo:hi], buf[:hi - lo]
        np.multiply(p_all[lo:hi], c32, out=tmp)    # params first: correct when ema is params
        e *= d32
        e += tmp


def check_state(state: dict, size: int):
    """Validate an AdamW ``state_dict`` for ``size`` parameters; returns ``(m, v, step)``.

    ``m``: float32 (size,), finite; ``v``: float32 (size,), finite and >= 0 (a second moment: a negative
    entry would make the next update NaN); ``step``: an integer >= 0 (not a bool, float or string).
    Any other value, or a missing key, is a ValueError naming it. Shared by this optimizer and the GPU
    one (``ddpm_ref.kernels.optim``), whose state has the same format.
    """
    if not isinstance(state, dict):
        raise ValueError(f"optimizer state must be a dict with 'm', 'v' and 'step', got {type(state).__name__}")
    missing = [k for k in ("m", "v", "step") if k not in state]
    if missing:
        raise ValueError(f"optimizer state is missing {missing} (has {sorted(map(str, state))})")
    m = np.asarray(state["m"])
    v = np.asarray(state["v"])
    step = state["step"]
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"optimizer step must be an integer >= 0, got {step!r}")
    step = int(step)
    for name, a in (("m", m), ("v", v)):
        if a.shape != (size,) or a.dtype != np.float32:
            raise ValueError(f"optimizer state {name!r} must be float32 ({size},), got {a.dtype} {a.shape}")
    if not np.isfinite(m).all():
        raise ValueError("optimizer state 'm' contains NaN or inf")
    if not (np.isfinite(v).all() and (v >= 0).all()):
        raise ValueError("optimizer state 'v' must be finite and >= 0 (a second moment), it contains "
                         "NaN, inf or negative values")
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

    Arguments are checked, never coerced: ``size`` (>= 1), ``warmup`` (>= 0) and ``total`` (>= 1, or
    None) are integers (Python or NumPy; not bools, floats or strings); ``lr``, ``eps`` (> 0),
    ``weight_decay`` (>= 0) and ``beta1``, ``beta2`` (in [0, 1)) are finite real numbers, not bools
    or strings; ``max_grad_norm`` is None or a number > 0 (+inf: measure only, as ``clip_grad_norm``);
    ``decay_mask`` a bool array of shape (size,), copied. Anything else is a ValueError naming it.
    ``step`` checks that ``params``, the moments and (when clipping) ``grad`` are writable before it
    writes anything, so a step that raises changes nothing.
    """

    def __init__(self, size: int, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup: int = 0,
                 max_grad_norm: float | None = None, decay_mask: np.ndarray | None = None,
                 schedule: str = "constant", total: int | None = None):
        c = _adamw_settings(size, lr, beta1, beta2, eps, weight_decay, warmup, max_grad_norm, decay_mask,
                            schedule, total)
        size = c["size"]
        self.size = size
        self.lr = c["lr"]
        self.beta1 = c["beta1"]
        self.beta2 = c["beta2"]
        self.eps = c["eps"]
        self.weight_decay = c["weight_decay"]
        self.warmup = c["warmup"]
        self.max_grad_norm = c["max_grad_norm"]
        self.decay_mask = c["decay_mask"]           # a copy (or None)
        self.schedule = c["schedule"]
        self.total = c["total"]
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
        # Everything the update writes must be writable, checked before anything is written: a step
        # that fails changes nothing (neither the moments nor the gradient nor the count).
        for name, a in (("params", params), ("optimizer state m", self.m), ("optimizer state v", self.v)):
            if not a.flags.writeable:
                raise ValueError(f"{name} is read-only: AdamW.step updates it in place")
        if self.max_grad_norm is not None and not grad.flags.writeable:
            raise ValueError("grad is read-only, but max_grad_norm clips it in place")
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
        """Restore ``state_dict()``'s content (copied in); an invalid state is a ValueError and changes nothing."""
        m, v, step = check_state(state, self.size)
        self.m[...] = m
        self.v[...] = v
        self.step_count = step
