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
    "model_log_variance", "p_mean_variance",
    "UniformSampler", "LossAwareSampler",
    "normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood",
    "prior_bpd", "vb_terms_bpd", "hybrid_vb_loss", "hybrid_vb_scale", "HYBRID_LAMBDA", "bits_per_dim",
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


def _real(value, name: str, expected: str) -> float:
    """``float(value)`` for a real number: a Python or NumPy int or float, or a 0-d array of one.
    Bools and strings are not numbers here (float(True) and float("5") would accept them)."""
    v = value[()] if isinstance(value, np.ndarray) and value.ndim == 0 else value
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    try:
        return float(v)
    except OverflowError:                   # an int beyond float range
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None


def _as_float_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "f":
        if arr.dtype.kind in "iu":          # integer data are exact in float64; bools are not data
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
    return arr.astype(np.int64, copy=False)


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
    g = _real(gamma, "gamma", "a positive number")
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
    mu, s = np.asarray(mu), np.asarray(s)
    for name, a in (("mu", mu), ("s (the data standard deviation)", s)):
        if a.dtype.kind not in "iuf":      # no bools or numeric strings taken as numbers
            raise ValueError(f"{name} must be a real number or array, got {a!r}")
    mu = mu.astype(np.float64)
    s = s.astype(np.float64)
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


# --------------------------------------------------------------------------- reverse-process moments
def _check_shape(shape, n: int) -> tuple:
    """``shape`` as a tuple of Python ints after checking it is ``(N, ...)``: non-negative integers
    (not bools, floats or strings), the first equal to the batch size ``n``."""
    what = f"shape must be a tuple of non-negative integers starting with N = {n}"
    dims = rng.shape_tuple(shape, what)
    if not dims or dims[0] != n:
        raise ValueError(f"{what} (t's length), got {dims}")
    return dims


def model_log_variance(schedule: Schedule, variance: str, t, v_interp=None, shape=None) -> np.ndarray:
    """``log sigma_t^2`` of ``p(x_{t-1} | x_t)`` in float64.

    ``"fixed_small"``: ``posterior_log_variance_clipped`` (log beta~_t, with beta~_2 at t index 0);
    ``"fixed_large"``: ``fixed_large_log_variance`` (log beta_t, but beta~_2 in place of beta_1 at
    t index 0, as DDPM's and improved-diffusion's code do "to get a better decoder log likelihood":
    the decoder's Gaussian then has variance 5.5e-5 instead of 1e-4 for the linear schedule);
    ``"learned_range"``: ``frac log beta_t + (1 - frac) log beta~_t`` with ``frac = (v_interp + 1)/2``
    (Nichol & Dhariwal 2021, eq. 15), elementwise, of v_interp's shape.

    For the fixed choices the result has shape ``shape`` (default ``(N,)``), broadcast; ``shape``
    must be a tuple of non-negative integers ``(N, ...)`` with N = len(t).
    """
    _check_schedule(schedule)
    _check_choice(variance, "variance", VARIANCES)
    t = check_t(schedule, t)
    if variance == "learned_range":
        if v_interp is None:
            raise ValueError("variance='learned_range' needs v_interp, the variance half of the model output")
        v = _as_float_array(v_interp, "v_interp").astype(np.float64)
        if v.shape[0] != t.shape[0]:
            raise ValueError(f"v_interp has batch size {v.shape[0]} but t has {t.shape[0]} entries")
        min_log = _coef(schedule.posterior_log_variance_clipped, t, v)      # (N, 1, ...)
        max_log = _coef(np.log(schedule.betas), t, v)
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log
    table = (schedule.posterior_log_variance_clipped if variance == "fixed_small"
             else schedule.fixed_large_log_variance)
    shape = (t.shape[0],) if shape is None else _check_shape(shape, t.shape[0])
    ref = np.empty((0,) * len(shape), dtype=np.float64)
    return np.broadcast_to(_coef(table, t, ref), shape)


def p_mean_variance(schedule: Schedule, model_output, xt, t, prediction: str = "epsilon",
                    variance: str = "fixed_small", clip: bool = False) -> dict:
    """Mean and log-variance of the reverse step ``p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I)``.

    ``mu_theta = mu~_t(x0_hat, x_t)``: the posterior mean (DDPM eq. 7) at the predicted x0, which for
    eps-prediction equals DDPM eq. 11. ``clip`` clips x0_hat to [-1, 1] first (improved-diffusion's
    ``clip_denoised``). Everything in float64. Returns a dict with ``mean``, ``log_variance`` (both
    xt's shape), ``x0_hat`` and ``eps_hat``.
    """
    pred, v_interp = split_output(model_output, variance)
    xt = _as_float_array(xt, "xt").astype(np.float64)
    pred = pred.astype(np.float64)
    if pred.shape != xt.shape:
        raise ValueError(f"the model output's prediction part must have xt's shape {xt.shape}, got "
                         f"{pred.shape} (variance={variance!r})")
    t = check_t(schedule, t, xt.shape[0])
    x0_hat, eps_hat = to_x0_eps(schedule, pred, xt, t, prediction)
    if clip:
        x0_hat = np.clip(x0_hat, -1.0, 1.0)
    mean, _, _ = q_posterior(schedule, x0_hat, xt, t)
    log_var = model_log_variance(schedule, variance, t, v_interp, xt.shape)
    return {"mean": mean, "log_variance": log_var, "x0_hat": x0_hat, "eps_hat": eps_hat}


# --------------------------------------------------------------------------- timestep samplers
class UniformSampler:
    """Timesteps uniform on [0, T), importance weights 1 (DDPM Algorithm 1).

    ``t_i = rng.randint(seed, Stream.TIMESTEP, index_i, T, step)``: the draw for a sample depends only
    on (seed, its index in the data set, the training step), not on the batch it sits in.
    """

    def __init__(self, T: int):
        if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)) or int(T) < 1:
            raise ValueError(f"T must be an integer >= 1, got {T!r}")
        self.T = int(T)

    def weights(self) -> np.ndarray:
        """The sampling distribution p (T,), here uniform."""
        return np.full(self.T, 1.0 / self.T)

    def sample(self, seed, index, step: int = 0):
        """Returns ``(t int64 (N,), weights float64 (N,))`` for the sample indices ``index`` (N,)."""
        index = np.atleast_1d(np.asarray(index))
        t = rng.randint(seed, rng.Stream.TIMESTEP, index, self.T, step)
        return t, np.ones(t.shape[0], dtype=np.float64)

    def update(self, t, losses) -> None:
        """Nothing to learn; accepts the same arguments as LossAwareSampler.update."""
        _check_update(self.T, t, losses)

    def state_dict(self) -> dict:
        return {"T": np.asarray(self.T, dtype=np.int64)}

    def load_state_dict(self, state: dict) -> None:
        """Check that ``state`` (from :meth:`state_dict`) is for this T; there is nothing else to load."""
        if not isinstance(state, dict):
            raise ValueError(f"UniformSampler state must be a dict, got {type(state).__name__}")
        if "T" not in state:
            raise ValueError(f"UniformSampler state is missing 'T' (has {sorted(state, key=str)})")
        T = _state_int(state, "T", "UniformSampler")
        if T != self.T:
            raise ValueError(f"state is for T = {T}, this sampler has T = {self.T}")


def _state_int(state: dict, key: str, owner: str) -> int:
    """An integer entry of a sampler state: a Python or NumPy int or a 0-d integer array (no floats,
    bools or strings: nothing is truncated)."""
    v = state[key]
    if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iu":
        return int(v)
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return int(v)
    raise ValueError(f"{owner} state {key!r} must be an integer, got {v!r}")


def _check_uniform_prob(value) -> float:
    up = _real(value, "uniform_prob", "a number in [0, 1]")
    if not 0.0 <= up <= 1.0:              # also refuses nan
        raise ValueError(f"uniform_prob must be in [0, 1], got {value!r}")
    return up


def _check_update(T: int, t, losses):
    t = np.asarray(t)
    if t.ndim != 1 or t.dtype.kind not in "iu":
        raise ValueError(f"t must be an integer array of shape (N,), got dtype {t.dtype} shape {t.shape}")
    losses = np.asarray(losses)
    if losses.dtype.kind not in "iuf":     # no bools, strings or objects taken as numbers
        raise ValueError(f"losses must be an array of real numbers, got dtype {losses.dtype}")
    losses = losses.astype(np.float64, copy=False)
    if losses.shape != t.shape:
        raise ValueError(f"losses must have t's shape {t.shape}, got {losses.shape}")
    if t.size and (t.min() < 0 or t.max() >= T):
        raise ValueError(f"t must lie in [0, {T}), got range [{t.min()}, {t.max()}]")
    if not np.all(np.isfinite(losses)):
        raise ValueError(f"losses must be finite, got {losses[~np.isfinite(losses)][:3]!r}")
    return t.astype(np.int64), losses


class LossAwareSampler:
    """improved-diffusion's loss-second-moment importance sampler (Nichol & Dhariwal 2021, eq. 18).

    Keeps the last ``history`` losses seen at each timestep. Until every timestep has ``history``
    of them (warm-up) it samples uniformly, exactly as :class:`UniformSampler` (same draws). After
    warm-up it samples ``p_t proportional to sqrt(E[L_t^2])`` mixed with a uniform floor:
    ``p = (1 - uniform_prob) w / sum(w) + uniform_prob / T``, and returns importance weights
    ``1 / (T p_t)``, so that ``E_{t~p}[L_t / (T p_t)] = (1/T) sum_t L_t = E_{t~U}[L_t]``: the weighted
    loss is an unbiased estimate of the uniformly weighted one.

    Draws go through ``ddpm_ref.rng`` (stream TIMESTEP, addressed by sample index and step): the
    inverse CDF of p at ``u = (w + 0.5) / 2**32`` for the same 32-bit word that UniformSampler turns
    into ``(w T) >> 32``. ``state_dict()`` holds the loss history and counts as plain arrays, so a
    resumed run samples exactly what the uninterrupted run would have.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)) or int(T) < 1:
            raise ValueError(f"T must be an integer >= 1, got {T!r}")
        if isinstance(history, (bool, np.bool_)) or not isinstance(history, (int, np.integer)) \
                or int(history) < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        up = _check_uniform_prob(uniform_prob)
        self.T = int(T)
        self.history = int(history)
        self.uniform_prob = up
        self.loss_history = np.zeros((self.T, self.history), dtype=np.float64)   # (T, history)
        self.loss_counts = np.zeros(self.T, dtype=np.int64)                       # (T,)

    @property
    def warmed_up(self) -> bool:
        return bool(np.all(self.loss_counts == self.history))

    def weights(self) -> np.ndarray:
        """The sampling distribution p (T,) (uniform before warm-up)."""
        if not self.warmed_up:
            return np.full(self.T, 1.0 / self.T)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        total = w.sum()
        if not total > 0:                      # every recorded loss is 0: nothing to prefer
            return np.full(self.T, 1.0 / self.T)
        p = w / total * (1.0 - self.uniform_prob) + self.uniform_prob / self.T
        return p / p.sum()

    def sample(self, seed, index, step: int = 0):
        """Returns ``(t int64 (N,), weights float64 (N,) = 1 / (T p_t))`` for the sample indices."""
        index = np.atleast_1d(np.asarray(index))
        if not self.warmed_up:
            t = rng.randint(seed, rng.Stream.TIMESTEP, index, self.T, step)
            return t, np.ones(t.shape[0], dtype=np.float64)
        p = self.weights()
        w = rng.random_bits(seed, rng.Stream.TIMESTEP, index, step, (1,))[:, 0]
        u = (w.astype(np.float64) + 0.5) * 2.0 ** -32             # in (0, 1), never 0 or 1
        cdf = np.cumsum(p)
        # First t with cdf[t] > u; a t with p_t = 0 can never be chosen. Rounding can leave cdf[-1]
        # a hair below 1: clip to T-1.
        t = np.minimum(np.searchsorted(cdf, u, side="right"), self.T - 1).astype(np.int64)
        return t, 1.0 / (self.T * p[t])

    def update(self, t, losses) -> None:
        """Record per-sample losses at their timesteps, in batch order (a full history drops its oldest).

        Pass the per-sample training losses before importance weighting (improved-diffusion records
        its total per-sample loss, L_simple plus the VB term for the hybrid objective)."""
        t, losses = _check_update(self.T, t, losses)
        for ti, li in zip(t.tolist(), losses.tolist()):
            c = self.loss_counts[ti]
            if c == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, c] = li
                self.loss_counts[ti] = c + 1

    def state_dict(self) -> dict:
        """Plain arrays (safe for ``np.savez`` / ``np.load(allow_pickle=False)``)."""
        return {"T": np.asarray(self.T, dtype=np.int64), "history": np.asarray(self.history, dtype=np.int64),
                "uniform_prob": np.asarray(self.uniform_prob, dtype=np.float64),
                "loss_history": self.loss_history.copy(), "loss_counts": self.loss_counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output (checked as ``__init__`` and :meth:`update` check their
        input: integer T, history and counts, finite losses, uniform_prob in [0, 1]). Nothing is
        changed unless the whole state is valid."""
        if not isinstance(state, dict):
            raise ValueError(f"LossAwareSampler state must be a dict, got {type(state).__name__}")
        for key in ("T", "history", "loss_history", "loss_counts"):
            if key not in state:
                raise ValueError(f"LossAwareSampler state is missing {key!r} (has {sorted(state, key=str)})")
        T = _state_int(state, "T", "LossAwareSampler")
        history = _state_int(state, "history", "LossAwareSampler")
        if T != self.T or history != self.history:
            raise ValueError(f"state is for T = {T}, history = {history}; this sampler has T = {self.T}, "
                             f"history = {self.history}")
        try:
            hist = np.asarray(state["loss_history"])
            counts = np.asarray(state["loss_counts"])
        except (ValueError, TypeError):      # ragged nested lists
            raise ValueError("loss_history and loss_counts must be arrays of shape "
                             f"{(self.T, self.history)} and {(self.T,)}") from None
        if hist.dtype.kind not in "iuf" or counts.dtype.kind not in "iu":
            raise ValueError(f"loss_history must hold real numbers and loss_counts integers, got dtypes "
                             f"{hist.dtype} and {counts.dtype}")
        if hist.shape != (self.T, self.history) or counts.shape != (self.T,):
            raise ValueError(f"loss_history must have shape {(self.T, self.history)} and loss_counts "
                             f"{(self.T,)}, got {hist.shape} and {counts.shape}")
        hist = hist.astype(np.float64)                   # a copy
        counts = counts.astype(np.int64)
        if counts.min() < 0 or counts.max() > self.history:
            raise ValueError(f"loss_counts must lie in [0, {self.history}], got range "
                             f"[{counts.min()}, {counts.max()}]")
        if not np.all(np.isfinite(hist)):
            bad = np.argwhere(~np.isfinite(hist))[0]
            raise ValueError(f"loss_history must be finite, got {float(hist[tuple(bad)])!r} at "
                             f"[{bad[0]}, {bad[1]}]")
        up = _check_uniform_prob(state["uniform_prob"]) if "uniform_prob" in state else self.uniform_prob
        self.loss_history = hist
        self.loss_counts = counts
        self.uniform_prob = up


# --------------------------------------------------------------------------- likelihood pieces
_LOG2 = math.log(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CDF_CUBIC = 0.044715
_CLAMP = 1e-12          # improved-diffusion clamps probabilities at 1e-12 before the log


def normal_kl(mean1, logvar1, mean2, logvar2) -> np.ndarray:
    """``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` elementwise, in nats (broadcasting):
    ``0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))``."""
    mean1, logvar1, mean2, logvar2 = (np.asarray(a, dtype=np.float64) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * np.exp(-logvar2))


def approx_standard_normal_cdf(x) -> np.ndarray:
    """The tanh approximation of the standard normal CDF that DDPM's and improved-diffusion's
    likelihood code use: ``0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (absolute error < 2e-4).
    Monotone with limits 0 and 1, so the 256 bin probabilities built from it still sum to 1."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + _CDF_CUBIC * x ** 3)))


def _approx_cdf_and_pdf(x):
    """The approximate CDF and its exact derivative ``0.5 (1 - tanh^2(u)) du/dx``."""
    u = _SQRT_2_OVER_PI * (x + _CDF_CUBIC * x ** 3)
    th = np.tanh(u)
    return 0.5 * (1.0 + th), 0.5 * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _CDF_CUBIC * x * x)


def _discretized_loglik_and_grad(x, means, log_scales):
    """log P(bin of x) and d/d log_scales (see discretized_gaussian_log_likelihood), float64."""
    centered = x - means
    inv_stdv = np.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)          # upper bin edge, standardised
    min_in = inv_stdv * (centered - 1.0 / 255.0)           # lower bin edge, standardised
    cdf_plus, pdf_plus = _approx_cdf_and_pdf(plus_in)
    cdf_min, pdf_min = _approx_cdf_and_pdf(min_in)
    one_minus_cdf_min = 1.0 - cdf_min
    cdf_delta = cdf_plus - cdf_min
    left = x < -0.999                                      # bin 0 reaches to -inf
    right = x > 0.999                                      # bin 255 reaches to +inf
    p = np.where(left, cdf_plus, np.where(right, one_minus_cdf_min, cdf_delta))
    log_probs = np.log(np.maximum(p, _CLAMP))
    # d plus_in / d log_scales = -plus_in and d min_in / d log_scales = -min_in (inv_stdv = e^-ls).
    # So dP/dls is  -pdf(plus_in) plus_in              for the left bin  (P = cdf_plus),
    #               +pdf(min_in) min_in                 for the right bin (P = 1 - cdf_min),
    #               -pdf(plus_in) plus_in + pdf(min_in) min_in  in between (P = cdf_plus - cdf_min),
    # and d log max(P, 1e-12) / dls = [P > 1e-12] dP/dls / P (a clamped value has no gradient).
    dp = np.where(left, -pdf_plus * plus_in,
                  np.where(right, pdf_min * min_in, -pdf_plus * plus_in + pdf_min * min_in))
    live = p > _CLAMP
    dlog = np.where(live, dp / np.where(live, p, 1.0), 0.0)
    return log_probs, dlog


def discretized_gaussian_log_likelihood(x, means, log_scales) -> np.ndarray:
    """log-likelihood (nats, elementwise) of data ``x`` in [-1, 1] quantised to 256 levels under
    ``N(means, exp(log_scales)^2)`` integrated over each bin (DDPM sec. 3.3, eq. 13): the bin of x is
    ``[x - 1/255, x + 1/255]``, the first bin extends to -inf and the last to +inf, and the CDF is
    :func:`approx_standard_normal_cdf`. Probabilities are clamped at 1e-12 before the log, as
    improved-diffusion does. Broadcasts means and log_scales against x; returns x's shape, float64."""
    x = np.asarray(x, dtype=np.float64)
    means = np.broadcast_to(np.asarray(means, dtype=np.float64), x.shape)
    log_scales = np.broadcast_to(np.asarray(log_scales, dtype=np.float64), x.shape)
    return _discretized_loglik_and_grad(x, means, log_scales)[0]


def _mean_flat(a: np.ndarray) -> np.ndarray:
    """Mean over all axes but the first: (N,). The row length is spelled out (not -1) so that N = 0
    gives an empty (0,) result."""
    return a.reshape(a.shape[0], math.prod(a.shape[1:])).mean(axis=1)


def _check_data(x0, name: str = "x0") -> np.ndarray:
    x0 = _as_float_array(x0, name)
    if not np.all(np.isfinite(x0)):
        raise ValueError(f"{name} must be finite, found {int(np.sum(~np.isfinite(x0)))} non-finite values")
    if x0.size and (x0.min() < -1.0 - 1e-6 or x0.max() > 1.0 + 1e-6):
        raise ValueError(f"{name} must be data scaled to [-1, 1] (the decoder's 256 bins), got range "
                         f"[{x0.min():.6g}, {x0.max():.6g}]")
    return x0


def prior_bpd(schedule: Schedule, x0) -> np.ndarray:
    """The prior term ``L_T = KL(q(x_T | x_0) || N(0, I))`` (DDPM eq. 5) in bits/dim, (N,) float64.

    No parameters; about 2.9e-5 bits/dim at x0 = 1 for the linear schedule with T = 1000, and 0 for
    a zero-terminal-SNR schedule."""
    _check_schedule(schedule)
    x0 = _as_float_array(x0, "x0").astype(np.float64)
    t = np.full(x0.shape[0], schedule.T - 1, dtype=np.int64)
    mean, _, log_var = q_mean_variance(schedule, x0, t)
    return _mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LOG2


def vb_terms_bpd(schedule: Schedule, model_output, x0, xt, t, prediction: str = "epsilon",
                 variance: str = "fixed_small", clip: bool = False) -> np.ndarray:
    """One term of the variational bound per sample, in bits/dim, (N,) float64 (DDPM eq. 5):

    * t index > 0: ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))``, both Gaussian;
    * t index 0: ``L_0 = -log p(x_0 | x_1)``, the discretised Gaussian decoder (eq. 13) with mean
      ``mu_theta(x_1, 1) = x0_hat`` and log-scale ``log sigma_1 = 0.5 log sigma_1^2``,

    averaged over the non-batch dimensions and divided by ln 2.
    """
    x0 = _check_data(x0).astype(np.float64)
    xt = _as_float_array(xt, "xt").astype(np.float64)
    _same_shape(x0, xt, "x0", "xt")
    t = check_t(schedule, t, x0.shape[0])
    pm = p_mean_variance(schedule, model_output, xt, t, prediction, variance, clip)
    true_mean, _, true_log_var = q_posterior(schedule, x0, xt, t)
    out = np.empty(x0.shape[0], dtype=np.float64)
    first = t == 0                      # decoder rows; each row is computed by one formula only
    if np.any(~first):
        r = ~first
        out[r] = _mean_flat(normal_kl(true_mean[r], true_log_var[r], pm["mean"][r],
                                      pm["log_variance"][r])) / _LOG2
    if np.any(first):
        out[first] = -_mean_flat(discretized_gaussian_log_likelihood(
            x0[first], pm["mean"][first], 0.5 * pm["log_variance"][first])) / _LOG2
    return out


HYBRID_LAMBDA = 0.001


def hybrid_vb_scale(schedule: Schedule, lam: float = HYBRID_LAMBDA) -> float:
    """The factor the training loop puts on the mean of :func:`hybrid_vb_loss`'s per-sample terms.

    L_hybrid = L_simple + lam L_vlb (Nichol & Dhariwal 2021, eq. 16, lam = 0.001) with
    ``L_vlb = sum_t L_t`` over all T terms. One uniformly drawn term estimates it as ``T L_t``, so the
    per-sample loss is ``mse + lam T L_t``. improved-diffusion's code writes this as
    ``vb * num_timesteps / 1000`` (its RESCALED_MSE loss type), the same number for lam = 0.001, with
    L_t in bits/dim (mean over dimensions / ln 2) and mse the mean over dimensions, as here.
    (Its plain MSE loss type adds vb unscaled, i.e. factor 1 whatever T; RESCALED_MSE is the default
    for learned sigmas.) So the factor is ``lam * T`` (1.0 for T = 1000), NOT ``lam``: adding only
    ``0.001 * mean(vb)`` would weigh the bound 1000 times less than the paper's hybrid loss.
    """
    _check_schedule(schedule)
    lam_f = _real(lam, "lam", "a finite number >= 0")
    if not (math.isfinite(lam_f) and lam_f >= 0.0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return lam_f * schedule.T


def hybrid_vb_loss(schedule: Schedule, model_output, x0, xt, t, prediction: str = "epsilon", dvb=None):
    """The VB term of the hybrid loss and its gradient w.r.t. the model output (variance half only).

    model_output: (N, 2C, ...) ``[prediction (C), v_interp (C)]`` (variance "learned_range"). As in
    improved-diffusion, the mean half is treated as a constant (stop-gradient) so that the bound
    trains only the variance and L_simple alone trains the mean; x0_hat is not clipped.

    Returns ``(vb, d_model_output)``: vb (N,) float64 in bits/dim (:func:`vb_terms_bpd`), and
    ``d_model_output[i] = dvb[i] * d vb[i] / d model_output[i]`` in model_output's dtype, zeros on the
    mean half. ``dvb`` (N,) is the upstream gradient (default ones: the gradient of ``sum(vb)``). The
    training loop wants ``dvb = hybrid_vb_scale(schedule) * w_i / N`` for ``loss = mean_i(w_i (mse_i
    + lam T vb_i))`` with importance weights w_i.

    Derivation (per sample i, element e; D elements per sample; l = log sigma^2, the model's
    log-variance at that element; the mean mu_theta is constant):
      l = frac max_log + (1 - frac) min_log, frac = (v + 1)/2      =>  dl/dv = (max_log - min_log)/2
      with max_log = log beta_t, min_log = log beta~_t (clipped).
      vb_i = (1 / (D ln 2)) sum_e term_e                            =>  dvb_i/dterm_e = 1/(D ln 2)
      t > 0: term = KL = 0.5 (-1 + l - l_q + exp(l_q - l) + (mu_q - mu)^2 exp(-l))
             dterm/dl = 0.5 (1 - exp(l_q - l) - (mu_q - mu)^2 exp(-l))
      t = 0: term = -log P(bin), P from the CDF at z_pm = (x0 - mu +- 1/255) exp(-ls), ls = l/2;
             dz/dls = -z, so dP/dls = -pdf(z+) z+ + pdf(z-) z- (first and last bins keep one edge),
             dterm/dl = -(1/2) (dP/dls) / P   (zero where P was clamped at 1e-12)
      d vb_i / d v_e = (1/(D ln 2)) dterm/dl (max_log - min_log)/2.
    """
    _check_schedule(schedule)
    out = _as_float_array(model_output, "model_output")
    pred, v_interp = split_output(out, "learned_range")
    x0 = _check_data(x0).astype(np.float64)
    xt = _as_float_array(xt, "xt").astype(np.float64)
    _same_shape(x0, xt, "x0", "xt")
    if x0.ndim < 2:
        raise ValueError(f"hybrid_vb_loss needs x0 of shape (N, C, ...) (a channel axis for the model "
                         f"output's (N, 2C, ...)), got x0 of shape {x0.shape} and model_output of shape {out.shape}")
    if pred.shape != x0.shape:
        raise ValueError(f"model_output must have shape (N, 2C, ...) = {(x0.shape[0], 2 * x0.shape[1]) + x0.shape[2:]}"
                         f" for x0 of shape {x0.shape}, got {out.shape}")
    t = check_t(schedule, t, x0.shape[0])
    n = x0.shape[0]
    if dvb is None:
        dvb = np.ones(n, dtype=np.float64)
    else:
        dvb = np.asarray(dvb, dtype=np.float64)
        if dvb.shape != (n,):
            raise ValueError(f"dvb must have shape ({n},), got {dvb.shape}")

    pm = p_mean_variance(schedule, out, xt, t, prediction, "learned_range", clip=False)
    mu, l = pm["mean"], pm["log_variance"]                     # (N, C, ...) float64, mu constant
    mu_q, _, l_q = q_posterior(schedule, x0, xt, t)
    d_count = int(np.prod(x0.shape[1:], dtype=np.int64))

    # t index > 0: the KL term and its derivative in l (every row, cheap); rows with t index 0
    # are then overwritten by the decoder NLL and its derivative (computed on those rows only).
    term = normal_kl(mu_q, l_q, mu, l)                         # (N, C, ...) nats
    dterm_dl = 0.5 * (1.0 - np.exp(l_q - l) - (mu_q - mu) ** 2 * np.exp(-l))
    first = t == 0
    if np.any(first):
        loglik, dloglik_dls = _discretized_loglik_and_grad(x0[first], mu[first], 0.5 * l[first])
        term[first] = -loglik
        dterm_dl[first] = -0.5 * dloglik_dls                   # ls = l/2 and term = -loglik
    vb = _mean_flat(term) / _LOG2                              # (N,) bits/dim

    half_range = 0.5 * (_coef(np.log(schedule.betas), t, l) - _coef(schedule.posterior_log_variance_clipped, t, l))
    scale = (dvb / (d_count * _LOG2)).reshape((n,) + (1,) * (x0.ndim - 1))
    dv = scale * dterm_dl * half_range                         # (N, C, ...)
    d_out = np.zeros(out.shape, dtype=out.dtype)
    d_out[:, pred.shape[1]:] = dv
    return vb, d_out


# --------------------------------------------------------------------------- the full bound
def bits_per_dim(schedule: Schedule, denoiser: Callable, x0, *, prediction: str = "epsilon",
                 variance: str = "fixed_small", seed: int = 0, timesteps=None, batch_size=None,
                 y=None, clip: bool = True, index_offset: int = 0, progress=None) -> dict:
    """The variational bound on the negative log-likelihood, in bits/dim, per sample (DDPM sec. 3.3).

    ``L = L_T + sum_{t>1} L_{t-1} + L_0`` (eq. 5): prior KL (exact, no network), T - 1 KL terms and the
    discretised decoder, each from :func:`vb_terms_bpd` with ``x_t = q_sample(x0, t, eps)``.

    * ``timesteps=None`` or ``"all"``: every term, T denoiser calls per sample.
    * ``timesteps=K`` (an int, 2 <= K <= T): an unbiased estimate with K denoiser calls per sample.
      The decoder term (t index 0) is always evaluated, and K - 1 of the T - 1 KL terms are drawn
      uniformly without replacement, independently for each sample, their sum scaled by
      ``(T - 1)/(K - 1)``. Each KL term is included with probability (K - 1)/(T - 1), so the
      expectation over the subset is the full bound exactly (a stratified version of "K of T scaled
      by T/K" that keeps the large decoder term out of the sampling variance). K = T is the full bound.

    Noise: ``eps`` for sample i at timestep t is ``rng.normal(seed, Stream.EVAL, index_i, step=t)``
    with ``index_i = index_offset + i``, so it is the same whatever the batch size or the subset, and
    a subset estimate equals the full bound's terms at the timesteps it picked. The subsets come from
    the same stream with ``sub = 1``.

    denoiser: ``f(x, t, y=None) -> model_output`` (x in x0's dtype). x0: (N, ...) data in [-1, 1].
    y: int (N,) labels or None. clip: clip x0_hat to [-1, 1] (improved-diffusion evaluates with
    clip_denoised=True). batch_size: rows per denoiser call, a row being one (sample, timestep) pair
    (default N: one timestep for the whole batch per call); the result does not depend on it.
    progress: optional callable ``progress(done, total)`` after each denoiser call, counting rows
    (N K in all).

    Returns a dict of float64 arrays: ``total`` (N,), ``prior`` (N,), ``decoder`` (N,), ``kl`` (N,)
    (the summed, or estimated, KL terms), ``terms`` (N, K) the evaluated terms unscaled and
    ``timesteps`` (N, K) int64 their t indices (column 0 is the decoder, t = 0; for the full bound
    column t holds timestep t).
    """
    _check_schedule(schedule)
    _check_choice(prediction, "prediction", PREDICTIONS)
    _check_choice(variance, "variance", VARIANCES)
    if not callable(denoiser):
        raise ValueError(f"denoiser must be a callable f(x, t, y=None), got {type(denoiser).__name__}")
    x0 = _check_data(x0)
    seed = rng.check_seed(seed)
    n = x0.shape[0]
    T = schedule.T
    if timesteps is None or (isinstance(timesteps, str) and timesteps == "all"):
        k = T
    elif isinstance(timesteps, (bool, np.bool_)) or not isinstance(timesteps, (int, np.integer)):
        raise ValueError(f"timesteps must be None, 'all' or an integer K, got {timesteps!r}")
    else:
        k = int(timesteps)
        if not min(2, T) <= k <= T:
            raise ValueError(f"timesteps K must lie in [{min(2, T)}, T = {T}] (the decoder plus K - 1 KL "
                             f"terms), got {k}")
    full = k == T
    if batch_size is None:
        batch_size = max(n, 1)
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) \
            or int(batch_size) < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    if isinstance(index_offset, (bool, np.bool_)) or not isinstance(index_offset, (int, np.integer)) \
            or not 0 <= int(index_offset) <= 2**32 - max(n, 1):
        raise ValueError(f"index_offset must be an integer in [0, 2**32 - N], got {index_offset!r}")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"y must be an integer array of shape ({n},) or None, got {y.dtype} {y.shape}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable(done, total) or None, got {progress!r}")

    index = int(index_offset) + np.arange(n, dtype=np.int64)
    prior = prior_bpd(schedule, x0)
    sample_shape = x0.shape[1:]
    x0_64 = x0.astype(np.float64)
    # The timesteps of every sample: column 0 the decoder, then the KL terms.
    if full:
        tmat = np.tile(np.arange(T, dtype=np.int64), (n, 1))                        # (N, T)
    else:
        tmat = np.zeros((n, k), dtype=np.int64)                                     # (N, K)
        for lo in range(0, n, 1024):                                                # bounded memory
            idx = index[lo:lo + 1024]
            keys = rng.random_bits(seed, rng.Stream.EVAL, idx, 0, (T - 1,), sub=1)  # (n, T-1)
            chosen = np.argsort(keys, axis=1, kind="stable")[:, :k - 1] + 1         # KL t indices
            tmat[lo:lo + 1024, 1:] = np.sort(chosen, axis=1)
    # Every (sample, term) pair is one row; rows go to the denoiser batch_size at a time, term-major
    # (with the default batch_size = N each call evaluates one term for the whole batch).
    rows_i = np.tile(np.arange(n, dtype=np.int64), k)                              # sample of row
    rows_r = np.repeat(np.arange(k, dtype=np.int64), n)                            # term of row
    rows_t = tmat[rows_i, rows_r]
    terms = np.zeros((n, k), dtype=np.float64)
    total_rows = n * k
    for lo in range(0, total_rows, batch_size):
        hi = min(total_rows, lo + batch_size)
        ii, rr, t = rows_i[lo:hi], rows_r[lo:hi], rows_t[lo:hi]
        eps = rng.normal(seed, rng.Stream.EVAL, index[ii], t, sample_shape).astype(np.float64)
        x0c = x0_64[ii]
        xt_in = q_sample(schedule, x0c, t, eps).astype(x0.dtype, copy=False)
        out = np.asarray(denoiser(xt_in, t, None if y is None else y[ii]))
        if out.ndim < 1 or out.shape[0] != hi - lo:
            raise ValueError(f"denoiser returned an output of shape {out.shape}, expected batch size {hi - lo}")
        terms[ii, rr] = vb_terms_bpd(schedule, out, x0c, xt_in.astype(np.float64), t,
                                     prediction, variance, clip)
        if progress is not None:
            progress(hi, total_rows)
    decoder = terms[:, 0].copy()
    kl_scale = 1.0 if full else (T - 1) / (k - 1)
    kl = terms[:, 1:].sum(axis=1) * kl_scale
    return {"total": prior + decoder + kl, "prior": prior, "decoder": decoder, "kl": kl,
            "terms": terms, "timesteps": tmat}
