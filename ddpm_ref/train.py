"""The training loop: L_simple / hybrid objectives, exact resume, checkpoints, progress and metrics.

What it is: DDPM training (Ho et al. 2020, algorithm 1) around any model with the ``ddpm_ref.models``
surface (the U-Net for images, the MLP for 2-D toys), on flat float32 buffers:

    repeat: x0 ~ q(x0); t ~ U{0..T-1} (or importance-sampled); eps ~ N(0, I)
            x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps                (eq. 4)
            take a gradient step on  w_t || target - f_theta(x_t, t) ||^2            (eq. 14)

with ``target`` = eps, x0 or v (``diffusion.training_target``) and ``w_t`` 1 (L_simple) or min-SNR-gamma
(Hang et al. 2023), and improved-diffusion's hybrid objective (Nichol & Dhariwal 2021, sec. 3.1,
eq. 16): ``L_hybrid = L_simple + lambda L_vlb`` with lambda = 0.001 and learned-range variance, the
VB term's gradient reaching only the variance channels (``diffusion.hybrid_vb_loss``, a hand-written
gradient, as everything here). Optional classifier-free-guidance training (Ho & Salimans 2022):
labels replaced by the "no label" index ``num_classes`` with probability ``p_uncond``. Optional
horizontal flips (DDPM's CIFAR-10 setup). AdamW, warmup, clipping and EMA come from ``optim.py``.

What it is not: a general trainer; no data-parallel training, no mixed precision.

Exact resume. Every random choice of step ``s`` (0-based) is a pure function of the seed, the step
and the *data-set index* of the sample (``rng.py``), never of a generator's position:

* data order: the samples taken at step ``s`` are positions ``s*B .. s*B + B - 1`` of the endless
  sequence made by concatenating epochs, epoch ``e`` being ``rng.permutation(seed, DATA_ORDER, n, e)``;
  a batch may straddle two epochs;
* timestep, noise, dropout mask, flip and label drop of sample ``i`` at step ``s``:
  streams TIMESTEP, TRAIN_NOISE, DROPOUT, FLIP, LABEL_DROP with ``index = i``, ``step = s``.

So the state to carry is exactly: params, EMA, AdamW moments and count, the step, the timestep
sampler's state (the loss-aware sampler's history). N steps straight and N/2 + resume + N/2 give
bit-identical results (tested). (If the batch is larger than the data set, one sample can appear twice
in a batch and then receives the same noise twice; that edge case is harmless and documented.)

A run directory holds ``checkpoint.npz`` (atomic, ``checkpoint.py``), ``metrics.jsonl`` (one JSON
object per logged step: step, loss, mse, vb, grad_norm, lr, steps_per_s, elapsed) and ``config.json``.
A non-finite loss or gradient stops training with :class:`NonFiniteLossError` naming the step, before
the update is applied; the last checkpoint on disk stays the last good one.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np

from . import diffusion, rng
from .ops import loss as _loss
from .checkpoint import Checkpoint, CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .backend import get_backend
from .optim import LR_SCHEDULES, AdamW, ema_decay, ema_update
from .schedule import Schedule

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "RunDirError", "train", "batch_indices",
           "build_model", "build_schedule", "model_from_config", "read_metrics", "CHECKPOINT_NAME",
           "METRICS_NAME"]

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the step is named and nothing was updated."""


class RunDirError(ValueError):
    """The run directory cannot be used as asked (non-empty without resume/force, nothing to resume)."""


@dataclass
class TrainConfig:
    """Every training choice, JSON-able (stored in each checkpoint).

    model: "unet" or "mlp"; preset: a preset of that model; model_overrides: config fields to change
    (``learned_variance`` and ``num_classes`` are set from ``variance`` and ``class_cond``).
    schedule: "linear" | "cosine" | "sigmoid"; T: number of diffusion steps.
    prediction: "epsilon" | "sample" | "v"; variance: "fixed_small" | "fixed_large" | "learned_range";
    loss: "simple" (L_simple, weighted by ``weighting``) or "hybrid" (needs learned_range).
    timestep_sampler: "uniform" or "loss_aware" (improved-diffusion's importance sampler).
    lr, beta1, beta2, adam_eps, weight_decay: AdamW; warmup: linear warmup steps; lr_schedule:
    "constant" (warmup only) or a decay to 0 over ``steps`` ("cosine" | "linear", optim.scheduled_lr;
    raising ``steps`` on resume stretches the decay from there on); grad_clip: global
    norm limit (None: no clipping); ema_decay: 0 disables the EMA; ema_warmup: see optim.ema_decay.
    class_cond: condition on the data set's labels; p_uncond: label-drop probability (CFG).
    hflip: random horizontal flips (images only). seed: every random stream; data_seed: the toy draw
    or user-file split. value_range: ``[lo, hi]`` of a user file's float images (rescaled to
    [-1, 1]; see ``data.load_dataset``), None for the default. checkpoint_every / log_every: in steps.
    """

    data: str = "digits"
    value_range: Optional[list] = None      # absent from older checkpoints: None, their behaviour
    model: str = "unet"
    preset: str = "digits"
    model_overrides: dict = field(default_factory=dict)
    schedule: str = "linear"
    T: int = 1000
    prediction: str = "epsilon"
    variance: str = "fixed_small"
    loss: str = "simple"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    timestep_sampler: str = "uniform"
    loss_aware_history: int = 10
    steps: int = 3000
    batch: int = 128
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 100
    lr_schedule: str = "constant"          # absent from older checkpoints: constant, their behaviour
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    class_cond: bool = False
    p_uncond: float = 0.1
    hflip: bool = False
    seed: int = 0
    data_seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise ValueError(f"{name} must be one of {options}, got {v!r}")

        for f in fields(self):                   # NumPy scalars -> Python numbers: config.json is JSON
            v = getattr(self, f.name)
            if isinstance(v, np.generic):
                setattr(self, f.name, v.item())
        for name in ("data", "model", "preset"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("class_cond", "hflip", "ema_warmup"):     # "false" is not False
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("lr", "beta1", "beta2", "adam_eps", "weight_decay", "ema_decay", "p_uncond",
                     "min_snr_gamma") + (("grad_clip",) if self.grad_clip is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")

        choice("model", ("unet", "mlp"))
        choice("schedule", ("linear", "cosine", "sigmoid"))
        choice("prediction", diffusion.PREDICTIONS)
        choice("variance", diffusion.VARIANCES)
        choice("loss", ("simple", "hybrid"))
        choice("weighting", diffusion.WEIGHTINGS)
        choice("timestep_sampler", ("uniform", "loss_aware"))
        choice("lr_schedule", LR_SCHEDULES)
        if self.loss == "hybrid" and self.variance != "learned_range":
            raise ValueError(f"loss='hybrid' needs variance='learned_range', got variance={self.variance!r}")
        if self.variance == "learned_range" and self.loss != "hybrid":
            raise ValueError("variance='learned_range' is trained by the hybrid loss: set loss='hybrid' "
                             f"(got loss={self.loss!r})")
        for name in ("T", "steps", "batch", "checkpoint_every", "log_every", "loss_aware_history"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, np.integer)) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if self.lr_schedule != "constant" and self.steps <= self.warmup:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} decays after the warmup: steps must exceed "
                             f"warmup = {self.warmup}, got steps={self.steps}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond!r}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1!r} and {self.beta2!r}")
        if not self.adam_eps > 0 or self.weight_decay < 0:
            raise ValueError(f"adam_eps must be > 0 and weight_decay >= 0, got {self.adam_eps!r} and "
                             f"{self.weight_decay!r}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma!r}")
        rng.check_seed(self.seed)
        rng.check_seed(self.data_seed)
        if self.value_range is not None:
            vr = self.value_range
            if (not isinstance(vr, (list, tuple)) or len(vr) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in vr) or not vr[0] < vr[1]):
                raise ValueError(f"value_range must be [lo, hi] with finite lo < hi, got {vr!r}")
            self.value_range = [float(vr[0]), float(vr[1])]
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a dict, got {type(self.model_overrides).__name__}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config fields {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------------ builders

def build_schedule(cfg: TrainConfig) -> Schedule:
    """The noise schedule named by the config (DDPM's linear 1e-4..0.02, cosine, sigmoid)."""
    return getattr(Schedule, cfg.schedule)(T=cfg.T)


def build_model(cfg: TrainConfig, dataset):
    """The model for ``cfg`` and the data: channels/size/dim from the data, learned variance and
    class conditioning from the config."""
    from .models import MLP, UNet

    over = dict(cfg.model_overrides)
    over["learned_variance"] = cfg.variance == "learned_range"
    over["num_classes"] = int(dataset.num_classes) if cfg.class_cond else None
    over["num_timesteps"] = cfg.T
    if cfg.class_cond and not (dataset.y is not None and dataset.num_classes > 0):
        raise ValueError(f"class_cond=True but data set {dataset.name!r} has no labels")
    if cfg.model == "unet":
        if dataset.x.ndim != 4:
            raise ValueError(f"the U-Net needs images (N, C, H, W); data set {dataset.name!r} has shape "
                             f"{dataset.x.shape[1:]} per example (use model='mlp', --model mlp)")
        _, c, h, w = dataset.x.shape
        if h != w:
            raise ValueError(f"the U-Net needs square images, got {h}x{w} in {dataset.name!r}")
        over.setdefault("in_channels", c)
        over.setdefault("image_size", h)
        return UNet.from_preset(cfg.preset, **over)
    if dataset.x.ndim != 2:
        raise ValueError(f"the MLP needs vectors (N, D); data set {dataset.name!r} has shape "
                         f"{dataset.x.shape[1:]} per example (use model='unet', --model unet)")
    over.setdefault("dim", dataset.x.shape[1])
    return MLP.from_preset(cfg.preset, **over)


def model_from_config(d: dict):
    """Rebuild a model from the ``{"kind", "config"}`` record stored in checkpoints."""
    from .models import MLP, MLPConfig, UNet, UNetConfig

    if not isinstance(d, dict) or d.get("kind") not in ("unet", "mlp") or not isinstance(d.get("config"), dict):
        raise ValueError(f"model record must be {{'kind': 'unet'|'mlp', 'config': {{...}}}}, got {d!r:.200}")
    if d["kind"] == "unet":
        return UNet(UNetConfig.from_dict(d["config"]))
    return MLP(MLPConfig.from_dict(d["config"]))


def batch_indices(seed: int, n: int, batch: int, step: int, _cache: Optional[dict] = None) -> np.ndarray:
    """Data-set indices (B,) of the batch at step ``step``: positions ``step*B ..`` of the
    concatenation of epoch permutations ``rng.permutation(seed, DATA_ORDER, n, epoch)``."""
    if n < 1:
        raise ValueError(f"the data set is empty (n = {n})")
    pos = step * batch + np.arange(batch, dtype=np.int64)   # (B,)
    epoch = pos // n
    off = pos % n
    out = np.empty(batch, dtype=np.int64)
    for e in np.unique(epoch):
        e = int(e)
        perm = None if _cache is None else _cache.get(e)
        if perm is None:
            perm = rng.permutation(seed, rng.Stream.DATA_ORDER, n, step=e)
            if _cache is not None:
                if len(_cache) >= 4:
                    _cache.pop(min(_cache))
                _cache[e] = perm
        sel = epoch == e
        out[sel] = perm[off[sel]]
    return out


# ------------------------------------------------------------------------------------ progress

class _Progress:
    """tqdm when installed (and enabled), else one updating line on stderr."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.bar = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, step: int, loss: float, sps: float):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"loss {loss:.4f} {sps:.1f} steps/s", refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self._last >= 0.2 or step == self.total:
            self._last = now
            sys.stderr.write(f"\rstep {step}/{self.total}  loss {loss:.4f}  {sps:.1f} steps/s   ")
            sys.stderr.flush()

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


def read_metrics(path) -> list:
    """The records of a ``metrics.jsonl`` file (skipping a torn last line after a crash)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


# ------------------------------------------------------------------------------------ trainer

class Trainer:
    """Holds the state of a run (params, EMA, AdamW, step, timestep sampler) and takes steps.

    ``Trainer(cfg, dataset)`` starts fresh (params from ``model.init_params(cfg.seed)``);
    :meth:`from_checkpoint` continues a run. :meth:`train_step` takes one step; :meth:`fit` runs the
    loop with progress, metrics and checkpoints in a run directory.
    """

    def __init__(self, cfg: TrainConfig, dataset, model=None, schedule: Optional[Schedule] = None,
                 device: str = "cpu"):
        if isinstance(cfg, dict):
            cfg = TrainConfig.from_dict(cfg)
        self.cfg = cfg.validate()
        x = getattr(dataset, "x", None)
        if not isinstance(x, np.ndarray) or x.ndim not in (2, 4) or x.shape[0] < 1:
            raise ValueError("dataset.x must be a non-empty float array (N, C, H, W) or (N, D), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if cfg.hflip and x.ndim != 4:
            raise ValueError(f"hflip needs images; data set {getattr(dataset, 'name', '?')!r} holds vectors")
        if cfg.loss == "hybrid" and (float(x.min()) < -1.0 or float(x.max()) > 1.0):
            raise ValueError("the hybrid loss's L_0 term is a discretised decoder over the 256 bins of 8-bit "
                             f"data in [-1, 1]; data set {getattr(dataset, 'name', '?')!r} spans "
                             f"[{float(x.min()):.3g}, {float(x.max()):.3g}] (use loss='simple')")
        self.dataset = dataset
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = None if dataset.y is None else np.asarray(dataset.y, dtype=np.int64)
        self.schedule = schedule if schedule is not None else build_schedule(cfg)
        if self.schedule.T != cfg.T:
            raise ValueError(f"schedule has T = {self.schedule.T}, config says T = {cfg.T}")
        self.model = model if model is not None else build_model(cfg, dataset)
        self.backend = get_backend(device)
        if self.backend.on_device:
            if not hasattr(self.model, "to"):
                raise ValueError(f"device={device!r}: the GPU backend runs the U-Net; the "
                                 f"{type(self.model).__name__} (2-D toys) trains on the CPU (device='cpu')")
            self.model = self.model.to(device)
        self.num_classes = getattr(self.model.config, "num_classes", None)
        if cfg.class_cond and self.y is None:
            raise ValueError("class_cond=True needs labels in the data set")
        B = self.backend
        # params, EMA, gradient and AdamW moments live on the backend (one flat buffer each); the
        # initialisation is drawn on the host (a pure function of the seed) and copied over
        self.params = B.asarray(self.model.init_params(cfg.seed))
        self.ema = self.params.copy() if cfg.ema_decay > 0 else None
        opt_kwargs = dict(lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.adam_eps,
                          weight_decay=cfg.weight_decay, warmup=cfg.warmup, max_grad_norm=cfg.grad_clip,
                          schedule=cfg.lr_schedule, total=cfg.steps)
        if B.on_device:
            from .kernels import optim as _koptim
            self.opt = _koptim.AdamW(self.params.size, **opt_kwargs)   # AdamW + EMA: one fused kernel
        else:
            self.opt = AdamW(self.params.size, **opt_kwargs)
        if cfg.timestep_sampler == "uniform":
            self.sampler = diffusion.UniformSampler(cfg.T)
        else:
            self.sampler = diffusion.LossAwareSampler(cfg.T, history=cfg.loss_aware_history)
        self.step = 0
        self.metrics = {"elapsed": 0.0, "loss_ema": None}
        self._grad = B.xp.zeros(self.params.size, np.float32)
        self._perm_cache: dict = {}

    # ------------------------------------------------------------------ config and checkpoints
    def config_dict(self) -> dict:
        """The full configuration stored in checkpoints: training, model, schedule, data."""
        ds = self.dataset
        return {
            "train": self.cfg.to_dict(),
            "model": {"kind": self.cfg.model, "config": self.model.config.to_dict()},
            "schedule": self.schedule.to_dict(),
            "data": {"name": str(getattr(ds, "name", self.cfg.data)), "shape": list(self.x.shape[1:]),
                     "num_classes": int(getattr(ds, "num_classes", 0) or 0), "n_train": int(self.x.shape[0])},
        }

    def checkpoint(self) -> Checkpoint:
        sampler_state = self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None
        B = self.backend
        return Checkpoint(params=B.to_host(self.params), ema=None if self.ema is None else B.to_host(self.ema),
                          optimizer=self.opt.state_dict(), step=self.step,
                          config=self.config_dict(), sampler=sampler_state, metrics=dict(self.metrics))

    def save(self, path) -> str:
        return save_checkpoint(path, self.checkpoint())

    @classmethod
    def from_checkpoint(cls, ckpt, dataset, steps: Optional[int] = None, device: str = "cpu") -> "Trainer":
        """Continue the run saved in ``ckpt`` (a path or :class:`Checkpoint`) on ``dataset``.

        ``steps`` may raise the total number of steps (nothing else may change on resume); a total below
        the checkpoint's step is a ValueError (equal: nothing is left to train). ``device`` may differ
        from the one the run was saved on: checkpoints hold host arrays.
        """
        path = ckpt if not isinstance(ckpt, Checkpoint) else None
        if path is not None:
            ckpt = load_checkpoint(path)
        where = path or "checkpoint"
        try:
            cfg = TrainConfig.from_dict(ckpt.config["train"])
            model = model_from_config(ckpt.config["model"])
            schedule = Schedule.from_dict(ckpt.config["schedule"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: its configuration is unusable ({e})") from None
        if steps is not None:
            cfg.steps = _check_steps(steps)
            if cfg.steps < ckpt.step:
                raise ValueError(f"steps={cfg.steps} is below the checkpoint's step {ckpt.step}: a resumed run "
                                 "can only continue to a later step (or stop where it is, steps="
                                 f"{ckpt.step})")
            cfg.validate()
        elif cfg.steps < ckpt.step:
            raise CheckpointError(f"{where}: at step {ckpt.step}, past its configured total of {cfg.steps} "
                                  "steps (pass a total of at least that many steps)")
        tr = cls(cfg, dataset, model=model, schedule=schedule, device=device)
        if ckpt.params.shape != tr.params.shape:
            raise CheckpointError(f"{where}: params have {ckpt.params.size} entries, the model needs "
                                  f"{tr.params.size}")
        n_saved = ckpt.config.get("data", {}).get("n_train")
        if n_saved is not None and n_saved != tr.x.shape[0]:
            raise CheckpointError(f"{where}: saved for {n_saved} training examples, the data set has "
                                  f"{tr.x.shape[0]} (resume needs the same data)")
        tr.params[...] = tr.backend.asarray(ckpt.params)
        if tr.ema is not None:
            if ckpt.ema is None:
                raise CheckpointError(f"{where}: no EMA in the checkpoint but ema_decay > 0")
            tr.ema[...] = tr.backend.asarray(ckpt.ema)
        if ckpt.optimizer is None:
            raise CheckpointError(f"{where}: holds no optimizer state, cannot resume training")
        tr.opt.load_state_dict(ckpt.optimizer)
        if hasattr(tr.sampler, "load_state_dict"):
            if ckpt.sampler is None:           # an empty history would not reproduce the run
                raise CheckpointError(f"{where}: no timestep-sampler state for its "
                                      f"{cfg.timestep_sampler!r} sampler, cannot resume the run exactly")
            tr.sampler.load_state_dict(ckpt.sampler)
        for key in ("loss_ema", "elapsed"):
            v = (ckpt.metrics or {}).get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise CheckpointError(f"{where}: metric {key!r} is {v!r}, expected a finite number")
        tr.step = int(ckpt.step)
        tr.metrics.update(ckpt.metrics or {})
        return tr

    # ------------------------------------------------------------------ one step
    def batch(self, step: int):
        """(index (B,), x0, y) for step ``step``: data order, flips and label drops applied."""
        cfg = self.cfg
        idx = batch_indices(cfg.seed, self.x.shape[0], cfg.batch, step, self._perm_cache)   # (B,)
        x0 = self.x[idx]                                                                      # (B, ...)
        if cfg.hflip:
            flip = rng.uniform(cfg.seed, rng.Stream.FLIP, idx, step) < 0.5                     # (B,)
            x0[flip] = x0[flip][..., ::-1]
        y = None
        if cfg.class_cond:
            y = self.y[idx].copy()
            if cfg.p_uncond > 0:
                drop = rng.uniform(cfg.seed, rng.Stream.LABEL_DROP, idx, step) < cfg.p_uncond
                y[drop] = self.num_classes      # the "no label" index
        return idx, x0, y

    def loss_and_grad(self, params: np.ndarray, step: int, grad_out: Optional[np.ndarray] = None):
        """Loss of the batch of step ``step`` at ``params`` and its gradient (flat, float32).

        Returns ``(loss, grad, info)``; info holds ``mse``, ``vb`` (hybrid only), the timesteps ``t``
        and per-sample losses ``losses`` (what the loss-aware sampler learns from).
        """
        cfg, sch, B = self.cfg, self.schedule, self.backend
        idx, x0, y = self.batch(step)
        t, is_weights = self.sampler.sample(cfg.seed, idx, step)                       # (B,), (B,)
        if B.on_device and cfg.loss == "simple":
            return self._loss_and_grad_fused(params, step, idx, x0, y, t, is_weights, grad_out)
        noise = rng.normal(cfg.seed, rng.Stream.TRAIN_NOISE, idx, step, x0.shape[1:])   # (B, ...)
        dtype = params.dtype          # float32 to train; float64 for gradient checks
        x0, noise = x0.astype(dtype, copy=False), noise.astype(dtype, copy=False)
        xt = diffusion.q_sample(sch, x0, t, noise).astype(dtype, copy=False)
        # (on the GPU backend, only the hybrid loss comes here: the network runs on the device, the
        # loss and its gradient on the host, from a copy of the output)
        out, cache = self.model.forward(params, B.asarray(xt), t, y, train=True, seed=cfg.seed, index=idx,
                                        step=step)
        out = B.to_host(out)
        pred, v_interp = diffusion.split_output(out, cfg.variance)
        target = diffusion.training_target(sch, x0, t, noise, cfg.prediction)
        lw = diffusion.loss_weights(sch, t, cfg.prediction, cfg.weighting, cfg.min_snr_gamma)  # (B,)
        isw = np.asarray(is_weights, dtype=np.float64)                                  # (B,)
        # L_simple (eq. 14): per sample the mean over elements, times its weight, then the batch mean
        # (ops.loss.mse_forward; weights = loss weighting x importance weights).
        mse, mcache = _loss.mse_forward(pred, target, weights=lw * isw)
        objective = lw * mcache["per_sample"]          # per-sample loss before importance weights
        dpred = _loss.mse_backward(mcache)             # d mse / d pred, (B, ...)
        info = {"t": t, "mse": mse}
        if cfg.loss == "hybrid":
            # + lam T L_t per sample (improved-diffusion eq. 16, diffusion.hybrid_vb_scale); its
            # gradient reaches the variance channels only (the mean half is a stop-gradient there).
            scale = diffusion.hybrid_vb_scale(sch)
            vb, dout = diffusion.hybrid_vb_loss(sch, out, x0, xt, t, prediction=cfg.prediction,
                                                dvb=scale * isw / x0.shape[0])
            vb_loss = float(np.mean(isw * scale * vb))
            loss = mse + vb_loss
            dout = dout.astype(dtype, copy=False)
            dout[:, :pred.shape[1]] += dpred
            info["vb"] = vb_loss
            objective = objective + scale * vb
        else:
            loss = mse
            dout = dpred
        info["losses"] = objective
        if not math.isfinite(loss):
            return loss, None, info
        grad = self.model.backward(B.asarray(np.ascontiguousarray(dout, dtype=dtype)), cache, out=grad_out)
        return loss, grad, info

    def _loss_and_grad_fused(self, params, step, idx, x0, y, t, is_weights, grad_out):
        """:meth:`loss_and_grad` for L_simple on the GPU backend: the noise is never stored.

        One kernel draws eps (the ``rng`` contract, TRAIN_NOISE) and writes x_t (eq. 4); after the
        forward pass, the loss kernel draws the same eps again in registers, forms the target (eps,
        x0 or v) and writes the loss and d loss / d pred (``kernels.noise``).
        """
        from .kernels import noise as _knoise
        cfg, sch, B = self.cfg, self.schedule, self.backend
        x0 = B.asarray(np.ascontiguousarray(x0, dtype=np.float32))                      # (B, ...) device
        xt, _ = _knoise.q_sample_target(sch, x0, t, cfg.seed, idx, step, prediction=cfg.prediction,
                                        store_target=False)
        out, cache = self.model.forward(params, xt, t, y, train=True, seed=cfg.seed, index=idx, step=step)
        lw = diffusion.loss_weights(sch, t, cfg.prediction, cfg.weighting, cfg.min_snr_gamma)  # (B,)
        isw = np.asarray(is_weights, dtype=np.float64)
        mse, per_sample, dpred = _knoise.mse_noise_loss(sch, out, x0, t, cfg.seed, idx, step,
                                                        prediction=cfg.prediction, weights=lw * isw)
        info = {"t": t, "mse": mse, "losses": lw * B.to_host(per_sample).astype(np.float64)}
        if not math.isfinite(mse):
            return mse, None, info
        return mse, self.model.backward(dpred, cache, out=grad_out), info

    def train_step(self) -> dict:
        """One optimisation step. Raises :class:`NonFiniteLossError` (nothing updated) on NaN/inf."""
        s = self.step
        with np.errstate(over="ignore", invalid="ignore"):   # non-finite results are caught below
            loss, grad, info = self.loss_and_grad(self.params, s, grad_out=self._grad)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {s + 1} (of {self.cfg.steps}); training stopped "
                                     "before applying it")
        if self.backend.on_device:
            # AdamW and the EMA in one pass over the flat buffers (kernels.optim); the EMA's decay
            # is that of the update being taken (optimizer count + 1), as on the CPU below
            d = None if self.ema is None else ema_decay(self.cfg.ema_decay, self.opt.step_count + 1,
                                                        self.cfg.ema_warmup)
            upd = self.opt.step(self.params, grad, ema=self.ema, ema_d=d)
        else:
            upd = self.opt.step(self.params, grad)
        if upd.get("skipped") or not math.isfinite(upd["grad_norm"]):   # AdamW changed nothing
            raise NonFiniteLossError(f"gradient norm is {upd['grad_norm']} at step {s + 1} (of {self.cfg.steps}); "
                                     "training stopped before applying it")
        if self.ema is not None and not self.backend.on_device:
            ema_update(self.ema, self.params, ema_decay(self.cfg.ema_decay, self.opt.step_count,
                                                        self.cfg.ema_warmup))
        if hasattr(self.sampler, "update"):
            self.sampler.update(info["t"], info["losses"])
        self.step = s + 1
        le = self.metrics.get("loss_ema")
        self.metrics["loss_ema"] = loss if le is None else 0.98 * le + 0.02 * loss
        return {"step": self.step, "loss": loss, "mse": info["mse"], "vb": info.get("vb"),
                "grad_norm": upd["grad_norm"], "lr": upd["lr"]}

    # ------------------------------------------------------------------ the loop
    def fit(self, run_dir=None, stop_at: Optional[int] = None, time_limit: Optional[float] = None,
            progress: bool = True, callback=None) -> list:
        """Train until ``cfg.steps`` (or ``stop_at`` steps, or ``time_limit`` seconds), writing
        checkpoints and metrics into ``run_dir`` if given. Returns the logged metric records.

        On a non-finite loss the error propagates after the metrics are flushed; the checkpoint on
        disk is the last one written (at a multiple of ``checkpoint_every``), never a bad state. The
        metrics file continues at the trainer's step: records past it (from a run that crashed or
        stopped after its checkpoint) and a torn last line are dropped first. A stop before
        ``cfg.steps`` (``stop_at``, ``time_limit``) writes a checkpoint but no extra record, so a
        stopped and resumed run logs exactly the uninterrupted run's records. ``callback(record)``
        runs after the step's checkpoint, so one that raises loses no training.
        """
        cfg = self.cfg
        stop_at, time_limit = _check_fit_args(stop_at, time_limit, callback)
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        ckpt_path = metrics_f = None
        saved_step = None                      # the step of the checkpoint on disk, if any
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
            ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
            if os.path.exists(ckpt_path):
                saved_step = self.step         # the run continues from its checkpoint
            # records past this step (a crashed or stopped run's) and a torn last line would
            # otherwise be duplicated or hide what follows: the file continues at this step
            _truncate_metrics(run_dir, self.step)
            metrics_f = open(os.path.join(run_dir, METRICS_NAME), "a", encoding="utf-8")
        records = []
        bar = _Progress(cfg.steps, self.step, progress)
        t0 = time.monotonic()
        elapsed0 = float(self.metrics.get("elapsed") or 0.0)
        last_t, last_step = t0, self.step
        sps = 0.0
        try:
            while self.step < end:
                try:
                    rec = self.train_step()
                except NonFiniteLossError as e:
                    # metrics.jsonl keeps the records up to the failure (the loss curve shows how it
                    # diverged); a resume from the checkpoint trims those past it
                    where = (f"; the last good checkpoint is {ckpt_path} (step {saved_step})"
                             if saved_step is not None else "; no checkpoint was written yet")
                    raise NonFiniteLossError(f"{e}{where}") from None
                now = time.monotonic()
                self.metrics["elapsed"] = elapsed0 + (now - t0)
                # the last step of the run is logged; a stop before it (stop_at, time_limit) is not,
                # so that a stopped and resumed run logs the uninterrupted run's records
                logged = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if logged:
                    sps = (self.step - last_step) / max(now - last_t, 1e-9)
                    last_t, last_step = now, self.step
                    rec.update(steps_per_s=sps, elapsed=self.metrics["elapsed"])
                    records.append(rec)
                    if metrics_f is not None:
                        metrics_f.write(json.dumps(rec) + "\n")
                        metrics_f.flush()
                bar.update(self.step, rec["loss"], sps)
                timed_out = time_limit is not None and now - t0 >= time_limit
                if ckpt_path is not None and (self.step % cfg.checkpoint_every == 0 or self.step == end
                                              or timed_out):
                    self.save(ckpt_path)
                    saved_step = self.step
                if logged and callback is not None:
                    callback(rec)              # after the checkpoint: a callback that raises loses nothing
                if timed_out:
                    break
        finally:
            bar.close()
            if metrics_f is not None:
                metrics_f.close()
        return records


# ------------------------------------------------------------------------------------ run dirs

def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metric records past ``step`` (written after the checkpoint by a run that then crashed)."""
    path = os.path.join(run_dir, METRICS_NAME)
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _check_fit_args(stop_at, time_limit, callback):
    """``fit``'s stop_at (None or an integer >= 1) and time_limit (None or finite seconds >= 0) as
    (int | None, float | None); callback None or callable. Errors name the value."""
    if stop_at is not None:
        if isinstance(stop_at, (bool, np.bool_)) or not isinstance(stop_at, (int, np.integer)) or stop_at < 1:
            raise ValueError(f"stop_at must be None or an integer >= 1 (a step to stop at), got {stop_at!r}")
        stop_at = int(stop_at)
    if time_limit is not None:
        if (isinstance(time_limit, (bool, np.bool_)) or not isinstance(time_limit, (int, float, np.number))
                or not math.isfinite(time_limit) or time_limit < 0):
            raise ValueError(f"time_limit must be None or a finite number of seconds >= 0, got {time_limit!r}")
        time_limit = float(time_limit)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be None or callable, got {callback!r}")
    return stop_at, time_limit


def _check_steps(steps) -> int:
    """A total number of steps given on top of a configuration: a positive integer, not truncated."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def train(cfg, run_dir, resume: bool = False, force: bool = False, progress: bool = True,
          stop_at: Optional[int] = None, time_limit: Optional[float] = None, dataset=None,
          steps: Optional[int] = None, callback=None, device: str = "cpu") -> Trainer:
    """Train per ``cfg`` (TrainConfig or dict) in ``run_dir``; returns the trainer at the end.

    A non-empty ``run_dir`` is refused unless ``resume`` (continue from its checkpoint; the saved
    configuration is used, ``cfg`` may be None, and only the total ``steps`` may change) or ``force``
    (start over: the old checkpoint and metrics are replaced). ``stop_at``: stop (with a checkpoint)
    once this many steps are done; ``time_limit``: seconds of training in this call. ``device``:
    "cpu" (the NumPy reference) or "gpu" (``ddpm_ref.kernels``; a run may resume on either).
    """
    from .data import TOYS, load_dataset

    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    _check_fit_args(stop_at, time_limit, callback)
    run_dir = os.fspath(run_dir)
    ckpt_path = os.path.join(run_dir, CHECKPOINT_NAME)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir} exists and is not a directory")
    nonempty = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    if resume:
        if not os.path.exists(ckpt_path):
            raise RunDirError(f"nothing to resume: {ckpt_path} does not exist")
        ckpt = load_checkpoint(ckpt_path)
        try:
            saved = TrainConfig.from_dict(ckpt.config["train"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt_path}: its training configuration is unusable ({e})") from None
        if cfg is not None:                    # the saved configuration rules: refuse, don't ignore
            mine, theirs = cfg.to_dict(), saved.to_dict()
            differ = sorted(k for k in mine if k != "steps" and mine[k] != theirs.get(k))
            if differ:
                raise ValueError(f"resume continues {run_dir} with its saved configuration, which differs "
                                 f"from the one given in {', '.join(differ)}; pass cfg=None (or the saved "
                                 "configuration), and steps= to raise the total")
            if steps is None and cfg.steps != saved.steps:
                steps = cfg.steps
        if dataset is None:
            # a toy run resumes on as many points as it was trained on (older runs: 10,000)
            n_saved = ckpt.config.get("data", {}).get("n_train")
            toy_n = int(n_saved) if saved.data in TOYS and isinstance(n_saved, int) else None
            dataset = load_dataset(saved.data, split="train", seed=saved.data_seed, n=toy_n,
                                   value_range=saved.value_range)
        tr = Trainer.from_checkpoint(ckpt, dataset, steps=steps, device=device)   # fit trims the metrics
    else:
        if cfg is None:
            raise ValueError("a training configuration is needed unless resuming")
        if steps is not None:
            cfg.steps = _check_steps(steps)
            cfg.validate()
        if nonempty and not force:
            raise RunDirError(f"{run_dir} is not empty; pass --resume to continue it or --force to start over")
        # everything that can fail (config, data, model/data pairing, device) comes before the run
        # directory is touched: a --force run that cannot start leaves the old run as it was
        if dataset is None:
            dataset = load_dataset(cfg.data, split="train", seed=cfg.data_seed, value_range=cfg.value_range)
        tr = Trainer(cfg, dataset, device=device)
    text = json.dumps(tr.config_dict(), indent=1)   # config.json must be writable before anything is removed
    os.makedirs(run_dir, exist_ok=True)
    if force and not resume:
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            p = os.path.join(run_dir, name)
            if os.path.exists(p):
                os.unlink(p)
    atomic_write(os.path.join(run_dir, CONFIG_NAME), lambda f: f.write(text.encode("utf-8")))
    tr.fit(run_dir, stop_at=stop_at, time_limit=time_limit, progress=progress, callback=callback)
    return tr
