"""PyTorch autograd as an outside oracle for the hand-written U-Net and MLP backward passes.

The U-Net's flat buffer is loaded (strict=True, one to one by name) into diffusers' UNet2DModel built
from ``UNetConfig.diffusers_kwargs()``; the forward output, every parameter gradient and the input
gradient of L = sum(R * out) are compared in float32. The MLP is compared with a torch twin written
here (same parameter names). Test-only dependency: without torch/diffusers these tests skip.

Tolerances (float32, unit roundoff 6e-8): outputs agree to 1e-4 of their largest magnitude, gradients
per tensor to 1e-3 of that tensor's largest magnitude plus 1e-5 of the largest gradient anywhere.
Both sides sum the same terms in different orders (GEMM blocking, GroupNorm reductions over up to
~1e4 elements), which moves results by up to ~1e-5 relative; the absolute floor covers gradients
that are exactly zero in exact arithmetic (the key bias: softmax ignores a per-row constant) and are
float32 noise on both sides.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install -e .[test])")
diffusers = pytest.importorskip("diffusers", reason="the U-Net oracle needs diffusers (pip install -e .[test])")

from ddpm_ref.models import MLP, UNet  # noqa: E402

torch.set_num_threads(1)


def _torch_unet(model, params):
    net = diffusers.UNet2DModel(**model.config.diffusers_kwargs())
    sd = {k: torch.from_numpy(v.copy()) for k, v in model.named(params).items()}
    net.load_state_dict(sd, strict=True)           # raises if a name or shape differs
    net.eval()                                     # dropout off, as forward(train=False)
    return net


def _compare_grads(named_ours, torch_named_params):
    gmax = max(float(p.grad.abs().max()) for _, p in torch_named_params)
    seen = set()
    for name, p in torch_named_params:
        ref = p.grad.numpy()
        err = np.abs(named_ours[name] - ref).max()
        assert err <= 1e-3 * np.abs(ref).max() + 1e-5 * gmax, (name, err, np.abs(ref).max())
        seen.add(name)
    assert seen == set(named_ours)                  # every tensor compared


CONFIGS = {
    "attention, one head": ("tiny", dict()),
    "labels, learned variance, 4 heads": ("tiny", dict(num_classes=5, learned_variance=True, head_dim=4)),
    "no attention, 3 levels, 3 channels": ("tiny", dict(in_channels=3, ch_mult=(1, 2, 2), num_res_blocks=2,
                                                        attn_resolutions=(), mid_attention=False)),
    "small preset": ("small", dict()),
    # diffusers' default downsampler (symmetric padding 1, stride 2) at two downsamplings, one with attention
    "downsample_padding=1, 3 levels": ("tiny", dict(ch_mult=(1, 2, 2), attn_resolutions=(4,), downsample_padding=1,
                                                    num_classes=5)),
}


@pytest.mark.parametrize("label", list(CONFIGS))
def test_unet_matches_diffusers_forward_and_all_gradients(label):
    preset, kw = CONFIGS[label]
    model = UNet.from_preset(preset, **kw)          # dropout 0.1 in the config, eval mode: identity
    cfg = model.config
    rs = np.random.default_rng(0)
    p = model.init_params(0)
    p += 0.1 * rs.standard_normal(p.shape).astype(np.float32)      # wake the zero-initialised layers
    n = 3
    x = rs.standard_normal((n, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    t = np.array([0, 123, 999])
    y = np.array([0, 4, 5]) if cfg.num_classes else None           # 5 = "no label"
    net = _torch_unet(model, p)
    out, cache = model.forward(p, x, t, y)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    ref = net(xt, torch.from_numpy(t), class_labels=None if y is None else torch.from_numpy(y)).sample
    ref_np = ref.detach().numpy()
    assert out.shape == ref_np.shape
    assert np.abs(out - ref_np).max() <= 1e-4 * np.abs(ref_np).max()
    R = rs.standard_normal(out.shape).astype(np.float32)
    (ref * torch.from_numpy(R)).sum().backward()
    g, dx = model.backward(R, cache, return_dx=True)
    _compare_grads(model.named(g), list(net.named_parameters()))
    ref_dx = xt.grad.numpy()
    assert np.abs(dx - ref_dx).max() <= 1e-3 * np.abs(ref_dx).max()


def test_cifar_layout_is_diffusers_ddpm_cifar10():
    """Names, shapes, order and count of the cifar preset against diffusers' UNet2DModel built on the
    meta device (no memory): the released DDPM CIFAR-10 configuration, 35,746,307 parameters."""
    model = UNet.from_preset("cifar")
    kw = model.config.diffusers_kwargs()
    assert kw["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert kw["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    with torch.device("meta"):
        net = diffusers.UNet2DModel(**kw)
    ref = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert ref == model.layout.to_list()            # same names, shapes and registration order
    assert sum(v.numel() for v in net.parameters()) == model.num_params == 35_746_307


class _TorchMLP(torch.nn.Module):
    """The MLP of ddpm_ref/models/mlp.py written in torch (independent twin, same parameter names)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        E, Hd = cfg.emb_dim, cfg.hidden
        self.input = torch.nn.Linear(cfg.dim * E + E, Hd)
        if cfg.num_classes is not None:
            self.class_embedding = torch.nn.Embedding(cfg.num_classes + 1, E)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(dict(linear_1=torch.nn.Linear(Hd, Hd),
                                                                   linear_2=torch.nn.Linear(Hd, Hd)))
                                          for _ in range(cfg.num_blocks))
        self.output = torch.nn.Linear(Hd, cfg.out_dim)

    @staticmethod
    def _sincos(v, dim):                          # diffusers get_timestep_embedding, freq_shift 1
        half = dim // 2
        freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        e = v[:, None] * freqs[None]
        return torch.cat([torch.sin(e), torch.cos(e)], dim=1)

    def forward(self, x, t, y):
        n, d = x.shape
        fx = self._sincos((self.cfg.x_scale * x).reshape(-1), self.cfg.emb_dim).reshape(n, -1)
        ft = self._sincos(t.float(), self.cfg.emb_dim)
        if self.cfg.num_classes is not None:
            ft = ft + self.class_embedding(y)
        h = self.input(torch.cat([fx, ft], dim=1))
        for b in self.blocks:
            h = h + b["linear_2"](torch.nn.functional.silu(b["linear_1"](torch.nn.functional.silu(h))))
        return self.output(torch.nn.functional.silu(h))


@pytest.mark.parametrize("kw", [dict(), dict(num_classes=3, learned_variance=True)])
def test_mlp_matches_a_torch_twin(kw):
    model = MLP.from_preset("toy", **kw)
    rs = np.random.default_rng(3)
    p = model.init_params(1)
    p += 0.05 * rs.standard_normal(p.shape).astype(np.float32)
    net = _TorchMLP(model.config)
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.named(p).items()}, strict=True)
    n = 64
    x = rs.standard_normal((n, 2)).astype(np.float32)
    t = rs.integers(0, 1000, n)
    y = rs.integers(0, 4, n) if kw else None
    out, cache = model.forward(p, x, t, y)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    ref = net(xt, torch.from_numpy(t), None if y is None else torch.from_numpy(y))
    ref_np = ref.detach().numpy()
    # sin/cos of arguments up to x_scale * |x| ~ 100 in float32: ~1e-5 absolute differences between
    # libm implementations, amplified by the first layer; 1e-4 of the output scale is the tolerance
    assert np.abs(out - ref_np).max() <= 1e-4 * np.abs(ref_np).max()
    R = rs.standard_normal(out.shape).astype(np.float32)
    (ref * torch.from_numpy(R)).sum().backward()
    g, dx = model.backward(R, cache, return_dx=True)
    _compare_grads(model.named(g), list(net.named_parameters()))
    assert np.abs(dx - xt.grad.numpy()).max() <= 1e-3 * np.abs(xt.grad.numpy()).max()
