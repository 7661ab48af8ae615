"""A small residual-MLP denoiser for low-dimensional data (the 2-D toy sets).

What it is: eps_theta(x_t, t) for x in R^D (D = 2 for the toys), trained with the same L_simple
(DDPM eq. 14) as the U-Net and with the same surface (``forward`` / ``backward`` / ``init_params`` /
``named`` / ``denoiser`` on one flat buffer), so the training loop and the samplers take either.
What it is not: a U-Net, and not from the paper (the DDPM paper has no toy network); its shape follows
the common 2-D toy denoisers (e.g. tiny-diffusion): sinusoidal features of each coordinate, a
sinusoidal timestep embedding, residual MLP blocks.

Network, shapes for a batch of N (E = emb_dim, Hd = hidden)::

    fx   = [sin, cos](x_scale * x_d * freqs)  per coordinate          (N, D*E)
    ft   = timestep_embedding(t, E) (+ class_embedding[y])             (N, E)
    h    = input(concat[fx, ft])                                       (N, Hd)
           (with x_raw: input(concat[fx, x, ft]), the raw coordinates too: (N, D*E + D + E) in)
    h    = h + linear_2(dropout(silu(linear_1(silu(h)))))  x num_blocks (pre-activation residual blocks)
    out  = output(silu(h))                                             (N, D or 2D)

No normalisation layer (the toys are standardised to unit variance and the network is shallow; the
residual branches start at zero, so the initial network is a well-conditioned linear-in-features map).
The frequencies are those of the Transformer embedding (``timestep_embedding`` with freq_shift=1),
``x_scale`` (default 25) stretching them over the unit-scale data: the features then have periods
from 0.25 up to ~2.5e4, so the lowest few hardly vary over the data (sin(w x) ~ w x with w ~ 1e-2
is a tiny signal); ``x_raw`` adds the coordinates themselves at full scale. Initialisation as the U-Net
(TF DDPM variance_scaling(1, fan_avg, uniform); the last layer of each residual branch and the output
layer zeros; biases zero; class embedding N(0, 1)), drawn from ``rng`` Stream.INIT by tensor number.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from ddpm_ref import rng
from ddpm_ref.params import ParamLayout, fan_avg_uniform
from ddpm_ref.ops import activation as _act
from ddpm_ref.ops import embedding as _emb
from ddpm_ref.ops import linear as _lin
from ddpm_ref.ops import resample as _res

__all__ = ["MLPConfig", "MLP", "MLP_PRESETS"]


@dataclass
class MLPConfig:
    """Hyper-parameters of the MLP denoiser. ``num_classes`` / ``learned_variance`` as in UNetConfig."""

    dim: int = 2
    hidden: int = 128
    num_blocks: int = 3
    emb_dim: int = 32
    x_scale: float = 25.0
    x_raw: bool = False            # absent from older configs: False, their layout
    dropout: float = 0.0
    num_classes: Optional[int] = None
    learned_variance: bool = False
    num_timesteps: int = 1000

    def __post_init__(self):
        for name in ("dim", "hidden", "num_blocks", "emb_dim", "num_timesteps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.emb_dim % 2 or self.emb_dim < 4:
            raise ValueError(f"emb_dim must be even and >= 4, got {self.emb_dim}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not float(self.x_scale) > 0:
            raise ValueError(f"x_scale must be > 0, got {self.x_scale}")
        if not isinstance(self.x_raw, (bool, np.bool_)):
            raise ValueError(f"x_raw must be True or False, got {self.x_raw!r}")
        if self.num_classes is not None and (isinstance(self.num_classes, (bool, np.bool_))
                                             or not isinstance(self.num_classes, (int, np.integer))
                                             or self.num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive integer, got {self.num_classes!r}")

    @property
    def in_features(self) -> int:
        """Width of the input layer: D*E sinusoidal features, D raw coordinates with x_raw, E for t."""
        return self.dim * self.emb_dim + (self.dim if self.x_raw else 0) + self.emb_dim

    @property
    def out_dim(self) -> int:
        return 2 * self.dim if self.learned_variance else self.dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MLPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MLPConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


MLP_PRESETS: Dict[str, dict] = {
    # 2-D toys: 111,746 parameters; forward + backward at batch 256 measured at 25 ms on one thread
    # of a heavily shared 2-core machine.
    "toy": dict(dim=2, hidden=128, num_blocks=3, emb_dim=32, x_scale=25.0),
    # For tests.
    "tiny": dict(dim=2, hidden=16, num_blocks=2, emb_dim=8, x_scale=4.0),
}


class MLP:
    """Residual-MLP denoiser on a flat parameter buffer (see the module docstring)."""

    def __init__(self, config: Optional[MLPConfig] = None, **kwargs):
        if config is None:
            config = MLPConfig(**kwargs)
        elif isinstance(config, dict):
            config = MLPConfig.from_dict({**config, **kwargs})
        elif kwargs:
            config = MLPConfig.from_dict({**config.to_dict(), **kwargs})
        if not isinstance(config, MLPConfig):
            raise ValueError(f"config must be an MLPConfig or dict, got {type(config).__name__}")
        self.config = cfg = config
        E, Hd = cfg.emb_dim, cfg.hidden
        entries = [("input.weight", (Hd, cfg.in_features)), ("input.bias", (Hd,))]
        if cfg.num_classes is not None:
            entries.append(("class_embedding.weight", (cfg.num_classes + 1, E)))
        for i in range(cfg.num_blocks):
            entries += [(f"blocks.{i}.linear_1.weight", (Hd, Hd)), (f"blocks.{i}.linear_1.bias", (Hd,)),
                        (f"blocks.{i}.linear_2.weight", (Hd, Hd)), (f"blocks.{i}.linear_2.bias", (Hd,))]
        entries += [("output.weight", (cfg.out_dim, Hd)), ("output.bias", (cfg.out_dim,))]
        self.layout = ParamLayout(entries)
        self.num_params = self.layout.size
        self._zero_init = {f"blocks.{i}.linear_2.weight" for i in range(cfg.num_blocks)} | {"output.weight"}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MLP":
        """``toy`` (the 2-D toy sets) or ``tiny`` (tests), fields overridable."""
        if name not in MLP_PRESETS:
            raise ValueError(f"unknown MLP preset {name!r}; expected one of {sorted(MLP_PRESETS)}")
        return cls(MLPConfig.from_dict({**MLP_PRESETS[name], **overrides}))

    def __repr__(self) -> str:
        return f"MLP({self.config}, {self.num_params} parameters)"

    def named(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        return self.layout.named(flat)

    def init_params(self, seed: int = 0) -> np.ndarray:
        """Fresh flat float32 parameters (module docstring), a pure function of ``seed``."""
        seed = rng.check_seed(seed)
        flat = self.layout.zeros(np.float32)
        views = self.layout.named(flat)
        for k, name in enumerate(self.layout.names):
            shape = self.layout.shapes[name]
            if name == "class_embedding.weight":
                views[name][...] = rng.normal(seed, rng.Stream.INIT, [k], 0, shape)[0]
            elif name.endswith(".weight") and name not in self._zero_init:
                fan_out, fan_in = shape
                views[name][...] = fan_avg_uniform(seed, k, shape, fan_in, fan_out)
        return flat

    def _check_inputs(self, params, x, t, y):
        cfg = self.config
        self.layout.check(params, "params")
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise ValueError(f"x must be a floating array, got dtype {x.dtype} with shape {x.shape}")
        if x.ndim != 2 or x.shape[1] != cfg.dim:
            raise ValueError(f"x must have shape (N, {cfg.dim}), got rank {x.ndim} shape {x.shape}")
        n = x.shape[0]
        t = np.asarray(t)
        if t.ndim == 0:
            t = np.full((n,), t)
        if t.shape != (n,) or t.dtype.kind not in "iuf":
            raise ValueError(f"t must be a numeric array of shape ({n},) or a scalar, got {t.dtype} {t.shape}")
        if n and (not np.all(np.isfinite(t)) or t.min() < 0 or t.max() >= cfg.num_timesteps):
            raise ValueError(f"t must lie in [0, {cfg.num_timesteps}), got range [{t.min()}, {t.max()}]")
        if y is not None:
            if cfg.num_classes is None:
                raise ValueError(f"y (shape {np.shape(y)}) was given to an unconditional MLP (num_classes=None)")
            y = np.asarray(y)
            if y.ndim == 0:
                y = np.full((n,), y)
            if y.shape != (n,) or y.dtype.kind not in "iu":
                raise ValueError(f"y must be an integer array of shape ({n},), got {y.dtype} {y.shape}")
            if n and (y.min() < 0 or y.max() > cfg.num_classes):
                raise ValueError(f"labels y must lie in [0, {cfg.num_classes}], got range [{y.min()}, {y.max()}]")
        elif cfg.num_classes is not None:
            y = np.full((n,), cfg.num_classes, dtype=np.int64)
        return x.astype(params.dtype, copy=False), t, y

    def forward(self, params, x, t, y=None, train: bool = False, seed: int = 0, index=None, step: int = 0,
                keep_cache: bool = True):
        """Model output (N, dim) or (N, 2*dim) with learned variance; returns (out, cache).

        Dropout masks (when dropout > 0 and train) are addressed by (seed, Stream.DROPOUT, index, step,
        sub = block number), index defaulting to arange(N).
        """
        cfg = self.config
        x, t, y = self._check_inputs(params, x, t, y)
        n = x.shape[0]
        dtype = params.dtype
        index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index)
        if index.shape != (n,):
            raise ValueError(f"index must have shape ({n},), got {index.shape}")
        P = self.layout.named(params)
        E = cfg.emb_dim
        fx, c_fx = _emb.sinusoidal_forward(x, E, scale=cfg.x_scale)                      # (N, D, E)
        fx = fx.reshape(n, cfg.dim * E)                                                  # (N, D*E)
        ft = _emb.timestep_embedding(t, E).astype(dtype, copy=False)                     # (N, E)
        c_y = None
        if cfg.num_classes is not None:
            lab, c_y = _emb.embedding_forward(y, P["class_embedding.weight"])            # (N, E)
            ft = ft + lab
        parts = [fx, x, ft] if cfg.x_raw else [fx, ft]
        f, c_cat = _res.concat_forward(parts, axis=1)                                    # (N, in_features)
        h, c_in = _lin.linear_forward(f, P["input.weight"], P["input.bias"])             # (N, Hd)
        blocks = []
        for i in range(cfg.num_blocks):
            p = f"blocks.{i}"
            r, c1 = _act.silu_forward(h)
            r, c2 = _lin.linear_forward(r, P[f"{p}.linear_1.weight"], P[f"{p}.linear_1.bias"])
            r, c3 = _act.silu_forward(r)
            r, c4 = _act.dropout_forward(r, cfg.dropout, seed, index, step, i, train=bool(train))
            r, c5 = _lin.linear_forward(r, P[f"{p}.linear_2.weight"], P[f"{p}.linear_2.bias"])
            h = h + r                                                                    # residual
            blocks.append((c1, c2, c3, c4, c5))
        a, c_a = _act.silu_forward(h)
        out, c_out = _lin.linear_forward(a, P["output.weight"], P["output.bias"])        # (N, out_dim)
        if not keep_cache:
            return out, None
        return out, {"caches": [c_fx, c_y, c_cat, c_in, blocks, c_a, c_out], "dtype": dtype, "n": n}

    def backward(self, dout, cache, return_dx: bool = False, out: Optional[np.ndarray] = None):
        """The forward pass in reverse: flat dparams (and dx with return_dx)."""
        if cache is None or "caches" not in cache or cache["caches"] is None:
            raise ValueError("backward needs the cache of a forward(..., keep_cache=True) call (used once)")
        cfg = self.config
        n, dtype = cache["n"], cache["dtype"]
        dout = np.asarray(dout)
        if dout.shape != (n, cfg.out_dim):           # checked before the cache is used up: a retry works
            raise ValueError(f"dout must have shape ({n}, {cfg.out_dim}), got {dout.shape}")
        c_fx, c_y, c_cat, c_in, blocks, c_a, c_out = cache["caches"]
        cache["caches"] = None
        dout = dout.astype(dtype, copy=False)
        if out is None:
            grad = self.layout.zeros(dtype)
        else:
            grad = self.layout.check(out, "out")
            grad[...] = 0
        G = self.layout.named(grad)
        da, G["output.weight"][...], G["output.bias"][...] = _lin.linear_backward(dout, c_out)
        dh = _act.silu_backward(da, c_a)
        for i in reversed(range(cfg.num_blocks)):
            p = f"blocks.{i}"
            c1, c2, c3, c4, c5 = blocks.pop()
            # h_out = h + r: dh reaches the residual branch and passes through unchanged
            dr, G[f"{p}.linear_2.weight"][...], G[f"{p}.linear_2.bias"][...] = _lin.linear_backward(dh, c5)
            dr = _act.dropout_backward(dr, c4)
            dr = _act.silu_backward(dr, c3)
            dr, G[f"{p}.linear_1.weight"][...], G[f"{p}.linear_1.bias"][...] = _lin.linear_backward(dr, c2)
            dh = dh + _act.silu_backward(dr, c1)
        df, G["input.weight"][...], G["input.bias"][...] = _lin.linear_backward(dh, c_in)
        dparts = _res.concat_backward(df, c_cat)
        dfx, dft = dparts[0], dparts[-1]                                                 # (N, D*E), (N, E)
        if c_y is not None:
            G["class_embedding.weight"][...] = _emb.embedding_backward(dft, c_y)
        if not return_dx:
            return grad
        dx = _emb.sinusoidal_backward(dfx.reshape(n, cfg.dim, cfg.emb_dim), c_fx)       # (N, D)
        if cfg.x_raw:
            dx = dx + dparts[1]                                   # x reaches the input twice: sum both paths
        return grad, dx

    def denoiser(self, params):
        """``f(x, t, y=None) -> model_output`` for the samplers (eval mode, no cache kept)."""
        self.layout.check(params, "params")

        def f(x, t, y=None):
            return self.forward(params, x, t, y, train=False, keep_cache=False)[0]

        return f
