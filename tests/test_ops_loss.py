"""Tests for ddpm_ref/ops/loss.py: weighted MSE (L_simple)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gradcheck import check_op
from ddpm_ref.ops.loss import mse_backward, mse_forward


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), weighted=st.booleans(),
       seed=st.integers(0, 2**16))
def test_mse_gradients(shape, weighted, seed):
    rng = np.random.default_rng(seed)
    pred = rng.standard_normal(shape)
    target = rng.standard_normal(shape)
    w = rng.uniform(0.1, 2.0, size=shape[0]) if weighted else None
    f = lambda pred: mse_forward(pred, target, w)
    b = lambda dloss, cache: mse_backward(cache, dloss)
    # Quadratic: centred differences are exact up to rounding; 1e-6 relative is a wide margin.
    check_op(f, b, [pred], (0,), rtol=1e-6)


def test_mse_values_against_a_loop():
    rng = np.random.default_rng(1)
    pred = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    target = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    w = np.array([1.0, 0.5, 2.0, 0.0])
    loss, cache = mse_forward(pred, target, w)
    per = [np.mean((pred[n].astype(np.float64) - target[n]) ** 2) for n in range(4)]
    # float64 accumulation of float32 differences: agreement to ~1e-7 relative (the float32 diff).
    np.testing.assert_allclose(cache["per_sample"], per, rtol=1e-6)
    assert loss == pytest.approx(np.mean(w * np.array(per)), rel=1e-6)
    dpred = mse_backward(cache, 2.0)
    assert dpred.dtype == np.float32
    np.testing.assert_array_equal(dpred[3], 0)         # weight 0: no gradient at all
    ref = 2.0 * 2 * (pred - target) * w[:, None, None, None].astype(np.float32) / (4 * 12)
    np.testing.assert_allclose(dpred, ref, rtol=1e-6, atol=1e-8)


def test_mse_matches_torch_unweighted():
    torch = pytest.importorskip("torch", reason="torch is the optional outside oracle (extra: test)")
    rng = np.random.default_rng(2)
    pred = rng.standard_normal((5, 7)).astype(np.float32)
    target = rng.standard_normal((5, 7)).astype(np.float32)
    loss, cache = mse_forward(pred, target)
    pt = torch.tensor(pred, requires_grad=True)
    lt = torch.nn.functional.mse_loss(pt, torch.tensor(target))   # mean over everything
    lt.backward()
    # Equal-sized samples: mean of per-sample means = global mean. float32 vs float64 sums: 1e-6.
    assert loss == pytest.approx(lt.item(), rel=1e-6)
    np.testing.assert_allclose(mse_backward(cache), pt.grad.numpy(), rtol=1e-6, atol=1e-8)


def test_mse_errors():
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        mse_forward(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        mse_forward(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="int64"):
        mse_forward(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 3)))
