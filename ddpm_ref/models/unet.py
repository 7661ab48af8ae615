"""The DDPM U-Net (Ho, Jain & Abbeel 2020, appendix B) as hand-written forward and backward passes.

What it is: the noise-prediction network eps_theta(x_t, t) of the paper (a PixelCNN++-style U-Net
with wide residual blocks, GroupNorm, SiLU, dropout, self-attention at chosen resolutions and the
sinusoidal Transformer timestep embedding fed to every residual block), trained with
L_simple = E || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2 (eq. 14).
Composed from the ops in :mod:`ddpm_ref.ops`, on one flat parameter buffer (:mod:`ddpm_ref.params`).

Layer for layer it is diffusers' ``UNet2DModel`` with
``down_block_types`` = DownBlock2D / AttnDownBlock2D per level (AttnDown where the level's
resolution is in ``attn_resolutions``), the mirror-image ``up_block_types``, ``UNetMidBlock2D``
(resnet, attention, resnet), ``downsample_padding`` 0 (the DDPM downsampler, the default: pad
right/bottom by one, then a 3x3 conv with stride 2 and no padding) or 1 (diffusers' UNet2DModel
default: a 3x3 conv with stride 2 and padding 1 on every side; diffusers' ``Downsample2D``), nearest x2 + 3x3 conv upsampling, ``resnet_time_scale_shift="default"`` (the time embedding is added
after the first convolution of each residual block), ``mid_block_scale_factor=1``,
``flip_sin_to_cos=False, freq_shift=1`` (the DDPM timestep embedding). Parameter names are exactly the
diffusers ``state_dict`` keys with torch shapes, listed in diffusers' registration order (its
``state_dict()`` order: attentions before resnets inside a block, up_blocks before mid_block), so a
state_dict converts one to one (:meth:`UNetConfig.diffusers_kwargs` gives the matching constructor).

What it is not: a framework. There is no autograd; :meth:`UNet.backward` is the forward pass read in
reverse, with ``d``-prefixed gradients and the skip connections summed explicitly.

Backends: every op is called through ``self.backend`` (:mod:`ddpm_ref.backend`): the NumPy reference
ops by default, our CUDA kernels (:mod:`ddpm_ref.kernels`, same names and signatures) after
``net = net.to("gpu")``, on a flat parameter buffer moved with ``net.backend.asarray(params)``. The
same forward and backward code runs on both; the GPU convolutions fuse the time-embedding add and
the residual add into their epilogues (``conv2d_forward(..., temb=, residual=)``), which the reference
op performs as plain adds.

Attention heads: ``head_dim`` is diffusers' ``attention_head_dim``. ``None`` (the paper, and the
released DDPM weights) means one head spanning all channels of each attention layer; an integer
``d`` gives ``channels // d`` heads of size ``d`` in every attention layer.

Initialisation follows the paper's TensorFlow code (diffusion_tf/nn.py): weights of convolutions and
dense layers ~ variance_scaling(1, "fan_avg", "uniform") = U(-a, a) with a = sqrt(3 / ((fan_in +
fan_out) / 2)); the layers that code initialises with scale 1e-10 (the second convolution of every
residual block, the attention output projection, the output convolution) are exact zeros here; biases
0; GroupNorm gamma 1, beta 0. The class embedding (not in the paper) is N(0, 1) as torch's
``nn.Embedding`` and improved-diffusion's ``label_emb``. Every tensor is drawn from
``rng.uniform/normal(seed, Stream.INIT, index=[tensor number in the layout])``, so an initialisation is
a pure function of the seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ddpm_ref import rng
from ddpm_ref.backend import Backend, get_backend
from ddpm_ref.params import ParamLayout, fan_avg_uniform

__all__ = ["UNetConfig", "UNet", "UNET_PRESETS"]


# --------------------------------------------------------------------------------------- config

@dataclass
class UNetConfig:
    """Hyper-parameters of the U-Net (defaults: the paper's CIFAR-10 network).

    ``out_channels`` defaults to ``in_channels``; with ``learned_variance`` the network outputs twice
    that many channels ([eps, v_interp], improved-diffusion). ``num_classes`` (None = unconditional)
    adds a label embedding with ``num_classes + 1`` rows; row ``num_classes`` is "no label" (classifier-
    free guidance). ``num_timesteps`` bounds the accepted t (0 <= t < num_timesteps).
    ``downsample_padding`` is diffusers' ``Downsample2D`` padding: 0 pads (top 0, bottom 1, left 0,
    right 1) before a stride-2 3x3 convolution without padding (the DDPM paper's code, and the default
    here), 1 convolves with padding 1 on all sides (diffusers' UNet2DModel default). On the even
    sizes the U-Net accepts both halve H and W; they differ in which pixels the kernel taps see.
    """

    in_channels: int = 3
    out_channels: Optional[int] = None
    image_size: int = 32
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (16,)
    head_dim: Optional[int] = None
    dropout: float = 0.1
    groups: int = 32
    norm_eps: float = 1e-6
    num_classes: Optional[int] = None
    learned_variance: bool = False
    flip_sin_to_cos: bool = False
    freq_shift: int = 1
    mid_attention: bool = True
    num_timesteps: int = 1000
    downsample_padding: int = 0

    def __post_init__(self):
        for name in ("ch_mult", "attn_resolutions"):      # integers, not truncated floats or strings
            v = getattr(self, name)
            if (not isinstance(v, (tuple, list)) or
                    any(isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, np.integer)) for m in v)):
                raise ValueError(f"{name} must be a tuple of integers, got {v!r}")
            setattr(self, name, tuple(int(m) for m in v))
        for name in ("in_channels", "image_size", "ch", "num_res_blocks", "groups", "num_timesteps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.out_channels is not None and (not isinstance(self.out_channels, (int, np.integer))
                                              or self.out_channels < 1):
            raise ValueError(f"out_channels must be None or a positive integer, got {self.out_channels!r}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive integers, got {self.ch_mult}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not float(self.norm_eps) > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.num_classes is not None and (isinstance(self.num_classes, (bool, np.bool_))
                                             or not isinstance(self.num_classes, (int, np.integer))
                                             or self.num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive integer, got {self.num_classes!r}")
        down = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % down:
            raise ValueError(f"image_size {self.image_size} cannot be halved {len(self.ch_mult) - 1} times "
                             f"(ch_mult {self.ch_mult}); it must be a multiple of {down}")
        for c in self.channels:
            if c % self.groups:
                raise ValueError(f"{c} channels cannot be split into groups={self.groups} GroupNorm groups "
                                 f"(ch {self.ch}, ch_mult {self.ch_mult})")
        if self.head_dim is not None:
            if (isinstance(self.head_dim, (bool, np.bool_)) or not isinstance(self.head_dim, (int, np.integer))
                    or self.head_dim < 1):
                raise ValueError(f"head_dim must be None or a positive integer, got {self.head_dim!r}")
            for c in self._attention_channels():
                if c % self.head_dim:
                    raise ValueError(f"an attention layer with {c} channels cannot be split into heads of "
                                     f"head_dim={self.head_dim}")
        if (isinstance(self.downsample_padding, bool) or not isinstance(self.downsample_padding, (int, np.integer))
                or self.downsample_padding not in (0, 1)):
            raise ValueError(f"downsample_padding must be 0 (pad right/bottom by one, the DDPM downsampler) "
                             f"or 1 (symmetric padding 1, diffusers' default), got {self.downsample_padding!r}")
        self.downsample_padding = int(self.downsample_padding)
        if self.freq_shift >= self.ch // 2:
            raise ValueError(f"freq_shift {self.freq_shift} must be < ch // 2 = {self.ch // 2}")

    # derived quantities -----------------------------------------------------------------
    @property
    def channels(self) -> Tuple[int, ...]:
        """Channels per level: diffusers' ``block_out_channels``."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def model_out_channels(self) -> int:
        """Channels of the network output (doubled with ``learned_variance``)."""
        c = self.in_channels if self.out_channels is None else int(self.out_channels)
        return 2 * c if self.learned_variance else c

    @property
    def temb_dim(self) -> int:
        """Width of the timestep embedding MLP (4 * ch)."""
        return 4 * self.ch

    def resolution(self, level: int) -> int:
        return self.image_size // (2 ** level)

    def level_has_attention(self, level: int) -> bool:
        return self.resolution(level) in self.attn_resolutions

    def _attention_channels(self):
        out = [c for i, c in enumerate(self.channels) if self.level_has_attention(i)]
        if self.mid_attention:
            out.append(self.channels[-1])
        return out

    def heads(self, channels: int) -> int:
        return 1 if self.head_dim is None else channels // self.head_dim

    # serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        # configurations written before downsample_padding existed omit it: they mean 0 (the default)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def diffusers_kwargs(self) -> dict:
        """Keyword arguments for ``diffusers.UNet2DModel`` building the same network."""
        levels = len(self.ch_mult)
        down = ["AttnDownBlock2D" if self.level_has_attention(i) else "DownBlock2D" for i in range(levels)]
        up = ["AttnUpBlock2D" if self.level_has_attention(levels - 1 - i) else "UpBlock2D" for i in range(levels)]
        kw = dict(
            sample_size=self.image_size, in_channels=self.in_channels, out_channels=self.model_out_channels,
            block_out_channels=self.channels, layers_per_block=self.num_res_blocks,
            down_block_types=tuple(down), up_block_types=tuple(up), mid_block_type="UNetMidBlock2D",
            add_attention=self.mid_attention, attention_head_dim=self.head_dim, norm_num_groups=self.groups,
            norm_eps=self.norm_eps, dropout=self.dropout, downsample_padding=self.downsample_padding,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift, time_embedding_type="positional", resnet_time_scale_shift="default",
            mid_block_scale_factor=1, act_fn="silu", center_input_sample=False,
        )
        if self.num_classes is not None:
            kw["num_class_embeds"] = self.num_classes + 1
        return kw


UNET_PRESETS: Dict[str, dict] = {
    # For tests: two levels, attention at 4x4, every block kind present, a few thousand parameters.
    "tiny": dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                 groups=4, dropout=0.1),
    # The embedded 8x8 digits, sized for a ~10-minute CPU run of ~3000 steps at batch 128: 176,849
    # parameters, 2.9 GFLOP of convolutions per training step at batch 128 (ch 32 would be 11.5).
    # No dropout: in a 10-minute run (~2,600 steps) it only slowed learning (DDIM-100 precision /
    # recall 0.857 / 0.880 without it, 0.808 / 0.863 with 0.1 in 1,734 steps of older code), and
    # no sample was a near-copy of a training image either way.
    "digits": dict(in_channels=1, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                   groups=4, dropout=0.0),
    # 1x16x16: ch 32, ch_mult (1, 2), 2 blocks per level, attention at 8x8, 8 groups.
    "small": dict(in_channels=1, image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,),
                  groups=8, dropout=0.1),
    # The paper's CIFAR-10 network: 35,746,307 parameters.
    "cifar": dict(in_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                  attn_resolutions=(16,), groups=32, dropout=0.1),
}
CIFAR_PARAMS = 35_746_307


# --------------------------------------------------------------------------------- small helpers

class _Grads:
    """Writes parameter gradients into named views of one preallocated flat buffer."""

    def __init__(self, layout: ParamLayout, dtype, out=None, xp=np):
        if out is None:
            out = xp.zeros(layout.size, dtype=dtype)
        else:
            layout.check(out, "out")
            out[...] = 0
        self.flat = out
        self.views = layout.named(out)

    def __setitem__(self, name, value):
        self.views[name][...] = value

    def add(self, name, value):
        self.views[name] += value


# ------------------------------------------------------------------------------------------ model

class UNet:
    """The DDPM U-Net on a flat parameter buffer. See the module docstring."""

    def __init__(self, config: Optional[UNetConfig] = None, **kwargs):
        if config is None:
            config = UNetConfig(**kwargs)
        elif isinstance(config, dict):
            config = UNetConfig.from_dict({**config, **kwargs})
        elif kwargs and isinstance(config, UNetConfig):
            config = UNetConfig.from_dict({**config.to_dict(), **kwargs})
        if not isinstance(config, UNetConfig):
            raise ValueError(f"config must be a UNetConfig or dict, got {type(config).__name__}")
        self.config = config
        self._zero_init = set()      # tensors the paper initialises with scale 1e-10 (exact zeros here)
        self._fans: Dict[str, Tuple[int, int]] = {}
        self.layout = ParamLayout(self._build_layout())
        self.num_params = self.layout.size
        self.backend: Backend = get_backend("cpu")

    def to(self, device) -> "UNet":
        """This network on ``device`` (``"cpu"``: the NumPy ops; ``"gpu"``: :mod:`ddpm_ref.kernels`).

        Returns a new UNet sharing the configuration and layout; parameters are a separate flat
        buffer, moved with ``net.backend.asarray(params)``. ``"gpu"`` fails with one clear message
        when CuPy, numba-cuda or a driver is missing (:mod:`ddpm_ref.backend`).
        """
        other = object.__new__(UNet)
        other.__dict__.update(self.__dict__)
        other.backend = get_backend(device)
        return other

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        """A named configuration, fields overridable: ``tiny`` (tests), ``digits`` (1x8x8, the embedded
        data set), ``small`` (1x16x16), ``cifar`` (the paper's 35.7M-parameter network)."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; expected one of {sorted(UNET_PRESETS)}")
        return cls(UNetConfig.from_dict({**UNET_PRESETS[name], **overrides}))

    def __repr__(self) -> str:
        where = "" if self.backend.name == "cpu" else f", on {self.backend.name}"
        return f"UNet({self.config}, {self.num_params} parameters{where})"

    # -------------------------------------------------------------------------------- layout
    def _build_layout(self) -> List[Tuple[str, Tuple[int, ...]]]:
        cfg = self.config
        entries: List[Tuple[str, Tuple[int, ...]]] = []

        def conv(name, cin, cout, k, zero=False, bias=True):
            entries.append((f"{name}.weight", (cout, cin, k, k)))
            self._fans[f"{name}.weight"] = (cin * k * k, cout * k * k)
            if zero:
                self._zero_init.add(f"{name}.weight")
            if bias:
                entries.append((f"{name}.bias", (cout,)))

        def dense(name, cin, cout, zero=False):
            entries.append((f"{name}.weight", (cout, cin)))
            self._fans[f"{name}.weight"] = (cin, cout)
            if zero:
                self._zero_init.add(f"{name}.weight")
            entries.append((f"{name}.bias", (cout,)))

        def norm(name, c):
            entries.append((f"{name}.weight", (c,)))
            entries.append((f"{name}.bias", (c,)))

        def resnet(p, cin, cout):
            norm(f"{p}.norm1", cin)
            conv(f"{p}.conv1", cin, cout, 3)
            dense(f"{p}.time_emb_proj", cfg.temb_dim, cout)
            norm(f"{p}.norm2", cout)
            conv(f"{p}.conv2", cout, cout, 3, zero=True)
            if cin != cout:
                conv(f"{p}.conv_shortcut", cin, cout, 1)

        def attention(p, c):
            norm(f"{p}.group_norm", c)
            dense(f"{p}.to_q", c, c)
            dense(f"{p}.to_k", c, c)
            dense(f"{p}.to_v", c, c)
            dense(f"{p}.to_out.0", c, c, zero=True)

        chans = cfg.channels
        levels = len(chans)
        conv("conv_in", cfg.in_channels, chans[0], 3)
        dense("time_embedding.linear_1", cfg.ch, cfg.temb_dim)
        dense("time_embedding.linear_2", cfg.temb_dim, cfg.temb_dim)
        if cfg.num_classes is not None:
            entries.append(("class_embedding.weight", (cfg.num_classes + 1, cfg.temb_dim)))
        # down path: diffusers' down_blocks
        cout = chans[0]
        for i in range(levels):
            cin, cout = cout, chans[i]
            if cfg.level_has_attention(i):           # diffusers registers attentions before resnets
                for j in range(cfg.num_res_blocks):
                    attention(f"down_blocks.{i}.attentions.{j}", cout)
            for j in range(cfg.num_res_blocks):
                resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
            if i < levels - 1:
                conv(f"down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
        # up path: up_blocks.u works at level i = levels - 1 - u
        rev = list(reversed(chans))
        out_c = rev[0]
        for u in range(levels):
            prev_c, out_c = out_c, rev[u]
            in_c = rev[min(u + 1, levels - 1)]
            level = levels - 1 - u
            n = cfg.num_res_blocks + 1
            if cfg.level_has_attention(level):
                for j in range(n):
                    attention(f"up_blocks.{u}.attentions.{j}", out_c)
            for j in range(n):
                skip_c = in_c if j == n - 1 else out_c
                rin = prev_c if j == 0 else out_c
                resnet(f"up_blocks.{u}.resnets.{j}", rin + skip_c, out_c)
            if u < levels - 1:
                conv(f"up_blocks.{u}.upsamplers.0.conv", out_c, out_c, 3)
        # middle (diffusers registers mid_block after up_blocks)
        c = chans[-1]
        if cfg.mid_attention:
            attention("mid_block.attentions.0", c)
        resnet("mid_block.resnets.0", c, c)
        resnet("mid_block.resnets.1", c, c)
        norm("conv_norm_out", chans[0])
        conv("conv_out", chans[0], cfg.model_out_channels, 3, zero=True)
        return entries

    def named(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """Named views (diffusers state_dict keys, torch shapes) into a flat buffer."""
        return self.layout.named(flat)

    # ------------------------------------------------------------------------------- init
    def init_params(self, seed: int = 0) -> np.ndarray:
        """A fresh flat float32 parameter buffer, initialised as the paper's code (module docstring)."""
        seed = rng.check_seed(seed)
        flat = self.layout.zeros(np.float32)
        views = self.layout.named(flat)
        for k, name in enumerate(self.layout.names):
            shape = self.layout.shapes[name]
            if name == "class_embedding.weight":
                views[name][...] = rng.normal(seed, rng.Stream.INIT, [k], 0, shape)[0]
            elif name in self._fans:
                if name in self._zero_init:
                    continue                                   # TF code: scale 1e-10; here exactly 0
                fan_in, fan_out = self._fans[name]
                views[name][...] = fan_avg_uniform(seed, k, shape, fan_in, fan_out)
            elif name.endswith(".weight"):                    # GroupNorm gamma
                views[name][...] = 1.0
            # biases and GroupNorm beta stay 0
        return flat

    # -------------------------------------------------------------------------- validation
    def _check_inputs(self, params, x, t, y):
        cfg = self.config
        B = self.backend
        self.layout.check(params, "params")
        if B.on_device and B.xp is not np and isinstance(params, np.ndarray):
            raise ValueError("params must be on the GPU for a UNet on the gpu backend (move them with "
                             "net.backend.asarray(params))")
        x = B.asarray(x)                   # a NumPy array passes unchanged on the CPU
        if x.dtype.kind != "f":
            raise ValueError(f"x must be a floating array (data scaled to [-1, 1]), got dtype {x.dtype} "
                             f"with shape {x.shape}")
        if x.ndim != 4:
            raise ValueError(f"x must have shape (N, C, H, W), got rank {x.ndim} shape {x.shape}")
        n, c, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x has {c} channels (shape {x.shape}); this U-Net expects in_channels={cfg.in_channels}")
        down = 2 ** (len(cfg.ch_mult) - 1)
        if h % down or w % down or h == 0 or w == 0:
            raise ValueError(f"spatial size {h}x{w} of x (shape {x.shape}) cannot be halved "
                             f"{len(cfg.ch_mult) - 1} times; height and width must be multiples of {down}")
        t = B.to_host(t)                   # timesteps and labels stay on the host (they are addresses)
        if t.ndim == 0:
            t = np.full((n,), t)
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},) or be a scalar, got {t.shape}")
        if t.dtype.kind not in "iuf":
            raise ValueError(f"t must hold numbers, got dtype {t.dtype}")
        if n and (not np.all(np.isfinite(t)) or t.min() < 0 or t.max() >= cfg.num_timesteps):
            raise ValueError(f"t must lie in [0, {cfg.num_timesteps}), got range [{t.min()}, {t.max()}]")
        if y is not None:
            if cfg.num_classes is None:
                raise ValueError(f"y (shape {np.shape(y)}) was given to an unconditional U-Net (num_classes=None)")
            y = B.to_host(y)
            if y.ndim == 0:
                y = np.full((n,), y)
            if y.shape != (n,) or y.dtype.kind not in "iu":
                raise ValueError(f"y must be an integer array of shape ({n},), got {y.dtype} {y.shape}")
            if n and (y.min() < 0 or y.max() > cfg.num_classes):
                raise ValueError(f"labels y must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = no label), "
                                 f"got range [{y.min()}, {y.max()}]")
        elif cfg.num_classes is not None:
            y = np.full((n,), cfg.num_classes, dtype=np.int64)       # "no label"
        return x.astype(params.dtype, copy=False), t, y

    # ----------------------------------------------------------------------------- blocks
    def _resnet_forward(self, P, p, x, emb_act, layer, run):
        """ResnetBlock2D: h = conv2(dropout(silu(gn2(conv1(silu(gn1(x))) + W temb)))); out = skip(x) + h."""
        cfg, B = self.config, self.backend
        # the projected time embedding and the skip branch are added in the convolutions' epilogues
        # (fused into the kernels on the GPU; plain adds in the reference)
        temb, c_t = B.linear.linear_forward(emb_act, P[f"{p}.time_emb_proj.weight"], P[f"{p}.time_emb_proj.bias"])
        h, c_n1 = B.norm.group_norm_silu_forward(x, P[f"{p}.norm1.weight"], P[f"{p}.norm1.bias"], cfg.groups,
                                                 cfg.norm_eps)
        h, c_c1 = B.conv.conv2d_forward(h, P[f"{p}.conv1.weight"], P[f"{p}.conv1.bias"], 1, 1,
                                        temb=temb)                                   # (N, O, H, W) + temb
        h, c_n2 = B.norm.group_norm_silu_forward(h, P[f"{p}.norm2.weight"], P[f"{p}.norm2.bias"], cfg.groups,
                                                 cfg.norm_eps)
        h, c_d = B.activation.dropout_forward(h, cfg.dropout, run["seed"], run["index"], run["step"], layer,
                                              train=run["train"])
        c_s = None
        if f"{p}.conv_shortcut.weight" in P:
            skip, c_s = B.conv.conv2d_forward(x, P[f"{p}.conv_shortcut.weight"], P[f"{p}.conv_shortcut.bias"], 1, 0)
        else:
            skip = x
        h, c_c2 = B.conv.conv2d_forward(h, P[f"{p}.conv2.weight"], P[f"{p}.conv2.bias"], 1, 1,
                                        residual=skip)                               # out = skip(x) + h
        return h, (c_n1, c_c1, c_t, c_n2, c_d, c_c2, c_s)

    def _resnet_backward(self, G, p, dout, cache):
        """Backward of :meth:`_resnet_forward`: returns (dx, demb_act)."""
        B = self.backend
        c_n1, c_c1, c_t, c_n2, c_d, c_c2, c_s = cache
        # out = skip + h: the gradient reaches both branches unchanged
        if c_s is not None:
            dx_skip, dw, db = B.conv.conv2d_backward(dout, c_s)
            G[f"{p}.conv_shortcut.weight"], G[f"{p}.conv_shortcut.bias"] = dw, db
        else:
            dx_skip = dout
        dh, dw, db = B.conv.conv2d_backward(dout, c_c2)
        G[f"{p}.conv2.weight"], G[f"{p}.conv2.bias"] = dw, db
        dh = B.activation.dropout_backward(dh, c_d)
        dh, dg, db = B.norm.group_norm_silu_backward(dh, c_n2)
        G[f"{p}.norm2.weight"], G[f"{p}.norm2.bias"] = dg, db
        dtemb = dh.sum(axis=(2, 3))                                                    # (N, O)
        demb_act, dw, db = B.linear.linear_backward(dtemb, c_t)
        G[f"{p}.time_emb_proj.weight"], G[f"{p}.time_emb_proj.bias"] = dw, db
        dh, dw, db = B.conv.conv2d_backward(dh, c_c1)
        G[f"{p}.conv1.weight"], G[f"{p}.conv1.bias"] = dw, db
        dx, dg, db = B.norm.group_norm_silu_backward(dh, c_n1)
        G[f"{p}.norm1.weight"], G[f"{p}.norm1.bias"] = dg, db
        dx += dx_skip                                                                  # the residual branch
        return dx, demb_act

    def _attention_forward(self, P, p, x):
        """diffusers Attention (group_norm, residual): out = x + W_o softmax(q k^T / sqrt(d)) v (per head)."""
        cfg, B = self.config, self.backend
        n, c, hh, ww = x.shape
        L = hh * ww
        nh = cfg.heads(c)
        d = c // nh
        h, c_n = B.norm.group_norm_forward(x, P[f"{p}.group_norm.weight"], P[f"{p}.group_norm.bias"],
                                          cfg.groups, cfg.norm_eps)                   # (N, C, H, W)
        h = h.reshape(n, c, L).transpose(0, 2, 1)                                      # (N, L, C)
        w_qkv = B.xp.concatenate([P[f"{p}.to_q.weight"], P[f"{p}.to_k.weight"], P[f"{p}.to_v.weight"]])  # (3C, C)
        b_qkv = B.xp.concatenate([P[f"{p}.to_q.bias"], P[f"{p}.to_k.bias"], P[f"{p}.to_v.bias"]])        # (3C,)
        qkv, c_qkv = B.linear.linear_forward(h, w_qkv, b_qkv)                              # (N, L, 3C)
        # (N, L, 3, nh, d) -> (3, N, nh, L, d) -> three (N*nh, L, d)
        qkv = qkv.reshape(n, L, 3, nh, d).transpose(2, 0, 3, 1, 4)
        q = B.xp.ascontiguousarray(qkv[0]).reshape(n * nh, L, d)
        k = B.xp.ascontiguousarray(qkv[1]).reshape(n * nh, L, d)
        v = B.xp.ascontiguousarray(qkv[2]).reshape(n * nh, L, d)
        del qkv
        a, c_a = B.attention.attention_forward(q, k, v)                                      # (N*nh, L, d)
        a = a.reshape(n, nh, L, d).transpose(0, 2, 1, 3).reshape(n, L, c)              # (N, L, C)
        o, c_o = B.linear.linear_forward(a, P[f"{p}.to_out.0.weight"], P[f"{p}.to_out.0.bias"])  # (N, L, C)
        out = o.transpose(0, 2, 1).reshape(n, c, hh, ww) + x                           # residual_connection
        return out, (c_n, c_qkv, c_a, c_o, (n, c, hh, ww, nh, d))

    def _attention_backward(self, G, p, dout, cache):
        """Backward of :meth:`_attention_forward`: returns dx."""
        B = self.backend
        c_n, c_qkv, c_a, c_o, (n, c, hh, ww, nh, d) = cache
        L = hh * ww
        do = dout.reshape(n, c, L).transpose(0, 2, 1)                                  # (N, L, C)
        da, dw, db = B.linear.linear_backward(do, c_o)
        G[f"{p}.to_out.0.weight"], G[f"{p}.to_out.0.bias"] = dw, db
        da = da.reshape(n, L, nh, d).transpose(0, 2, 1, 3).reshape(n * nh, L, d)      # (N*nh, L, d)
        dq, dk, dv = B.attention.attention_backward(B.xp.ascontiguousarray(da), c_a)
        del da
        dqkv = B.xp.empty((n, L, 3, nh, d), dtype=dout.dtype)                            # (N, L, 3, nh, d)
        for j, g in enumerate((dq, dk, dv)):
            dqkv[:, :, j] = g.reshape(n, nh, L, d).transpose(0, 2, 1, 3)
        del dq, dk, dv
        dh, dw, db = B.linear.linear_backward(dqkv.reshape(n, L, 3 * c), c_qkv)           # (N, L, C)
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            G[f"{p}.{name}.weight"] = dw[j * c:(j + 1) * c]
            G[f"{p}.{name}.bias"] = db[j * c:(j + 1) * c]
        dh = dh.transpose(0, 2, 1).reshape(n, c, hh, ww)                               # (N, C, H, W)
        dx, dg, db = B.norm.group_norm_backward(B.xp.ascontiguousarray(dh), c_n)
        G[f"{p}.group_norm.weight"], G[f"{p}.group_norm.bias"] = dg, db
        dx += dout                                                                     # residual_connection
        return dx

    # ---------------------------------------------------------------------------- forward
    def forward(self, params: np.ndarray, x: np.ndarray, t, y=None, train: bool = False, seed: int = 0,
                index=None, step: int = 0, keep_cache: bool = True):
        """eps_theta(x_t, t[, y]) (or x0 / v, and the variance interpolation with learned variance).

        params: flat buffer (its dtype is the compute dtype: float32 to train, float64 for gradient
        checks); x (N, C, H, W) floating; t (N,) timesteps in [0, num_timesteps); y (N,) labels in
        [0, num_classes] or None ("no label" for a class-conditional model). train switches dropout
        on; its masks are addressed by (seed, Stream.DROPOUT, index, step, sub = dropout layer number),
        index defaulting to arange(N); the dropout layers (one per residual block) are numbered 0, 1,
        ... in forward order (down blocks, middle, up blocks). Returns (out (N, model_out_channels, H, W), cache); the cache is
        None when keep_cache is False (inference).
        """
        cfg, B = self.config, self.backend
        x, t, y = self._check_inputs(params, x, t, y)
        n = x.shape[0]
        if index is None:
            index = np.arange(n, dtype=np.int64)
        index = B.to_host(index)
        if index.shape != (n,):
            raise ValueError(f"index must have shape ({n},), got {index.shape}")
        run = dict(seed=seed, index=index, step=step, train=bool(train))
        P = self.layout.named(params)
        dtype = params.dtype
        caches = [] if keep_cache else None

        def keep(c):
            if caches is not None:
                caches.append(c)

        # timestep embedding (DDPM appendix B: Transformer sinusoidal embedding, 2-layer MLP) ---------
        temb0 = B.embedding.timestep_embedding(t, cfg.ch, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                        freq_shift=cfg.freq_shift).astype(dtype, copy=False)      # (N, ch)
        e, c1 = B.linear.linear_forward(temb0, P["time_embedding.linear_1.weight"], P["time_embedding.linear_1.bias"])
        e, c2 = B.activation.silu_forward(e)
        emb, c3 = B.linear.linear_forward(e, P["time_embedding.linear_2.weight"], P["time_embedding.linear_2.bias"])
        c4 = None
        if cfg.num_classes is not None:
            lab, c4 = B.embedding.embedding_forward(y, P["class_embedding.weight"])            # (N, temb)
            emb = emb + lab
        # every residual block applies silu to emb before its projection: compute it once, share it
        emb_act, c5 = B.activation.silu_forward(emb)                                           # (N, temb)
        keep((c1, c2, c3, c4, c5))

        # down path: each step produces one skip tensor hs[k] ---------------------------------------
        h, c = B.conv.conv2d_forward(x, P["conv_in.weight"], P["conv_in.bias"], 1, 1)   # (N, ch, H, W)
        keep(c)
        hs = [h]
        layer = 0
        levels = len(cfg.ch_mult)
        down_pad = (0, 1, 0, 1) if cfg.downsample_padding == 0 else 1
        for i in range(levels):
            attn = cfg.level_has_attention(i)
            for j in range(cfg.num_res_blocks):
                h, c = self._resnet_forward(P, f"down_blocks.{i}.resnets.{j}", h, emb_act, layer, run)
                layer += 1
                keep(c)
                if attn:
                    h, c = self._attention_forward(P, f"down_blocks.{i}.attentions.{j}", h)
                    keep(c)
                hs.append(h)
            if i < levels - 1:
                # Downsample2D(padding=0): pad (top 0, bottom 1, left 0, right 1), 3x3 conv, stride 2;
                # Downsample2D(padding=1): 3x3 conv, stride 2, padding 1 on every side
                h, c = B.conv.conv2d_forward(h, P[f"down_blocks.{i}.downsamplers.0.conv.weight"],
                                            P[f"down_blocks.{i}.downsamplers.0.conv.bias"], 2, down_pad)
                keep(c)
                hs.append(h)

        # middle ------------------------------------------------------------------------------------
        h, c = self._resnet_forward(P, "mid_block.resnets.0", h, emb_act, layer, run)
        layer += 1
        keep(c)
        if cfg.mid_attention:
            h, c = self._attention_forward(P, "mid_block.attentions.0", h)
            keep(c)
        h, c = self._resnet_forward(P, "mid_block.resnets.1", h, emb_act, layer, run)
        layer += 1
        keep(c)

        # up path: concatenate [h, skip] before each residual block ------------------------------
        for u in range(levels):
            level = levels - 1 - u
            attn = cfg.level_has_attention(level)
            for j in range(cfg.num_res_blocks + 1):
                h, c = B.resample.concat_forward([h, hs.pop()], axis=1)                      # (N, Ch + Cs, H, W)
                keep(c)
                h, c = self._resnet_forward(P, f"up_blocks.{u}.resnets.{j}", h, emb_act, layer, run)
                layer += 1
                keep(c)
                if attn:
                    h, c = self._attention_forward(P, f"up_blocks.{u}.attentions.{j}", h)
                    keep(c)
            if u < levels - 1:
                h, c1 = B.resample.upsample_nearest2x_forward(h)                             # (N, C, 2H, 2W)
                h, c2 = B.conv.conv2d_forward(h, P[f"up_blocks.{u}.upsamplers.0.conv.weight"],
                                             P[f"up_blocks.{u}.upsamplers.0.conv.bias"], 1, 1)
                keep((c1, c2))

        # output ------------------------------------------------------------------------------------
        h, c1 = B.norm.group_norm_silu_forward(h, P["conv_norm_out.weight"], P["conv_norm_out.bias"], cfg.groups, cfg.norm_eps)
        out, c2 = B.conv.conv2d_forward(h, P["conv_out.weight"], P["conv_out.bias"], 1, 1)  # (N, out, H, W)
        keep((c1, c2))
        if caches is None:
            return out, None
        return out, {"caches": caches, "dtype": dtype, "x_shape": x.shape}

    # --------------------------------------------------------------------------- backward
    def backward(self, dout: np.ndarray, cache: dict, return_dx: bool = False, out: Optional[np.ndarray] = None):
        """Gradients of a scalar loss w.r.t. every parameter (flat layout), given dL/d(out).

        The forward pass read in reverse. The cache is consumed (each layer's cache is dropped as
        soon as its backward has run), so one cache serves one backward. ``out`` may be a
        preallocated flat buffer to write into. Returns dparams, or (dparams, dx) with return_dx.
        """
        if cache is None or "caches" not in cache:
            raise ValueError("backward needs the cache of a forward(..., keep_cache=True) call")
        cfg, B = self.config, self.backend
        caches = cache["caches"]
        if not caches:
            raise ValueError("this cache has already been consumed by a backward pass")
        dtype = cache["dtype"]
        dout = B.asarray(dout)
        n, _, H, W = cache["x_shape"]
        if dout.shape != (n, cfg.model_out_channels, H, W):
            raise ValueError(f"dout must have shape {(n, cfg.model_out_channels, H, W)}, got {dout.shape}")
        dout = dout.astype(dtype, copy=False)
        G = _Grads(self.layout, dtype, out, B.xp)
        demb_act = B.xp.zeros((n, cfg.temb_dim), dtype=dtype)                            # (N, temb)

        def resnet_bwd(p, dh):
            dx, de = self._resnet_backward(G, p, dh, caches.pop())
            demb_act[...] += de                                                        # emb_act feeds every block
            return dx

        # output
        c1, c2 = caches.pop()
        dh, dw, db = B.conv.conv2d_backward(dout, c2)
        G["conv_out.weight"], G["conv_out.bias"] = dw, db
        dh, dg, db = B.norm.group_norm_silu_backward(dh, c1)
        G["conv_norm_out.weight"], G["conv_norm_out.bias"] = dg, db

        # up path in reverse: each concat hands back the gradient of one skip tensor
        levels = len(cfg.ch_mult)
        dskips = []                                                                    # in pop order reversed
        for u in reversed(range(levels)):
            level = levels - 1 - u
            attn = cfg.level_has_attention(level)
            if u < levels - 1:
                c1, c2 = caches.pop()
                dh, dw, db = B.conv.conv2d_backward(dh, c2)
                G[f"up_blocks.{u}.upsamplers.0.conv.weight"], G[f"up_blocks.{u}.upsamplers.0.conv.bias"] = dw, db
                dh = B.resample.upsample_nearest2x_backward(dh, c1)
            for j in reversed(range(cfg.num_res_blocks + 1)):
                if attn:
                    dh = self._attention_backward(G, f"up_blocks.{u}.attentions.{j}", dh, caches.pop())
                dh = resnet_bwd(f"up_blocks.{u}.resnets.{j}", dh)
                dh, dskip = B.resample.concat_backward(dh, caches.pop())
                dskips.append(dskip)
        # dskips[0] belongs to hs[0] (the last one popped), dskips[-1] to hs[-1]

        # middle
        dh = resnet_bwd("mid_block.resnets.1", dh)
        if cfg.mid_attention:
            dh = self._attention_backward(G, "mid_block.attentions.0", dh, caches.pop())
        dh = resnet_bwd("mid_block.resnets.0", dh)

        # down path in reverse: before stepping back through the layer that made hs[k], add the
        # gradient that hs[k] received through its skip connection
        for i in reversed(range(levels)):
            attn = cfg.level_has_attention(i)
            if i < levels - 1:
                dh = dh + dskips.pop()
                p = f"down_blocks.{i}.downsamplers.0.conv"
                dh, dw, db = B.conv.conv2d_backward(dh, caches.pop())
                G[f"{p}.weight"], G[f"{p}.bias"] = dw, db
            for j in reversed(range(cfg.num_res_blocks)):
                dh = dh + dskips.pop()
                if attn:
                    dh = self._attention_backward(G, f"down_blocks.{i}.attentions.{j}", dh, caches.pop())
                dh = resnet_bwd(f"down_blocks.{i}.resnets.{j}", dh)
        dh = dh + dskips.pop()
        dx, dw, db = B.conv.conv2d_backward(dh, caches.pop())
        G["conv_in.weight"], G["conv_in.bias"] = dw, db
        assert not dskips

        # timestep embedding in reverse
        c1, c2, c3, c4, c5 = caches.pop()
        assert not caches
        demb = B.activation.silu_backward(demb_act, c5)                                        # (N, temb)
        if c4 is not None:
            G["class_embedding.weight"] = B.embedding.embedding_backward(demb, c4)
        de, dw, db = B.linear.linear_backward(demb, c3)
        G["time_embedding.linear_2.weight"], G["time_embedding.linear_2.bias"] = dw, db
        de = B.activation.silu_backward(de, c2)
        _, dw, db = B.linear.linear_backward(de, c1)
        G["time_embedding.linear_1.weight"], G["time_embedding.linear_1.bias"] = dw, db
        if return_dx:
            return G.flat, dx
        return G.flat

    # --------------------------------------------------------------------------- denoiser
    def denoiser(self, params: np.ndarray):
        """``f(x, t, y=None) -> model_output`` for the samplers (eval mode, no cache kept)."""
        self.layout.check(params, "params")

        def f(x, t, y=None):
            return self.forward(params, x, t, y, train=False, keep_cache=False)[0]

        return f
