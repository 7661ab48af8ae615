"""Tests for ddpm_ref/schedule.py: golden values, invariants over hypothesis-drawn schedules, the
posterior coefficients against Gaussian conditioning, zero-terminal-SNR rescaling, JSON round trips
and every ValueError."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_ref.schedule import Schedule

TABLES = ["betas", "alphas", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar",
          "snr", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
          "posterior_mean_coef2", "fixed_large_variance", "fixed_large_log_variance"]

# Golden values are float64 results; rtol 1e-12 leaves room for a different (equally valid)
# summation order in cumprod/linspace while catching any float32 storage (7e-7 relative error).
GOLD_RTOL = 1e-12


def test_linear_golden_values():
    s = Schedule.linear(1000)
    np.testing.assert_allclose(s.alpha_bar[0], 0.9999, rtol=GOLD_RTOL)
    np.testing.assert_allclose(s.alpha_bar[999], 4.035829765375676e-05, rtol=GOLD_RTOL)
    np.testing.assert_allclose(s.posterior_variance[1], 5.4531876613021935e-05, rtol=GOLD_RTOL)
    np.testing.assert_allclose(s.posterior_variance[999], 0.01999998352656061, rtol=GOLD_RTOL)
    assert s.betas[0] == 1e-4 and s.betas[-1] == 0.02     # linspace end points are exact
    assert s.posterior_variance[0] == 0.0                   # beta~_1 = 0 since alpha_bar_0 = 1


def test_cosine_golden_values():
    c = Schedule.cosine(1000)
    np.testing.assert_allclose(c.betas[0], 4.128422482196914e-05, rtol=GOLD_RTOL)
    assert c.betas[999] == 0.999                            # clipped at max_beta exactly
    np.testing.assert_allclose(c.alpha_bar[999], 2.4287669070348567e-09, rtol=GOLD_RTOL)


def test_cosine_alpha_bar_follows_f_where_unclipped():
    # alpha_bar(t) = f(t)/f(0) (Nichol & Dhariwal eq. 17) wherever no beta was clipped; the product of
    # ratios telescopes, so only cumprod rounding (~1e-13 over 1000 factors) separates them.
    T, s_ = 1000, 0.008
    c = Schedule.cosine(T, s_)
    f = np.cos((np.arange(T + 1) / T + s_) / (1 + s_) * np.pi / 2) ** 2
    last = int(np.argmax(c.betas >= 0.999))             # the first clipped beta (here the last one)
    assert last > 900
    np.testing.assert_allclose(c.alpha_bar[:last], (f[1:] / f[0])[:last], rtol=1e-11)


def test_tables_are_float64_read_only_and_length_T():
    for s in (Schedule.linear(17), Schedule.cosine(9), Schedule.sigmoid(13), Schedule.linear(1)):
        for name in TABLES:
            a = getattr(s, name)
            assert a.dtype == np.float64 and a.shape == (s.T,), name
            assert not a.flags.writeable, name
            assert np.all(np.isfinite(a)), name
        assert len(s) == s.T


def test_definitions_of_simple_tables():
    s = Schedule.cosine(50)
    # These are identities up to one rounding: rtol 1e-15 (a few ulp).
    np.testing.assert_allclose(s.alphas, 1 - s.betas, rtol=1e-15)
    np.testing.assert_allclose(s.alpha_bar, np.cumprod(1 - s.betas), rtol=1e-15)
    np.testing.assert_allclose(s.alpha_bar_prev[1:], s.alpha_bar[:-1], rtol=0)
    assert s.alpha_bar_prev[0] == 1.0
    np.testing.assert_allclose(s.sqrt_alpha_bar ** 2 + s.sqrt_one_minus_alpha_bar ** 2, 1.0, rtol=1e-15)
    np.testing.assert_allclose(s.snr, s.alpha_bar / (1 - s.alpha_bar), rtol=1e-15)
    # log-variance clipping: index 0 takes beta~ at index 1
    assert s.posterior_log_variance_clipped[0] == np.log(s.posterior_variance[1])
    np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(s.posterior_variance[1:]), rtol=1e-15)
    # fixed_large: [beta~ at index 1, betas[1:]] (DDPM/improved-diffusion's first-step choice)
    assert s.fixed_large_variance[0] == s.posterior_variance[1]
    np.testing.assert_array_equal(s.fixed_large_variance[1:], s.betas[1:])


def test_T_equals_one_is_finite():
    s = Schedule.linear(1, beta_start=0.3)
    assert s.betas[0] == 0.3 and s.alpha_bar[0] == pytest.approx(0.7, rel=1e-15)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == np.log(0.3)   # documented fallback to beta_1
    assert s.fixed_large_variance[0] == 0.3


# ----------------------------------------------------------------------------- invariants
def _schedules():
    """Hypothesis strategy over schedules of every kind, including arbitrary valid betas."""
    custom = st.lists(st.floats(1e-4, 0.9), min_size=2, max_size=40).map(Schedule.from_betas)
    linear = st.builds(lambda T, a, b: Schedule.linear(T, min(a, b), max(a, b)),
                       st.integers(2, 300), st.floats(1e-5, 0.05), st.floats(1e-3, 0.5))
    cosine = st.builds(Schedule.cosine, st.integers(2, 300), st.floats(0.0, 0.1), st.floats(0.5, 0.999))
    sigmoid = st.builds(lambda T, a, w, tau: Schedule.sigmoid(T, a, a + w, tau),
                        st.integers(2, 300), st.floats(-5, 0), st.floats(1, 8), st.floats(0.5, 2))
    return st.one_of(custom, linear, cosine, sigmoid)


def _conditioning(ab_prev, alpha, ab):
    """Mean coefficients and variance of x_{t-1} | (x0, x_t) by Gaussian conditioning of the joint.

    Independent of the package: build (x0, x_{t-1}, x_t) = A z from independent standard normals
    z = (x0, e1, e2), x_{t-1} = sqrt(ab_prev) x0 + sqrt(1-ab_prev) e1, x_t = sqrt(alpha) x_{t-1} +
    sqrt(1-alpha) e2, Sigma = A A^T, then condition on (x0, x_t) with the Schur complement.
    (x0 ~ N(0, 1) here; the conditional law given x0 does not depend on x0's own distribution.)
    """
    A = np.zeros((3, 3))
    A[0] = [1.0, 0.0, 0.0]
    A[1] = [math.sqrt(ab_prev), math.sqrt(1 - ab_prev), 0.0]
    A[2] = math.sqrt(alpha) * A[1] + np.array([0.0, 0.0, math.sqrt(1 - alpha)])
    S = A @ A.T
    obs = [0, 2]
    S_oo = S[np.ix_(obs, obs)]
    S_1o = S[1, obs]
    coef = np.linalg.solve(S_oo, S_1o)          # S_oo symmetric
    var = S[1, 1] - S_1o @ coef
    return coef[0], coef[1], var


@given(_schedules())
def test_invariants(s):
    ab = s.alpha_bar
    assert np.all(ab > 0) and np.all(ab < 1)
    assert np.all(np.diff(ab) < 0)                       # strictly decreasing
    assert np.all(s.posterior_variance >= 0)
    # beta~ = beta (1 - ab_prev)/(1 - ab) <= beta since ab_prev >= ab; allow one ulp of rounding.
    assert np.all(s.posterior_variance <= s.betas * (1 + 1e-15))
    assert np.all(s.betas > 0) and np.all(s.betas <= 1)


@settings(max_examples=10)
@given(_schedules(), st.data())
def test_posterior_coefficients_match_gaussian_conditioning(s, data):
    ts = sorted(set(data.draw(st.lists(st.integers(0, s.T - 1), min_size=1, max_size=6)) + [0, s.T - 1]))
    for t in ts:
        c1, c2, var = _conditioning(s.alpha_bar_prev[t], s.alphas[t], s.alpha_bar[t])
        # The 2x2 solve has condition number up to ~1/(1 - ab) <= 1/beta_min = 1e4: float64 error
        # stays below ~1e-11; 1e-9 absolute is a comfortable bound, far below any formula error.
        np.testing.assert_allclose(s.posterior_mean_coef1[t], c1, atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(s.posterior_mean_coef2[t], c2, atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(s.posterior_variance[t], var, atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("base", [Schedule.linear(1000), Schedule.cosine(200), Schedule.sigmoid(50)])
def test_zero_terminal_snr(base):
    z = base.rescale_zero_terminal_snr()
    assert z.betas[-1] == 1.0 and z.alpha_bar[-1] == 0.0 and z.snr[-1] == 0.0
    assert z.betas[0] == base.betas[0]                   # first step kept (Lin et al. Algorithm 1)
    assert np.all(z.betas > 0) and np.all(z.betas <= 1)
    for name in TABLES:
        assert np.all(np.isfinite(getattr(z, name))), name
    # sqrt(alpha_bar) is an affine map of the original: shifted to 0 at T, first value kept.
    s0, sT = base.sqrt_alpha_bar[0], base.sqrt_alpha_bar[-1]
    expected = (base.sqrt_alpha_bar - sT) * s0 / (s0 - sT)
    # alpha_bar is rebuilt from the betas by cumprod: relative error ~T ulp; 1e-12 absolute suffices.
    np.testing.assert_allclose(z.sqrt_alpha_bar, expected, atol=1e-12)
    assert np.all(np.diff(z.alpha_bar) < 0)
    # the last posterior variance: beta~_T = (1 - ab_prev) * 1 / 1
    np.testing.assert_allclose(z.posterior_variance[-1], 1 - z.alpha_bar_prev[-1], rtol=1e-15)
    assert z.posterior_mean_coef2[-1] == 0.0             # sqrt(alpha_T) = 0


@pytest.mark.parametrize("betas", [[0.1, 1.0, 0.3, 0.3], [1.0, 0.5, 0.5], [0.2, 0.5, 1.0, 0.5, 0.9]])
def test_zero_terminal_snr_of_a_schedule_already_at_zero_is_the_schedule(betas):
    # alpha_bar reaches 0 (a beta of exactly 1) two or more steps before T: the SNR is already zero at
    # T, and the ratios alpha_bar'_t / alpha_bar'_{t-1} would be 0/0 (they gave NaN and an error
    # blaming "betas must be finite"). The schedule comes back unchanged.
    s = Schedule.from_betas(betas)
    z = s.rescale_zero_terminal_snr()
    assert z is s and z.alpha_bar[-1] == 0.0
    np.testing.assert_array_equal(z.betas, betas)


def test_zero_terminal_snr_when_only_the_last_steps_reach_zero_is_unchanged():
    # Where the old arithmetic already worked (0/0 only at beta_T, which is set to 1), it still runs
    # and gives the same schedule as before: the algorithm's result, not the input.
    z = Schedule.from_betas([0.1, 0.2, 1.0]).rescale_zero_terminal_snr()
    assert z.name == "zero_terminal_snr" and z.params["base"]["betas"] == [0.1, 0.2, 1.0]
    assert z.betas[0] == 0.1 and z.betas[-1] == 1.0 and z.alpha_bar[-1] == 0.0
    assert list(Schedule.from_betas([0.1, 1.0, 0.3]).rescale_zero_terminal_snr().betas) == [0.1, 1.0, 1.0]
    assert list(Schedule.from_betas([0.1, 1e-300]).rescale_zero_terminal_snr().betas) == [0.1, 1.0]


@pytest.mark.parametrize("betas, match", [
    ([0.1, 1e-300, 1e-300], r"constant \(= 0.948.*\) over all T steps.*1/0"),
    ([0.1, 1e-300, 1e-300, 1e-300], r"over all T steps"),
    ([0.1, 0.2, 1e-300, 1e-300], r"constant .* from t index 1 to T-1 = 3.*0/0"),
    ([0.1, 1e-300, 0.2], r"gives beta = 0.0 at t index 1 \(betas\[1\] = 1e-300\).*does not decrease"),
])
def test_zero_terminal_snr_of_a_flat_schedule_explains_itself(betas, match):
    # sqrt(alpha_bar) that does not move (betas below float64 resolution) makes the shift-and-scale 0/0.
    with pytest.raises(ValueError, match=match):
        Schedule.from_betas(betas).rescale_zero_terminal_snr()


# ----------------------------------------------------------------------------- constructors
def test_linear_and_sigmoid_shapes():
    s = Schedule.linear(10, 0.001, 0.01)
    np.testing.assert_allclose(np.diff(s.betas), 0.001, rtol=1e-12)   # evenly spaced
    g = Schedule.sigmoid(100)
    assert np.all(g.betas <= 0.999) and np.all(np.diff(g.alpha_bar) < 0)
    # the sigmoid alpha_bar is normalised to start at alpha_bar(0) = 1: alpha_bar_1 = 1 - beta_1
    assert g.alpha_bar[0] == pytest.approx(1 - g.betas[0], rel=1e-15)


@pytest.mark.parametrize("make", [lambda: Schedule.linear(37), lambda: Schedule.cosine(20),
                                  lambda: Schedule.sigmoid(11, -2, 4, 0.7),
                                  lambda: Schedule.linear(30).rescale_zero_terminal_snr(),
                                  lambda: Schedule.from_betas([0.1, 0.2, 1.0])])
def test_to_dict_round_trips_through_json_exactly(make):
    s = make()
    d = json.loads(json.dumps(s.to_dict()))
    r = Schedule.from_dict(d)
    assert r == s and r.name == s.name and r.T == s.T
    for name in TABLES:
        np.testing.assert_array_equal(getattr(r, name), getattr(s, name))   # bit-exact


def test_to_dict_and_from_dict_share_no_dicts_with_the_caller():
    s = Schedule.linear(3)
    d = s.to_dict()
    d["params"]["beta_end"] = 0.5
    assert s.params == {"T": 3, "beta_start": 1e-4, "beta_end": 0.02}
    src = json.loads(json.dumps(Schedule.linear(3).rescale_zero_terminal_snr().to_dict()))
    r = Schedule.from_dict(src)
    src["params"]["base"]["name"] = "tampered"              # nested: the base schedule's dict
    src["params"]["base"]["params"]["T"] = 99
    src["params"]["base"]["betas"].append(0.5)
    assert r.params["base"]["name"] == "linear" and r.params["base"]["params"]["T"] == 3
    assert len(r.params["base"]["betas"]) == 3
    p = {"nested": {"a": [1, {"b": 2}]}}
    c = Schedule([0.1, 0.2], "custom", p)
    p["nested"]["a"][1]["b"] = 3
    assert c.params == {"nested": {"a": [1, {"b": 2}]}}
    c.to_dict()["params"]["nested"]["a"].append(4)
    assert c.params == {"nested": {"a": [1, {"b": 2}]}}


@pytest.mark.parametrize("d", [
    {"betas": [0.1, 0.2]},                                            # betas alone
    {"betas": [0.1, 0.2], "T": 2},
    {"betas": [0.1, 0.2], "name": "linear", "params": None},
    {"betas": [0.1, 0.2], "T": np.int64(2), "name": "custom", "params": {}},
    {"name": "cosine", "params": {"T": 2, "s": 0.008, "max_beta": 0.999}, "T": 2, "betas": [0.1, 0.2]},
])
def test_from_dict_accepts_what_to_dict_writes_and_its_subsets(d):
    s = Schedule.from_dict(d)
    assert list(s.betas) == [0.1, 0.2] and s.name == d.get("name", "custom")
    assert s.params == (d.get("params") or {})


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, match", [
    (lambda: Schedule.linear(0), r"T .*>= 1, got 0"),
    (lambda: Schedule.linear(-3), r"got -3"),
    (lambda: Schedule.cosine(2.5), r"got 2.5"),
    (lambda: Schedule.sigmoid(True), r"got True"),
    (lambda: Schedule.linear(10, 0.0, 0.02), r"beta_start must be > 0.0, got 0.0"),
    (lambda: Schedule.linear(10, 1e-4, 1.5), r"beta_end must be <= 1.0, got 1.5"),
    (lambda: Schedule.linear(10, float("nan")), r"beta_start must be finite"),
    (lambda: Schedule.cosine(10, s=-0.1), r"s must be >= 0.0, got -0.1"),
    (lambda: Schedule.cosine(10, max_beta=0.0), r"max_beta must be > 0.0"),
    (lambda: Schedule.sigmoid(10, 3.0, -3.0), r"end > start.*start=3.0, end=-3.0"),
    (lambda: Schedule.sigmoid(10, tau=0.0), r"tau must be > 0.0"),
    (lambda: Schedule.from_betas([0.1, 0.0, 0.2]), r"\(0, 1\], got betas\[1\] = 0.0"),
    (lambda: Schedule.from_betas([0.1, -0.2]), r"betas\[1\] = -0.2"),
    (lambda: Schedule.from_betas([0.1, 1.5]), r"betas\[1\] = 1.5"),
    (lambda: Schedule.from_betas([0.1, float("nan")]), r"finite, got betas\[1\] = nan"),
    (lambda: Schedule.from_betas([float("inf")]), r"finite, got betas\[0\] = inf"),
    (lambda: Schedule.from_betas([[0.1, 0.2]]), r"shape \(T,\), got shape \(1, 2\)"),
    (lambda: Schedule.from_betas(0.1), r"shape \(T,\), got shape \(\)"),
    (lambda: Schedule.from_betas([]), r"T = 0"),
    (lambda: Schedule.from_betas(["a", "b"]), r"real numbers, got dtype <U1"),
    (lambda: Schedule.from_betas([1e-300, 0.1]), r"betas\[0\] = 1e-300 is too small"),
    (lambda: Schedule.linear(1).rescale_zero_terminal_snr(), r"T >= 2, got T = 1"),
    (lambda: Schedule.from_dict({"T": 3}), r"'betas' entry"),
    (lambda: Schedule.from_dict({"T": 3, "betas": [0.1, 0.2]}), r"T = 3 but holds 2 betas"),
    (lambda: Schedule.from_dict([0.1]), r"got list"),
    # bools and numeric strings are not numbers
    (lambda: Schedule.linear(3, 1e-4, True), r"beta_end must be a real number, got True"),
    (lambda: Schedule.linear(3, "1e-4", "0.02"), r"beta_start must be a real number, got '1e-4'"),
    (lambda: Schedule.linear(3, np.bool_(True)), r"beta_start must be a real number, got"),
    (lambda: Schedule.cosine(10, s=True), r"s must be a real number, got True"),
    (lambda: Schedule.cosine(10, max_beta="0.5"), r"max_beta must be a real number, got '0.5'"),
    (lambda: Schedule.sigmoid(10, tau=None), r"tau must be a real number, got None"),
    (lambda: Schedule.sigmoid(10, start=[1.0]), r"start must be a real number, got \[1.0\]"),
    (lambda: Schedule.linear(10, 10**400), r"beta_start must be a real number"),
    # garbage in from_dict and Schedule(...)
    (lambda: Schedule.from_dict({"betas": [0.1], "params": "ab"}), r"params must be a dict .*got str 'ab'"),
    (lambda: Schedule.from_dict({"betas": [0.1], "params": [("a", 1)]}), r"params must be a dict .*got list"),
    (lambda: Schedule.from_dict({"betas": [0.1, [0.2, 0.3]]}), r"betas must be a 1-D list of real numbers"),
    (lambda: Schedule.from_dict({"betas": [0.1, 0.2], "T": np.array([2, 2])}), r"T must be an integer.*got array"),
    (lambda: Schedule.from_dict({"betas": [0.1], "T": True}), r"T must be an integer .*got True"),
    (lambda: Schedule.from_dict({"betas": [0.1], "T": 1.0}), r"T must be an integer .*got 1.0"),
    (lambda: Schedule.from_dict({"betas": [0.1], "T": "1"}), r"T must be an integer .*got '1'"),
    (lambda: Schedule.from_dict({"betas": [0.1], "name": None}), r"name must be a string, got None"),
    (lambda: Schedule.from_dict({"betas": [0.1], "name": ["x"]}), r"name must be a string, got \['x'\]"),
    (lambda: Schedule([0.1], params=[1, 2]), r"params must be a dict \(or None\), got list"),
    (lambda: Schedule([0.1], params="ab"), r"params must be a dict \(or None\), got str"),
    (lambda: Schedule([0.1], name=None), r"name must be a string, got None"),
    (lambda: Schedule([0.1, [0.2, 0.3]]), r"betas must be a 1-D array of real numbers"),
    (lambda: Schedule.from_betas([True, False]), r"real numbers, got dtype bool"),
])
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_zero_terminal_snr_and_cosine_match_diffusers():
    # An outside oracle: diffusers' rescale_zero_terminal_snr (Lin et al. Algorithm 1 in torch).
    # Given float64 betas it computes in float64: agreement to 1e-12 absolute (measured 2e-15).
    torch = pytest.importorskip("torch")
    ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")
    base = Schedule.linear(1000)
    theirs = ddpm.rescale_zero_terminal_snr(torch.tensor(base.betas, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(base.rescale_zero_terminal_snr().betas, theirs, rtol=0, atol=1e-12)
    # diffusers' "squaredcos_cap_v2" is the same cosine schedule, computed in float32: 1e-7 absolute.
    cos = ddpm.betas_for_alpha_bar(1000, max_beta=0.999, alpha_transform_type="cosine").numpy()
    np.testing.assert_allclose(Schedule.cosine(1000).betas, cos, rtol=0, atol=1e-7)
