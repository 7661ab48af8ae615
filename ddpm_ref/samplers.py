"""The reverse process: timestep lists, the DDPM and DDIM steps, and the sampling loop.

What it is: ancestral sampling from ``p_theta(x_{t-1} | x_t)`` (Ho, Jain & Abbeel 2020, arXiv
2006.11239, eq. 11 and Algorithm 2), its respaced form (Nichol & Dhariwal 2021, sec. 4), the DDIM
step (Song, Meng & Ermon 2021, arXiv 2010.02502, eq. 12), x0 clipping or dynamic thresholding
(Saharia et al. 2022, "Imagen", sec. 2.3) and classifier-free guidance (Ho & Salimans 2022), around
any denoiser ``f(x, t, y=None) -> model_output``. What it is not: no network, no training, no
likelihood (``diffusion.py`` has the bound); the tables come from ``schedule.py`` and the
parameterisation conversions from ``diffusion.py``.

Indexing. As everywhere in ddpm-ref, table index ``t`` in [0, T) is the paper's timestep ``t + 1``.
A reverse step goes from ``t`` to ``t_prev`` < t; ``t_prev = -1`` is the final step, onto the data
(the paper's ``x_0``, where ``alpha_bar_0 := 1``), and adds no noise (Algorithm 2: "z = 0 if t = 1").

The steps, for a step from ``t`` to ``s = t_prev`` (``ab`` = alpha_bar, ``ab_s = 1`` when s = -1):

* Respacing: a step that skips timesteps is the DDPM step of a respaced chain with the effective
  ``beta = 1 - ab_t / ab_s`` and ``alpha = ab_t / ab_s``. When ``s = t - 1`` these are the schedule's
  own ``beta_t``, so one formula covers full and respaced chains. ``t_prev`` always comes from the
  timestep list, never from ``t - 1`` or ``t - T // S``.
* DDPM (eq. 11 / Algorithm 2): ``x_s = mu + sigma z`` with the posterior mean (eq. 7) at the
  predicted x0, ``mu = sqrt(ab_s) beta / (1 - ab_t) x0_hat + sqrt(alpha) (1 - ab_s) / (1 - ab_t) x_t``,
  which for eps-prediction and no clipping is eq. 11,
  ``mu = (x_t - beta / sqrt(1 - ab_t) eps_hat) / sqrt(alpha)``. Variances: ``"fixed_small"``
  ``sigma^2 = beta~ = (1 - ab_s) / (1 - ab_t) beta``; ``"fixed_large"`` ``sigma^2 = beta``;
  ``"learned_range"`` ``log sigma^2 = f log beta + (1 - f) log beta~`` with ``f = (v + 1) / 2`` from
  the model's variance channels (Nichol & Dhariwal eq. 15). DDPM's ``fixed_large`` convention of
  ``beta~_2`` in place of ``beta_1`` at the first timestep only concerns the likelihood: in sampling
  that step is the final one and adds no noise, so the convention never changes a sample.
* DDIM (eq. 12): ``x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z`` with
  ``sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)`` (eq. 16); eta = 0 is the
  deterministic DDIM, eta = 1 has DDPM's fixed_small variance. With clipping there are two
  conventions for the eps_hat of the direction term, chosen by ``eps_from_clipped``: ``True``
  (default) re-derives it from the clipped x0_hat, ``eps_hat = (x_t - sqrt(ab_t) x0_hat) /
  sqrt(1 - ab_t)``, so that x0_hat and eps_hat stay a consistent pair in eq. 12 (GLIDE and
  improved-diffusion; diffusers' ``DDIMScheduler.step(use_clipped_model_output=True)``); ``False``
  keeps the model's own eps (for x0- or v-prediction: the eps of the unclipped x0_hat), as
  diffusers' ``DDIMScheduler.step`` does by default and ``DDIMPipeline`` always does unless called
  with ``use_clipped_model_output=True``. The two agree whenever clipping leaves x0_hat unchanged.

Clipping (``clip``): ``True`` clips x0_hat to [-1, 1] (the data range) before it is used; ``False``
leaves it; ``"dynamic"`` is Imagen's dynamic thresholding: per sample, ``c`` = the 99.5th percentile
of ``|x0_hat|``, ``c = max(c, 1)``, ``x0_hat = clip(x0_hat, -c, c) / c``.

Noise (the contract of ``rng.py``): sample ``i`` of a call gets index ``index_offset + i``;
``x_T = rng.normal(seed, Stream.SAMPLE_INIT, index, 0, shape)`` and the noise ``z`` of the step
*from* timestep ``t`` is ``rng.normal(seed, Stream.SAMPLE_STEP, index, t, shape)``. So a sample does
not depend on the batch it was drawn in, and a GPU sampler following the same contract draws the
same images: its noise is bit-identical, and the rest agrees to float32 rounding (the network's GEMMs
may round differently with the batch's shape, as BLAS picks its kernels by matrix size).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import diffusion, rng
from .rng import Stream
from .schedule import Schedule
from .schedule import _check_float as _check_real

__all__ = [
    "SPACINGS", "SAMPLERS", "DYNAMIC_PERCENTILE", "timesteps", "previous_timesteps", "step_coefficients",
    "clip_x0", "dynamic_threshold", "ddpm_step", "ddim_step", "guided_output", "sample", "Trajectory",
]

SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim")
DYNAMIC_PERCENTILE = 0.995          # Imagen's p for dynamic thresholding


# --------------------------------------------------------------------------- validation helpers
def _check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def _check_schedule(schedule) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a ddpm_ref.schedule.Schedule, got {type(schedule).__name__}")
    return schedule


def _check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _check_clip(clip):
    if clip is True or clip is False or (isinstance(clip, str) and clip == "dynamic"):
        return clip
    if isinstance(clip, (bool, np.bool_)):
        return bool(clip)
    raise ValueError(f"clip must be True, False or 'dynamic', got {clip!r}")


def _check_step_times(schedule: Schedule, t, t_prev, n: int):
    """Per-sample (t, t_prev) as int64 (N,): scalars broadcast; 0 <= t < T and -1 <= t_prev < t."""
    out = []
    for name, v in (("t", t), ("t_prev", t_prev)):
        a = np.asarray(v)
        if a.dtype == np.bool_ or a.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer or an integer array of shape (N,), got {v!r}")
        if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != n):
            raise ValueError(f"{name} must be a scalar or have shape ({n},), got shape {a.shape}")
        out.append(np.broadcast_to(a.astype(np.int64), (n,)))
    t, t_prev = out
    if n:
        if t.min() < 0 or t.max() >= schedule.T:
            bad = int(t.min()) if t.min() < 0 else int(t.max())
            raise ValueError(f"t must lie in [0, T) = [0, {schedule.T}), got t = {bad}")
        if t_prev.min() < -1:
            raise ValueError(f"t_prev must be >= -1 (-1 marks the final step), got {int(t_prev.min())}")
        if np.any(t_prev >= t):
            i = int(np.flatnonzero(t_prev >= t)[0])
            raise ValueError(f"t_prev must be smaller than t, got t = {int(t[i])}, t_prev = {int(t_prev[i])}")
    return t, t_prev


def _as_batch(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name} must be a float array (N, ...), got dtype {arr.dtype}")
    if arr.ndim < 1:
        raise ValueError(f"{name} must have a batch axis: shape (N, ...), got a scalar")
    return arr


# --------------------------------------------------------------------------- timesteps
def timesteps(T: int, num_steps: int, spacing: str = "leading", offset: int = 0) -> np.ndarray:
    """The timesteps a sampler visits, int64 (num_steps,), strictly decreasing (first = largest t).

    With S = num_steps (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
    flawed", table 2, and diffusers' ``timestep_spacing``):

    * ``"leading"``: ``arange(0, S) * (T // S)`` reversed, plus ``offset`` (diffusers'
      ``steps_offset``), exactly as diffusers' DDPM/DDIM schedulers, so that converted pipelines
      visit the same timesteps. Its largest timestep is ``(S - 1) (T // S) + offset``: below
      ``T - 1`` whenever S < T (e.g. 980 for T = 1000, S = 50), a known pitfall (Lin et al. 2023) — the
      chain then starts from pure noise at a timestep whose ``alpha_bar`` is not ~0. We keep it for
      parity with diffusers (and as the default of ``sample``, as in the DDPM/DDIM pipelines), and
      recommend ``"trailing"`` for few steps.
    * ``"trailing"``: ``round(arange(T, 0, -T / S)) - 1``: always starts at ``T - 1`` (Lin et al.'s fix).
    * ``"linspace"``: ``round(linspace(0, T - 1, S))`` reversed: starts at ``T - 1``, ends at 0
      (for S = 1 it is ``[0]``, as in diffusers).

    A full run (``num_steps == T``) is exactly ``T-1, T-2, ..., 0`` for every spacing (with
    offset 0). ``offset`` is only meaningful for "leading"; the largest timestep must stay below T.
    """
    T = _check_int(T, "T", low=1)
    num_steps = _check_int(num_steps, "num_steps", low=1, high=T)
    _check_choice(spacing, "spacing", SPACINGS)
    offset = _check_int(offset, "offset", low=0)
    if offset and spacing != "leading":
        raise ValueError(f"offset (diffusers' steps_offset) applies to 'leading' spacing only, got "
                         f"offset={offset} with spacing={spacing!r}")
    if spacing == "leading":
        ts = np.arange(num_steps, dtype=np.int64)[::-1] * (T // num_steps) + offset
        if ts[0] >= T:
            raise ValueError(f"offset={offset} pushes the first timestep to {int(ts[0])}, beyond T - 1 = {T - 1}")
    elif spacing == "trailing":
        # diffusers' float formula (kept bit for bit); the float arange can hold one extra entry.
        ts = (np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1)[:num_steps]
    else:
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    ts = np.ascontiguousarray(ts)
    if ts.shape[0] != num_steps or np.any(np.diff(ts) >= 0) or ts[-1] < 0:
        raise ValueError(f"internal error: {spacing!r} spacing gave an invalid timestep list for "
                         f"T={T}, num_steps={num_steps}: {ts}")
    return ts


def previous_timesteps(ts) -> np.ndarray:
    """``t_prev`` for each entry of a decreasing timestep list: the next entry, and -1 after the last."""
    ts = np.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 1 or ts.dtype.kind not in "iu":
        raise ValueError(f"timesteps must be a non-empty 1-D integer array, got {ts!r}")
    if np.any(np.diff(ts.astype(np.int64)) >= 0):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    return np.concatenate([ts[1:].astype(np.int64), [-1]])


# --------------------------------------------------------------------------- one step's coefficients
def step_coefficients(schedule: Schedule, t, t_prev) -> dict:
    """The float64 quantities of a (possibly respaced) step from ``t`` to ``t_prev``, each (N,).

    ``alpha_bar_t``, ``alpha_bar_prev`` (1 where t_prev = -1), ``beta = 1 - ab_t / ab_prev`` (the
    effective beta), ``alpha = 1 - beta``, ``posterior_variance`` ``beta~ = (1 - ab_prev) / (1 - ab_t)
    beta``, and the posterior-mean coefficients (eq. 7) ``coef_x0 = sqrt(ab_prev) beta / (1 - ab_t)``,
    ``coef_xt = sqrt(alpha) (1 - ab_prev) / (1 - ab_t)``. With ``t_prev = t - 1`` these equal the
    schedule's tables at t (to rounding).
    """
    _check_schedule(schedule)
    n = int(np.size(t)) if np.ndim(t) else (int(np.size(t_prev)) if np.ndim(t_prev) else 1)
    t, t_prev = _check_step_times(schedule, t, t_prev, n)
    return _coefficients(schedule, t, t_prev)


def _coefficients(schedule: Schedule, t: np.ndarray, t_prev: np.ndarray) -> dict:
    """:func:`step_coefficients` for validated int64 (N,) arrays."""
    ab_t = schedule.alpha_bar[t]
    ab_prev = np.where(t_prev >= 0, schedule.alpha_bar[np.maximum(t_prev, 0)], 1.0)
    alpha = ab_t / ab_prev
    beta = 1.0 - alpha
    one_minus_ab_t = 1.0 - ab_t
    return {
        "alpha_bar_t": ab_t, "alpha_bar_prev": ab_prev, "alpha": alpha, "beta": beta,
        "posterior_variance": (1.0 - ab_prev) / one_minus_ab_t * beta,
        "coef_x0": np.sqrt(ab_prev) * beta / one_minus_ab_t,
        "coef_xt": np.sqrt(alpha) * (1.0 - ab_prev) / one_minus_ab_t,
    }


def _bcast(c: np.ndarray, ndim: int) -> np.ndarray:
    """Per-sample (N,) coefficients shaped (N, 1, ..., 1) for an (N, ...) array of ``ndim`` axes."""
    return c.reshape((c.shape[0],) + (1,) * (ndim - 1))


# --------------------------------------------------------------------------- clipping
def dynamic_threshold(x0, p: float = DYNAMIC_PERCENTILE) -> np.ndarray:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per sample.

    ``c = max(quantile_p(|x0|), 1)`` over each sample's elements (linear interpolation between order
    statistics, as ``numpy.quantile`` and ``torch.quantile``), then ``clip(x0, -c, c) / c``: samples
    whose values stay within [-1, 1] are unchanged; saturated ones are pulled back inside.
    """
    x0 = _as_batch(x0, "x0")
    p = _check_real(p, "the dynamic-thresholding percentile p", 0.0, 1.0, high_open=False)
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    if flat.shape[1] == 0:
        return x0.copy()
    c = np.maximum(np.quantile(flat, p, axis=1), 1.0)             # (N,)
    c = _bcast(c, x0.ndim).astype(x0.dtype)
    return np.clip(x0, -c, c) / c


def clip_x0(x0, clip) -> np.ndarray:
    """Apply the ``clip`` choice to a predicted x0: True -> [-1, 1], False -> as is, "dynamic" ->
    :func:`dynamic_threshold`."""
    clip = _check_clip(clip)
    if clip == "dynamic":
        return dynamic_threshold(x0)
    if clip:
        return np.clip(x0, -1.0, 1.0)
    return x0


def _predict(schedule, model_output, xt, t, prediction, variance, clip, eps_from_clipped=True):
    """(x0_hat, eps_hat, v_interp) from a model output, with x0_hat clipped; eps_hat re-derived from
    the clipped x0_hat when ``eps_from_clipped``, else the model's own (unclipped) eps."""
    pred, v_interp = diffusion.split_output(model_output, variance)
    if pred.shape != xt.shape:
        raise ValueError(f"the model output must have xt's shape {xt.shape}"
                         f"{' with 2C channels on axis 1' if variance == 'learned_range' else ''}, "
                         f"got {np.shape(model_output)} (variance={variance!r})")
    if prediction == "epsilon" and np.any(schedule.alpha_bar[t] == 0.0):
        bad = int(t[np.flatnonzero(schedule.alpha_bar[t] == 0.0)[0]])
        raise ValueError(f"eps-prediction cannot recover x0 at t = {bad}, where alpha_bar = 0 (a zero-terminal-"
                         "SNR schedule): use v-prediction there (Lin et al. 2023)")
    xt64 = xt.astype(np.float64)
    x0_hat, eps_hat = diffusion.to_x0_eps(schedule, pred.astype(np.float64), xt64, t, prediction)
    if clip is not False:
        x0_hat = clip_x0(x0_hat, clip)
        if eps_from_clipped:
            eps_hat = diffusion.eps_from_x0(schedule, xt64, t, x0_hat)
    return x0_hat, eps_hat, v_interp


def _check_bool(value, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_noise(noise, xt: np.ndarray, needed: bool):
    if noise is None:
        if needed:
            raise ValueError("noise is required: this step adds noise (t_prev >= 0 and sigma > 0)")
        return None
    noise = _as_batch(noise, "noise")
    if noise.shape != xt.shape:
        raise ValueError(f"noise must have xt's shape {xt.shape}, got {noise.shape}")
    return noise


# --------------------------------------------------------------------------- the steps
def ddpm_step(schedule: Schedule, model_output, xt, t, t_prev, noise, prediction: str = "epsilon",
              variance: str = "fixed_small", clip=True):
    """One ancestral step ``x_{t_prev} ~ p_theta(x_{t_prev} | x_t)`` (DDPM eq. 11, Algorithm 2 line 4).

    model_output: the denoiser's output for (xt, t): xt's shape, or 2C channels on axis 1 with
    ``variance="learned_range"``. xt, noise: (N, ...). t, t_prev: ints or int arrays (N,), with
    ``-1 <= t_prev < t`` (t_prev from the timestep list; -1 = final step). noise may be None where no
    sample adds noise. Returns ``(x_prev, x0_hat)`` in xt's dtype, computed in float64:
    ``x_prev = mu + sigma z`` (``z`` = noise; zero at the final step), ``mu`` the posterior mean (eq. 7)
    at the (clipped) x0_hat with the effective beta of the step, ``sigma^2`` per ``variance`` (module
    docstring).
    """
    _check_schedule(schedule)
    _check_choice(prediction, "prediction", diffusion.PREDICTIONS)
    _check_choice(variance, "variance", diffusion.VARIANCES)
    clip = _check_clip(clip)
    xt = _as_batch(xt, "xt")
    n = xt.shape[0]
    t, t_prev = _check_step_times(schedule, t, t_prev, n)
    x0_hat, _, v_interp = _predict(schedule, model_output, xt, t, prediction, variance, clip)
    c = _coefficients(schedule, t, t_prev)
    final = t_prev < 0                                                  # (N,) no noise here
    noise = _check_noise(noise, xt, needed=bool(np.any(~final)))
    mean = _bcast(c["coef_x0"], xt.ndim) * x0_hat + _bcast(c["coef_xt"], xt.ndim) * xt.astype(np.float64)
    if noise is None:
        x_prev = mean
    else:
        safe_beta = np.where(final, 1.0, c["beta"])                    # log() only where noise is added
        safe_tilde = np.where(final, 1.0, c["posterior_variance"])
        if variance == "fixed_small":
            sigma = _bcast(np.sqrt(safe_tilde), xt.ndim)
        elif variance == "fixed_large":
            sigma = _bcast(np.sqrt(safe_beta), xt.ndim)
        else:                                                           # Nichol & Dhariwal eq. 15
            frac = (v_interp.astype(np.float64) + 1.0) / 2.0
            log_var = (frac * _bcast(np.log(safe_beta), xt.ndim)
                       + (1.0 - frac) * _bcast(np.log(safe_tilde), xt.ndim))
            sigma = np.exp(0.5 * log_var)
        sigma = np.where(_bcast(final, xt.ndim), 0.0, sigma)
        x_prev = mean + sigma * noise.astype(np.float64)
    return x_prev.astype(xt.dtype, copy=False), x0_hat.astype(xt.dtype, copy=False)


def ddim_step(schedule: Schedule, model_output, xt, t, t_prev, eta, noise, prediction: str = "epsilon",
              clip=True, eps_from_clipped: bool = True):
    """One DDIM step (Song et al. 2021, eq. 12) from ``t`` to ``t_prev``.

    ``x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z``,
    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)`` (eq. 16), ``ab_prev = 1``
    at the final step (t_prev = -1), where x_prev = x0_hat. eta in [0, 1]: 0 is deterministic (noise
    may be None), 1 has the DDPM fixed_small variance. model_output has xt's shape (split off learned
    variance channels first; DDIM does not use them). eps_from_clipped: with clipping, True takes
    ``eps_hat`` re-derived from the clipped x0_hat (GLIDE, improved-diffusion; diffusers'
    ``use_clipped_model_output=True``), False the model's own eps (diffusers' DDIMPipeline); no
    effect with ``clip=False`` (module docstring). Returns ``(x_prev, x0_hat)`` in xt's dtype.
    """
    _check_schedule(schedule)
    _check_choice(prediction, "prediction", diffusion.PREDICTIONS)
    clip = _check_clip(clip)
    eps_from_clipped = _check_bool(eps_from_clipped, "eps_from_clipped")
    eta = _check_real(eta, "eta", 0.0, 1.0, low_open=False, high_open=False)
    xt = _as_batch(xt, "xt")
    n = xt.shape[0]
    t, t_prev = _check_step_times(schedule, t, t_prev, n)
    x0_hat, eps_hat, _ = _predict(schedule, model_output, xt, t, prediction, "fixed_small", clip,
                                  eps_from_clipped)
    c = _coefficients(schedule, t, t_prev)
    ab_prev = c["alpha_bar_prev"]
    sigma = eta * np.sqrt(c["posterior_variance"])                     # eq. 16: eta sqrt(beta~)
    noise = _check_noise(noise, xt, needed=bool(np.any(sigma > 0)))
    dir_coef = np.sqrt(np.maximum(1.0 - ab_prev - sigma ** 2, 0.0))    # "direction pointing to x_t"
    x_prev = _bcast(np.sqrt(ab_prev), xt.ndim) * x0_hat + _bcast(dir_coef, xt.ndim) * eps_hat
    if noise is not None:
        x_prev = x_prev + _bcast(sigma, xt.ndim) * noise.astype(np.float64)
    return x_prev.astype(xt.dtype, copy=False), x0_hat.astype(xt.dtype, copy=False)


# --------------------------------------------------------------------------- guidance and the loop
def guided_output(cond, uncond, guidance: float, variance: str = "fixed_small") -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): ``(1 + w) out(x, y) - w out(x, none)``.

    Applied to the prediction channels (eps, x0 or v: the conversions between them are affine in the
    prediction with coefficients that do not depend on it, so guiding any of them gives the same
    x0_hat and eps_hat); with ``"learned_range"`` the variance channels are the conditional pass's.
    """
    w = _check_real(guidance, "guidance")
    p_c, v_c = diffusion.split_output(cond, variance)
    p_u, _ = diffusion.split_output(uncond, variance)
    if p_c.shape != p_u.shape:
        raise ValueError(f"conditional and unconditional outputs differ in shape: {p_c.shape} vs {p_u.shape}")
    guided = (1.0 + w) * p_c.astype(np.float64) - w * p_u.astype(np.float64)
    guided = guided.astype(np.result_type(p_c.dtype, np.float32), copy=False)
    if v_c is None:
        return guided
    return np.concatenate([guided, v_c.astype(guided.dtype, copy=False)], axis=1)


class Trajectory(list):
    """The reverse process as a list of ``(t, xt, x0_hat)``, one per step, in sampling order.

    ``xt`` is the state the step at timestep ``t`` started from (the first is x_T), ``x0_hat`` the
    (clipped) prediction of x0 there. ``np.asarray(trajectory)`` (or :meth:`states`) stacks the states
    ``x_T, ..., x_0`` into one array ``(S + 1, N, ...)``, the last being the returned samples.
    """

    def __init__(self, steps=(), final=None):
        super().__init__(steps)
        self.final = final

    def states(self) -> np.ndarray:
        xs = [xt for _, xt, _ in self]
        if self.final is not None:
            xs.append(self.final)
        return np.stack(xs)

    def __array__(self, dtype=None, copy=None):
        s = self.states()
        return s if dtype is None else s.astype(dtype)


def sample(denoiser: Callable, schedule: Schedule, shape, n: int, seed: int, sampler: str = "ddpm",
           num_steps: int | None = None, spacing: str = "leading", eta: float = 0.0,
           prediction: str = "epsilon", variance: str = "fixed_small", clip=True, y=None,
           guidance: float = 0.0, return_trajectory: bool = False, index_offset: int = 0,
           progress: Callable | None = None, offset: int = 0, ddim_eps_from_clipped: bool = True):
    """Draw ``n`` samples by running the reverse process (DDPM Algorithm 2, or DDIM) with ``denoiser``.

    denoiser: ``f(x, t, y=None) -> model_output``, x float32 (N, *shape), t int64 (N,), y int64 (N,)
    or None (unconditional). shape: one sample's shape, e.g. (C, H, W) or (D,). sampler: "ddpm"
    (ancestral, with ``variance``) or "ddim" (with ``eta``). num_steps: None = all T timesteps, else
    a respaced chain of ``timesteps(T, num_steps, spacing, offset)``; offset: diffusers'
    ``steps_offset``, added to every "leading" timestep (0 for other spacings). clip: True, False or
    "dynamic" (module docstring). ddim_eps_from_clipped: the DDIM direction term's eps with clipping,
    re-derived from the clipped x0_hat (True, GLIDE / improved-diffusion) or the model's own (False,
    diffusers' DDIMPipeline); see :func:`ddim_step`. y: class labels (n,) for a conditional model; with ``guidance`` w != 0 each step also
    calls ``f(x, t, None)`` and uses ``(1 + w) f(x, t, y) - w f(x, t, None)`` (:func:`guided_output`).
    index_offset: the noise index of the first sample (``index = index_offset + arange(n)``), so a
    large set drawn in several calls equals the set drawn at once. progress: optional callable
    ``progress(i, num_steps, t)``, called after step ``i`` (0-based) at timestep ``t``.

    Algorithm 2: ``x_T ~ N(0, I)``; for t = T..1: ``z ~ N(0, I)`` if t > 1 else 0,
    ``x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z``;
    return x_0 (here: over the timestep list, with the steps of :func:`ddpm_step` / :func:`ddim_step`).

    Returns float32 samples (n, *shape); with ``return_trajectory`` also a :class:`Trajectory`.
    """
    if not callable(denoiser):
        raise ValueError(f"denoiser must be a callable f(x, t, y=None), got {type(denoiser).__name__}")
    _check_schedule(schedule)
    _check_choice(sampler, "sampler", SAMPLERS)
    _check_choice(prediction, "prediction", diffusion.PREDICTIONS)
    _check_choice(variance, "variance", diffusion.VARIANCES)
    clip = _check_clip(clip)
    ddim_eps_from_clipped = _check_bool(ddim_eps_from_clipped, "ddim_eps_from_clipped")
    n = _check_int(n, "n", low=1)
    seed = rng.check_seed(seed)
    index_offset = _check_int(index_offset, "index_offset", low=0)
    if index_offset + n > 2**32:
        raise ValueError(f"index_offset + n must be <= 2**32 (the noise index is 32-bit), got {index_offset + n}")
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        shape = tuple(_check_int(s, "shape entry", low=1) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a tuple of positive integers (one sample's shape), got {shape!r}") from None
    if not shape:
        raise ValueError("shape must have at least one axis (one sample's shape, e.g. (C, H, W) or (D,))")
    num_steps = schedule.T if num_steps is None else num_steps
    ts = timesteps(schedule.T, num_steps, spacing, offset)
    ts_prev = previous_timesteps(ts)
    if sampler == "ddim":
        eta = _check_real(eta, "eta", 0.0, 1.0, low_open=False, high_open=False)
    w = _check_real(guidance, "guidance")
    if y is not None:
        y = np.asarray(y)
        if y.dtype == np.bool_ or y.dtype.kind not in "iu" or y.shape != (n,):
            raise ValueError(f"y must be an integer array of class labels with shape ({n},), got "
                             f"{y.dtype} array of shape {y.shape}")
        y = y.astype(np.int64)
    if w != 0.0 and y is None:
        raise ValueError(f"guidance={w} needs class labels y (classifier-free guidance)")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable progress(i, num_steps, t) or None, got {progress!r}")

    index = index_offset + np.arange(n, dtype=np.int64)
    x = rng.normal(seed, Stream.SAMPLE_INIT, index, 0, shape)          # x_T, (n, *shape) float32
    traj = Trajectory() if return_trajectory else None
    for i, (t, t_prev) in enumerate(zip(ts.tolist(), ts_prev.tolist())):
        tt = np.full(n, t, dtype=np.int64)
        out = denoiser(x, tt, y)
        if w != 0.0:
            out = guided_output(out, denoiser(x, tt, None), w, variance)
        out = np.asarray(out)
        if out.dtype.kind != "f" or not np.all(np.isfinite(out)):
            raise ValueError(f"the denoiser returned {'non-float' if out.dtype.kind != 'f' else 'non-finite'} "
                             f"values at t = {t} (step {i} of {len(ts)}): stopping instead of sampling NaNs")
        adds_noise = t_prev >= 0 and (sampler == "ddpm" or eta > 0.0)
        z = rng.normal(seed, Stream.SAMPLE_STEP, index, t, shape) if adds_noise else None
        if sampler == "ddpm":
            x_new, x0_hat = ddpm_step(schedule, out, x, tt, t_prev, z, prediction, variance, clip)
        else:
            pred, _ = diffusion.split_output(out, variance)             # DDIM ignores learned variance
            x_new, x0_hat = ddim_step(schedule, pred, x, tt, t_prev, eta, z, prediction, clip,
                                      ddim_eps_from_clipped)
        if traj is not None:
            traj.append((t, x, x0_hat))
        x = x_new.astype(np.float32, copy=False)
        if progress is not None:
            progress(i, len(ts), t)
    if traj is not None:
        traj.final = x
        return x, traj
    return x
