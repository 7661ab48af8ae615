"""Tests for ddpm_ref/interop.py: diffusers UNet2DModel / DDPMScheduler / DDIMScheduler / DDPMPipeline
as the oracle (test-only dependencies, skipped with a reason when absent).

Tolerances:
* weights: exact (float32 copied bit for bit; safetensors stores raw bits).
* U-Net forward: 1e-4 relative to the output's scale (the issue's bar). Both sides compute in
  float32 with different summation orders (BLAS GEMM vs torch's convolution, our softmax vs
  torch's); over ~20 layers that accumulates to ~1e-6..1e-5.
* scheduler steps: 2e-5 relative to the sample's scale. diffusers keeps betas / alphas_cumprod in
  float32 (alpha_bar off by up to ~1e-6 relative after 1000 products) while ours are float64; the
  coefficients 1/sqrt(alpha_bar) (up to ~160 at t = T-1 on the linear schedule) amplify that.
"""
import json
import os

import numpy as np
import pytest

from ddpm_ref import interop
from ddpm_ref import safetensors as st
from ddpm_ref.schedule import Schedule

torch = pytest.importorskip("torch", reason="torch (setup.py extra `test`) runs the diffusers oracle")
diffusers = pytest.importorskip("diffusers", reason="diffusers (setup.py extra `test`) is the oracle "
                                "for the conversion")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch on one thread while this module runs, restored afterwards: on a loaded 2-core machine
    its spinning worker threads cost ~10x the CPU time of the tiny models' actual work (measured:
    a 20-step DDPMPipeline run, 2.8 s of CPU on 2 threads, 0.35 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Several UNet2DModel configurations, each small (a few thousand to ~100k parameters, 8x8 images).
CONFIGS = {
    # the DDPM CIFAR-10 layout (google/ddpm-cifar10-32), shrunk: one head, pad (0,1,0,1), freq_shift 1
    "ddpm": dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                 norm_num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
                 downsample_padding=0),
    # diffusers' own defaults for the embedding and heads; three levels, attention at two of them
    "heads": dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                  layers_per_block=2, down_block_types=("AttnDownBlock2D", "DownBlock2D",
                                                        "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
                  attention_head_dim=8, norm_num_groups=4, downsample_padding=0),
    # class-conditional, learned variance (2C outputs), no middle attention, dropout (eval mode)
    "classes": dict(sample_size=8, in_channels=2, out_channels=4, block_out_channels=(8, 16),
                    layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D"), attention_head_dim=None,
                    norm_num_groups=4, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
                    downsample_padding=0, num_class_embeds=5, add_attention=False, dropout=0.1),
    # diffusers' default downsampler (symmetric padding 1, stride 2) at two downsamplings, with
    # diffusers' default embedding (flip_sin_to_cos=True, freq_shift=0) and heads of 8
    "padded": dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 16, 32),
                   layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                   norm_num_groups=8, downsample_padding=1),
}


def _diffusers_unet(name, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**CONFIGS[name]).eval()
    with torch.no_grad():                       # move every tensor off its init value (GroupNorm 1/0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weights_and_config_load_exactly(tmp_path, name):
    ref = _diffusers_unet(name)
    ref.save_pretrained(tmp_path)
    learned = name == "classes"
    model, params = interop.load_unet(tmp_path, learned_variance=learned)
    assert model.config.diffusers_kwargs()["block_out_channels"] == CONFIGS[name]["block_out_channels"]
    named = model.named(params)
    state = _state(ref)
    assert set(named) == set(state)                      # one to one, nothing left over
    for key, value in state.items():
        np.testing.assert_array_equal(named[key], value, err_msg=key)   # bit-exact copy
    if name == "classes":
        assert model.config.num_classes == 4 and model.config.learned_variance


def test_old_attention_names_are_renamed(tmp_path):
    """diffusers < 0.15 checkpoints (e.g. the released google/ddpm-cifar10-32) use query/key/value/
    proj_attn; they load to the same buffer."""
    ref = _diffusers_unet("ddpm")
    ref.save_pretrained(tmp_path / "new")
    renamed = {}
    for key, value in _state(ref).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    os.makedirs(tmp_path / "old")
    st.save_file(renamed, tmp_path / "old" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    _, a = interop.load_unet(tmp_path / "new")
    _, b = interop.load_unet(tmp_path / "old")
    np.testing.assert_array_equal(a, b)


def test_pickle_weights_through_torch(tmp_path):
    ref = _diffusers_unet("ddpm")
    ref.save_pretrained(tmp_path / "st")
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    _, a = interop.load_unet(tmp_path / "st")
    _, b = interop.load_unet(tmp_path / "bin")
    np.testing.assert_array_equal(a, b)


def test_sharded_and_variant_weights(tmp_path):
    ref = _diffusers_unet("heads")
    ref.save_pretrained(tmp_path / "one")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="400KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ref.save_pretrained(tmp_path / "variant", variant="v2")
    _, a = interop.load_unet(tmp_path / "one")
    _, b = interop.load_unet(tmp_path / "sharded")
    _, c = interop.load_unet(tmp_path / "variant", variant="v2")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match="no weights found"):
        interop.load_unet(tmp_path / "variant")


@pytest.mark.parametrize("key, value, named", [
    ("down_block_types", ("SkipDownBlock2D", "AttnDownBlock2D"), "SkipDownBlock2D"),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D"), "up_block_types"),   # not mirrored
    ("downsample_padding", 2, "downsample_padding=2"),
    ("downsample_padding", True, "downsample_padding=True"),
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("time_embedding_type", "fourier", "time_embedding_type='fourier'"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift'"),
    ("mid_block_scale_factor", 2.0, "mid_block_scale_factor=2.0"),
    ("center_input_sample", True, "center_input_sample=True"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("block_out_channels", (16, 24), "block_out_channels"),
    ("mid_block_type", None, "mid_block_type=None"),
    ("downsample_type", "resnet", "downsample_type='resnet'"),
])
def test_unsupported_unet_configs_are_refused_by_name(key, value, named):
    config = {"_class_name": "UNet2DModel", **CONFIGS["ddpm"], key: value}
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        interop.unet_config_from_diffusers(config)


def test_absent_keys_take_diffusers_defaults():
    """A config.json that omits keys means diffusers' defaults (downsample_padding=1, the symmetric
    downsampler), not the DDPM layout."""
    cfg = interop.unet_config_from_diffusers({"sample_size": 8, "block_out_channels": [32, 64],
                                              "down_block_types": ["DownBlock2D"] * 2,
                                              "up_block_types": ["UpBlock2D"] * 2})
    assert cfg.downsample_padding == 1
    cfg = interop.unet_config_from_diffusers({"sample_size": 8, "block_out_channels": [32, 64],
                                              "down_block_types": ["DownBlock2D"] * 2,
                                              "up_block_types": ["UpBlock2D"] * 2,
                                              "downsample_padding": 0})
    assert cfg.downsample_padding == 0
    assert (cfg.flip_sin_to_cos, cfg.freq_shift, cfg.head_dim, cfg.norm_eps) == (True, 0, 8, 1e-5)
    with pytest.warns(UserWarning, match="not_a_key"):
        interop.unet_config_from_diffusers({**{k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in CONFIGS["ddpm"].items()},
                                            "not_a_key": 3})


def test_mismatched_weights_are_refused(tmp_path):
    ref = _diffusers_unet("ddpm")
    ref.save_pretrained(tmp_path)
    state = _state(ref)
    state["extra.weight"] = np.zeros(3, np.float32)
    st.save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="extra.weight"):
        interop.load_unet(tmp_path)
    del state["extra.weight"]
    state["conv_in.weight"] = state["conv_in.weight"][:, :2]
    st.save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="conv_in.weight has shape"):
        interop.load_unet(tmp_path)


# ----------------------------------------------------------------------------- schedulers

SCHEDULES = [
    dict(),                                                                     # DDPM linear
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid"),
    dict(beta_schedule="laplace"),
    dict(rescale_betas_zero_snr=True, num_train_timesteps=100),
    dict(trained_betas=np.linspace(1e-3, 0.2, 50).tolist(), num_train_timesteps=50),
]


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: kw.get("beta_schedule", "") + (
    "zsnr" if kw.get("rescale_betas_zero_snr") else "") + ("trained" if "trained_betas" in kw else ""))
def test_schedule_tables_match_diffusers(kw):
    ref = diffusers.DDPMScheduler(**kw)
    schedule, settings = interop.schedule_from_diffusers(dict(ref.config))
    assert schedule.T == ref.config.num_train_timesteps
    # diffusers' tables are float32: betas agree to float32 rounding (~6e-8 relative, a few ulps
    # from torch.linspace), alpha_bar to the float32 cumulative product's rounding (measured < 5e-7
    # absolute). The zero-SNR rescaling in float32 loses relative precision where alpha_bar ~ 1e-8,
    # so there we compare alpha_bar absolutely only.
    np.testing.assert_allclose(schedule.alpha_bar, ref.alphas_cumprod.double().numpy(), rtol=0,
                               atol=2e-6)
    if not kw.get("rescale_betas_zero_snr"):
        np.testing.assert_allclose(schedule.betas, ref.betas.double().numpy(), rtol=1e-6, atol=0)
    assert settings == {"sampler": "ddpm", "num_steps": None, "spacing": "leading", "eta": 0.0,
                        "prediction": "epsilon", "variance": "fixed_small", "clip": True,
                        "offset": 0, "ddim_eps_from_clipped": False}


@pytest.mark.parametrize("kw", [
    dict(), dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large"),
    dict(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.03, num_train_timesteps=40,
         prediction_type="v_prediction", variance_type="learned_range", timestep_spacing="trailing",
         clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="sample", timestep_spacing="linspace"),
    dict(trained_betas=np.linspace(1e-3, 0.2, 50).tolist(), num_train_timesteps=50),
])
@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_scheduler_config_round_trip_exact(tmp_path, kw, cls):
    """diffusers config -> ours -> diffusers config -> ours: the same float64 betas and settings, and
    diffusers' own from_pretrained accepts what we write."""
    if cls == "DDIMScheduler":
        kw = {k: v for k, v in kw.items() if k != "variance_type"}
    ref = getattr(diffusers, cls)(**kw)
    schedule, settings = interop.schedule_from_diffusers(dict(ref.config))
    written = interop.scheduler_config_to_diffusers(schedule, settings)
    schedule2, settings2 = interop.schedule_from_diffusers(json.loads(json.dumps(written)))
    assert schedule2 == schedule and np.array_equal(schedule2.betas, schedule.betas)
    assert settings2 == settings
    assert ("trained_betas" in kw) == (written["trained_betas"] is not None)   # named when we can
    (tmp_path / "scheduler_config.json").write_text(json.dumps(written))
    back = getattr(diffusers, cls).from_pretrained(tmp_path)
    np.testing.assert_allclose(back.alphas_cumprod.numpy(), ref.alphas_cumprod.numpy(), rtol=0,
                               atol=0)                       # diffusers rebuilds the same float32 table


def test_our_schedules_export_exactly():
    for schedule in (Schedule.linear(200, 2e-4, 0.04), Schedule.cosine(300),
                     Schedule.sigmoid(100), Schedule.cosine(100, s=0.02),
                     Schedule.linear(100).rescale_zero_terminal_snr()):
        for settings in ({"sampler": "ddpm", "variance": "fixed_large", "prediction": "v"},
                         {"sampler": "ddim", "spacing": "trailing", "clip": False}):
            written = json.loads(json.dumps(interop.scheduler_config_to_diffusers(schedule, settings)))
            back, got = interop.schedule_from_diffusers(written)
            assert np.array_equal(back.betas, schedule.betas), schedule
            for key, value in settings.items():
                assert got[key] == value


@pytest.mark.parametrize("cls, key, value", [
    ("DDPMScheduler", "variance_type", "learned"),
    ("DDPMScheduler", "variance_type", "fixed_large_log"),
    ("DDPMScheduler", "clip_sample_range", 2.0),
    ("DDPMScheduler", "steps_offset", -1),
    ("DDIMScheduler", "steps_offset", 1000),
    ("DDPMScheduler", "beta_schedule", "exp"),
    ("DDPMScheduler", "prediction_type", "flow"),
    ("DDIMScheduler", "set_alpha_to_one", False),
    ("PNDMScheduler", None, None),
])
def test_unsupported_scheduler_configs_are_refused_by_name(cls, key, value):
    config = {"_class_name": cls}
    if key is not None:
        config[key] = value
    named = key or "PNDMScheduler"
    with pytest.raises(ValueError, match=f"{named}" + ("" if key is None else f"={value!r}")):
        interop.schedule_from_diffusers(config)


# ------------------------------------------------------------------------------ U-Net forward

def _relative_error(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_diffusers(tmp_path, name):
    ref = _diffusers_unet(name, seed=1)
    ref.save_pretrained(tmp_path)
    model, params = interop.load_unet(tmp_path, learned_variance=name == "classes")
    cfg = CONFIGS[name]
    g = np.random.default_rng(0)
    x = g.standard_normal((3, cfg["in_channels"], 8, 8)).astype(np.float32)   # (N, C, H, W)
    t = np.array([0, 517, 999])
    y = np.array([0, 4, 2]) if name == "classes" else None
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t),
                       class_labels=None if y is None else torch.from_numpy(y)).sample.numpy()
    ours, _ = model.forward(params, x, t, y)
    assert ours.shape == expected.shape
    # 1e-4 relative (the bar): float32 on both sides, different summation orders.
    assert _relative_error(ours, expected) < 1e-4


def test_export_then_import_is_exact_and_diffusers_reads_it(tmp_path):
    from ddpm_ref.models.unet import UNet
    model = UNet.from_preset("tiny", num_classes=3, learned_variance=True, num_timesteps=200)
    params = model.init_params(seed=3)
    g = np.random.default_rng(1)
    params += (0.05 * g.standard_normal(params.shape)).astype(np.float32)   # no zero tensors left
    schedule = Schedule.cosine(200)
    settings = {"sampler": "ddpm", "num_steps": None, "spacing": "trailing", "eta": 0.0,
                "prediction": "v", "variance": "learned_range", "clip": False, "offset": 0,
                "ddim_eps_from_clipped": False}
    interop.save_diffusers(tmp_path, model, params, schedule, settings)
    model2, params2, schedule2, settings2 = interop.load_diffusers(tmp_path)
    assert model2.config == model.config
    assert params2.dtype == np.float32 and np.array_equal(params2, params)
    assert np.array_equal(schedule2.betas, schedule.betas)
    assert settings2 == {**settings, "shape": (1, 8, 8)}
    # DDIM with a learned-variance model: a DDIMPipeline folder around a DDPMScheduler config
    ddim_settings = {**settings, "sampler": "ddim", "num_steps": 50}
    interop.save_diffusers(tmp_path / "ddim", model, params, schedule, ddim_settings)
    assert json.loads((tmp_path / "ddim" / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    assert interop.load_diffusers(tmp_path / "ddim")[3] == {**ddim_settings, "shape": (1, 8, 8)}
    # model-only layout: the same network back
    interop.save_diffusers(tmp_path / "model", model, params)
    model3, params3 = interop.load_unet(tmp_path / "model")
    assert model3.config == model.config and np.array_equal(params3, params)
    # diffusers' own loader reads our pipeline folder and computes what we compute
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config.variance_type == "learned_range"
    x = g.standard_normal((2, 1, 8, 8)).astype(np.float32)
    t, y = np.array([3, 150]), np.array([0, 2])
    with torch.no_grad():
        expected = pipe.unet(torch.from_numpy(x), torch.from_numpy(t),
                             class_labels=torch.from_numpy(y)).sample.numpy()
    assert _relative_error(model.forward(params, x, t, y)[0], expected) < 1e-4


def test_downsample_padding_exports_and_reimports(tmp_path):
    """Both downsamplers survive export -> config.json -> import, and diffusers builds the same
    network from what we write (forward within 1e-4 relative, as test_forward_matches_diffusers)."""
    from ddpm_ref.models.unet import UNet
    g = np.random.default_rng(4)
    x = g.standard_normal((2, 1, 8, 8)).astype(np.float32)                  # (N, C, H, W)
    t = np.array([7, 640])
    params = UNet.from_preset("tiny").init_params(seed=5)     # the padding changes no parameter
    params += (0.1 * g.standard_normal(params.shape)).astype(np.float32)   # wake the zero layers
    outs = []
    for pad in (0, 1):
        model = UNet.from_preset("tiny", downsample_padding=pad)
        interop.save_diffusers(tmp_path / str(pad), model, params)
        assert json.loads((tmp_path / str(pad) / "config.json").read_text())["downsample_padding"] == pad
        model2, params2 = interop.load_unet(tmp_path / str(pad))
        assert model2.config == model.config and np.array_equal(params2, params)
        ref = diffusers.UNet2DModel.from_pretrained(tmp_path / str(pad)).eval()
        assert ref.config.downsample_padding == pad
        with torch.no_grad():
            expected = ref(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
        ours = model.forward(params, x, t)[0]
        assert _relative_error(ours, expected) < 1e-4
        outs.append(ours)
    # teeth: on the same weights the two downsamplers give outputs far apart (O(1e-1) relative, not
    # rounding), so the 1e-4 agreements above can tell them apart
    assert _relative_error(outs[1], outs[0]) > 1e-2


# ---------------------------------------------------------------------- sampler steps vs diffusers

from ddpm_ref import rng, samplers  # noqa: E402

T_STEPS = 1000


def _feed_noise(monkeypatch, module, queue):
    """Replace diffusers' randn_tensor in ``module`` by arrays popped from ``queue`` (our noise)."""
    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        a = queue.pop(0)
        assert tuple(shape) == a.shape
        return torch.from_numpy(a)
    monkeypatch.setattr(module, "randn_tensor", randn_tensor)


def _close(ours, ref, what):
    # 2e-5 relative to the reference's scale: float32 diffusers tables vs our float64 ones,
    # amplified by 1/sqrt(alpha_bar) (up to ~160) in x0 from eps at large t (module docstring).
    ref = ref.numpy().astype(np.float64)
    err = np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12)
    assert err < 2e-5, f"{what}: relative error {err:.3g}"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddpm_step_equals_ddpmscheduler_step(monkeypatch, spacing, variance, prediction):
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    S, C = 10, 2
    ref = diffusers.DDPMScheduler(num_train_timesteps=T_STEPS, variance_type=variance,
                                  prediction_type=prediction, timestep_spacing=spacing,
                                  clip_sample=prediction != "sample")
    ref.set_timesteps(S)
    schedule, settings = interop.schedule_from_diffusers(dict(ref.config))
    ts = samplers.timesteps(T_STEPS, S, spacing)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())       # the same chain
    g = np.random.default_rng(sum(map(ord, spacing + variance + prediction)))
    learned = variance == "learned_range"
    for t, t_prev in zip(ts, samplers.previous_timesteps(ts)):
        xt = g.standard_normal((2, C, 4, 4)).astype(np.float32)              # (N, C, H, W)
        out = g.standard_normal((2, 2 * C if learned else C, 4, 4)).astype(np.float32)
        if learned:
            out[:, C:] = g.uniform(-1, 1, (2, C, 4, 4))                        # v_interp in [-1, 1]
        noise = g.standard_normal(xt.shape).astype(np.float32)
        # diffusers adds noise whenever t > 0, also at the last step of a trailing chain (t = 99);
        # ours adds none at the final step (Algorithm 2). There we feed diffusers zero noise.
        final = t_prev < 0
        queue = [np.zeros_like(noise) if final else noise] if t > 0 else []
        _feed_noise(monkeypatch, ddpm_module, queue)
        expected = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(xt))
        assert not queue                                                # diffusers drew exactly once
        x_prev, x0 = samplers.ddpm_step(schedule, out, xt, int(t), int(t_prev), None if final else noise,
                                        settings["prediction"], settings["variance"], settings["clip"])
        _close(x0, expected.pred_original_sample, f"x0 at t={t}")
        _close(x_prev, expected.prev_sample, f"x_prev at t={t}")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_ddimscheduler_step(spacing, prediction, eta):
    """DDIMScheduler steps from t to t - T // S (whatever the spacing); given that t_prev our step is
    the same formula. With clipping, eps_from_clipped=True re-derives eps from the clipped x0
    (diffusers' use_clipped_model_output=True); False (the loaded settings, DDIMPipeline's default)
    keeps the raw eps."""
    S, C = 7, 3
    clip = prediction != "v_prediction"
    ref = diffusers.DDIMScheduler(num_train_timesteps=T_STEPS, prediction_type=prediction,
                                  timestep_spacing=spacing, clip_sample=clip)
    ref.set_timesteps(S)
    schedule, settings = interop.schedule_from_diffusers(dict(ref.config))
    ts = samplers.timesteps(T_STEPS, S, spacing)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    g = np.random.default_rng(sum(map(ord, spacing + prediction)) + int(10 * eta))
    for t in ts:
        t_prev = max(int(t) - T_STEPS // S, -1)                  # diffusers' previous timestep
        xt = g.standard_normal((2, C, 4, 4)).astype(np.float32)
        out = g.standard_normal((2, C, 4, 4)).astype(np.float32)
        noise = g.standard_normal(xt.shape).astype(np.float32)
        expected = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(xt), eta=eta,
                            use_clipped_model_output=True, variance_noise=torch.from_numpy(noise))
        x_prev, x0 = samplers.ddim_step(schedule, out, xt, int(t), t_prev, eta, noise,
                                        settings["prediction"], settings["clip"])
        _close(x0, expected.pred_original_sample, f"x0 at t={t}")
        _close(x_prev, expected.prev_sample, f"x_prev at t={t}")
        plain = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(xt), eta=eta,
                         variance_noise=torch.from_numpy(noise))            # DDIMPipeline's call
        assert settings["ddim_eps_from_clipped"] is False
        raw, x0_raw = samplers.ddim_step(schedule, out, xt, int(t), t_prev, eta, noise, settings["prediction"],
                                         settings["clip"], settings["ddim_eps_from_clipped"])
        _close(x0_raw, plain.pred_original_sample, f"x0 (raw eps) at t={t}")
        _close(raw, plain.prev_sample, f"x_prev (raw eps) at t={t}")
        if not clip:      # without clipping the raw and the recomputed eps are the same
            _close(x_prev, plain.prev_sample, f"x_prev (raw eps) at t={t}")


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_steps_offset_gives_diffusers_leading_timesteps(cls):
    """steps_offset (e.g. 1, as Stable Diffusion's schedulers) shifts every "leading" timestep; the
    loaded settings' offset gives diffusers' set_timesteps list exactly, and is written back."""
    for T, S, offset in [(1000, 10, 1), (1000, 7, 1), (999, 10, 1), (1000, 50, 3), (40, 40, 0)]:
        ref = getattr(diffusers, cls)(num_train_timesteps=T, timestep_spacing="leading", steps_offset=offset)
        ref.set_timesteps(S)
        schedule, settings = interop.schedule_from_diffusers(dict(ref.config))
        assert settings["offset"] == offset
        ts = samplers.timesteps(T, S, settings["spacing"], settings["offset"])
        np.testing.assert_array_equal(ts, ref.timesteps.numpy())               # exact
        written = interop.scheduler_config_to_diffusers(schedule, settings)
        assert written["steps_offset"] == offset
        assert interop.schedule_from_diffusers(written)[1] == settings
    for spacing in ("trailing", "linspace"):        # diffusers ignores steps_offset there; so do we
        ref = getattr(diffusers, cls)(timestep_spacing=spacing, steps_offset=1)
        ref.set_timesteps(10)
        _, settings = interop.schedule_from_diffusers(dict(ref.config))
        assert settings["offset"] == 0
        np.testing.assert_array_equal(samplers.timesteps(1000, 10, spacing, settings["offset"]),
                                      ref.timesteps.numpy())
    with pytest.raises(ValueError, match="'leading' spacing only"):
        interop.scheduler_config_to_diffusers(Schedule.linear(100), {"spacing": "trailing", "offset": 1})


def test_dynamic_thresholding_maps_to_ours():
    """thresholding with sample_max_value = 1 is plain clipping; with no cap it is our 'dynamic'."""
    g = np.random.default_rng(5)
    x0 = (3 * g.standard_normal((3, 2, 4, 4))).astype(np.float32)
    for cap, clip in ((1.0, True), (interop._NO_CAP, "dynamic")):
        ref = diffusers.DDPMScheduler(thresholding=True, sample_max_value=cap)
        _, settings = interop.schedule_from_diffusers(dict(ref.config))
        assert settings["clip"] == clip
        expected = ref._threshold_sample(torch.from_numpy(x0)).numpy()
        # float32 quantile on both sides (linear interpolation): a few ulps
        np.testing.assert_allclose(samplers.clip_x0(x0, clip), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="sample_max_value=2.0"):
        interop.schedule_from_diffusers({"thresholding": True, "sample_max_value": 2.0})
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio=0.9"):
        interop.schedule_from_diffusers({"thresholding": True, "sample_max_value": 2.0,
                                         "dynamic_thresholding_ratio": 0.9})


# --------------------------------------------------------------------------- whole pipelines

def _inject_our_noise(monkeypatch, pipe, pipeline_module, scheduler_module, seed, n):
    """Make a diffusers pipeline draw ddpm_ref's noise: x_T = rng.normal(seed, SAMPLE_INIT, i, 0)
    and the noise of the step from t = rng.normal(seed, SAMPLE_STEP, i, t), as samplers.sample does.
    randn_tensor is patched in the pipeline (x_T) and scheduler (step noise) modules; a wrapper on
    scheduler.step records the timestep the next draw belongs to. Nothing else is changed."""
    index = np.arange(n)
    state = {"t": None, "draws": 0}

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        state["draws"] += 1
        if state["t"] is None:
            a = rng.normal(seed, rng.Stream.SAMPLE_INIT, index, 0, tuple(shape[1:]))
        else:
            a = rng.normal(seed, rng.Stream.SAMPLE_STEP, index, state["t"], tuple(shape[1:]))
        assert a.shape == tuple(shape)
        return torch.from_numpy(a)

    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        state["t"] = int(timestep)
        return step(model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "randn_tensor", randn_tensor)
    monkeypatch.setattr(scheduler_module, "randn_tensor", randn_tensor)
    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    return state


# kind -> (pipeline, scheduler keyword arguments, inference steps). The clipped DDIM chains run 8
# steps: with clipping and the raw eps, x_prev = sqrt(ab_prev) clip(x0_hat) + sqrt(1 - ab_prev) eps(x_t)
# depends on x_t through the network alone, and this random U-Net amplifies a state difference about
# 2x per step (measured: each step of ours matches DDIMScheduler.step to ~1e-7 from the same state,
# yet the float32 U-Net/table differences of ~2e-6 at the first step grow to 4.4e-5 after 8 steps and
# 1.6e-4 after 10, on the [0, 1] image scale). 8 steps keep the 1e-4 bound of the other runs honest.
PIPELINES = {
    "ddpm": ("ddpm", {}, 20),
    "ddim": ("ddim", dict(clip_sample=False), 10),
    "ddim-clip": ("ddim", dict(clip_sample=True), 8),           # DDIMPipeline's raw eps after clipping
    "ddpm-offset": ("ddpm", dict(steps_offset=1), 20),         # timesteps 951, 901, ..., 1
    "ddim-offset": ("ddim", dict(steps_offset=1, clip_sample=True), 8),   # 876, 751, ..., 1
}


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_pipeline_run_matches_with_the_same_noise(tmp_path, monkeypatch, kind):
    """A 20-step DDPMPipeline run (and a 10-step DDIMPipeline, eta = 0, with and without clip_sample),
    also with steps_offset = 1, equals samplers.sample(**settings) on the converted folder: the same
    timesteps and, with clip_sample, DDIM's raw eps (settings["ddim_eps_from_clipped"] is False)."""
    import diffusers.pipelines.ddim.pipeline_ddim as ddim_pipeline
    import diffusers.pipelines.ddpm.pipeline_ddpm as ddpm_pipeline
    import diffusers.schedulers.scheduling_ddim as ddim_scheduler
    import diffusers.schedulers.scheduling_ddpm as ddpm_scheduler
    unet = _diffusers_unet("ddpm", seed=2)
    sampler, sched_kw, steps = PIPELINES[kind]
    if sampler == "ddpm":
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**sched_kw))
        modules = (ddpm_pipeline, ddpm_scheduler)
    else:
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**sched_kw))
        modules = (ddim_pipeline, ddim_scheduler)
    pipe.save_pretrained(tmp_path)
    model, params, schedule, settings = interop.load_diffusers(tmp_path)
    assert settings["sampler"] == sampler and settings["shape"] == (3, 8, 8)
    assert settings["offset"] == sched_kw.get("steps_offset", 0)
    seed, n = 7, 2
    state = _inject_our_noise(monkeypatch, pipe, *modules, seed=seed, n=n)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(batch_size=n, num_inference_steps=steps, output_type="pt").images.numpy()
    ts = samplers.timesteps(schedule.T, steps, settings["spacing"], settings["offset"])
    np.testing.assert_array_equal(ts, pipe.scheduler.timesteps.numpy())     # the same chain
    if kind in ("ddpm", "ddim"):
        assert state["draws"] == (1 + steps - 1 if kind == "ddpm" else 1)   # x_T + one per step with t > 0
    # diffusers' DDPMScheduler draws noise at every t > 0, also at the final step from t = 1 with an
    # offset (there with variance clamped at 1e-20: 1e-10 z, far below the tolerance); ours adds none.
    assert state["draws"] == 1 + (int(np.sum(ts > 0)) if sampler == "ddpm" else 0)
    ours = samplers.sample(model.denoiser(params), schedule, n=n, seed=seed,
                           **{**settings, "num_steps": steps})
    ours = np.clip(ours / 2 + 0.5, 0, 1)                  # the pipeline's output mapping (NCHW, "pt")
    # 1e-4 absolute on [0, 1] images: per-step float32 differences (~1e-6 relative in the U-Net,
    # ~1e-6 in the tables) accumulated over the chain.
    assert np.max(np.abs(ours - expected)) < 1e-4
    assert np.std(expected) > 0.05                         # a non-trivial image, not all clipped
    if sampler == "ddim" and sched_kw["clip_sample"]:
        # Teeth: clipping did change x0_hat on this chain, so the eps convention matters; GLIDE's
        # re-derived eps samples a visibly different chain from DDIMPipeline's.
        glide = samplers.sample(model.denoiser(params), schedule, n=n, seed=seed,
                                **{**settings, "num_steps": steps, "ddim_eps_from_clipped": True})
        assert np.max(np.abs(np.clip(glide / 2 + 0.5, 0, 1) - expected)) > 1e-2


# ------------------------------------------------------- documented differences, pinned down

def test_released_cifar10_config_maps_to_the_35_7m_network():
    """The configuration of google/ddpm-cifar10-32 (diffusers 0.0.4 era keys) gives our cifar
    network: the same 35,746,307 parameters under the same names and shapes as UNet2DModel's."""
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
              "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
              "center_input_sample": False,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
              "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
              "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
              "time_embedding_type": "positional",
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
    from ddpm_ref.models.unet import UNet
    ours = UNet(interop.unet_config_from_diffusers(config))
    assert ours.num_params == 35_746_307
    assert ours.config.attn_resolutions == (16,) and ours.config.dropout == 0.0
    with torch.device("meta"):                                  # shapes only, no memory
        ref = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == dict(iter(ours.layout))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_widen_exactly(tmp_path, dtype):
    ref = _diffusers_unet("classes").to(getattr(torch, dtype))
    ref.save_pretrained(tmp_path)
    model, params = interop.load_unet(tmp_path, learned_variance=True)
    named = model.named(params)
    for key, value in ref.state_dict().items():                 # F16/BF16 -> F32 is exact
        np.testing.assert_array_equal(named[key], value.float().numpy(), err_msg=key)


def test_diffusers_last_step_noise_differs_as_documented(monkeypatch):
    """DDPMScheduler adds noise at the last step of a trailing chain (t = 99 > 0): with fixed_large
    its variance is 1 - alpha_bar_99. Ours adds none there (Algorithm 2: z = 0 at the final step)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    ref = diffusers.DDPMScheduler(variance_type="fixed_large", timestep_spacing="trailing")
    ref.set_timesteps(10)
    t = int(ref.timesteps[-1])
    assert t == 99
    schedule, settings = interop.schedule_from_diffusers(dict(ref.config))
    g = np.random.default_rng(3)
    xt, out = (g.standard_normal((1, 1, 4, 4)).astype(np.float32) for _ in range(2))
    noise = g.standard_normal(xt.shape).astype(np.float32)
    _feed_noise(monkeypatch, ddpm_module, [noise])
    theirs = ref.step(torch.from_numpy(out), t, torch.from_numpy(xt)).prev_sample.numpy()
    ours, _ = samplers.ddpm_step(schedule, out, xt, t, -1, None, variance="fixed_large")
    added = (theirs - ours) / noise
    # float32 vs float64 tables: 1e-5 relative on the recovered standard deviation
    np.testing.assert_allclose(added, np.sqrt(1 - schedule.alpha_bar[t]), rtol=1e-5)


def test_diffusers_ddim_previous_timestep_and_raw_eps_differ_as_documented():
    """DDIMScheduler steps to t - T // S (not the next listed timestep) and, in DDIMPipeline's
    default (use_clipped_model_output False), keeps the raw eps after clipping x0."""
    ref = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(7)
    listed = ref.timesteps.numpy()
    assert np.any(listed[:-1] - 1000 // 7 != listed[1:])        # 1000 / 7 is not an integer
    ref = diffusers.DDIMScheduler(clip_sample=True)
    ref.set_timesteps(10)
    schedule, settings = interop.schedule_from_diffusers(dict(ref.config))
    g = np.random.default_rng(4)
    xt = g.standard_normal((1, 1, 4, 4)).astype(np.float32)
    out = (3 * g.standard_normal((1, 1, 4, 4))).astype(np.float32)   # x0_hat far outside [-1, 1]
    raw = ref.step(torch.from_numpy(out), 900, torch.from_numpy(xt)).prev_sample.numpy()
    ours, _ = samplers.ddim_step(schedule, out, xt, 900, 800, 0.0, None, clip=True)
    assert np.max(np.abs(ours - raw)) > 1e-2                    # a real difference, not rounding
    # ... which the loaded settings remove: eps_from_clipped=False is DDIMPipeline's raw eps
    same, _ = samplers.ddim_step(schedule, out, xt, 900, 800, 0.0, None, clip=True,
                                 eps_from_clipped=settings["ddim_eps_from_clipped"])
    _close(same, torch.from_numpy(raw), "x_prev with the raw eps")


def test_folder_layouts_and_their_refusals(tmp_path):
    ref = _diffusers_unet("ddpm")
    ref.save_pretrained(tmp_path / "model")
    # a bare model folder: the DDPM paper's schedule and DDPMPipeline's defaults
    model, params, schedule, settings = interop.load_diffusers(tmp_path / "model")
    assert schedule == Schedule.linear(1000) and settings["sampler"] == "ddpm"
    assert settings["num_steps"] is None and settings["shape"] == (3, 8, 8)
    pipe = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=ref, scheduler=diffusers.DDPMScheduler()).save_pretrained(pipe)
    index = json.loads((pipe / "model_index.json").read_text())
    for change, named in [({"_class_name": "StableDiffusionPipeline"}, "StableDiffusionPipeline"),
                          ({"vae": ["diffusers", "AutoencoderKL"]}, "vae")]:
        (pipe / "model_index.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(ValueError, match=named):
            interop.load_diffusers(pipe)
    (pipe / "model_index.json").write_text(json.dumps(index))
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler"}))
    with pytest.raises(ValueError, match="PNDMScheduler"):
        interop.load_diffusers(pipe)
    with pytest.raises(ValueError, match="not a directory"):
        interop.load_diffusers(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a diffusers model folder"):
        interop.load_diffusers(tmp_path / "empty")


def test_no_torch_needed_and_pickle_refused_without_it(tmp_path, monkeypatch):
    """Loading safetensors folders imports neither torch nor diffusers; a .bin file without torch
    is refused with a message, never unpickled by us."""
    import subprocess
    import sys
    ref = _diffusers_unet("ddpm")
    ref.save_pretrained(tmp_path / "st")
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    code = ("import sys; from ddpm_ref import interop; interop.load_diffusers(sys.argv[1]); "
            "bad = [m for m in ('torch', 'diffusers', 'safetensors.torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "st")], check=True)
    monkeypatch.setitem(sys.modules, "torch", None)               # `import torch` now fails
    with pytest.raises(ImportError, match="never unpickles"):
        interop.load_unet(tmp_path / "bin")


# ------------------------------------------------------------------- bad input, named errors

def _tiny(seed=0):
    from ddpm_ref.models.unet import UNet
    model = UNet.from_preset("tiny", num_timesteps=100)
    return model, model.init_params(seed=seed)


@pytest.mark.parametrize("sampler", ["DDIM", "ddim ", "euler", ["ddpm"]])
def test_unknown_sampler_is_refused_by_name(tmp_path, sampler):
    with pytest.raises(ValueError, match=r"'ddpm' or 'ddim', got " + repr(sampler).replace("[", r"\[")):
        interop.schedule_from_diffusers({"_class_name": "DDPMScheduler"}, sampler=sampler)
    model, params = _tiny()
    interop.save_diffusers(tmp_path / "p", model, params, Schedule.linear(100), {"sampler": "ddpm"})
    with pytest.raises(ValueError, match="'ddpm' or 'ddim'"):
        interop.load_diffusers(tmp_path / "p", sampler=sampler)


def test_corrupt_pickle_weights_are_refused_naming_the_file(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "good.bin")
    data = (tmp_path / "good.bin").read_bytes()
    for name, content in [("truncated.bin", data[: len(data) // 2]), ("garbage.pt", b"not a checkpoint"),
                          ("empty.bin", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="cannot read this PyTorch weight file") as info:
            interop.read_state_dict(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_variant_weights_use_diffusers_index_name(tmp_path, safe):
    """diffusers' _add_variant puts the variant before the last suffix, also for the index:
    diffusion_pytorch_model.safetensors.index.fp16.json. Its legacy spelling loads too."""
    ref = _diffusers_unet("heads")
    ref.save_pretrained(tmp_path / "one")
    ref.save_pretrained(tmp_path / "sh", max_shard_size="400KB", variant="fp16", safe_serialization=safe)
    ext = "safetensors" if safe else "bin"
    index = tmp_path / "sh" / f"diffusion_pytorch_model.{ext}.index.fp16.json"
    assert index.exists()                                             # what diffusers writes
    _, a = interop.load_unet(tmp_path / "one")
    _, b = interop.load_unet(tmp_path / "sh", variant="fp16")
    np.testing.assert_array_equal(a, b)
    assert interop.find_weights(tmp_path / "sh", "fp16") == str(index)
    index.rename(tmp_path / "sh" / f"diffusion_pytorch_model.{ext}.fp16.index.json")   # legacy reader's name
    np.testing.assert_array_equal(interop.load_unet(tmp_path / "sh", variant="fp16")[1], a)
    with pytest.raises(ValueError, match="no weights found"):
        interop.load_unet(tmp_path / "sh")                            # only the fp16 variant is there


def test_save_diffusers_refuses_a_non_empty_folder_and_overwrite_replaces_it_whole(tmp_path):
    model, pa = _tiny(0)
    _, pb = _tiny(1)
    pipe = tmp_path / "p"
    interop.save_diffusers(pipe, model, pa, Schedule.linear(100), {"sampler": "ddpm"})
    before = {p.relative_to(pipe): p.read_bytes() for p in pipe.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="not empty; pass overwrite=True"):
        interop.save_diffusers(pipe, model, pb)
    assert {p.relative_to(pipe): p.read_bytes() for p in pipe.rglob("*") if p.is_file()} == before
    # overwrite: a model-only export replaces the pipeline folder, no stale model_index.json / unet/
    interop.save_diffusers(pipe, model, pb, overwrite=True)
    assert sorted(os.listdir(pipe)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    np.testing.assert_array_equal(interop.load_diffusers(pipe)[1], pb)
    assert sorted(os.listdir(tmp_path)) == ["p"]                       # no temporary folders left
    # a folder that is not a diffusers export is never replaced; an empty one is used
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a diffusers model or pipeline folder"):
        interop.save_diffusers(tmp_path / "mine", model, pa, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    interop.save_diffusers(tmp_path / "empty", model, pa)
    np.testing.assert_array_equal(interop.load_unet(tmp_path / "empty")[1], pa)


def test_failed_save_diffusers_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    model, pa = _tiny(0)
    _, pb = _tiny(1)
    pipe = tmp_path / "p"
    interop.save_diffusers(pipe, model, pa, Schedule.linear(100), {"sampler": "ddpm"})
    before = {p.relative_to(pipe): p.read_bytes() for p in pipe.rglob("*") if p.is_file()}

    def disk_full(tensors, path, metadata=None, bf16=False):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(interop.st, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        interop.save_diffusers(pipe, model, pb, Schedule.cosine(100), {"sampler": "ddim"}, overwrite=True)
    with pytest.raises(OSError, match="No space"):
        interop.save_diffusers(tmp_path / "new", model, pb)
    assert {p.relative_to(pipe): p.read_bytes() for p in pipe.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["p"]                       # nothing half-written beside it
    monkeypatch.undo()
    _, params, _, settings = interop.load_diffusers(pipe)
    assert np.array_equal(params, pa) and settings["sampler"] == "ddpm"


@pytest.mark.parametrize("change, named", [
    ({"dropout": None}, "dropout must be a finite number, got None"),
    ({"freq_shift": None}, "freq_shift must be an integer, got None"),
    ({"norm_eps": "1e-5"}, "norm_eps must be a finite number"),
    ({"flip_sin_to_cos": None}, "flip_sin_to_cos must be true or false"),
    ({"down_block_types": "DownBlock2D"}, "down_block_types must be a list"),
])
def test_malformed_unet_config_values_are_named(change, named):
    config = {"sample_size": 8, "block_out_channels": [32, 64], "norm_num_groups": 8,
              "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2, **change}
    with pytest.raises(ValueError, match=f"config.json: {named}"):
        interop.unet_config_from_diffusers(config)


@pytest.mark.parametrize("change, named", [
    ({"prediction_type": ["epsilon"]}, r"prediction_type=\['epsilon'\] is not supported"),
    ({"thresholding": True, "sample_max_value": None}, "sample_max_value must be a number, got None"),
    ({"trained_betas": [0.1, "x"], "num_train_timesteps": 2}, "trained_betas must be a list of 2 numbers"),
    ({"num_train_timesteps": 3, "beta_end": 2.0}, "beta_end must be <= 1.0"),
    ({"beta_start": None}, "beta_start must be a finite number, got None"),
])
def test_malformed_scheduler_config_values_are_named(change, named):
    with pytest.raises(ValueError, match=f"scheduler_config.json: {named}"):
        interop.schedule_from_diffusers(change)


def test_malformed_files_in_a_model_folder_are_named(tmp_path):
    model, params = _tiny()
    interop.save_diffusers(tmp_path / "m", model, params)
    config = tmp_path / "m" / "config.json"
    good = config.read_bytes()
    config.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="config.json: not a UTF-8 text file"):
        interop.load_unet(tmp_path / "m")
    config.write_bytes(good)
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    weights.rename(tmp_path / "m" / "part1.safetensors")
    names = list(interop.read_state_dict(tmp_path / "m" / "part1.safetensors"))
    index = tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json"
    for shard, named in [(1, "= 1; expected the file name of a shard"), (None, "= None; expected"),
                         ("../part1.safetensors", "no path separators"),
                         ("diffusion_pytorch_model.safetensors.index.json", "is an index")]:
        index.write_text(json.dumps({"weight_map": {**{n: "part1.safetensors" for n in names},
                                                    names[0]: shard}}))
        with pytest.raises(ValueError, match=named) as info:
            interop.load_unet(tmp_path / "m")
        assert str(index) in str(info.value)
    index.write_text(json.dumps({"weight_map": {n: "part1.safetensors" for n in names}}))
    np.testing.assert_array_equal(interop.load_unet(tmp_path / "m")[1], params)
