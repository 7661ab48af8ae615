"""Noise schedules and every table derived from them, in float64.

What it is: the variance schedule ``beta_1 .. beta_T`` of the DDPM forward process
(Ho, Jain & Abbeel 2020, arXiv 2006.11239, eq. 2) and the closed-form tables that the forward
process, the posterior and the samplers read. What it is not: no randomness, no model, no sampling
loop (those live in ``diffusion.py`` and ``samplers.py``).

Indexing. Arrays have length ``T`` and are indexed ``t = 0 .. T-1``; index ``t`` holds the paper's
timestep ``t + 1``. So ``betas[0]`` is the paper's ``beta_1``, ``alpha_bar[T-1]`` is ``alpha_bar_T``,
and ``alpha_bar_prev[0] = 1`` is the paper's ``alpha_bar_0 := 1``.

Tables (all float64, shape (T,), read-only):

==================================  ============================================================
``betas``                           ``beta_t``
``alphas``                          ``alpha_t = 1 - beta_t``
``alpha_bar``                       ``alpha_bar_t = prod_{s<=t} alpha_s``                (eq. 4)
``alpha_bar_prev``                  ``alpha_bar_{t-1}``, with ``alpha_bar_0 = 1``
``sqrt_alpha_bar``                  ``sqrt(alpha_bar_t)``
``sqrt_one_minus_alpha_bar``        ``sqrt(1 - alpha_bar_t)``
``snr``                             ``alpha_bar_t / (1 - alpha_bar_t)`` (Kingma et al. 2021)
``posterior_variance``              ``beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t`` (eq. 7)
``posterior_log_variance_clipped``  ``log beta~_t``, with ``beta~_1`` (= 0) replaced by ``beta~_2``
``posterior_mean_coef1``            ``sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)``   (eq. 7, x0)
``posterior_mean_coef2``            ``sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)`` (eq. 7, xt)
``fixed_large_variance``            ``[beta~_2, beta_2, ..., beta_T]``: DDPM's "sigma^2 = beta" choice
                                    with ``beta~_2`` in place of ``beta_1`` for the first step's
                                    likelihood (as the DDPM and improved-diffusion code do)
``fixed_large_log_variance``        its log
==================================  ============================================================

When ``T == 1`` there is no ``beta~_2``: ``posterior_log_variance_clipped`` and the fixed-large
tables then hold ``beta_1``, the only non-zero variance available.

Schedules:

* ``linear``: betas evenly spaced from 1e-4 to 0.02 (DDPM sec. 4).
* ``cosine``: ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos(((t/T + s) / (1 + s)) pi/2)^2``, betas
  ``1 - alpha_bar(t+1)/alpha_bar(t)`` clipped at ``max_beta`` (Nichol & Dhariwal 2021, eq. 17).
* ``sigmoid``: ``alpha_bar`` follows a shifted sigmoid (Jabri, Fleet & Chen 2022, "Scalable adaptive
  computation for iterative generation"; the form used by lucidrains' denoising-diffusion-pytorch).
* ``from_betas``: any user schedule.
* ``rescale_zero_terminal_snr``: Lin, Liu, Li & Yang 2023 ("Common diffusion noise schedules and
  sample steps are flawed", Algorithm 1): shift and scale ``sqrt(alpha_bar)`` so that
  ``alpha_bar_T = 0`` while ``alpha_bar_1`` is unchanged. The last beta becomes exactly 1, which is
  valid here (betas lie in (0, 1]); the posterior tables stay finite because ``1 - alpha_bar_t >=
  beta_1 > 0`` for every t. (Predicting eps at ``t = T`` is then ill-posed, as Lin et al. note:
  ``x0`` cannot be recovered from ``x_T`` and eps; use v-prediction with such schedules.)
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["Schedule"]

_TABLES = (
    "betas", "alphas", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar",
    "snr", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
    "posterior_mean_coef2", "fixed_large_variance", "fixed_large_log_variance",
)


def _copy_params(value):
    """A copy of a params value, deep through dicts and lists (a rescaled schedule nests its base's
    dict), so that no caller's dict is shared with a schedule."""
    if isinstance(value, dict):
        return {k: _copy_params(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_params(v) for v in value]
    return value


def _check_T(T) -> int:
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)):
        raise ValueError(f"T (the number of diffusion steps) must be an integer >= 1, got {T!r}")
    if int(T) < 1:
        raise ValueError(f"T (the number of diffusion steps) must be an integer >= 1, got {T}")
    return int(T)


def _check_float(value, name: str, low=None, high=None, low_open=True, high_open=True) -> float:
    # A real number: Python or NumPy int or float (or a 0-d array of one). Bools and strings are not
    # numbers here: float(True) and float("0.02") would silently accept them.
    v = value[()] if isinstance(value, np.ndarray) and value.ndim == 0 else value
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v!r}")
    return v


class Schedule:
    """A variance schedule with every derived table (see the module docstring).

    Build one with a constructor (``Schedule.linear()``, ``.cosine()``, ``.sigmoid()``,
    ``.from_betas(betas)``) or ``Schedule(betas)``. The tables are read-only float64 arrays; cast
    them (``schedule.alpha_bar[t].astype(np.float32)``) where they are used, never store them in
    lower precision (storing alpha_bar in float32 costs up to 7e-7 relative error).
    """

    def __init__(self, betas, name: str = "custom", params: dict | None = None):
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, got {name!r}")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"params must be a dict (or None), got {type(params).__name__} {params!r:.80}")
        try:
            arr = np.asarray(betas)
        except (ValueError, TypeError):       # ragged nested sequences
            raise ValueError(f"betas must be a 1-D array of real numbers, got {betas!r:.80}") from None
        if arr.dtype == object or arr.dtype.kind not in "iuf":
            raise ValueError(f"betas must be a 1-D array of real numbers, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"betas must be a 1-D array of shape (T,), got shape {arr.shape}")
        if arr.shape[0] < 1:
            raise ValueError("betas must hold at least one value (T >= 1), got an empty array (T = 0)")
        betas = arr.astype(np.float64)
        bad = ~np.isfinite(betas)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"betas must be finite, got betas[{i}] = {float(betas[i])!r}")
        bad = (betas <= 0.0) | (betas > 1.0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"betas must lie in (0, 1], got betas[{i}] = {float(betas[i])!r}")
        if 1.0 - (1.0 - betas[0]) == 0.0:
            raise ValueError(
                f"betas[0] = {float(betas[0])!r} is too small: 1 - beta_1 rounds to 1 in float64, so "
                "1 - alpha_bar_1 = 0 and the posterior tables would divide by zero")
        self.name = str(name)
        self.params = _copy_params(dict(params or {}))
        self._build(betas)

    # ------------------------------------------------------------------ tables
    def _build(self, betas: np.ndarray) -> None:
        T = betas.shape[0]
        alphas = 1.0 - betas                                          # alpha_t
        alpha_bar = np.cumprod(alphas)                                # eq. 4
        alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])      # alpha_bar_{t-1}, alpha_bar_0 = 1
        one_minus_alpha_bar = 1.0 - alpha_bar                         # >= beta_1 > 0 for every t
        posterior_variance = betas * (1.0 - alpha_bar_prev) / one_minus_alpha_bar   # eq. 7
        # log beta~ is -inf at t index 0 (beta~_1 = 0): improved-diffusion "clips" it by using beta~_2.
        first = posterior_variance[1] if T > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.concatenate([[first], posterior_variance[1:]]))
        posterior_mean_coef1 = betas * np.sqrt(alpha_bar_prev) / one_minus_alpha_bar
        posterior_mean_coef2 = (1.0 - alpha_bar_prev) * np.sqrt(alphas) / one_minus_alpha_bar
        fixed_large_variance = np.concatenate([[first], betas[1:]])
        with np.errstate(divide="ignore"):
            snr = alpha_bar / one_minus_alpha_bar
        tables = dict(
            betas=betas, alphas=alphas, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
            sqrt_alpha_bar=np.sqrt(alpha_bar), sqrt_one_minus_alpha_bar=np.sqrt(one_minus_alpha_bar),
            snr=snr, posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=posterior_mean_coef1, posterior_mean_coef2=posterior_mean_coef2,
            fixed_large_variance=fixed_large_variance,
            fixed_large_log_variance=np.log(fixed_large_variance),
        )
        for key, value in tables.items():
            value = np.array(value, dtype=np.float64)
            if not np.all(np.isfinite(value)):
                i = int(np.flatnonzero(~np.isfinite(value))[0])
                raise ValueError(f"schedule table {key} is not finite at t index {i} ({float(value[i])!r}); "
                                 "check the betas")
            value.setflags(write=False)
            setattr(self, key, value)
        self.T = T

    # ------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """DDPM's linear schedule: ``beta_t`` evenly spaced from ``beta_start`` to ``beta_end``
        (Ho et al. 2020, sec. 4: 1e-4 to 0.02 over T = 1000). With T = 1 the single beta is
        ``beta_start``."""
        T = _check_T(T)
        beta_start = _check_float(beta_start, "beta_start", 0.0, 1.0, high_open=False)
        beta_end = _check_float(beta_end, "beta_end", 0.0, 1.0, high_open=False)
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        return cls(betas, "linear", {"T": T, "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        """Nichol & Dhariwal 2021 (eq. 17): ``alpha_bar(t) = f(t)/f(0)``,
        ``f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2``; ``beta_t = min(1 - alpha_bar(t)/alpha_bar(t-1),
        max_beta)`` for the paper's t = 1..T (improved-diffusion's ``betas_for_alpha_bar``)."""
        T = _check_T(T)
        s = _check_float(s, "s", 0.0, None, low_open=False)
        max_beta = _check_float(max_beta, "max_beta", 0.0, 1.0, high_open=False)

        def f(u):
            return np.cos((u + s) / (1.0 + s) * (np.pi / 2.0)) ** 2

        u = np.arange(T + 1, dtype=np.float64) / T                      # t/T for t = 0..T
        fu = f(u)
        betas = np.minimum(1.0 - fu[1:] / fu[:-1], max_beta)
        return cls(betas, "cosine", {"T": T, "s": s, "max_beta": max_beta})

    @classmethod
    def sigmoid(cls, T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                max_beta: float = 0.999) -> "Schedule":
        """Sigmoid schedule (Jabri et al. 2022, as in lucidrains' denoising-diffusion-pytorch):
        ``alpha_bar(u) = (sigmoid(end/tau) - sigmoid((u (end - start) + start)/tau)) /
        (sigmoid(end/tau) - sigmoid(start/tau))`` for ``u = t/T``, normalised by ``alpha_bar(0)``;
        betas from consecutive ratios, clipped at ``max_beta``."""
        T = _check_T(T)
        start = _check_float(start, "start")
        end = _check_float(end, "end")
        tau = _check_float(tau, "tau", 0.0, None)
        max_beta = _check_float(max_beta, "max_beta", 0.0, 1.0, high_open=False)
        if not end > start:
            raise ValueError(f"sigmoid schedule needs end > start, got start={start!r}, end={end!r}")

        def sig(x):
            return 1.0 / (1.0 + np.exp(-x))

        u = np.arange(T + 1, dtype=np.float64) / T
        v_start, v_end = sig(start / tau), sig(end / tau)
        ab = (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
        ab = ab / ab[0]
        betas = np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)
        return cls(betas, "sigmoid", {"T": T, "start": start, "end": end, "tau": tau,
                                      "max_beta": max_beta})

    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        """Any schedule: ``betas`` is a 1-D array of shape (T,) with values in (0, 1]."""
        return cls(betas, "custom", {})

    def rescale_zero_terminal_snr(self) -> "Schedule":
        """Return a new schedule with zero terminal SNR (Lin et al. 2023, Algorithm 1).

        ``sqrt(alpha_bar)`` is shifted so its last value is 0 and scaled so its first value is
        unchanged: ``sqrt_ab' = (sqrt_ab - sqrt_ab_T) * sqrt_ab_1 / (sqrt_ab_1 - sqrt_ab_T)``; the betas
        are recovered from consecutive ratios of ``alpha_bar' = sqrt_ab'^2``, so ``beta_1`` is kept and
        ``beta_T = 1``. Needs T >= 2 (with T = 1 the only step would have to be both kept and zeroed).

        A schedule whose ``alpha_bar`` already reaches 0 two or more steps before T (a beta of
        exactly 1 there) already has zero terminal SNR, and the ratios above would be 0/0: the
        schedule itself is returned unchanged. (If ``alpha_bar`` first reaches 0 at step T - 1 or T,
        the 0/0 touches only ``beta_T``, which is set to 1, and the algorithm runs as usual.) A
        ValueError is raised when ``sqrt(alpha_bar)`` is constant over the last three or more steps
        (betas too small to change ``alpha_bar`` in float64): the shift makes ``alpha_bar`` 0 before
        step T - 1 and the betas after it 0/0 (and when it is constant from the start, the scale
        ``sqrt_ab_1 / (sqrt_ab_1 - sqrt_ab_T)`` itself is 1/0).
        """
        if self.T < 2:
            raise ValueError(f"zero terminal SNR rescaling needs T >= 2, got T = {self.T}")
        if self.T >= 3 and self.alpha_bar[-3] == 0.0:   # non-increasing: 0 from some t index <= T-3
            return self
        sab = self.sqrt_alpha_bar.copy()
        s0, sT = sab[0], sab[-1]
        flat = np.flatnonzero(sab[:-1] == sT)           # contiguous up to T-2: sab is non-increasing
        if flat.size and flat[0] < self.T - 2:          # at T-2 the 0/0 lands on beta_T, set to 1 below
            k = int(flat[0])
            where = ("over all T steps (the betas after the first" if k == 0 else
                     f"from t index {k} to T-1 = {self.T - 1} (the betas after t index {k}")
            why = ("its scale sqrt_ab_1 / (sqrt_ab_1 - sqrt_ab_T) is 1/0 and the rescaled betas 0/0" if k == 0
                   else f"the rescaled alpha_bar would be 0 from t index {k} on and the betas after it 0/0")
            raise ValueError(f"cannot rescale this schedule to zero terminal SNR: sqrt(alpha_bar) is constant "
                             f"(= {float(sT)!r}) {where} are too small to change alpha_bar in float64), so {why}")
        with np.errstate(divide="ignore", invalid="ignore"):   # T = 2: 0/0 only where overwritten below
            sab = (sab - sT) * (s0 / (s0 - sT))
            ab = sab ** 2
            alphas = np.concatenate([[ab[0]], ab[1:] / ab[:-1]])
        betas = 1.0 - alphas
        betas[0] = self.betas[0]          # exactly, not up to rounding of the shift-and-scale
        betas[-1] = 1.0                   # ab[-1] = 0 exactly; state it
        bad = ~np.isfinite(betas) | (betas <= 0.0)
        if bad.any():   # alpha_bar constant over a step (a beta below float64 resolution), or underflow
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"zero terminal SNR rescaling of this schedule gives beta = {float(betas[i])!r} at t index {i} "
                f"(betas[{i}] = {float(self.betas[i])!r}): alpha_bar does not decrease there in float64, "
                "and betas must lie in (0, 1]")
        params = {"base": self.to_dict()}
        return Schedule(betas, "zero_terminal_snr", params)

    # ------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description: the betas (Python floats round-trip exactly through JSON), the
        constructor name and its parameters (a copy: changing the dict leaves the schedule alone)."""
        return {"name": self.name, "params": _copy_params(self.params), "T": self.T,
                "betas": [float(b) for b in self.betas]}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        """Rebuild from :meth:`to_dict` output (betas are authoritative; the rest is provenance).

        ``betas`` is required; ``T`` (an integer equal to the number of betas), ``name`` (a string,
        default ``"custom"``) and ``params`` (a dict or None, default empty) are optional. The
        schedule keeps copies: changing ``d`` afterwards leaves it alone."""
        if not isinstance(d, dict) or "betas" not in d:
            raise ValueError(f"schedule dict must be a dict with a 'betas' entry, got {type(d).__name__}"
                             f"{' with keys ' + str(sorted(d, key=str)) if isinstance(d, dict) else ''}")
        try:
            betas = np.asarray(d["betas"])
        except (ValueError, TypeError):       # ragged nested lists
            raise ValueError(f"schedule dict's betas must be a 1-D list of real numbers, got "
                             f"{d['betas']!r:.80}") from None
        if "T" in d:
            T = d["T"]
            if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)):
                raise ValueError(f"schedule dict's T must be an integer (the number of betas), got {T!r}")
            if betas.ndim == 1 and T != betas.shape[0]:
                raise ValueError(f"schedule dict says T = {T!r} but holds {betas.shape[0]} betas")
        name = d.get("name", "custom")
        if not isinstance(name, str):
            raise ValueError(f"schedule dict's name must be a string, got {name!r}")
        params = d.get("params", {})
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"schedule dict's params must be a dict (or null), got "
                             f"{type(params).__name__} {params!r:.80}")
        return cls(betas, name, params)

    # ------------------------------------------------------------------ misc
    def __len__(self) -> int:
        return self.T

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and np.array_equal(self.betas, other.betas)

    def __hash__(self) -> int:
        return hash(self.betas.tobytes())

    def __repr__(self) -> str:
        return (f"Schedule({self.name}, T={self.T}, beta[0]={self.betas[0]:.6g}, "
                f"beta[T-1]={self.betas[-1]:.6g}, alpha_bar[T-1]={self.alpha_bar[-1]:.6g})")
