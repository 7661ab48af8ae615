"""ddpm_ref.kernels.loss (MSE) and ddpm_ref.kernels.attention against ddpm_ref.ops, fwd and bwd.

Tolerance table (reference in float64 on the same float32 inputs unless stated):
- MSE loss and per-sample losses: rtol 1e-6. Both sum squares in float64; the differences are
  float32 (exact for the reference's float32 run, one rounding here).
- dpred: rtol 1e-6 against the reference run in float32: the same float32 products with the same
  float32-cast coefficient (bitwise equal in the simulator; FMA-free on a GPU too).
- attention out/dq/dk/dv: rtol 1e-5, atol 1e-6 * L * max(1, max|ref|): float32 matmuls over L or d
  terms (NumPy's BLAS in the simulator, cuBLAS on a GPU) and a float32 softmax.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_setup import kb, FULL, fast_simulator_barriers  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)

from ddpm_ref.kernels import attention, loss  # noqa: E402
from ddpm_ref.ops import attention as ref_attention, loss as ref_loss  # noqa: E402


@settings(max_examples=6)
@given(n=st.integers(1, 3), shape=st.sampled_from([(1, 3, 3), (5,), (2, 2, 3)]), weighted=st.booleans(),
       dloss=st.sampled_from([1.0, 0.25]), seed=st.integers(0, 1000))
def test_mse_matches_reference(n, shape, weighted, dloss, seed):
    r = np.random.default_rng(seed)
    pred = r.normal(size=(n,) + shape).astype(np.float32)
    target = r.normal(size=(n,) + shape).astype(np.float32)
    w = r.uniform(0.5, 2, n) if weighted else None
    l_ref, c_ref = ref_loss.mse_forward(pred, target, w)
    d_ref = ref_loss.mse_backward(c_ref, dloss)
    l, c = loss.mse_forward(kb.to_device(pred), kb.to_device(target), w)
    assert l == pytest.approx(l_ref, rel=1e-6)
    np.testing.assert_allclose(kb.to_host(c["per_sample"]), c_ref["per_sample"], rtol=1e-6)
    np.testing.assert_allclose(kb.to_host(loss.mse_backward(c, dloss)), d_ref, rtol=1e-6, atol=1e-9)
    l2, c2, d2 = loss.mse_forward_backward(kb.to_device(pred), kb.to_device(target), w, dloss)
    assert l2 == l
    np.testing.assert_allclose(kb.to_host(d2), d_ref, rtol=1e-6, atol=1e-9)


def test_mse_errors():
    p = kb.to_device(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="target"):
        loss.mse_forward(p, kb.to_device(np.zeros((2, 4), np.float32)))
    with pytest.raises(ValueError, match="weights"):
        loss.mse_forward(p, p.copy(), np.ones(3))


def _attention_check(b, lq, lk, d, dv, seed):
    r = np.random.default_rng(seed)
    q, k = (r.normal(size=(b, n, d)).astype(np.float32) for n in (lq, lk))
    v = r.normal(size=(b, lk, dv)).astype(np.float32)
    dout = r.normal(size=(b, lq, dv)).astype(np.float32)
    out, cache = attention.attention_forward(kb.to_device(q), kb.to_device(k), kb.to_device(v))
    out_ref, cache_ref = ref_attention.attention_forward(*(a.astype(np.float64) for a in (q, k, v)))
    tol = lambda want: dict(rtol=1e-5, atol=1e-6 * max(lk, d) * max(1, np.abs(want).max()))  # noqa: E731
    np.testing.assert_allclose(kb.to_host(out), out_ref, **tol(out_ref))
    np.testing.assert_allclose(kb.to_host(cache["p"]), cache_ref["p"], **tol(cache_ref["p"]))
    grads = attention.attention_backward(kb.to_device(dout), cache)
    grads_ref = ref_attention.attention_backward(dout.astype(np.float64), cache_ref)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(kb.to_host(g), g_ref, **tol(g_ref))


@settings(max_examples=5)
@given(b=st.integers(1, 2), lq=st.integers(1, 6), lk=st.integers(1, 6), d=st.integers(1, 5),
       dv=st.integers(1, 4), seed=st.integers(0, 1000))
def test_attention_matches_reference(b, lq, lk, d, dv, seed):
    _attention_check(b, lq, lk, d, dv, seed)


def test_attention_large_logits_are_stable():
    # Logits of size ~1e4: the max-subtracted softmax must not overflow (the reference's too).
    q = np.full((1, 2, 1), 100.0, np.float32)
    k = np.array([[[100.0], [-100.0], [99.9]]], np.float32)
    v = np.eye(3, dtype=np.float32)[None]
    out, _ = attention.attention_forward(kb.to_device(q), kb.to_device(k), kb.to_device(v))
    out_ref, _ = ref_attention.attention_forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert np.all(np.isfinite(kb.to_host(out)))
    np.testing.assert_allclose(kb.to_host(out), out_ref, rtol=1e-4, atol=1e-6)  # exp of float32 logits ~1e4: rtol 1e-4


@pytest.mark.skipif(not FULL, reason="full-size shapes run on a real GPU only (DDPM_KERNELS_FULL=1)")
def test_attention_full_size():
    _attention_check(8, 256, 256, 256, 256, 0)
