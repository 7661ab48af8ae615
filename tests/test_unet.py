"""Tests for ddpm_ref/models/unet.py: the DDPM U-Net's layout, initialisation, input checks and a
float64 gradient check of the whole network (every parameter tensor and the input).

The PyTorch comparison lives in tests/test_torch_oracle.py.
"""
import numpy as np
import pytest

from ddpm_ref.models import CIFAR_PARAMS, UNet, UNetConfig


def _tiny_full(**kw):
    # tiny with everything on: attention (4x4 and middle, 4 heads of 4 channels), dropout, labels
    return UNet.from_preset("tiny", num_classes=3, dropout=0.1, head_dim=4, **kw)


def _perturbed(model, seed=0, scale=0.2):
    """Initial parameters plus noise, so the zero-initialised layers carry signal (float64)."""
    p = model.init_params(seed).astype(np.float64)
    return p + scale * np.random.default_rng(seed).standard_normal(p.shape)


# ----------------------------------------------------------------------------------- layout

def test_cifar_preset_has_the_papers_parameter_count():
    # DDPM's CIFAR-10 network = diffusers UNet2DModel (128, 256, 256, 256): 35,746,307 parameters
    model = UNet.from_preset("cifar")
    assert model.num_params == CIFAR_PARAMS == 35_746_307


def test_layout_uses_diffusers_state_dict_names():
    model = UNet.from_preset("cifar", num_classes=10)
    s = model.layout.shapes
    assert s["conv_in.weight"] == (128, 3, 3, 3)
    assert s["time_embedding.linear_1.weight"] == (512, 128)
    assert s["class_embedding.weight"] == (11, 512)                   # 10 labels + "no label"
    assert s["down_blocks.0.resnets.0.norm1.weight"] == (128,)
    assert s["down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert s["down_blocks.1.attentions.1.to_q.weight"] == (256, 256)
    assert s["down_blocks.0.downsamplers.0.conv.weight"] == (128, 128, 3, 3)
    assert "down_blocks.3.downsamplers.0.conv.weight" not in s        # the last level keeps its size
    assert s["mid_block.attentions.0.to_out.0.weight"] == (256, 256)
    assert s["up_blocks.2.attentions.2.group_norm.weight"] == (256,)  # 16x16 on the way up
    assert s["up_blocks.3.resnets.2.conv1.weight"] == (128, 256, 3, 3)
    assert s["up_blocks.0.upsamplers.0.conv.weight"] == (256, 256, 3, 3)
    assert s["conv_out.weight"] == (3, 128, 3, 3)
    assert UNet.from_preset("tiny", learned_variance=True).layout.shapes["conv_out.weight"] == (2, 8, 3, 3)


def test_config_round_trip_and_presets():
    cfg = UNet.from_preset("small").config
    assert (cfg.image_size, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions, cfg.groups) == \
        (16, 32, (1, 2), 2, (8,), 8)
    d = cfg.to_dict()
    assert UNetConfig.from_dict(d) == cfg
    assert UNet(d, ch=16).config == UNetConfig.from_dict({**d, "ch": 16})   # a dict plus overrides
    assert UNet(cfg).layout.to_list() == UNet.from_preset("small").layout.to_list()
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        UNet.from_preset("huge")


def test_config_errors():
    with pytest.raises(ValueError, match="groups=5"):
        UNet.from_preset("tiny", groups=5)
    with pytest.raises(ValueError, match="image_size 10 cannot be halved 2 times"):
        UNet.from_preset("tiny", image_size=10, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="head_dim=3"):
        UNet.from_preset("tiny", head_dim=3)
    with pytest.raises(ValueError, match="dropout"):
        UNet.from_preset("tiny", dropout=1.0)
    for bad in (2, -1, True, 1.0, "1"):
        with pytest.raises(ValueError, match=f"downsample_padding must be 0 .* or 1 .*got {bad!r}"):
            UNet.from_preset("tiny", downsample_padding=bad)
    # refused rather than failing later (head_dim 0: ZeroDivisionError) or truncated (num_classes 2.5
    # made a 3-row table whose "no label" row 2 was also accepted as a label)
    for bad in (0, -4, 2.0, "4", True):
        with pytest.raises(ValueError, match="head_dim must be None or a positive integer"):
            UNet.from_preset("tiny", head_dim=bad)
    for bad in (2.5, "3", 0, True):
        with pytest.raises(ValueError, match="num_classes must be None or a positive integer"):
            UNet.from_preset("tiny", num_classes=bad)
    for name, bad in (("ch_mult", (1.5, 2)), ("attn_resolutions", (4.7,)), ("ch_mult", "12")):
        with pytest.raises(ValueError, match=f"{name} must be a tuple of integers"):
            UNet.from_preset("tiny", **{name: bad})


def test_downsample_padding_config_and_old_configs():
    cfg = UNet.from_preset("tiny", downsample_padding=1).config
    d = cfg.to_dict()
    assert d["downsample_padding"] == 1 and UNetConfig.from_dict(d) == cfg
    assert cfg.diffusers_kwargs()["downsample_padding"] == 1
    assert UNet.from_preset("tiny").config.diffusers_kwargs()["downsample_padding"] == 0   # the default
    # a configuration saved before the field existed loads as the DDPM downsampler (0)
    old = {k: v for k, v in UNet.from_preset("tiny").config.to_dict().items() if k != "downsample_padding"}
    assert UNetConfig.from_dict(old).downsample_padding == 0
    # the padding changes no parameter, only which pixels the stride-2 kernel sees
    assert UNet(cfg).layout.to_list() == UNet.from_preset("tiny").layout.to_list()


def test_downsample_padding_1_gradient_check_float64():
    """Symmetric padding: the output differs from the DDPM downsampler's on the same weights, and
    the downsampler weight, conv_in weight and input gradients match float64 centred differences
    (tolerance reasoning as in test_whole_unet_gradient_check_float64)."""
    m1 = UNet.from_preset("tiny", downsample_padding=1, dropout=0.0)
    m0 = UNet.from_preset("tiny", dropout=0.0)
    rs = np.random.default_rng(5)
    p = _perturbed(m1, seed=2)
    x = rs.standard_normal((2, 1, 8, 8))
    t = np.array([3, 500])
    out, cache = m1.forward(p, x, t)
    out0, _ = m0.forward(p, x, t)
    # the two downsamplers read different pixels: the outputs differ at the O(1) level, not rounding
    assert np.abs(out - out0).max() > 1e-2 * np.abs(out0).max()
    R = rs.standard_normal(out.shape)
    g, dx = m1.backward(R, cache, return_dx=True)
    eps = 1e-5

    def loss(pp, xx):
        return float(np.sum(m1.forward(pp, xx, t, keep_cache=False)[0] * R))

    v = rs.standard_normal(x.shape)
    num = (loss(p, x + eps * v) - loss(p, x - eps * v)) / (2 * eps)
    assert abs(float(np.sum(dx * v)) - num) <= 1e-6 + 1e-5 * abs(num)
    for name in ("down_blocks.0.downsamplers.0.conv.weight", "down_blocks.0.downsamplers.0.conv.bias",
                 "conv_in.weight"):
        off, size = m1.layout.offsets[name], m1.layout.numel(name)
        v = np.zeros(p.shape)
        v[off:off + size] = rs.standard_normal(size)
        num = (loss(p + eps * v, x) - loss(p - eps * v, x)) / (2 * eps)
        assert abs(float(g @ v) - num) <= 1e-6 + 1e-5 * abs(num), name


# ------------------------------------------------------------------------------------ init

def test_init_follows_the_papers_code_and_is_reproducible():
    model = _tiny_full()
    a, b, c = model.init_params(0), model.init_params(0), model.init_params(1)
    assert a.dtype == np.float32 and a.shape == (model.num_params,)
    np.testing.assert_array_equal(a, b)                       # a pure function of the seed
    assert not np.array_equal(a, c)
    P = model.named(a)
    # the layers the TF code initialises at scale 1e-10 are exactly zero here
    for name in ("down_blocks.0.resnets.0.conv2.weight", "mid_block.attentions.0.to_out.0.weight",
                 "conv_out.weight"):
        assert not P[name].any(), name
    for name, v in P.items():
        if name.endswith(".bias"):
            assert not v.any(), name
    np.testing.assert_array_equal(P["down_blocks.0.resnets.0.norm1.weight"], 1.0)
    # variance_scaling(1, fan_avg, uniform): U(-a, a), a = sqrt(3 / ((fan_in + fan_out) / 2))
    w = P["down_blocks.1.resnets.0.conv1.weight"]                      # (16, 8, 3, 3)
    limit = np.sqrt(3.0 / ((8 * 9 + 16 * 9) / 2))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.95 * limit
    # the variance of U(-a, a) is a^2 / 3; 1152 draws: the sample variance is within ~12% (3 sigma)
    assert abs(w.var() / (limit ** 2 / 3) - 1) < 0.15
    assert abs(P["class_embedding.weight"].std() - 1.0) < 0.1          # N(0, 1), 4 x 32 draws: ~3 sigma


# -------------------------------------------------------------------------- gradient check

def _loss(model, p, x, t, y, R):
    out, _ = model.forward(p, x, t, y, train=True, seed=3, step=7, keep_cache=False)
    return float(np.sum(out * R))


def test_whole_unet_gradient_check_float64():
    """Centred differences on a random projection L = sum(R * out), with attention (4 heads), dropout
    on and class labels: for EVERY parameter tensor, the derivative along a random direction confined
    to that tensor (it weighs all of the tensor's entries at once), plus one random single entry of
    every third tensor; for the input, a random direction and single entries."""
    model = _tiny_full()
    rs = np.random.default_rng(1)
    p = _perturbed(model)
    x = rs.standard_normal((2, 1, 8, 8))
    t = np.array([5, 731])
    y = np.array([2, 3])                                  # a real label and "no label"
    out, cache = model.forward(p, x, t, y, train=True, seed=3, step=7)
    assert out.dtype == np.float64 and out.shape == (2, 1, 8, 8)
    R = rs.standard_normal(out.shape)
    g, dx = model.backward(R, cache, return_dx=True)
    eps = 1e-5
    # float64 centred differences: truncation ~eps^2 * |third derivative| ~ 1e-10, round-off
    # ~1e-16 * |L| / eps ~ 1e-10; 1e-6 absolute + 1e-5 relative leaves two orders of margin and still
    # catches any wrong term (those show up at the 1e-2..1 level).

    def check(analytic, numeric, what):
        assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (what, analytic, numeric)

    def num_x(v):
        return (_loss(model, p, x + eps * v, t, y, R) - _loss(model, p, x - eps * v, t, y, R)) / (2 * eps)

    def num_p(v):
        return (_loss(model, p + eps * v, x, t, y, R) - _loss(model, p - eps * v, x, t, y, R)) / (2 * eps)

    v = rs.standard_normal(x.shape)
    check(float(np.sum(dx * v)), num_x(v), "x, random direction")
    for flat_i in rs.choice(x.size, 3, replace=False):
        v = np.zeros(x.shape)
        v.flat[flat_i] = 1.0
        check(dx.flat[flat_i], num_x(v), f"x[{flat_i}]")
    for k, name in enumerate(model.layout.names):
        off, size = model.layout.offsets[name], model.layout.numel(name)
        v = np.zeros(p.shape)
        v[off:off + size] = rs.standard_normal(size)
        check(float(g @ v), num_p(v), f"{name}, random direction")
        if k % 3 == 0:
            j = off + int(rs.integers(size))
            v = np.zeros(p.shape)
            v[j] = 1.0
            check(g[j], num_p(v), f"{name}[{j - off}]")
    assert len(model.layout) > 100                        # every tensor of the tiny U-Net was checked


# ---------------------------------------------------------------------------- behaviour

def test_forward_dtype_labels_cache_and_denoiser():
    model = _tiny_full()
    p = model.init_params(0)
    p += 0.05 * np.random.default_rng(0).standard_normal(p.shape).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    t = np.array([0, 500, 999])
    out, cache = model.forward(p, x, t)
    assert out.dtype == np.float32
    # y=None on a class-conditional model is the "no label" row (index num_classes)
    out_nl, _ = model.forward(p, x, t, np.full(3, 3))
    np.testing.assert_array_equal(out, out_nl)
    # eval mode, no cache, and the denoiser give the same numbers bit for bit
    np.testing.assert_array_equal(model.forward(p, x, t, keep_cache=False)[0], out)
    np.testing.assert_array_equal(model.denoiser(p)(x, t), out)
    g = model.backward(np.ones_like(out), cache)
    assert g.dtype == np.float32 and g.shape == (model.num_params,)
    with pytest.raises(ValueError, match="consumed"):
        model.backward(np.ones_like(out), cache)
    # a preallocated gradient buffer is filled in place
    buf = np.full(model.num_params, 7.0, np.float32)
    _, cache = model.forward(p, x, t)
    assert model.backward(np.ones_like(out), cache, out=buf) is buf
    np.testing.assert_array_equal(buf, g)


def test_dropout_masks_are_addressed_by_sample_index_not_batch_position():
    model = UNet.from_preset("tiny", dropout=0.5)
    p = model.init_params(0)
    p += 0.1 * np.random.default_rng(0).standard_normal(p.shape).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    t = np.array([10, 20, 30])
    full, _ = model.forward(p, x, t, train=True, seed=5, index=np.array([4, 9, 2]), step=3)
    one, _ = model.forward(p, x[1:2], t[1:2], train=True, seed=5, index=np.array([9]), step=3)
    # same sample, same index: same masks; float32 batched vs single GEMMs differ only by rounding
    np.testing.assert_allclose(one[0], full[1], rtol=1e-5, atol=1e-5)
    other_step, _ = model.forward(p, x, t, train=True, seed=5, index=np.array([4, 9, 2]), step=4)
    assert np.abs(other_step - full).max() > 1e-3                      # a new step draws new masks
    evald, _ = model.forward(p, x, t)
    assert np.abs(evald - full).max() > 1e-3                           # dropout is on only in training


def test_bad_inputs_raise_value_errors_naming_the_shape():
    model = _tiny_full()
    p = model.init_params(0)
    x = np.zeros((2, 1, 8, 8), np.float32)
    t = np.array([1, 2])
    with pytest.raises(ValueError, match=r"rank 3 shape \(1, 8, 8\)"):
        model.forward(p, x[0], t)
    with pytest.raises(ValueError, match=r"x has 3 channels \(shape \(2, 3, 8, 8\)\)"):
        model.forward(p, np.zeros((2, 3, 8, 8), np.float32), t)
    with pytest.raises(ValueError, match=r"spatial size 7x6 .*multiples of 2"):
        model.forward(p, np.zeros((2, 1, 7, 6), np.float32), t)
    with pytest.raises(ValueError, match=r"floating array .*int64 with shape \(2, 1, 8, 8\)"):
        model.forward(p, x.astype(np.int64), t)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\), got range \[1, 1000\]"):
        model.forward(p, x, np.array([1, 1000]))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model.forward(p, x, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 3\]"):
        model.forward(p, x, t, np.array([0, 4]))
    with pytest.raises(ValueError, match=r"params must have shape"):
        model.forward(p[:-1], x, t)
    uncond = UNet.from_preset("tiny")
    with pytest.raises(ValueError, match=r"y \(shape \(2,\)\) was given to an unconditional U-Net"):
        uncond.forward(uncond.init_params(0), x, t, np.array([0, 1]))
    _, cache = model.forward(p, x, t)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 1, 8, 8\)"):
        model.backward(np.zeros((2, 2, 8, 8), np.float32), cache)
