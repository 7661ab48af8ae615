"""The U-Net, the training loop and the sampler on the GPU backend (ddpm_ref.kernels) against the
NumPy reference: the same model code, ops chosen by ``UNet.to("gpu")`` / ``Trainer(device="gpu")``.

In the CUDA simulator every simulated thread costs about a millisecond, so the network here is the
smallest U-Net with every block kind (4x4 images, ch 4, two levels, attention at 2x2, a class
embedding, dropout) and the convolutions run on small version-3 tiles (``kernels.conv.FORCED_TILES``;
the production tiles have their own tests in test_kernels_conv.py). On a real GPU
(``NUMBA_ENABLE_CUDASIM=0``) the production tiles run.

Tolerance table (the reference runs the same graph in float32 with NumPy's BLAS):
- network output: atol 2e-5 x max|out|. Both sides are float32; convolution K-sums (at most 144
  terms here), GroupNorm statistics and attention softmaxes are accumulated in different orders,
  ~1e-6 relative per layer over ~20 layers.
- gradients, per tensor: atol 1e-4 x max|g_ref| over that tensor (so a tensor of zeros, e.g. a
  zero-initialised layer's upstream, is compared absolutely at the scale of its siblings via the floor
  1e-7). The backward pass adds the same order-of-summation noise again; a wrong or missing term (a
  dropped skip gradient, a transposed weight) is O(1) relative.
- training: the losses rtol 1e-5; params and EMA after two AdamW steps atol 2e-6 (each step moves a
  parameter by ~lr = 1e-3 times m / sqrt(v), a ratio of gradients that agree to ~1e-5 relative).
- sampling: atol 1e-4 after 2 DDIM steps (each step's network output agrees to ~1e-6; the DDIM update
  amplifies by at most ~1/sqrt(alpha_bar) ~ 1.1 per step here).
"""
import numpy as np
import pytest

from kernel_setup import SIM, kb, fast_simulator_barriers, small_conv_tiles  # noqa: E402,F401  (GPU or simulator)
from ddpm_ref import samplers  # noqa: E402
from ddpm_ref.backend import get_backend  # noqa: E402
from ddpm_ref.data import Dataset  # noqa: E402
from ddpm_ref.kernels import conv as kconv, noise as knoise  # noqa: E402
from ddpm_ref.models.unet import UNet  # noqa: E402
from ddpm_ref.schedule import Schedule  # noqa: E402
from ddpm_ref.train import TrainConfig, Trainer  # noqa: E402

MINI = dict(in_channels=1, image_size=4, ch=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(2,),
            groups=2, dropout=0.1, num_timesteps=50)


pytestmark = pytest.mark.usefixtures("small_conv_tiles")


def _params(net, seed):
    """The paper's initialisation plus noise, so that the zero-initialised layers carry gradient too."""
    p = net.init_params(seed)
    p += (0.05 * np.random.default_rng(seed).standard_normal(p.shape)).astype(np.float32)
    return p


def test_unet_forward_backward_match_reference():
    net = UNet(num_classes=3, **MINI)
    gpu = net.to("gpu")
    assert gpu.backend.name == "gpu" and net.backend.name == "cpu" and gpu.layout is net.layout
    p = _params(net, 1)
    r = np.random.default_rng(2)
    x = r.standard_normal((2, 1, 4, 4)).astype(np.float32)
    t, y = np.array([3, 41]), np.array([2, 3])                       # label 3 = "no label"
    kw = dict(train=True, seed=5, index=np.array([7, 9]), step=4)
    out, cache = net.forward(p, x, t, y, **kw)
    out_d, cache_d = gpu.forward(gpu.backend.asarray(p), kb.to_device(x), t, y, **kw)
    scale = np.abs(out).max()
    assert scale > 0.05                                              # a non-trivial output
    np.testing.assert_allclose(kb.to_host(out_d), out, rtol=0, atol=2e-5 * scale)
    dout = r.standard_normal(out.shape).astype(np.float32)
    g, dx = net.backward(dout, cache, return_dx=True)
    g_d, dx_d = gpu.backward(kb.to_device(dout), cache_d, return_dx=True)
    g_d = kb.to_host(g_d)
    ref_views, dev_views = net.named(g), net.named(g_d)
    for name in net.layout.names:
        want = ref_views[name]
        atol = max(1e-4 * float(np.abs(want).max()), 1e-7)
        np.testing.assert_allclose(dev_views[name], want, rtol=0, atol=atol, err_msg=name)
    np.testing.assert_allclose(kb.to_host(dx_d), dx, rtol=0, atol=1e-4 * np.abs(dx).max())
    assert np.count_nonzero(g) > 0.9 * g.size                        # the check covers nearly every entry


def test_unet_to_checks_the_device_and_where_params_live():
    gpu = UNet(**MINI).to("gpu")
    p = gpu.init_params(0)
    if not SIM:                                                      # on a GPU, host params are an error
        with pytest.raises(ValueError, match="params must be on the GPU"):
            gpu.forward(p, np.zeros((1, 1, 4, 4), np.float32), [0])
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'gpu'\), got 'tpu'"):
        UNet(**MINI).to("tpu")


def _dataset():
    r = np.random.default_rng(3)
    x = np.clip(r.normal(0, 0.5, size=(6, 1, 4, 4)), -1, 1).astype(np.float32)
    return Dataset(x=x, y=None, num_classes=0, name="mini")


def test_trainer_on_gpu_matches_cpu_and_resumes_across_devices():
    cfg = TrainConfig(data="mini", model="unet", preset="tiny", model_overrides=MINI, T=50, batch=2, steps=2,
                      lr=1e-3, warmup=1, ema_decay=0.9, seed=4)
    ds = _dataset()
    cpu, gpu = Trainer(cfg, ds), Trainer(cfg, ds, device="gpu")
    for _ in range(2):
        a, b = cpu.train_step(), gpu.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    ck_cpu, ck_gpu = cpu.checkpoint(), gpu.checkpoint()
    assert isinstance(ck_gpu.params, np.ndarray) and isinstance(ck_gpu.ema, np.ndarray)
    np.testing.assert_allclose(ck_gpu.params, ck_cpu.params, rtol=0, atol=2e-6)
    np.testing.assert_allclose(ck_gpu.ema, ck_cpu.ema, rtol=0, atol=2e-6)
    np.testing.assert_allclose(ck_gpu.optimizer["m"], ck_cpu.optimizer["m"], rtol=0,
                               atol=1e-4 * np.abs(ck_cpu.optimizer["m"]).max())
    assert ck_gpu.optimizer["step"] == ck_cpu.optimizer["step"] == 2
    assert np.abs(ck_cpu.params - cpu.model.init_params(4)).max() > 1e-4     # the steps moved them
    # a run saved on the GPU continues on the CPU from exactly the saved state
    back = Trainer.from_checkpoint(ck_gpu, ds, steps=3)
    assert back.backend.name == "cpu" and back.step == 2
    np.testing.assert_array_equal(back.params, ck_gpu.params)


def test_trainer_on_gpu_refuses_the_mlp():
    from ddpm_ref.data import load_dataset
    cfg = TrainConfig(data="moons", model="mlp", preset="tiny", batch=4, steps=1)
    with pytest.raises(ValueError, match="the GPU backend runs the U-Net"):
        Trainer(cfg, load_dataset("moons", split="train", seed=0), device="gpu")


def test_sampling_with_the_unet_on_gpu_matches_reference():
    net = UNet(**MINI)
    gpu = net.to("gpu")
    p = _params(net, 6)
    sched = Schedule.linear(T=50)
    kw = dict(seed=8, sampler="ddim", num_steps=2, eta=1.0, index_offset=2)
    want = samplers.sample(net.denoiser(p), sched, (1, 4, 4), 2, **kw)
    got = knoise.sample(gpu.denoiser(gpu.backend.asarray(p)), sched, (1, 4, 4), 2, **kw)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(kb.to_host(got), want, rtol=0, atol=1e-4)
    # `ddpm sample --device gpu`: the network on the kernels behind a host-array denoiser
    from ddpm_ref import cli
    x = np.random.default_rng(9).standard_normal((2, 1, 4, 4)).astype(np.float32)
    t = np.array([10, 49])
    host = cli._denoiser(net, p, "gpu")(x, t)
    assert isinstance(host, np.ndarray)
    want = net.denoiser(p)(x, t)
    np.testing.assert_allclose(host, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_backend_record():
    cpu = get_backend("cpu")
    assert cpu.xp is np and not cpu.on_device and get_backend(cpu) is cpu
    from ddpm_ref.ops import conv as ref_conv
    assert cpu.conv is ref_conv
    gpu = get_backend("gpu")
    assert gpu.on_device and gpu.conv is kconv
    with pytest.raises(ValueError, match=r"got 'cuda'"):
        get_backend("cuda")
