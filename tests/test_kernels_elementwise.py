"""ddpm_ref.kernels.activation / resample / linear against ddpm_ref.ops, in the CUDA simulator.

Tolerance table:
- dropout: exact. The keep decision is an integer comparison of the same Philox word, and the kept
  value is the same float32 product ``x * float32(1 / (1 - p))``.
- SiLU: rtol 1e-6, atol 1e-7. float32 exp may differ by an ulp between libm and libdevice; the
  simulator uses the host's, so there the results are exact.
- upsample: exact (copies); its backward: rtol 1e-6 (sums of 4 float32 values in a different order).
- linear: rtol 1e-5, atol 1e-6 * K (float32 GEMMs over K terms vs a float64 reference).
- embeddings: exact (a gather; the scatter adds repeated ids in index order, as np.add.at does;
  the timestep table is the reference's own, copied).
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_setup import kb, fast_simulator_barriers  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)

from ddpm_ref.kernels import activation, embedding, linear, resample  # noqa: E402
from ddpm_ref.ops import activation as ref_act, embedding as ref_emb, linear as ref_lin, resample as ref_res  # noqa: E402,E501


@settings(max_examples=8)
@given(n=st.integers(1, 3), shape=st.sampled_from([(2, 3, 3), (5,), (1, 1, 7)]),
       p=st.sampled_from([0.0, 0.1, 0.5, 0.999]), seed=st.integers(0, 2**32 - 1),
       step=st.integers(0, 10**6), layer=st.integers(0, 40), train=st.booleans())
def test_dropout_matches_reference_exactly(n, shape, p, seed, step, layer, train):
    r = np.random.default_rng(step)
    x = r.normal(size=(n,) + shape).astype(np.float32)
    dy = r.normal(size=x.shape).astype(np.float32)
    index = r.integers(0, 2**32, n)
    y_ref, c_ref = ref_act.dropout_forward(x, p, seed, index, step, layer, train)
    y, c = activation.dropout_forward(kb.to_device(x), p, seed, index, step, layer, train)
    np.testing.assert_array_equal(kb.to_host(y), y_ref)
    np.testing.assert_array_equal(kb.to_host(activation.dropout_backward(kb.to_device(dy), c)),
                                  ref_act.dropout_backward(dy, c_ref))
    assert "mask" not in c                        # the mask is drawn again, never stored


def test_dropout_errors():
    x = kb.to_device(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="p must be in"):
        activation.dropout_forward(x, 1.0, 0, [0, 1], 0, 0)
    with pytest.raises(ValueError, match="index"):
        activation.dropout_forward(x, 0.1, 0, [0], 0, 0)


def test_silu_matches_reference():
    x = np.concatenate([np.linspace(-100, 100, 41), [-1e4, 1e4, 0.0]]).astype(np.float32).reshape(4, 11)
    dy = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    y_ref, c_ref = ref_act.silu_forward(x)
    y, c = activation.silu_forward(kb.to_device(x))
    np.testing.assert_allclose(kb.to_host(y), y_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kb.to_host(activation.silu_backward(kb.to_device(dy), c)),
                               ref_act.silu_backward(dy, c_ref), rtol=1e-6, atol=1e-7)


def test_upsample_concat_linear():
    r = np.random.default_rng(1)
    x = r.normal(size=(2, 3, 2, 3)).astype(np.float32)
    y_ref, c_ref = ref_res.upsample_nearest2x_forward(x)
    y, c = resample.upsample_nearest2x_forward(kb.to_device(x))
    np.testing.assert_array_equal(kb.to_host(y), y_ref)
    dy = r.normal(size=y_ref.shape).astype(np.float32)
    np.testing.assert_allclose(kb.to_host(resample.upsample_nearest2x_backward(kb.to_device(dy), c)),
                               ref_res.upsample_nearest2x_backward(dy, c_ref), rtol=1e-6)
    a, b = x, r.normal(size=(2, 1, 2, 3)).astype(np.float32)
    cat_ref, cc_ref = ref_res.concat_forward([a, b], axis=1)
    cat, cc = resample.concat_forward([kb.to_device(a), kb.to_device(b)], axis=1)
    np.testing.assert_array_equal(kb.to_host(cat), cat_ref)
    for got, want in zip(resample.concat_backward(kb.to_device(cat_ref), cc),
                         ref_res.concat_backward(cat_ref, cc_ref)):
        np.testing.assert_array_equal(kb.to_host(got), want)
    xl = r.normal(size=(3, 2, 5)).astype(np.float32)
    w = r.normal(size=(4, 5)).astype(np.float32)
    bias = r.normal(size=4).astype(np.float32)
    yl_ref, cl_ref = ref_lin.linear_forward(xl.astype(np.float64), w.astype(np.float64), bias.astype(np.float64))
    yl, cl = linear.linear_forward(kb.to_device(xl), kb.to_device(w), kb.to_device(bias))
    np.testing.assert_allclose(kb.to_host(yl), yl_ref, rtol=1e-5, atol=5e-6)
    dyl = r.normal(size=yl_ref.shape).astype(np.float32)
    for got, want in zip(linear.linear_backward(kb.to_device(dyl), cl),
                         ref_lin.linear_backward(dyl.astype(np.float64), cl_ref)):
        np.testing.assert_allclose(kb.to_host(got), want, rtol=1e-5, atol=1e-5)


def test_embeddings():
    r = np.random.default_rng(2)
    table = r.normal(size=(5, 3)).astype(np.float32)
    ids = np.array([[4, 0, 4], [2, 4, 1]])
    y_ref, c_ref = ref_emb.embedding_forward(ids, table)
    y, c = embedding.embedding_forward(ids, kb.to_device(table))
    np.testing.assert_array_equal(kb.to_host(y), y_ref)
    dy = r.normal(size=y_ref.shape).astype(np.float32)
    np.testing.assert_allclose(kb.to_host(embedding.embedding_backward(kb.to_device(dy), c)),
                               ref_emb.embedding_backward(dy, c_ref), rtol=1e-6)   # 3 float32 adds
    t = np.array([0, 17, 999])
    np.testing.assert_array_equal(kb.to_host(embedding.timestep_embedding(t, 7)), ref_emb.timestep_embedding(t, 7))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        embedding.embedding_forward(np.array([5]), kb.to_device(table))
