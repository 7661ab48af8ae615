"""The fused reverse-step kernels (ddpm_ref.kernels.noise.ddpm_step / ddim_step / sample) against
ddpm_ref.samplers, in the CUDA simulator.

Tolerance table:
- one step: rtol 1e-6, atol 1e-6. The kernel does the reference's per-element float64 arithmetic
  with the reference's float64 per-sample coefficients (samplers.step_coefficients), then one
  rounding to float32; what can differ is the float64 evaluation order inside an expression
  (FMA on a GPU), far below a float32 ulp, which can flip one rounding: 1 ulp of values of size
  <= ~10 is ~1e-6.
- a 10-step sampling run with the Gaussian oracle denoiser: atol 1e-5. Each step is as above; the
  run feeds float32 results back (as the reference does), so one-ulp flips can propagate through
  10 steps whose coefficients are bounded by ~1/sqrt(alpha) ~ 1.01 each.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_setup import kb, fast_simulator_barriers  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)
from ddpm_ref import diffusion, rng, samplers  # noqa: E402

from ddpm_ref.kernels import noise  # noqa: E402
from ddpm_ref.schedule import Schedule  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-6)


@settings(max_examples=12)
@given(sampler=st.sampled_from(["ddpm", "ddim"]), prediction=st.sampled_from(["epsilon", "sample", "v"]),
       variance=st.sampled_from(["fixed_small", "fixed_large", "learned_range"]), clip=st.booleans(),
       steps=st.sampled_from([(30, 29), (30, 20), (5, -1), (0, -1)]), eta=st.sampled_from([0.0, 0.5, 1.0]),
       generated=st.booleans(), n=st.integers(1, 2), seed=st.integers(0, 1000))
def test_step_matches_reference(sampler, prediction, variance, clip, steps, eta, generated, n, seed):
    sched = Schedule.linear(T=40)
    t, t_prev = steps
    shape = (2, 3, 1)
    r = np.random.default_rng(seed)
    xt = r.normal(size=(n,) + shape).astype(np.float32)
    c_out = 4 if (variance == "learned_range" and sampler == "ddpm") else 2
    out = r.normal(size=(n, c_out) + shape[1:]).astype(np.float32)
    if c_out == 4:
        out[:, 2:] = r.uniform(-1, 1, size=(n, 2) + shape[1:])   # the variance interpolation v
    index = np.arange(7, 7 + n)
    z = rng.normal(seed, rng.Stream.SAMPLE_STEP, index, t, shape)
    tt = np.full(n, t)
    dev = dict(seed=seed, index=index) if generated else dict()
    noise_dev = None if generated else kb.to_device(z)
    if sampler == "ddpm":
        want = samplers.ddpm_step(sched, out, xt, tt, t_prev, z, prediction, variance, clip)
        got = noise.ddpm_step(sched, kb.to_device(out), kb.to_device(xt), tt, t_prev, noise_dev, prediction,
                              variance, clip, **dev)
    else:
        want = samplers.ddim_step(sched, out, xt, tt, t_prev, eta, z, prediction, clip)
        got = noise.ddim_step(sched, kb.to_device(out), kb.to_device(xt), tt, t_prev, eta, noise_dev,
                              prediction, clip, **dev)
    for g, w in zip(got, want):
        np.testing.assert_allclose(kb.to_host(g), w, **TOL)


def test_step_errors():
    sched = Schedule.linear(T=10)
    x = kb.to_device(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="noise is required"):
        noise.ddpm_step(sched, x, x.copy(), 5, 4)
    with pytest.raises(ValueError, match="dynamic"):
        noise.ddpm_step(sched, x, x.copy(), 5, -1, clip="dynamic")
    with pytest.raises(ValueError, match="t_prev must be smaller than t"):
        noise.ddpm_step(sched, x, x.copy(), 5, 5, seed=0, index=[0, 1])
    with pytest.raises(ValueError, match="model output must have shape"):
        noise.ddpm_step(sched, x, x.copy(), 5, -1, variance="learned_range")
    with pytest.raises(ValueError, match="eta"):
        noise.ddim_step(sched, x, x.copy(), 5, 4, 1.5)


@pytest.mark.parametrize("sampler,eta,prediction", [("ddpm", 0.0, "epsilon"), ("ddim", 0.0, "v"),
                                                    ("ddim", 1.0, "sample")])
def test_short_sampling_run_matches_reference(sampler, eta, prediction):
    # A 10-step respaced run on 2-D data with the closed-form optimal denoiser of N(mu, s^2 I) data.
    sched = Schedule.linear(T=100)
    mu, s = np.array([0.5, -0.25], np.float32), 0.3
    oracle = diffusion.gaussian_oracle_denoiser(sched, mu, s, prediction)
    on_device = lambda x, t: kb.to_device(np.asarray(oracle(kb.to_host(x), t), dtype=np.float32))  # noqa: E731
    want = samplers.sample(oracle, sched, (2,), 3, seed=5, sampler=sampler, num_steps=10, eta=eta,
                           prediction=prediction, index_offset=4)
    got = noise.sample(on_device, sched, (2,), 3, seed=5, sampler=sampler, num_steps=10, eta=eta,
                       prediction=prediction, index_offset=4)
    np.testing.assert_allclose(kb.to_host(got), want, rtol=0, atol=1e-5)
