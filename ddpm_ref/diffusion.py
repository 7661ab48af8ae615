"""The forward process, the training objectives and the variational bound in bits/dim.

What it is: the closed-form mathematics of DDPM (Ho, Jain & Abbeel 2020, arXiv 2006.11239) around a
denoiser, for any array shape ``(N, ...)`` with the batch first:

* the forward process ``q(x_t | x_0)`` (eq. 4) and the posterior ``q(x_{t-1} | x_t, x_0)`` (eqs. 6-7);
* conversions between the three parameterisations of the model output: eps (DDPM eq. 11),
  x0 ("sample") and v (Salimans & Ho 2022, "Progressive distillation", sec. 4 and appendix D);
* the training target for each, loss weightings (uniform; min-SNR-gamma, Hang et al. 2023) and two
  timestep samplers (uniform; improved-diffusion's loss-second-moment importance sampler, Nichol &
  Dhariwal 2021, sec. 3.3);
* the variational bound (DDPM eq. 5 and sec. 3.3): prior KL, KL terms, discretised Gaussian decoder,
  in bits per dimension; ``bits_per_dim`` evaluates it for any denoiser callable, over all T or as
  an unbiased estimate from a subset of timesteps; the hybrid loss's VB term with its hand-written
  gradient w.r.t. the learned variance (Nichol & Dhariwal 2021, sec. 3.1, eq. 15-16);
* ``gaussian_oracle_denoiser``: the exact optimal denoiser when the data are Gaussian, the oracle the
  tests of this module and of the samplers use.

What it is not: no network, no sampling loop (``samplers.py``), no optimiser.

Conventions. ``t`` is a per-sample integer array of shape (N,) with values in [0, T); index ``t``
is the paper's timestep ``t + 1`` (see ``schedule.py``). Coefficients are read from the float64
tables and cast to the dtype of the data, so float32 data give float32 results and float64 data
(gradient checks) give float64. Bits/dim quantities are always computed in float64.

Variance choices for ``p(x_{t-1} | x_t)``: ``"fixed_small"`` (``beta~_t``), ``"fixed_large"``
(``beta_t``, with ``beta~_2`` in place of ``beta_1`` for the first step as DDPM's code does), and
``"learned_range"`` (improved-diffusion eq. 15: the model outputs ``v`` in [-1, 1] per element and
``log sigma^2 = frac log beta_t + (1 - frac) log beta~_t`` with ``frac = (v + 1) / 2``, where
``log beta~_t`` is ``posterior_log_variance_clipped``). With ``"learned_range"`` the model output
has ``2C`` channels on axis 1: ``[eps-or-x0-or-v (C), v_interp (C)]``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from . import rng
from .schedule import Schedule

__all__ = [
    "PREDICTIONS", "VARIANCES", "WEIGHTINGS",
    "check_t", "q_sample", "q_posterior", "q_mean_variance",
    "x0_from_eps", "eps_from_x0", "v_from_eps", "v_from_x0", "x0_from_v", "eps_from_v",
    "split_output", "to_x0_eps", "training_target", "loss_weights",
    "gaussian_oracle_denoiser",
]

PREDICTIONS = ("epsilon", "sample", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
WEIGHTINGS = ("uniform", "min_snr")


# --------------------------------------------------------------------------- validation helpers
def _check_schedule(schedule) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a ddpm_ref.schedule.Schedule, got {type(schedule).__name__}")
    return schedule


def _check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _as_float_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "f":
        if arr.dtype.kind in "iub":
            arr = arr.astype(np.float64)
        else:
            raise ValueError(f"{name} must be a float array, got dtype {arr.dtype}")
    if arr.ndim < 1:
        raise ValueError(f"{name} must have a batch axis: shape (N, ...), got a scalar")
    return arr


def check_t(schedule: Schedule, t, n: int | None = None) -> np.ndarray:
    """Validate per-sample timesteps: an integer array of shape (N,) with values in [0, T).

    Returns it as int64. ``n``, when given, is the batch size N it must match.
    """
    arr = np.asarray(t)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            raise ValueError(f"t must be an integer array, got dtype {arr.dtype} (cast it with .astype(np.int64))")
        raise ValueError(f"t must be an integer array of shape (N,), got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"t must be a per-sample array of shape (N,), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"t has {arr.shape[0]} entries but the batch has N = {n} samples")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= schedule.T:
            bad = lo if lo < 0 else hi
            raise ValueError(f"t must lie in [0, T) = [0, {schedule.T}), got t = {bad}")
    return arr.astype(np.int64)


def _coef(table: np.ndarray, t: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``table[t]`` shaped (N, 1, ..., 1) to broadcast against ``like`` (N, ...), in like's dtype."""
    c = table[t].reshape((t.shape[0],) + (1,) * (like.ndim - 1))
    return c.astype(like.dtype, copy=False)


def _same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape, got {a.shape} and {b.shape}")


def _result_dtype(*arrays) -> np.dtype:
    return np.result_type(*[a.dtype for a in arrays])


# --------------------------------------------------------------------------- forward process
def q_sample(schedule: Schedule, x0, t, noise) -> np.ndarray:
    """Draw ``x_t ~ q(x_t | x_0)`` (DDPM eq. 4): ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.

    x0, noise: (N, ...) with the same shape; t: int (N,). Returns (N, ...) in their common dtype.
    """
    _check_schedule(schedule)
    x0 = _as_float_array(x0, "x0")
    noise = _as_float_array(noise, "noise")
    _same_shape(x0, noise, "x0", "noise")
    t = check_t(schedule, t, x0.shape[0])
    dt = _result_dtype(x0, noise)
    ref = np.empty((0,) * x0.ndim, dtype=dt)
    return (_coef(schedule.sqrt_alpha_bar, t, ref) * x0
            + _coef(schedule.sqrt_one_minus_alpha_bar, t, ref) * noise).astype(dt, copy=False)


def q_mean_variance(schedule: Schedule, x0, t):
    """Mean, variance and log-variance of ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``.

    Returns three arrays of x0's shape (the variances are broadcast views).
    """
    _check_schedule(schedule)
    x0 = _as_float_array(x0, "x0")
    t = check_t(schedule, t, x0.shape[0])
    mean = _coef(schedule.sqrt_alpha_bar, t, x0) * x0
    var = np.broadcast_to(_coef(1.0 - schedule.alpha_bar, t, x0), x0.shape)
    with np.errstate(divide="ignore"):
        log_var = np.broadcast_to(_coef(np.log(1.0 - schedule.alpha_bar), t, x0), x0.shape)
    return mean, var, log_var


def q_posterior(schedule: Schedule, x0, xt, t):
    """The forward-process posterior ``q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)`` (DDPM eqs. 6-7).

    ``mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
    + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t``, ``beta~_t = (1 - alpha_bar_{t-1})
    / (1 - alpha_bar_t) beta_t``. Returns ``(mean, variance, log_variance)``, each of x0's shape
    (variance and log_variance are read-only broadcast views); log_variance is
    ``posterior_log_variance_clipped`` (finite at t index 0, where beta~ = 0).
    """
    _check_schedule(schedule)
    x0 = _as_float_array(x0, "x0")
    xt = _as_float_array(xt, "xt")
    _same_shape(x0, xt, "x0", "xt")
    t = check_t(schedule, t, x0.shape[0])
    dt = _result_dtype(x0, xt)
    ref = np.empty((0,) * x0.ndim, dtype=dt)
    mean = (_coef(schedule.posterior_mean_coef1, t, ref) * x0
            + _coef(schedule.posterior_mean_coef2, t, ref) * xt).astype(dt, copy=False)
    var = np.broadcast_to(_coef(schedule.posterior_variance, t, ref), x0.shape)
    log_var = np.broadcast_to(_coef(schedule.posterior_log_variance_clipped, t, ref), x0.shape)
    return mean, var, log_var


# --------------------------------------------------------------------------- parameterisations
def _pair(schedule, xt, other, t, name):
    _check_schedule(schedule)
    xt = _as_float_array(xt, "xt")
    other = _as_float_array(other, name)
    _same_shape(xt, other, "xt", name)
    t = check_t(schedule, t, xt.shape[0])
    dt = _result_dtype(xt, other)
    ref = np.empty((0,) * xt.ndim, dtype=dt)
    return xt, other, t, ref, dt


def x0_from_eps(schedule: Schedule, xt, t, eps) -> np.ndarray:
    """``x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)`` (DDPM eq. 4 solved for x_0).

    Undefined where alpha_bar_t = 0 (the last step of a zero-terminal-SNR schedule): use v there.
    """
    xt, eps, t, ref, dt = _pair(schedule, xt, eps, t, "eps")
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((xt - _coef(schedule.sqrt_one_minus_alpha_bar, t, ref) * eps)
                / _coef(schedule.sqrt_alpha_bar, t, ref)).astype(dt, copy=False)


def eps_from_x0(schedule: Schedule, xt, t, x0) -> np.ndarray:
    """``eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)`` (DDPM eq. 4 solved for eps)."""
    xt, x0, t, ref, dt = _pair(schedule, xt, x0, t, "x0")
    return ((xt - _coef(schedule.sqrt_alpha_bar, t, ref) * x0)
            / _coef(schedule.sqrt_one_minus_alpha_bar, t, ref)).astype(dt, copy=False)


def v_from_eps(schedule: Schedule, xt, t, eps) -> np.ndarray:
    """``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0`` with x_0 eliminated:
    ``v = (eps - sqrt(1 - alpha_bar_t) x_t) / sqrt(alpha_bar_t)`` (undefined where alpha_bar_t = 0)."""
    xt, eps, t, ref, dt = _pair(schedule, xt, eps, t, "eps")
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((eps - _coef(schedule.sqrt_one_minus_alpha_bar, t, ref) * xt)
                / _coef(schedule.sqrt_alpha_bar, t, ref)).astype(dt, copy=False)


def v_from_x0(schedule: Schedule, xt, t, x0) -> np.ndarray:
    """``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0`` with eps eliminated:
    ``v = (sqrt(alpha_bar_t) x_t - x_0) / sqrt(1 - alpha_bar_t)``."""
    xt, x0, t, ref, dt = _pair(schedule, xt, x0, t, "x0")
    return ((_coef(schedule.sqrt_alpha_bar, t, ref) * xt - x0)
            / _coef(schedule.sqrt_one_minus_alpha_bar, t, ref)).astype(dt, copy=False)


def x0_from_v(schedule: Schedule, xt, t, v) -> np.ndarray:
    """``x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v`` (Salimans & Ho 2022, sec. 4)."""
    xt, v, t, ref, dt = _pair(schedule, xt, v, t, "v")
    return (_coef(schedule.sqrt_alpha_bar, t, ref) * xt
            - _coef(schedule.sqrt_one_minus_alpha_bar, t, ref) * v).astype(dt, copy=False)


def eps_from_v(schedule: Schedule, xt, t, v) -> np.ndarray:
    """``eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v`` (Salimans & Ho 2022, appendix D)."""
    xt, v, t, ref, dt = _pair(schedule, xt, v, t, "v")
    return (_coef(schedule.sqrt_one_minus_alpha_bar, t, ref) * xt
            + _coef(schedule.sqrt_alpha_bar, t, ref) * v).astype(dt, copy=False)


def split_output(model_output, variance: str):
    """Split a model output into ``(prediction (N, C, ...), v_interp (N, C, ...) or None)``.

    With ``variance="learned_range"`` the output has 2C channels on axis 1 (improved-diffusion's
    layout ``[mean part, variance interpolation]``); otherwise it is returned whole with ``None``.
    """
    _check_choice(variance, "variance", VARIANCES)
    out = _as_float_array(model_output, "model_output")
    if variance != "learned_range":
        return out, None
    if out.ndim < 2 or out.shape[1] % 2:
        raise ValueError("with variance='learned_range' the model output needs an even number of "
                         f"channels on axis 1 (2C), got shape {out.shape}")
    c = out.shape[1] // 2
    return out[:, :c], out[:, c:]


def to_x0_eps(schedule: Schedule, model_output, xt, t, prediction: str):
    """Turn a prediction (the mean part of the model output, xt's shape) into ``(x0_hat, eps_hat)``.

    ``"epsilon"``: x0 from eps (eq. 4); ``"sample"``: eps from x0; ``"v"``: both from v.
    """
    _check_choice(prediction, "prediction", PREDICTIONS)
    out = _as_float_array(model_output, "model_output")
    xt = _as_float_array(xt, "xt")
    if out.shape != xt.shape:
        raise ValueError(f"model_output must have xt's shape {xt.shape}, got {out.shape} (split a "
                         "learned-variance output with split_output first)")
    if prediction == "epsilon":
        return x0_from_eps(schedule, xt, t, out), out
    if prediction == "sample":
        return out, eps_from_x0(schedule, xt, t, out)
    return x0_from_v(schedule, xt, t, out), eps_from_v(schedule, xt, t, out)


def training_target(schedule: Schedule, x0, t, noise, prediction: str) -> np.ndarray:
    """What the network regresses onto for ``x_t = q_sample(x0, t, noise)``: ``noise`` for
    ``"epsilon"`` (DDPM eq. 14, L_simple), ``x0`` for ``"sample"``, and
    ``v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0`` for ``"v"`` (Salimans & Ho 2022)."""
    _check_choice(prediction, "prediction", PREDICTIONS)
    _check_schedule(schedule)
    x0 = _as_float_array(x0, "x0")
    noise = _as_float_array(noise, "noise")
    _same_shape(x0, noise, "x0", "noise")
    t = check_t(schedule, t, x0.shape[0])
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x0
    dt = _result_dtype(x0, noise)
    ref = np.empty((0,) * x0.ndim, dtype=dt)
    return (_coef(schedule.sqrt_alpha_bar, t, ref) * noise
            - _coef(schedule.sqrt_one_minus_alpha_bar, t, ref) * x0).astype(dt, copy=False)


def loss_weights(schedule: Schedule, t, prediction: str, weighting: str = "uniform",
                 gamma: float = 5.0) -> np.ndarray:
    """Per-sample weights (N,) float64 for the mean-squared error in the prediction's own space.

    ``"uniform"``: ones (L_simple). ``"min_snr"`` (Hang et al. 2023, "Efficient diffusion training via
    min-SNR weighting strategy", eq. 8): the loss measured in x0 space, ``|x0 - x0_hat|^2``, gets the
    weight ``min(SNR_t, gamma)``. The error in each space is a fixed multiple of the x0 error:
    ``|eps - eps_hat|^2 = SNR |x0 - x0_hat|^2`` and ``|v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2``, so the
    weight on the prediction's own MSE is ``min(SNR, gamma) / SNR = min(1, gamma/SNR)`` for eps,
    ``min(SNR, gamma)`` for x0 and ``min(SNR, gamma) / (SNR + 1)`` for v. (At SNR = 0, the last step of a
    zero-terminal-SNR schedule, the eps weight takes its limit 1.)
    """
    _check_schedule(schedule)
    _check_choice(prediction, "prediction", PREDICTIONS)
    _check_choice(weighting, "weighting", WEIGHTINGS)
    t = check_t(schedule, t)
    if weighting == "uniform":
        return np.ones(t.shape[0], dtype=np.float64)
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a positive number, got {gamma!r}") from None
    if not (math.isfinite(g) and g > 0):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    snr = schedule.snr[t]
    if prediction == "epsilon":
        with np.errstate(divide="ignore"):
            return np.minimum(1.0, g / snr)
    if prediction == "sample":
        return np.minimum(snr, g)
    return np.minimum(snr, g) / (snr + 1.0)


# --------------------------------------------------------------------------- Gaussian oracle
def gaussian_oracle_denoiser(schedule: Schedule, mu, s, prediction: str = "epsilon") -> Callable:
    """The exact optimal (MMSE) denoiser for Gaussian data ``x0 ~ N(mu, s^2 I)``.

    With ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (ab = alpha_bar_t), x0 and x_t are jointly Gaussian
    in each dimension, so
    ``E[x0 | x_t] = mu + s^2 sqrt(ab) / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu)
    = (sqrt(ab) s^2 x_t + (1 - ab) mu) / (ab s^2 + 1 - ab)``,
    and by linearity of eq. 4 ``E[eps | x_t] = (x_t - sqrt(ab) E[x0 | x_t]) / sqrt(1 - ab)`` and
    ``E[v | x_t] = sqrt(ab) E[eps | x_t] - sqrt(1 - ab) E[x0 | x_t]``. These minimise the eps, x0 and v
    regression losses, so they are what a perfectly trained network outputs; the reverse process
    driven by them samples N(mu, s^2) up to the discretisation of the reverse process.

    mu, s: scalars or arrays broadcasting against one sample's shape (per-dimension means and
    standard deviations; s > 0). Returns ``f(x, t, y=None) -> model_output`` with the denoiser
    convention of ``samplers.sample`` (x (N, ...), t int (N,), y ignored), in x's dtype, computed in
    float64. It never divides by alpha_bar, so it is defined at zero terminal SNR too.
    """
    _check_schedule(schedule)
    _check_choice(prediction, "prediction", PREDICTIONS)
    mu = np.asarray(mu, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if not np.all(np.isfinite(mu)):
        raise ValueError(f"mu must be finite, got {mu!r}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError(f"s (the data standard deviation) must be positive and finite, got {s!r}")
    s2 = s * s

    def denoiser(x, t, y=None):
        x = _as_float_array(x, "x")
        tt = check_t(schedule, t, x.shape[0])
        shape = (tt.shape[0],) + (1,) * (x.ndim - 1)
        ab = schedule.alpha_bar[tt].reshape(shape)                 # (N, 1, ..., 1)
        sab = schedule.sqrt_alpha_bar[tt].reshape(shape)
        s1ab = schedule.sqrt_one_minus_alpha_bar[tt].reshape(shape)
        xf = x.astype(np.float64)
        x0_hat = (sab * s2 * xf + (1.0 - ab) * mu) / (ab * s2 + 1.0 - ab)   # E[x0 | xt]
        if prediction == "sample":
            out = x0_hat
        else:
            eps_hat = (xf - sab * x0_hat) / s1ab                           # E[eps | xt]
            out = eps_hat if prediction == "epsilon" else sab * eps_hat - s1ab * x0_hat
        return out.astype(x.dtype, copy=False)

    denoiser.__doc__ = f"Gaussian oracle denoiser (prediction={prediction!r})"
    return denoiser
