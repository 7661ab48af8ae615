"""Tests for ddpm_ref/ops/linear.py: gradient checks (float64), torch oracle, errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gradcheck import check_op
from ddpm_ref.ops.linear import linear_backward, linear_forward


@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), n_in=st.integers(1, 6),
       n_out=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_gradients(lead, n_in, n_out, bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(tuple(lead) + (n_in,))
    w = rng.standard_normal((n_out, n_in))
    b = rng.standard_normal(n_out) if bias else None
    # float64 centred differences of a linear map are exact up to rounding: 1e-6 is a wide margin.
    check_op(linear_forward, linear_backward, [x, w, b], (0, 1, 2 if bias else None), rtol=1e-6)


def test_linear_matches_torch_float32():
    torch = pytest.importorskip("torch", reason="torch is the optional outside oracle (extra: test)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    w = rng.standard_normal((4, 7)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    y, cache = linear_forward(x, w, b)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = linear_backward(dy, cache)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.linear(xt, wt, bt)
    yt.backward(torch.tensor(dy))
    # float32 sums of <= 15 O(1) terms: ~1e-6 relative; 1e-5 allows a different summation order.
    for ours, ref in ((y, yt.detach()), (dx, xt.grad), (dw, wt.grad), (db, bt.grad)):
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_linear_known_values():
    # [1, 2] @ [[1, 0], [1, 1]]^T + [0.5, -0.5] = [1.5, 2.5]: exact in binary floating point.
    y, _ = linear_forward(np.array([[1.0, 2.0]]), np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([0.5, -0.5]))
    np.testing.assert_array_equal(y, [[1.5, 2.5]])


def test_linear_errors():
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        linear_forward(np.zeros((2, 5)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(4, 3, 1\)"):
        linear_forward(np.zeros((2, 3)), np.zeros((4, 3, 1)))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        linear_forward(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros(5))
    with pytest.raises(ValueError, match="int32"):
        linear_forward(np.zeros((2, 3), dtype=np.int32), np.zeros((4, 3)))
    _, cache = linear_forward(np.zeros((2, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        linear_backward(np.zeros((2, 5)), cache)
