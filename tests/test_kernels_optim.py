"""ddpm_ref.kernels.optim (fused AdamW + EMA) against ddpm_ref.optim, in the CUDA simulator.

Tolerance table:
- simulator: the kernel does the reference's float32 operations in the reference's order with the
  same float32-cast scalars, so parameters, moments and EMA agree to 1 float32 ulp (rtol 2e-7 on
  values; we assert rtol 1e-6, atol 1e-9 to stay honest about the sqrt and division roundings,
  which NumPy and the simulator both round correctly).
- GPU: FMA contraction of ``m*b1 + g*(1-b1)`` etc. changes a rounding per operation: over a few
  steps relative differences stay below 1e-5 (asserted at full size in gpu_check.sh runs).
- the global norm: float64 sums in a different order: rtol 1e-12.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_setup import kb, SIM, fast_simulator_barriers  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)
from ddpm_ref import optim as ref  # noqa: E402

from ddpm_ref.kernels import optim  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-9) if SIM else dict(rtol=1e-5, atol=1e-8)


@settings(max_examples=6)
@given(size=st.integers(1, 150), wd=st.sampled_from([0.0, 0.1]), clip=st.sampled_from([None, 0.5, 100.0]),
       masked=st.booleans(), warmup=st.integers(0, 3), seed=st.integers(0, 1000))
def test_adamw_ema_matches_reference(size, wd, clip, masked, warmup, seed):
    r = np.random.default_rng(seed)
    p0 = r.normal(size=size).astype(np.float32)
    mask = r.uniform(size=size) < 0.5 if masked else None
    host = ref.AdamW(size, lr=1e-2, weight_decay=wd, warmup=warmup, max_grad_norm=clip, decay_mask=mask)
    dev = optim.AdamW(size, lr=1e-2, weight_decay=wd, warmup=warmup, max_grad_norm=clip, decay_mask=mask)
    p_h, ema_h = p0.copy(), p0.copy()
    p_d, ema_d = kb.to_device(p0), kb.to_device(p0)
    for k in range(1, 4):
        g = r.normal(size=size).astype(np.float32)
        g_d = kb.to_device(g)
        info_h = host.step(p_h, g)
        d = ref.ema_decay(0.999, k)
        ref.ema_update(ema_h, p_h, d)
        info_d = dev.step(p_d, g_d, ema=ema_d, ema_d=d)
        assert info_d["lr"] == info_h["lr"]
        assert info_d["grad_norm"] == pytest.approx(info_h["grad_norm"], rel=1e-12)
        np.testing.assert_allclose(kb.to_host(g_d), g, **TOL)          # clipped in place, as the reference
        np.testing.assert_allclose(kb.to_host(p_d), p_h, **TOL)
        np.testing.assert_allclose(kb.to_host(ema_d), ema_h, **TOL)
    sd = dev.state_dict()
    np.testing.assert_allclose(sd["m"], host.m, **TOL)
    np.testing.assert_allclose(sd["v"], host.v, **TOL)
    assert sd["step"] == host.step_count == 3


def test_state_roundtrip_and_errors():
    dev = optim.AdamW(5, lr=1e-3)
    state = {"m": np.arange(5, dtype=np.float32), "v": np.ones(5, np.float32), "step": 7}
    dev.load_state_dict(state)
    out = dev.state_dict()
    np.testing.assert_array_equal(out["m"], state["m"])              # a copy, exact
    assert out["step"] == 7
    with pytest.raises(ValueError, match="lr"):
        optim.AdamW(5, lr=-1.0)
    with pytest.raises(ValueError, match="sizes"):
        dev.step(kb.to_device(np.zeros(4, np.float32)), kb.to_device(np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match="float32"):
        dev.step(kb.to_device(np.zeros(5)), kb.to_device(np.zeros(5)))
    with pytest.raises(ValueError, match="ema_d"):
        p = kb.to_device(np.zeros(5, np.float32))
        dev.step(p, kb.to_device(np.zeros(5, np.float32)), ema=kb.to_device(np.zeros(5, np.float32)))


def test_ema_update_and_clip():
    r = np.random.default_rng(0)
    e, p = r.normal(size=37).astype(np.float32), r.normal(size=37).astype(np.float32)
    e_ref = e.copy()
    ref.ema_update(e_ref, p, 0.9)
    e_d = kb.to_device(e)
    optim.ema_update(e_d, kb.to_device(p), 0.9)
    np.testing.assert_allclose(kb.to_host(e_d), e_ref, **TOL)
    g = r.normal(size=37).astype(np.float32) * 10
    g_ref = g.copy()
    n_ref = ref.clip_grad_norm(g_ref, 1.0)
    g_d = kb.to_device(g)
    assert optim.clip_grad_norm(g_d, 1.0) == pytest.approx(n_ref, rel=1e-12)
    np.testing.assert_allclose(kb.to_host(g_d), g_ref, **TOL)


@pytest.mark.parametrize("kwargs", [dict(eps=float("inf")), dict(lr=True), dict(warmup=2.7), dict(size="4"),
                                    dict(total=2.5), dict(max_grad_norm=True),
                                    dict(decay_mask=np.array([0.5, 0, 1, 1, 0]))])
def test_constructor_refuses_what_the_reference_refuses(kwargs):
    # the same shared check (ddpm_ref.optim._adamw_settings): the same values, the same messages
    kw = {"size": 5, **kwargs}
    with pytest.raises(ValueError) as r:
        ref.AdamW(**kw)
    with pytest.raises(ValueError) as g:
        optim.AdamW(**kw)
    assert str(g.value) == str(r.value)


def test_bad_state_or_ema_decay_changes_nothing():
    mask = np.array([1, 0, 1, 0, 1], bool)
    dev = optim.AdamW(5, lr=1e-3, warmup=2, schedule="cosine", total=10, weight_decay=0.1, decay_mask=mask)
    mask[:] = False                                                    # copied: the caller's edit does not reach it
    np.testing.assert_array_equal(kb.to_host(dev.decay_mask), [1, 0, 1, 0, 1])
    assert [dev.lr_at(k) for k in (1, 5, 10)] == [ref.scheduled_lr(1e-3, k, 2, "cosine", 10) for k in (1, 5, 10)]
    good = {"m": np.arange(5, dtype=np.float32), "v": np.ones(5, np.float32), "step": 7}
    dev.load_state_dict(good)
    for bad, match in (({**good, "v": -np.ones(5, np.float32)}, "'v' must be finite and >= 0"),
                       ({**good, "step": 2.9}, "step must be an integer"), ({"m": good["m"]}, "missing")):
        with pytest.raises(ValueError, match=match):
            dev.load_state_dict(bad)
        out = dev.state_dict()
        np.testing.assert_array_equal(out["v"], 1.0)
        assert out["step"] == 7
    z = kb.to_device(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="ema_d .* got True"):
        dev.step(z, kb.to_device(np.zeros(5, np.float32)), ema=kb.to_device(np.zeros(5, np.float32)), ema_d=True)
    with pytest.raises(ValueError, match="max_norm must be"):
        optim.clip_grad_norm(z, "1")
    assert dev.step_count == 7
