"""Tests for ddpm_ref/ops/attention.py: gradient checks, torch oracle, stability, errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gradcheck import check_op
from ddpm_ref.ops.attention import attention_backward, attention_forward, softmax


@given(B=st.integers(1, 3), Lq=st.integers(1, 6), Lk=st.integers(1, 6), d=st.integers(1, 5),
       dv=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_attention_gradients(B, Lq, Lk, d, dv, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Lq, d))
    k = rng.standard_normal((B, Lk, d))
    v = rng.standard_normal((B, Lk, dv))
    # float64 centred differences; softmax is smooth with O(1) curvature here: 1e-6 relative.
    check_op(attention_forward, attention_backward, [q, k, v], (0, 1, 2), rtol=1e-6)


def test_attention_matches_torch_float32():
    torch = pytest.importorskip("torch", reason="torch is the optional outside oracle (extra: test)")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((3, 16, 8)).astype(np.float32) for _ in range(3))
    out, cache = attention_forward(q, k, v)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = attention_backward(dout, cache)
    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    ref.backward(torch.tensor(dout))
    # float32, 16-term sums and a softmax: ~1e-6 relative; 1e-5 allows another summation order.
    for ours, r in ((out, ref.detach()), (dq, qt.grad), (dk, kt.grad), (dv, vt.grad)):
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, r.numpy(), rtol=1e-5, atol=1e-5)


def test_attention_known_values_and_stability():
    # One query equal to one of two keys, huge logits: softmax must pick that key's value, no NaN.
    q = np.array([[[1000.0, 0.0]]])
    k = np.array([[[1000.0, 0.0], [0.0, 1000.0]]])
    v = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    with np.errstate(over="raise", invalid="raise"):
        out, cache = attention_forward(q, k, v)
        dq, dk, dv = attention_backward(np.ones_like(out), cache)
    # The weight on the second key is exp(-1e6 / sqrt(2)) = 0 in float64: the result is exact.
    np.testing.assert_array_equal(out, [[[1.0, 2.0]]])
    assert np.all(np.isfinite(dq)) and np.all(np.isfinite(dk))
    # Uniform attention: equal keys give the mean of the values exactly (weights 1/2 each).
    out, _ = attention_forward(np.ones((1, 1, 2)), np.ones((1, 2, 2)), v)
    np.testing.assert_allclose(out, [[[2.0, 3.0]]], rtol=1e-15)
    p = softmax(np.array([[1e4, 0.0, -1e4]]))
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.0]])


def test_attention_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        attention_forward(np.zeros((2, 3)), np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3, 5\)"):
        attention_forward(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        attention_forward(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="int64"):
        attention_forward(np.zeros((2, 3, 4), dtype=np.int64), np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))


def test_softmax_and_sigmoid_refuse_non_float_input():
    from ddpm_ref.ops.activation import sigmoid

    for f in (softmax, sigmoid):
        with pytest.raises(ValueError, match="floating-point array, got dtype int64"):
            f(np.arange(3))
        with pytest.raises(ValueError, match="must be a numpy array, got list"):
            f([0.0, 1.0])
