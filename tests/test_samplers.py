"""Tests for ddpm_ref/samplers.py: timestep lists, the DDPM and DDIM steps, guidance and the loop.

The main oracle: for Gaussian data x0 ~ N(mu, s^2 I) the optimal denoiser is known in closed form
(``diffusion.gaussian_oracle_denoiser``), so a correct reverse process driven by it must sample
N(mu, s^2). Step-level identities check the formulas exactly: DDPM eq. 11 written out, the posterior
of diffusion.p_mean_variance, respaced steps against improved-diffusion's construction (a full chain
on the respaced betas), DDIM with eta = 1 against DDPM fixed_small, and diffusers' timestep lists.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddpm_ref import diffusion, rng, samplers
from ddpm_ref.rng import Stream
from ddpm_ref.samplers import ddim_step, ddpm_step, sample, timesteps
from ddpm_ref.schedule import Schedule

SCHEDULE = Schedule.linear(1000)
MU = np.array([0.5, -0.3, 0.0, 0.2])
S = np.array([1.0, 0.8, 1.2, 1.5])
N = 2000                                   # samples; x 4 dims = 8000 standardised values


def oracle(prediction="epsilon", schedule=SCHEDULE):
    return diffusion.gaussian_oracle_denoiser(schedule, MU, S, prediction)


# --------------------------------------------------------------------------------------------
# timesteps


@pytest.mark.parametrize("spacing", samplers.SPACINGS)
@pytest.mark.parametrize("T", [1, 2, 7, 1000])
def test_full_run_is_every_timestep(spacing, T):
    np.testing.assert_array_equal(timesteps(T, T, spacing), np.arange(T - 1, -1, -1))


def test_known_timestep_lists():
    np.testing.assert_array_equal(timesteps(1000, 50, "leading"), np.arange(980, -1, -20))
    np.testing.assert_array_equal(timesteps(1000, 50, "leading", offset=1), np.arange(981, 0, -20))
    np.testing.assert_array_equal(timesteps(1000, 50, "trailing"), np.arange(999, 0, -20))
    np.testing.assert_array_equal(timesteps(10, 4, "linspace"), [9, 6, 3, 0])
    np.testing.assert_array_equal(timesteps(10, 3, "trailing"), [9, 6, 2])      # round(10, 6.67, 3.33) - 1
    np.testing.assert_array_equal(timesteps(1000, 1, "trailing"), [999])


@given(T=st.integers(1, 1500), data=st.data())
def test_timestep_properties(T, data):
    num_steps = data.draw(st.integers(1, T))
    for spacing in samplers.SPACINGS:
        ts = timesteps(T, num_steps, spacing)
        assert ts.dtype == np.int64 and ts.shape == (num_steps,)
        assert ts[-1] >= 0 and ts[0] <= T - 1 and np.all(np.diff(ts) < 0)
        if spacing == "trailing" or (spacing == "linspace" and num_steps > 1):
            assert ts[0] == T - 1                  # Lin et al.'s point: start from the noisiest step
        if spacing == "linspace":
            assert ts[-1] == 0                     # (one step: linspace(0, T-1, 1) = [0], as diffusers)


# diffusers 0.42.1, DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing).set_timesteps(S)
# .timesteps, recorded (importing torch + diffusers here would cost more than this whole file).
DIFFUSERS_TIMESTEPS = {
    (1000, 7, "leading"): [852, 710, 568, 426, 284, 142, 0],
    (1000, 7, "trailing"): [999, 856, 713, 570, 428, 285, 142],
    (1000, 7, "linspace"): [999, 832, 666, 500, 333, 166, 0],
    (1000, 6, "leading"): [830, 664, 498, 332, 166, 0],
    (1000, 6, "trailing"): [999, 832, 666, 499, 332, 166],
    (1000, 6, "linspace"): [999, 799, 599, 400, 200, 0],
    (999, 10, "leading"): [891, 792, 693, 594, 495, 396, 297, 198, 99, 0],
    (999, 10, "trailing"): [998, 898, 798, 698, 598, 499, 399, 299, 199, 99],
    (999, 10, "linspace"): [998, 887, 776, 665, 554, 444, 333, 222, 111, 0],
    (37, 5, "leading"): [28, 21, 14, 7, 0],
    (37, 5, "trailing"): [36, 29, 21, 14, 6],
    (37, 5, "linspace"): [36, 27, 18, 9, 0],
    (10, 3, "leading"): [6, 3, 0],
    (10, 3, "trailing"): [9, 6, 2],
    (10, 3, "linspace"): [9, 4, 0],
    (1000, 3, "leading"): [666, 333, 0],
    (1000, 3, "trailing"): [999, 666, 332],
    (1000, 3, "linspace"): [999, 500, 0],
    (1000, 1, "leading"): [0],
    (1000, 1, "trailing"): [999],
    (1000, 1, "linspace"): [0],
}


@pytest.mark.parametrize("key", sorted(DIFFUSERS_TIMESTEPS))
def test_timesteps_match_diffusers(key):
    T, num, spacing = key
    np.testing.assert_array_equal(timesteps(T, num, spacing), DIFFUSERS_TIMESTEPS[key])


def test_leading_offset_matches_diffusers_steps_offset():
    # DDIMScheduler(..., timestep_spacing="leading", steps_offset=1).set_timesteps(7), diffusers 0.42.1
    np.testing.assert_array_equal(timesteps(1000, 7, "leading", offset=1), [853, 711, 569, 427, 285, 143, 1])


def test_previous_timesteps():
    ts = timesteps(1000, 10, "trailing")
    np.testing.assert_array_equal(samplers.previous_timesteps(ts), list(ts[1:]) + [-1])
    with pytest.raises(ValueError, match="decreasing"):
        samplers.previous_timesteps([3, 5, 1])


def test_respaced_run_takes_t_prev_from_the_list(monkeypatch):
    seen = []
    real_step = samplers.ddpm_step

    def recording_step(schedule, out, xt, t, t_prev, *args, **kwargs):
        seen.append((int(np.asarray(t)[0]), int(t_prev)))
        return real_step(schedule, out, xt, t, t_prev, *args, **kwargs)

    monkeypatch.setattr(samplers, "ddpm_step", recording_step)
    sample(oracle(), SCHEDULE, (4,), 3, 0, num_steps=7, spacing="trailing", clip=False)
    ts = timesteps(1000, 7, "trailing")                   # 999, 856, 713, 570, 428, 285, 142
    assert seen == list(zip(ts.tolist(), ts[1:].tolist() + [-1]))
    # Not t - 1 and not t - T // S: e.g. 999 -> 856 (T // S = 142 would give 857).
    assert seen[0] == (999, 856)


# --------------------------------------------------------------------------------------------
# One step, checked against independent formulations


def _state(n=64, d=4, seed=0):
    """Test inputs (x_t, eps, z), float64 (n, d)."""
    g = np.random.default_rng(seed)
    xt = g.standard_normal((n, d))
    eps = g.standard_normal((n, d))
    z = g.standard_normal((n, d))
    return xt, eps, z


def test_ddpm_step_is_eq_11_for_full_steps():
    xt, eps, z = _state()
    sch = SCHEDULE
    for t in [999, 500, 1]:
        tt = np.full(xt.shape[0], t)
        beta, alpha, ab = sch.betas[t], sch.alphas[t], sch.alpha_bar[t]
        mean = (xt - beta / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)            # eq. 11
        for variance, var in [("fixed_small", sch.posterior_variance[t]), ("fixed_large", beta)]:
            x_prev, x0_hat = ddpm_step(sch, eps, xt, tt, t - 1, z, "epsilon", variance, clip=False)
            # float64 throughout: agreement to rounding (the two forms differ algebraically only)
            np.testing.assert_allclose(x_prev, mean + math.sqrt(var) * z, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(x0_hat, (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab), rtol=1e-10)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_p_mean_variance(variance, clip):
    xt, eps, z = _state(seed=1)
    xt = 3.0 * xt                                  # so that clipping x0 to [-1, 1] matters
    g = np.random.default_rng(2)
    v = g.uniform(-1, 1, xt.shape)
    out = np.concatenate([eps, v], axis=1) if variance == "learned_range" else eps
    t = g.integers(1, 1000, xt.shape[0])           # per-sample timesteps, full steps t -> t - 1
    x_prev, x0_hat = ddpm_step(SCHEDULE, out, xt, t, t - 1, z, "epsilon", variance, clip)
    pmv = diffusion.p_mean_variance(SCHEDULE, out, xt, t, "epsilon", variance, clip)
    np.testing.assert_allclose(x0_hat, pmv["x0_hat"], rtol=1e-12, atol=1e-12)
    # p_mean_variance reads the tables, ddpm_step recomputes them from alpha_bar: equal to rounding.
    expected = pmv["mean"] + np.exp(0.5 * pmv["log_variance"]) * z
    np.testing.assert_allclose(x_prev, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_final_step_adds_no_noise(variance):
    xt, eps, _ = _state(seed=3)
    out = np.concatenate([eps, np.zeros_like(eps)], axis=1) if variance == "learned_range" else eps
    t = np.array([0] * 32 + [5] * 32)                              # final steps from t = 0 and t = 5
    huge = np.full(xt.shape, 1e6)
    x_prev, x0_hat = ddpm_step(SCHEDULE, out, xt, t, -1, huge, "epsilon", variance, clip=False)
    np.testing.assert_array_equal(x_prev, x0_hat)               # the mean at alpha_bar_prev = 1 is x0_hat
    x_none, _ = ddpm_step(SCHEDULE, out, xt, t, -1, None, "epsilon", variance, clip=False)
    np.testing.assert_array_equal(x_none, x0_hat)
    x_ddim, x0_ddim = ddim_step(SCHEDULE, eps, xt, t, -1, 1.0, huge, "epsilon", clip=False)
    np.testing.assert_array_equal(x_ddim, x0_ddim)
    np.testing.assert_allclose(x0_ddim, x0_hat, rtol=1e-12)


def _respaced_schedule(ts):
    """improved-diffusion's respacing: a new schedule whose betas are 1 - ab[t_i] / ab[t_{i-1}]."""
    ab = SCHEDULE.alpha_bar[np.sort(ts)]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return Schedule.from_betas(1.0 - ab / ab_prev)


@pytest.mark.parametrize("spacing", samplers.SPACINGS)
def test_respaced_steps_equal_the_full_chain_of_the_respaced_schedule(spacing):
    ts = timesteps(1000, 10, spacing)
    t_prev = samplers.previous_timesteps(ts)
    sub = _respaced_schedule(ts)                      # index i of sub = ts[::-1][i]
    xt, eps, z = _state(n=len(ts), seed=4)
    v = np.random.default_rng(5).uniform(-1, 1, xt.shape)
    i = np.arange(len(ts))[::-1]                      # the respaced index of ts[k]
    for variance in ["fixed_small", "fixed_large", "learned_range"]:
        out = np.concatenate([eps, v], axis=1) if variance == "learned_range" else eps
        mine, x0_mine = ddpm_step(SCHEDULE, out, xt, ts, t_prev, z, "epsilon", variance, clip=False)
        theirs, x0_theirs = ddpm_step(sub, out, xt, i, i - 1, z, "epsilon", variance, clip=False)
        np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(x0_mine, x0_theirs, rtol=1e-9)
        # ... and the respaced schedule's own tables (eq. 7) give the same mean and variance
        pmv = diffusion.p_mean_variance(sub, out, xt, i, "epsilon", variance, False)
        ok = i > 0                                     # index 0 is the final step: no noise
        expected = pmv["mean"] + np.where(ok[:, None], np.exp(0.5 * pmv["log_variance"]), 0.0) * z
        np.testing.assert_allclose(mine, expected, rtol=1e-9, atol=1e-9)
    for eta in (0.0, 0.5, 1.0):
        mine, _ = ddim_step(SCHEDULE, eps, xt, ts, t_prev, eta, z, "epsilon", clip=False)
        theirs, _ = ddim_step(sub, eps, xt, i, i - 1, eta, z, "epsilon", clip=False)
        np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=1e-9)


def test_ddim_eq_12_and_eta_one_is_ddpm_fixed_small():
    xt, eps, z = _state(seed=6)
    t, s = 700, 650
    ab_t, ab_s = SCHEDULE.alpha_bar[t], SCHEDULE.alpha_bar[s]
    x0 = (xt - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    for eta in (0.0, 0.3, 1.0):
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)          # eq. 16
        expected = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - sigma ** 2) * eps + sigma * z   # eq. 12
        got, _ = ddim_step(SCHEDULE, eps, xt, t, s, eta, z, "epsilon", clip=False)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    # eta = 1: the same distribution as DDPM fixed_small, and with the same z the same numbers.
    ddim1, _ = ddim_step(SCHEDULE, eps, xt, t, s, 1.0, z, "epsilon", clip=False)
    ddpm, _ = ddpm_step(SCHEDULE, eps, xt, t, s, z, "epsilon", "fixed_small", clip=False)
    np.testing.assert_allclose(ddim1, ddpm, rtol=1e-10, atol=1e-10)
    # eta = 0: sigma = 0, the noise is not used at all (None or any array give the same numbers).
    a, _ = ddim_step(SCHEDULE, eps, xt, t, s, 0.0, None, "epsilon", clip=False)
    b, _ = ddim_step(SCHEDULE, eps, xt, t, s, 0.0, 100.0 * z, "epsilon", clip=False)
    np.testing.assert_array_equal(a, b)


def test_ddim_eps_from_clipped_conventions():
    """With clipping, eq. 12's eps_hat is either re-derived from the clipped x0_hat (GLIDE /
    improved-diffusion, the default) or the model's own eps (diffusers' DDIMPipeline)."""
    xt, eps, z = _state(seed=9)
    xt = 4.0 * xt                                              # x0_hat well outside [-1, 1]
    t, s = 300, 200
    ab_t, ab_s = SCHEDULE.alpha_bar[t], SCHEDULE.alpha_bar[s]
    x0 = np.clip((xt - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t), -1, 1)
    assert np.mean(np.abs(x0) == 1.0) > 0.3                    # clipping really happens
    eps_clipped = (xt - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    for eta in (0.0, 0.7):
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)      # eq. 16
        for eps_from_clipped, e in ((True, eps_clipped), (False, eps)):
            expected = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - sigma ** 2) * e + sigma * z   # eq. 12
            got, x0_hat = ddim_step(SCHEDULE, eps, xt, t, s, eta, z, "epsilon", clip=True,
                                    eps_from_clipped=eps_from_clipped)
            # float64 throughout: the same formula up to rounding
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
            np.testing.assert_array_equal(x0_hat, x0)
    # x0-prediction: "the model's own eps" is the eps of the unclipped x0.
    x0_raw = 3.0 * eps
    got, _ = ddim_step(SCHEDULE, x0_raw, xt, t, s, 0.0, None, "sample", clip=True, eps_from_clipped=False)
    eps_raw = (xt - math.sqrt(ab_t) * x0_raw) / math.sqrt(1 - ab_t)
    expected = math.sqrt(ab_s) * np.clip(x0_raw, -1, 1) + math.sqrt(1 - ab_s) * eps_raw
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    # Without clipping the two conventions are the same computation: bit for bit.
    a, _ = ddim_step(SCHEDULE, eps, xt, t, s, 0.7, z, "epsilon", clip=False, eps_from_clipped=True)
    b, _ = ddim_step(SCHEDULE, eps, xt, t, s, 0.7, z, "epsilon", clip=False, eps_from_clipped=False)
    np.testing.assert_array_equal(a, b)


def test_sample_passes_ddim_eps_from_clipped_and_offset():
    den = diffusion.gaussian_oracle_denoiser(SCHEDULE, 0.2, 3.0, "epsilon")   # wide data: x0_hat clipped
    kw = dict(sampler="ddim", num_steps=20, spacing="trailing", eta=0.5)
    a = sample(den, SCHEDULE, (8,), 16, 3, clip=True, **kw)
    b = sample(den, SCHEDULE, (8,), 16, 3, clip=True, ddim_eps_from_clipped=True, **kw)
    c = sample(den, SCHEDULE, (8,), 16, 3, clip=True, ddim_eps_from_clipped=False, **kw)
    np.testing.assert_array_equal(a, b)                            # True is the default
    assert np.abs(a - c).max() > 1e-2                              # the convention matters here ...
    a = sample(den, SCHEDULE, (8,), 16, 3, clip=False, **kw)
    c = sample(den, SCHEDULE, (8,), 16, 3, clip=False, ddim_eps_from_clipped=False, **kw)
    np.testing.assert_array_equal(a, c)                            # ... and not without clipping
    a = sample(den, SCHEDULE, (8,), 16, 3, num_steps=10, clip=True)
    c = sample(den, SCHEDULE, (8,), 16, 3, num_steps=10, clip=True, ddim_eps_from_clipped=False)
    np.testing.assert_array_equal(a, c)                            # DDPM steps never use it
    # offset: diffusers' steps_offset on "leading" timesteps; noise is addressed by the visited t.
    seen = []
    x, traj = sample(oracle(), SCHEDULE, (4,), 3, 0, num_steps=10, spacing="leading", offset=1, clip=False,
                     return_trajectory=True, progress=lambda i, total, t: seen.append(t))
    assert seen == list(range(901, 0, -100))                      # 901, 801, ..., 1
    np.testing.assert_array_equal(traj[-1][2], x)                  # the final step (t = 1 -> -1) gives x0_hat
    plain = sample(oracle(), SCHEDULE, (4,), 3, 0, num_steps=10, spacing="leading", clip=False)
    assert np.abs(x - plain).max() > 1e-3                          # a different chain, not ignored


def test_learned_range_endpoints_are_the_fixed_variances():
    xt, eps, z = _state(seed=7)
    t, s = 400, 350                                              # a respaced step
    for v, variance in [(-1.0, "fixed_small"), (1.0, "fixed_large")]:
        out = np.concatenate([eps, np.full_like(eps, v)], axis=1)
        a, _ = ddpm_step(SCHEDULE, out, xt, t, s, z, "epsilon", "learned_range", clip=False)
        b, _ = ddpm_step(SCHEDULE, eps, xt, t, s, z, "epsilon", variance, clip=False)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)   # exp(log(x)) round trip


def test_clipping_and_dynamic_thresholding():
    g = np.random.default_rng(8)
    x0 = np.concatenate([g.uniform(-0.9, 0.9, (1, 50)), 3.0 * g.standard_normal((1, 50)),
                         np.full((1, 50), 4.0)])
    np.testing.assert_array_equal(samplers.clip_x0(x0, True), np.clip(x0, -1, 1))
    np.testing.assert_array_equal(samplers.clip_x0(x0, False), x0)
    d = samplers.clip_x0(x0, "dynamic")
    np.testing.assert_array_equal(d[0], x0[0])                    # already inside [-1, 1]: unchanged
    np.testing.assert_allclose(d[2], np.ones(50))                 # c = 4: 4 / 4
    # Row 1: c = the 99.5th percentile of |x0| by linear interpolation between order statistics.
    a = np.sort(np.abs(x0[1]))
    pos = 0.995 * (a.size - 1)
    c = a[int(pos)] + (pos - int(pos)) * (a[int(pos) + 1] - a[int(pos)])
    assert c > 1.0
    np.testing.assert_allclose(d[1], np.clip(x0[1], -c, c) / c, rtol=1e-12)
    assert np.abs(d).max() <= 1.0
    # Steps use the clipped x0 and a consistent eps: DDIM's x0_hat comes back clipped.
    xt = 5.0 * g.standard_normal((16, 4))
    eps = g.standard_normal((16, 4))
    for clip in (True, "dynamic"):
        _, x0_hat = ddim_step(SCHEDULE, eps, xt, 10, 5, 0.0, None, "epsilon", clip=clip)
        assert np.abs(x0_hat).max() <= 1.0


# --------------------------------------------------------------------------------------------
# Whole runs against the Gaussian oracle

# Statistical bounds. The 2000 x 4 samples are standardised, z = (x - mu) / s, and pooled (8000
# values). For exact N(mu, s^2) samples mean(z) has standard error 1/sqrt(8000) = 0.0112 and std(z)
# about 1/sqrt(2 * 8000) = 0.0079; the bounds are 5 standard errors. Respaced chains (100 steps)
# are coarser discretisations of the reverse process and shrink the variance slightly even with the
# exact denoiser (measured with 16000 samples: DDPM fixed_small / DDIM eta=1 -4.4%, DDIM eta=0
# -1.6%, fixed_large -0.7%); their std bound gets that allowance on top. Full 1000-step chains
# are within 1% (no allowance). The mean is unbiased in every case (the chain is linear in x_T).
SE_MEAN = 1.0 / math.sqrt(4 * N)
SE_STD = 1.0 / math.sqrt(2 * 4 * N)
ALLOWANCE = {"ddpm-fixed_small": 0.06, "ddim-1.0": 0.06, "ddim-0.0": 0.025, "ddpm-fixed_large": 0.015}

CONFIGS = [("ddpm", "fixed_small", 0.0), ("ddpm", "fixed_large", 0.0), ("ddim", "fixed_small", 0.0),
           ("ddim", "fixed_small", 1.0)]
CHAINS = [(None, "leading"), (100, "leading"), (100, "trailing"), (100, "linspace")]


@pytest.fixture(scope="module")
def runs():
    """All oracle runs, computed once (the full chains are the slow part of this file)."""
    out = {}
    for sampler, variance, eta in CONFIGS:
        for num_steps, spacing in CHAINS:
            out[sampler, variance, eta, num_steps, spacing] = sample(
                oracle(), SCHEDULE, (4,), N, 2024, sampler=sampler, num_steps=num_steps, spacing=spacing,
                eta=eta, variance=variance, clip=False)
    return out


@pytest.mark.parametrize("num_steps,spacing", CHAINS)
@pytest.mark.parametrize("sampler,variance,eta", CONFIGS)
def test_oracle_samples_have_the_data_moments(runs, sampler, variance, eta, num_steps, spacing):
    x = runs[sampler, variance, eta, num_steps, spacing]
    assert x.shape == (N, 4) and x.dtype == np.float32
    z = (x.astype(np.float64) - MU) / S
    key = f"{sampler}-{variance}" if sampler == "ddpm" else f"ddim-{eta}"
    allowance = 0.0 if num_steps is None else ALLOWANCE[key]
    assert abs(z.mean()) < 5 * SE_MEAN
    assert abs(z.std() - 1.0) < 5 * SE_STD + allowance
    # Per dimension (2000 values each): mean within 5 standard errors of mu in units of s.
    assert np.all(np.abs(z.mean(axis=0)) < 5 / math.sqrt(N))


def test_full_chains_agree_with_each_other(runs):
    # DDIM with eta = 1 draws the same numbers as DDPM fixed_small (same noise, same formula up to
    # rounding); float32 states over 1000 steps: equal to 1e-4.
    np.testing.assert_allclose(runs["ddim", "fixed_small", 1.0, None, "leading"],
                               runs["ddpm", "fixed_small", 0.0, None, "leading"], atol=1e-4)


def test_ddim_eta_zero_is_deterministic(monkeypatch):
    base = sample(oracle(), SCHEDULE, (4,), 16, 5, sampler="ddim", num_steps=20, spacing="trailing", clip=False)
    real_normal = rng.normal
    calls = []

    def other_step_noise(seed, stream, index, step=0, shape=(), sub=0):
        calls.append(stream)
        z = real_normal(seed, stream, index, step, shape, sub)
        return z if stream != Stream.SAMPLE_STEP else -3.0 * z          # any other step noise

    monkeypatch.setattr(samplers.rng, "normal", other_step_noise)
    again = sample(oracle(), SCHEDULE, (4,), 16, 5, sampler="ddim", num_steps=20, spacing="trailing", clip=False)
    np.testing.assert_array_equal(again, base)                     # x_T alone decides the sample
    assert Stream.SAMPLE_STEP not in calls
    # The same perturbation changes an eta > 0 run, so the test above has teeth.
    a = sample(oracle(), SCHEDULE, (4,), 16, 5, sampler="ddim", eta=1.0, num_steps=20, clip=False)
    monkeypatch.setattr(samplers.rng, "normal", real_normal)
    b = sample(oracle(), SCHEDULE, (4,), 16, 5, sampler="ddim", eta=1.0, num_steps=20, clip=False)
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_do_not_depend_on_the_batch(sampler):
    kw = dict(sampler=sampler, eta=1.0, num_steps=25, spacing="linspace")
    whole = sample(oracle(), SCHEDULE, (4,), 8, 9, **kw)
    first = sample(oracle(), SCHEDULE, (4,), 4, 9, index_offset=0, **kw)
    second = sample(oracle(), SCHEDULE, (4,), 4, 9, index_offset=4, **kw)
    np.testing.assert_array_equal(np.concatenate([first, second]), whole)        # exact
    np.testing.assert_array_equal(sample(oracle(), SCHEDULE, (4,), 3, 9, index_offset=5, **kw), whole[5:])


@pytest.mark.parametrize("sampler,variance", [("ddpm", "fixed_small"), ("ddpm", "fixed_large"), ("ddim", "fixed_small")])
def test_prediction_types_give_the_same_samples(sampler, variance):
    res = {p: sample(oracle(p), SCHEDULE, (4,), 200, 3, sampler=sampler, variance=variance, eta=0.5,
                     num_steps=50, spacing="trailing", clip=True, prediction=p)
           for p in diffusion.PREDICTIONS}
    # The three oracles are the same function in different coordinates; they return float32, so the
    # predictions differ by float32 rounding (amplified up to ~1/sqrt(alpha_bar) ~ 160 when x0 is
    # recovered from eps near t = T, damped by the small x0 coefficient there). Measured: <= 1e-6;
    # bound 2e-5, far below any real discrepancy (a wrong conversion is off by O(1)).
    np.testing.assert_allclose(res["sample"], res["epsilon"], atol=2e-5)
    np.testing.assert_allclose(res["v"], res["epsilon"], atol=2e-5)


def _class_oracles():
    """A class-conditional Gaussian oracle: class k has mean mu_k; y=None -> the mean of the means."""
    mus = np.array([[1.0, 0.0, -1.0, 0.5], [-0.5, 0.5, 0.5, 0.0]])
    cond = [diffusion.gaussian_oracle_denoiser(SCHEDULE, m, S, "epsilon") for m in mus]
    uncond = diffusion.gaussian_oracle_denoiser(SCHEDULE, mus.mean(0), S, "epsilon")
    calls = {"cond": 0, "uncond": 0}

    def f(x, t, y=None):
        if y is None:
            calls["uncond"] += 1
            return uncond(x, t)
        calls["cond"] += 1
        out = np.empty_like(x)
        for k in range(len(mus)):
            m = y == k
            if m.any():
                out[m] = cond[k](x[m], t[m])
        return out

    return f, calls, mus


def test_guidance_zero_is_the_conditional_sampler_and_labels_matter():
    f, calls, mus = _class_oracles()
    y = np.array([0, 1] * 100)
    plain = sample(f, SCHEDULE, (4,), 200, 11, num_steps=50, spacing="trailing", y=y, clip=False)
    assert calls["uncond"] == 0
    guided0 = sample(f, SCHEDULE, (4,), 200, 11, num_steps=50, spacing="trailing", y=y, guidance=0.0, clip=False)
    np.testing.assert_array_equal(guided0, plain)
    # The class means come out (100 samples per class: 5 standard errors s / sqrt(100) per dim).
    for k in range(2):
        assert np.all(np.abs(plain[y == k].mean(0) - mus[k]) < 5 * S / 10)
    # w = 2: both passes are made at every step, and the result differs.
    calls["uncond"] = calls["cond"] = 0
    guided = sample(f, SCHEDULE, (4,), 200, 11, num_steps=50, spacing="trailing", y=y, guidance=2.0, clip=False)
    assert calls == {"cond": 50, "uncond": 50}
    assert np.abs(guided - plain).max() > 0.05


def test_guided_output_formula_and_learned_variance_channels():
    g = np.random.default_rng(12)
    c, u = g.standard_normal((3, 4, 2, 2)), g.standard_normal((3, 4, 2, 2))
    out = samplers.guided_output(c, u, 1.5, "fixed_small")
    np.testing.assert_allclose(out, 2.5 * c - 1.5 * u, rtol=1e-12)
    out = samplers.guided_output(c, u, 1.5, "learned_range")      # channels [eps (2), v (2)]
    np.testing.assert_allclose(out[:, :2], 2.5 * c[:, :2] - 1.5 * u[:, :2], rtol=1e-12)
    np.testing.assert_array_equal(out[:, 2:], c[:, 2:])            # variance from the conditional pass


def test_learned_range_run_with_fixed_endpoints():
    base = oracle()

    def learned(v):
        def f(x, t, y=None):
            eps = base(x, t)
            return np.concatenate([eps, np.full_like(eps, v)], axis=1)
        return f

    kw = dict(num_steps=30, spacing="trailing", clip=False)
    for v, variance in [(-1.0, "fixed_small"), (1.0, "fixed_large")]:
        a = sample(learned(v), SCHEDULE, (4,), 50, 13, variance="learned_range", **kw)
        b = sample(base, SCHEDULE, (4,), 50, 13, variance=variance, **kw)
        np.testing.assert_allclose(a, b, atol=1e-5)          # float32 states, exp(log) rounding
    # DDIM ignores the variance channels.
    a = sample(learned(0.3), SCHEDULE, (4,), 50, 13, sampler="ddim", variance="learned_range", **kw)
    b = sample(base, SCHEDULE, (4,), 50, 13, sampler="ddim", **kw)
    np.testing.assert_array_equal(a, b)


def test_trajectory_and_progress():
    events = []
    x, traj = sample(oracle(), SCHEDULE, (4,), 6, 14, num_steps=12, spacing="linspace",
                     return_trajectory=True, progress=lambda i, total, t: events.append((i, total, t)), clip=False)
    ts = timesteps(1000, 12, "linspace")
    assert [t for t, _, _ in traj] == ts.tolist()
    assert events == [(i, 12, int(t)) for i, t in enumerate(ts)]
    np.testing.assert_array_equal(traj[0][1], rng.normal(14, Stream.SAMPLE_INIT, np.arange(6), 0, (4,)))
    states = np.asarray(traj)
    assert states.shape == (13, 6, 4) and states.dtype == np.float32
    np.testing.assert_array_equal(states[-1], x)
    np.testing.assert_array_equal(traj[-1][2], x)                  # the final step returns x0_hat
    assert traj[0][2].shape == (6, 4)


def test_sample_with_image_shape_and_clipping():
    # An (N, C, H, W) run: the oracle works per element; clip=True keeps x0_hat and the output in [-1, 1].
    den = diffusion.gaussian_oracle_denoiser(SCHEDULE, 0.2, 0.9, "epsilon")
    x = sample(den, SCHEDULE, (1, 3, 3), 20, 15, num_steps=20, spacing="trailing", clip=True)
    assert x.shape == (20, 1, 3, 3) and np.abs(x).max() <= 1.0
    xd = sample(den, SCHEDULE, (1, 3, 3), 20, 15, num_steps=20, spacing="trailing", clip="dynamic")
    assert np.abs(xd).max() <= 1.0


def test_zero_terminal_snr_with_v_prediction():
    # Lin et al. 2023: alpha_bar_T = 0, so x_T is pure noise and x0 must come from v (eps cannot
    # give it). Same bounds as the respaced runs above (100 trailing steps, starting at t = T - 1).
    sch = Schedule.linear(1000).rescale_zero_terminal_snr()
    assert sch.alpha_bar[-1] == 0.0
    den = diffusion.gaussian_oracle_denoiser(sch, MU, S, "v")
    for sampler, variance, key in [("ddim", "fixed_small", "ddim-0.0"), ("ddpm", "fixed_large", "ddpm-fixed_large")]:
        x = sample(den, sch, (4,), N, 16, sampler=sampler, variance=variance, prediction="v", num_steps=100,
                   spacing="trailing", clip=False)
        z = (x.astype(np.float64) - MU) / S
        assert abs(z.mean()) < 5 * SE_MEAN
        assert abs(z.std() - 1.0) < 5 * SE_STD + ALLOWANCE[key]
    with pytest.raises(ValueError, match="alpha_bar = 0"):
        sample(diffusion.gaussian_oracle_denoiser(sch, MU, S, "epsilon"), sch, (4,), 4, 0, num_steps=10,
               spacing="trailing")


def test_non_finite_denoiser_output_stops_the_run():
    calls = []

    def bad(x, t, y=None):
        calls.append(int(t[0]))
        out = np.zeros_like(x)
        if t[0] < 500:
            out[0, 0] = np.nan
        return out

    with pytest.raises(ValueError, match="non-finite values at t = 499"):
        sample(bad, SCHEDULE, (4,), 3, 0, num_steps=10, spacing="trailing")     # 999, 899, ..., 99
    assert calls == [999, 899, 799, 699, 599, 499]                 # stopped at the first bad output


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("args,match", [
    ((1000, 0, "leading"), "num_steps"),
    ((1000, 1001, "leading"), "num_steps"),
    ((1000, 10.0, "leading"), "num_steps"),
    ((0, 1, "leading"), "T"),
    ((1000, 10, "uniform"), "spacing"),
    ((1000, 10, "Leading"), "spacing"),
])
def test_bad_timesteps(args, match):
    with pytest.raises(ValueError, match=match):
        timesteps(*args)


def test_bad_offsets():
    with pytest.raises(ValueError, match="offset"):
        timesteps(1000, 10, "trailing", offset=1)
    with pytest.raises(ValueError, match="offset"):
        timesteps(1000, 1000, "leading", offset=1)          # 999 + 1 is beyond T - 1
    with pytest.raises(ValueError, match="offset"):
        timesteps(1000, 10, "leading", offset=-1)


def test_bad_step_input():
    xt, eps, z = _state(n=4)
    with pytest.raises(ValueError, match="t_prev must be smaller"):
        ddpm_step(SCHEDULE, eps, xt, 5, 5, z)
    with pytest.raises(ValueError, match="t_prev must be >= -1"):
        ddpm_step(SCHEDULE, eps, xt, 5, -2, z)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T\)"):
        ddpm_step(SCHEDULE, eps, xt, 1000, 3, z)
    with pytest.raises(ValueError, match="shape"):
        ddpm_step(SCHEDULE, eps, xt, np.array([5, 6]), 3, z)
    with pytest.raises(ValueError, match="noise is required"):
        ddpm_step(SCHEDULE, eps, xt, 5, 3, None)
    with pytest.raises(ValueError, match="noise must have"):
        ddpm_step(SCHEDULE, eps, xt, 5, 3, z[:, :2])
    with pytest.raises(ValueError, match="model output"):
        ddpm_step(SCHEDULE, eps[:, :2], xt, 5, 3, z)
    with pytest.raises(ValueError, match="learned_range"):
        ddpm_step(SCHEDULE, eps[:, :3], xt, 5, 3, z, variance="learned_range")
    with pytest.raises(ValueError, match="variance"):
        ddpm_step(SCHEDULE, eps, xt, 5, 3, z, variance="large")
    with pytest.raises(ValueError, match="prediction"):
        ddpm_step(SCHEDULE, eps, xt, 5, 3, z, prediction="eps")
    with pytest.raises(ValueError, match="clip"):
        ddpm_step(SCHEDULE, eps, xt, 5, 3, z, clip="yes")
    with pytest.raises(ValueError, match="eta"):
        ddim_step(SCHEDULE, eps, xt, 5, 3, 1.5, z)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(SCHEDULE, eps, xt, 5, 3, float("nan"), z)
    with pytest.raises(ValueError, match="noise is required"):
        ddim_step(SCHEDULE, eps, xt, 5, 3, 0.5, None)
    with pytest.raises(ValueError, match="eps_from_clipped"):
        ddim_step(SCHEDULE, eps, xt, 5, 3, 0.5, z, eps_from_clipped=None)
    with pytest.raises(ValueError, match="schedule"):
        ddpm_step("linear", eps, xt, 5, 3, z)
    with pytest.raises(ValueError, match="percentile"):
        samplers.dynamic_threshold(xt, p=0.0)
    # Non-numbers get the same named errors as out-of-range numbers, not float()'s bare ones.
    with pytest.raises(ValueError, match="eta must be a real number, got None"):
        ddim_step(SCHEDULE, eps, xt, 5, 3, None, z)
    with pytest.raises(ValueError, match="percentile p must be a real number, got None"):
        samplers.dynamic_threshold(xt, p=None)
    for bad in (None, "x", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance"):
            samplers.guided_output(eps, eps, bad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), "sampler"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=2000), "num_steps"),
    (dict(spacing="even"), "spacing"),
    (dict(n=0), "n must"),
    (dict(seed=-1), "seed"),
    (dict(shape=(4, 0)), "shape"),
    (dict(shape=()), "shape"),
    (dict(index_offset=-1), "index_offset"),
    (dict(y=np.array([0, 1])), "y must"),
    (dict(y=np.zeros(3)), "y must"),
    (dict(guidance=1.0), "needs class labels"),
    (dict(guidance=float("inf"), y=np.zeros(3, np.int64)), "guidance"),
    (dict(sampler="ddim", eta=-0.1), "eta"),
    (dict(sampler="ddim", eta=None), "eta must be a real number, got None"),
    (dict(sampler="ddim", eta="x"), "eta must be a real number, got 'x'"),
    (dict(guidance=None), "guidance must be a real number, got None"),
    (dict(clip="soft"), "clip"),
    (dict(progress=5), "progress"),
    (dict(offset=1, spacing="trailing"), "offset"),
    (dict(offset=-1), "offset"),
    (dict(ddim_eps_from_clipped="no"), "ddim_eps_from_clipped"),
    (dict(denoiser=None), "denoiser"),
])
def test_bad_sample_input(kwargs, match):
    args = dict(denoiser=oracle(), schedule=SCHEDULE, shape=(4,), n=3, seed=0, num_steps=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample(**args)
