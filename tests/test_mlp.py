"""Tests for ddpm_ref/models/mlp.py: the residual-MLP denoiser for 2-D data: layout, initialisation,
input checks and a float64 gradient check of every parameter tensor and the input."""
import numpy as np
import pytest

from ddpm_ref.models import MLP, MLPConfig


def _perturbed(model, seed=0, scale=0.2):
    p = model.init_params(seed).astype(np.float64)
    return p + scale * np.random.default_rng(seed).standard_normal(p.shape)


def test_toy_preset_layout_and_config():
    model = MLP.from_preset("toy")
    cfg = model.config
    s = model.layout.shapes
    assert s["input.weight"] == (128, 2 * 32 + 32) and s["output.weight"] == (2, 128)
    assert s["blocks.2.linear_2.weight"] == (128, 128) and "blocks.3.linear_1.weight" not in s
    # input (96*128+128) + 3 blocks * 2 * (128*128+128) + output (2*128+2)
    assert model.num_params == 96 * 128 + 128 + 6 * (128 * 128 + 128) + 258
    assert MLPConfig.from_dict(cfg.to_dict()) == cfg
    lv = MLP.from_preset("toy", learned_variance=True, num_classes=4)
    assert lv.layout.shapes["output.weight"] == (4, 128) and lv.layout.shapes["class_embedding.weight"] == (5, 32)
    with pytest.raises(ValueError, match="unknown MLP preset 'big'"):
        MLP.from_preset("big")
    with pytest.raises(ValueError, match="emb_dim must be even"):
        MLP.from_preset("toy", emb_dim=7)


def test_x_raw_input():
    # the raw coordinates widen the input layer by D and enter it unscaled; everything else is unchanged
    plain = MLP.from_preset("tiny", x_raw=False)
    raw = MLP.from_preset("tiny", x_raw=True)
    assert plain.layout.shapes["input.weight"] == (16, 2 * 8 + 8)
    assert raw.layout.shapes["input.weight"] == (16, 2 * 8 + 2 + 8) and raw.config.in_features == 26
    assert raw.num_params == plain.num_params + 2 * 16
    # configs saved before the field existed load with the old layout
    old = {k: v for k, v in plain.config.to_dict().items() if k != "x_raw"}
    assert MLPConfig.from_dict(old) == plain.config
    # with only the raw-x columns of the input weight non-zero (and biases zero), h = W_x x exactly,
    # so the network is x -> out linear in x away from the silu: check the columns are the x ones
    p = np.zeros(raw.num_params, np.float64)
    P = raw.named(p)
    P["input.weight"][:, 16:18] = np.eye(16, 2)       # h_0 = x_0, h_1 = x_1
    P["output.weight"][...] = np.eye(2, 16)            # out = silu(h)[:2]
    x = np.array([[0.5, -1.0], [2.0, 3.0]])
    out, _ = raw.forward(p, x, np.array([3, 500]))
    np.testing.assert_allclose(out, x / (1 + np.exp(-x)), rtol=1e-15)   # silu(x), float64
    with pytest.raises(ValueError, match="x_raw must be True or False, got 1"):
        MLPConfig(x_raw=1)


def test_init_is_reproducible_with_zero_residual_branches():
    model = MLP.from_preset("toy")
    a = model.init_params(4)
    np.testing.assert_array_equal(a, model.init_params(4))
    P = model.named(a)
    assert not P["output.weight"].any() and not P["blocks.0.linear_2.weight"].any()
    limit = np.sqrt(3.0 / ((96 + 128) / 2))                       # variance_scaling(1, fan_avg, uniform)
    assert limit * 0.95 < np.abs(P["input.weight"]).max() <= limit
    # fresh network: zero output layer, so the output is exactly zero
    x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    out, _ = model.forward(a, x, np.arange(5))
    assert out.dtype == np.float32 and not out.any()


def _loss(model, p, x, t, y, R):
    out, _ = model.forward(p, x, t, y, train=True, seed=2, step=1, keep_cache=False)
    return float(np.sum(out * R))


@pytest.mark.parametrize("x_raw", [False, True])
def test_mlp_gradient_check_float64(x_raw):
    """Every parameter tensor (4 random entries each) and every input entry, centred differences on a
    random projection, with dropout, class labels and learned variance on (and the raw-x input)."""
    model = MLP.from_preset("tiny", num_classes=3, dropout=0.2, learned_variance=True, x_raw=x_raw)
    rs = np.random.default_rng(5)
    p = _perturbed(model)
    x = rs.standard_normal((4, 2))
    t = np.array([0, 17, 400, 999])
    y = np.array([0, 2, 3, 1])
    out, cache = model.forward(p, x, t, y, train=True, seed=2, step=1)
    R = rs.standard_normal(out.shape)
    g, dx = model.backward(R, cache, return_dx=True)
    eps = 1e-6
    # float64 centred differences: truncation ~eps^2 |L'''| and round-off ~1e-16 |L| / eps are both
    # far below 1e-7 here; a wrong term shows up at the 1e-2 level

    def check(analytic, numeric, what):
        assert abs(analytic - numeric) <= 1e-7 + 1e-6 * abs(numeric), (what, analytic, numeric)

    for i in range(x.size):
        xp, xm = x.copy(), x.copy()
        xp.flat[i] += eps
        xm.flat[i] -= eps
        check(dx.flat[i], (_loss(model, p, xp, t, y, R) - _loss(model, p, xm, t, y, R)) / (2 * eps), f"x{i}")
    for name in model.layout.names:
        off, size = model.layout.offsets[name], model.layout.numel(name)
        for j in rs.choice(size, min(4, size), replace=False):
            pp, pm = p.copy(), p.copy()
            pp[off + j] += eps
            pm[off + j] -= eps
            num = (_loss(model, pp, x, t, y, R) - _loss(model, pm, x, t, y, R)) / (2 * eps)
            check(g[off + j], num, f"{name}[{j}]")
    v = rs.standard_normal(p.shape)
    num = (_loss(model, p + eps * v, x, t, y, R) - _loss(model, p - eps * v, x, t, y, R)) / (2 * eps)
    check(float(g @ v), num, "random direction")


def test_labels_dropout_and_denoiser():
    model = MLP.from_preset("tiny", num_classes=3, dropout=0.5)
    p = _perturbed(model).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
    t = np.array([1, 2, 3, 4])
    out, _ = model.forward(p, x, t)
    np.testing.assert_array_equal(out, model.forward(p, x, t, np.full(4, 3))[0])   # None = "no label"
    np.testing.assert_array_equal(out, model.denoiser(p)(x, t))
    assert np.abs(model.forward(p, x, t, np.zeros(4, np.int64))[0] - out).max() > 1e-4  # labels matter
    tr, _ = model.forward(p, x, t, train=True, seed=1, index=np.array([7, 8, 9, 10]))
    one, _ = model.forward(p, x[2:3], t[2:3], train=True, seed=1, index=np.array([9]))
    np.testing.assert_allclose(one[0], tr[2], rtol=1e-5, atol=1e-6)   # float32 rounding of batched GEMMs
    assert np.abs(tr - out).max() > 1e-4


def test_bad_inputs():
    model = MLP.from_preset("tiny")
    p = model.init_params(0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\), got rank 2 shape \(3, 3\)"):
        model.forward(p, np.zeros((3, 3), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"floating array, got dtype int64"):
        model.forward(p, np.zeros((3, 2), np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\), got range \[-1, 0\]"):
        model.forward(p, np.zeros((2, 2), np.float32), np.array([-1, 0]))
    with pytest.raises(ValueError, match="unconditional MLP"):
        model.forward(p, np.zeros((2, 2), np.float32), np.zeros(2, np.int64), np.zeros(2, np.int64))
    _, cache = model.forward(p, np.zeros((2, 2), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 2\)"):
        model.backward(np.zeros((2, 4), np.float32), cache)
    assert model.backward(np.ones((2, 2), np.float32), cache).shape == p.shape   # the cache survived the bad call
    for bad in (2.5, "3", 0, True):
        with pytest.raises(ValueError, match="num_classes must be None or a positive integer"):
            MLP.from_preset("tiny", num_classes=bad)
