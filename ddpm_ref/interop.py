"""Interoperability with Hugging Face diffusers: load their DDPM models into NumPy, save ours for them.

What it is: a converter between diffusers' on-disk formats and ddpm-ref's objects.

* A **model directory** (``config.json`` + ``diffusion_pytorch_model.safetensors``, a
  ``UNet2DModel.save_pretrained`` result) becomes a :class:`~ddpm_ref.models.unet.UNet` and its flat
  float32 parameter buffer. Our parameter names *are* UNet2DModel ``state_dict`` keys with torch
  shapes, so the weights copy one to one (old checkpoints' attention names ``query/key/value/
  proj_attn`` are renamed ``to_q/to_k/to_v/to_out.0`` as diffusers itself does).
* A **pipeline directory** (``model_index.json``, ``unet/``, ``scheduler/scheduler_config.json``, as
  ``DDPMPipeline.save_pretrained`` writes, e.g. the released ``google/ddpm-cifar10-32``) also gives
  the noise schedule (DDPM eq. 2: the betas) and the sampler settings of the DDPMScheduler /
  DDIMScheduler configuration, ready for :func:`ddpm_ref.samplers.sample`.
* :func:`save_diffusers` writes ours back in the same layouts; export then import is exact.

What it is not: PyTorch. The package never imports torch or diffusers here except to read a
pickle-based ``.bin``/``.pt`` weight file, which goes through ``torch.load(weights_only=True)`` when
torch is installed (we never unpickle anything ourselves). Safetensors files are read with
:mod:`ddpm_ref.safetensors` (NumPy alone).

Refusals. Anything the NumPy U-Net or samplers do not implement is refused with a ValueError naming
the setting and its value, never approximated: block types other than DownBlock2D/AttnDownBlock2D/
UpBlock2D/AttnUpBlock2D (and up blocks that do not mirror the down blocks), mid blocks other than
UNetMidBlock2D, ``downsample_padding`` other than 0 (pad right/bottom by one, the DDPM layout) and 1
(symmetric padding 1, diffusers' default; both map onto ``UNetConfig.downsample_padding``), activations other than SiLU, Fourier/learned timestep embeddings, class embeddings
other than a plain table, ``resnet_time_scale_shift`` other than "default", ``mid_block_scale_factor``
other than 1, ``center_input_sample``, block widths that are not multiples of the first; scheduler
classes other than DDPMScheduler/DDIMScheduler, beta schedules we cannot reproduce, variance types
``learned`` and ``fixed_large_log``, ``clip_sample_range`` other than 1, thresholding other than
``sample_max_value=1`` (which is exactly clipping) or an uncapped 0.995 percentile (which is our
``clip="dynamic"``), a ``steps_offset`` that is not a non-negative integer below
``num_train_timesteps``, DDIM's ``set_alpha_to_one=False``. Unknown configuration
keys (other than diffusers' ``_class_name``-style bookkeeping) are reported with a warning, as
diffusers' own ``from_config`` does.

Keys absent from a ``config.json`` take *diffusers'* defaults (UNet2DModel's are not the DDPM paper's:
e.g. ``flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, attention_head_dim=8``), listed in
:data:`UNET2D_DEFAULTS`, :data:`DDPM_SCHEDULER_DEFAULTS` and :data:`DDIM_SCHEDULER_DEFAULTS` (diffusers
0.42).

Differences from diffusers' schedulers, each deliberate (see also the tests, which pin them down):

* Tables in float64 (ours) versus float32 (diffusers builds ``betas`` with ``torch.linspace(...,
  dtype=float32)`` and ``alphas_cumprod`` by a float32 cumulative product): agreement is to float32
  rounding, about 1e-6 relative, not bit for bit.
* DDIMScheduler steps from ``t`` to ``t - T // S`` whatever the spacing; our samplers step to the next
  listed timestep (a known pitfall: a respaced chain whose previous step is ``t - T//S``). The two coincide for "leading" spacing with ``T % S == 0``;
  for "trailing" and "linspace" diffusers' DDIM sampler visits other alpha_bar values than its own
  timestep list says. The step formula itself is identical (tests: our ``ddim_step`` with diffusers'
  ``t_prev`` equals ``DDIMScheduler.step``).
* With clipping, ``samplers.sample`` by default re-derives DDIM's eps from the clipped x0 (GLIDE,
  improved-diffusion; diffusers' ``use_clipped_model_output=True``), while DDIMPipeline keeps the
  model's raw eps unless called with ``use_clipped_model_output=True``. Loaded settings therefore say
  ``ddim_eps_from_clipped=False`` (DDIMPipeline's default, a call-time argument that no diffusers
  configuration stores, like ``eta``), and a DDIMPipeline with ``clip_sample=True`` and ours sample
  the same chain (tested); pass ``ddim_eps_from_clipped=True`` for improved-diffusion's convention.
* ``steps_offset`` is added to "leading" timesteps only (diffusers ignores it for the other
  spacings; so do we): settings carry it as ``offset`` (0 otherwise). With an offset a full chain
  (``num_steps=None``, DDPMPipeline's 1000 steps) would start at ``T``, beyond the table: diffusers
  fails there and ``samplers.timesteps`` refuses it; pass a smaller ``num_steps``.
* DDPMScheduler adds noise whenever ``t > 0``, even at the last step of a spaced chain (trailing
  spacing ends at ``t = T/S - 1``); with ``fixed_large`` that last noise has variance ``1 -
  alpha_bar_t``. Ours adds none at the last step (DDPM Algorithm 2, "z = 0 if t = 1").
* ``fixed_small`` clamps ``beta~`` at 1e-20 in diffusers; ours does not need to (``beta~ > 0`` for
  every step but the last, which adds no noise). ``fixed_small_log`` in diffusers draws
  ``exp(0.5 log beta~) z``, the same distribution as ``fixed_small``, and is mapped to it.
* ``learned_range`` interpolates ``log beta~`` (diffusers: clamped at 1e-20, ours:
  ``posterior_log_variance_clipped``, improved-diffusion) and ``log beta`` of the (respaced) step;
  they differ only at the first table entry, where neither adds noise.
* A diffusers class embedding with K rows becomes ``num_classes = K - 1``: our U-Net reserves its last
  row for "no label" (classifier-free guidance), so ``y=None`` selects diffusers' class K - 1, while
  explicit labels 0..K-1 behave exactly as in diffusers.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import stat
import warnings

import numpy as np

from . import safetensors as st
from .schedule import Schedule

__all__ = [
    "UNET2D_DEFAULTS", "DDPM_SCHEDULER_DEFAULTS", "DDIM_SCHEDULER_DEFAULTS",
    "read_state_dict", "find_weights", "unet_config_from_diffusers", "unet_config_to_diffusers",
    "params_from_state_dict", "state_dict_from_params", "schedule_from_diffusers",
    "scheduler_config_to_diffusers", "load_unet", "load_diffusers", "save_diffusers",
]

# UNet2DModel.__init__ defaults (diffusers 0.42): what a key absent from config.json means.
UNET2D_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
# DDPMScheduler.__init__ defaults (diffusers 0.42).
DDPM_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
    "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# DDIMScheduler.__init__ defaults (diffusers 0.42): no variance_type, plus set_alpha_to_one.
DDIM_SCHEDULER_DEFAULTS = {k: v for k, v in DDPM_SCHEDULER_DEFAULTS.items() if k != "variance_type"}
DDIM_SCHEDULER_DEFAULTS["set_alpha_to_one"] = True

# Default number of sampling steps of the pipelines (DDPMPipeline: 1000, DDIMPipeline: 50).
_PIPELINE_STEPS = {"ddpm": None, "ddim": 50}
_PREDICTION_FROM = {"epsilon": "epsilon", "sample": "sample", "v_prediction": "v"}
_PREDICTION_TO = {v: k for k, v in _PREDICTION_FROM.items()}
_DIFFUSERS_VERSION = "0.30.0"          # written as _diffusers_version (informational; tested with 0.42)
_WEIGHT_STEM = "diffusion_pytorch_model"
_DYNAMIC_PERCENTILE = 0.995            # samplers.DYNAMIC_PERCENTILE (Imagen's p)
_NO_CAP = float(np.finfo(np.float32).max)   # a sample_max_value no float32 x0 can reach
_META_KEY = "ddpm_ref.unet_config"     # safetensors metadata: our config, for an exact round trip


def _json(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _write_json(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _unknown_keys(config, known, where):
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        warnings.warn(f"{where}: ignoring configuration keys ddpm-ref does not know: {unknown} "
                      "(diffusers' from_config ignores unexpected keys the same way)", stacklevel=3)


def _refuse(where, key, value, supported):
    raise ValueError(f"{where}: {key}={value!r} is not supported by ddpm-ref; supported: {supported}")


def _real(where, key, value):
    """A finite JSON number (not a bool, string or null) as a float, else ValueError naming it."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value)):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _integer(where, key, value):
    """An integer (or an integral float such as 1.0) as an int, else ValueError naming it."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value):
        return int(value)
    raise ValueError(f"{where}: {key} must be an integer, got {value!r}")


def _flag(where, key, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return bool(value)


# ------------------------------------------------------------------------------------ weights

def _torch_load(path):
    """A pickle-based weight file, read through torch (weights only), as float32/int NumPy arrays."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a pickle-based PyTorch file; ddpm-ref never unpickles files itself and reads "
            "them only through torch.load(weights_only=True). Install PyTorch (pip install "
            "'ddpm-ref[torch]') or convert the file to safetensors.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:            # torch/pickle/zip/EOF/Index errors of a corrupt or foreign file
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot read this PyTorch weight file (corrupt, truncated, empty or "
                         f"not a weights-only state_dict): {type(e).__name__}: {detail}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        out[name] = tensor.contiguous().numpy().copy()
    return out


def read_state_dict(path):
    """Read one weight file -> dict name -> ndarray (floats widened to float32 where narrower).

    Safetensors arrays of 32 bits or more are read-only views of the memory-mapped file (copy them
    to modify); the others are fresh arrays.

    ``.safetensors`` is read with NumPy alone; a sharded ``*.index.json`` (``{"weight_map": {name:
    shard}}``) reads each shard; ``.bin``/``.pt``/``.pth``/``.ckpt`` go through
    ``torch.load(weights_only=True)`` and need torch.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weight file {path} does not exist")
    if _is_index(path):
        index = _json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path}: a sharded index needs a 'weight_map' object")
        for name, shard in weight_map.items():
            if (not isinstance(shard, str) or not shard or shard in (".", "..")
                    or os.path.basename(shard) != shard or "/" in shard or "\\" in shard):
                raise ValueError(f"{path}: weight_map[{name!r}] = {shard!r}; expected the file name of a "
                                 "shard in the same folder (a non-empty string, no path separators)")
            if _is_index(shard):
                raise ValueError(f"{path}: weight_map[{name!r}] = {shard!r} is an index, expected a "
                                 "weight file (.safetensors or .bin)")
        out = {}
        folder = os.path.dirname(path)
        for shard in sorted(set(weight_map.values())):
            part = read_state_dict(os.path.join(folder, shard))
            for name, value in part.items():
                if weight_map.get(name) == shard:
                    out[name] = value
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{path}: tensors {missing[:5]} are listed in the index but missing "
                             "from their shards")
        return out
    if path.endswith(".safetensors"):
        raw = st.load_file(path, mmap_mode=True)      # read-only views of the mapped file, no copy
        return {k: (v.astype(np.float32) if v.dtype.kind == "f" and v.dtype.itemsize < 4 else v)
                for k, v in raw.items()}
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _torch_load(path)
    raise ValueError(f"{path}: unknown weight file type; expected .safetensors, .bin, .pt, .pth, "
                     ".ckpt or a sharded index (.index.json, or diffusers' variant .index.{variant}.json)")


_INDEX_RE = re.compile(r"\.index(\.[^./\\]+)?\.json$")


def _is_index(path):
    """A sharded-weights index: ``*.index.json`` or diffusers' variant spelling ``*.index.{v}.json``."""
    return _INDEX_RE.search(os.path.basename(os.fspath(path))) is not None


def _weight_names(variant):
    """Candidate weight file names, in order of preference (safetensors before pickle).

    diffusers (``_add_variant``) inserts the variant before the last suffix, so a sharded variant
    index is ``diffusion_pytorch_model.safetensors.index.{variant}.json`` (what ``save_pretrained``
    writes and ``from_pretrained`` reads); its legacy reader also looks for
    ``...safetensors.{variant}.index.json``. ``diffusion_pytorch_model.{variant}.safetensors.index.json``
    (the variant in the stem) is accepted too.
    """
    if variant is None:
        return [f"{_WEIGHT_STEM}.{ext}" for ext in ("safetensors", "safetensors.index.json", "bin",
                                                      "bin.index.json")]
    names = []
    for ext in ("safetensors", "bin"):
        names += [f"{_WEIGHT_STEM}.{variant}.{ext}", f"{_WEIGHT_STEM}.{ext}.index.{variant}.json",
                  f"{_WEIGHT_STEM}.{ext}.{variant}.index.json",
                  f"{_WEIGHT_STEM}.{variant}.{ext}.index.json"]
    return names


def find_weights(model_dir, variant=None):
    """The weight file of a diffusers model directory, safetensors preferred over pickle.

    Looks for ``diffusion_pytorch_model[.{variant}].safetensors``, its sharded index
    (``diffusion_pytorch_model.safetensors.index[.{variant}].json``, diffusers' naming), then the
    ``.bin`` equivalents.
    """
    if variant is not None and (not isinstance(variant, str) or not variant.strip()
                                or any(sep in variant for sep in ("/", "\\", os.sep))):
        raise ValueError(f"variant must be a non-empty name such as 'fp16' (no path separators), "
                         f"got {variant!r}")
    names = _weight_names(variant)
    for name in names:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    raise ValueError(f"{model_dir}: no weights found; expected one of {names}")


# --------------------------------------------------------------------------------- UNet config

def _positive_int(where, key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def unet_config_from_diffusers(config, image_size=None, learned_variance=False, num_timesteps=None,
                               where="config.json"):
    """Map a UNet2DModel configuration (dict, as in ``config.json``) onto our ``UNetConfig``.

    image_size: used when the configuration has no ``sample_size`` (needed to place attention by
    resolution). learned_variance: the scheduler says ``variance_type="learned_range"``; then the
    model must output ``2 * in_channels`` channels. num_timesteps: T of the scheduler (bounds the
    accepted t), else the configuration's ``num_train_timesteps``, else 1000.
    Everything we do not implement raises ValueError naming the key and its value.
    """
    from .models.unet import UNetConfig

    if not isinstance(config, dict):
        raise ValueError(f"{where}: the UNet configuration must be a dict, got {type(config).__name__}")
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        _refuse(where, "_class_name", cls, "'UNet2DModel'")
    _unknown_keys(config, UNET2D_DEFAULTS, where)
    c = {**UNET2D_DEFAULTS, **config}

    # settings with exactly one supported value
    fixed = [
        ("center_input_sample", False, "False"),
        ("time_embedding_type", "positional", "'positional' (sinusoidal, DDPM)"),
        ("mid_block_type", "UNetMidBlock2D", "'UNetMidBlock2D'"),
        ("downsample_type", "conv", "'conv'"),
        ("upsample_type", "conv", "'conv'"),
        ("resnet_time_scale_shift", "default", "'default' (the embedding is added)"),
        ("class_embed_type", None, "None (a plain class-embedding table)"),
    ]
    for key, expected, supported in fixed:
        if c[key] != expected or isinstance(c[key], bool) != isinstance(expected, bool):
            _refuse(where, key, c[key], supported)
    if c["act_fn"] not in ("silu", "swish"):
        _refuse(where, "act_fn", c["act_fn"], "'silu' (alias 'swish')")
    if c["mid_block_scale_factor"] != 1:
        _refuse(where, "mid_block_scale_factor", c["mid_block_scale_factor"], "1")
    # Downsample2D: padding 0 pads (0, 1, 0, 1) then convolves unpadded; any other p convolves with
    # symmetric padding p. We implement 0 (DDPM) and 1 (diffusers' default).
    pad = c["downsample_padding"]
    if isinstance(pad, bool) or not isinstance(pad, int) or pad not in (0, 1):
        _refuse(where, "downsample_padding", pad, "0 (pad right/bottom by one, then a stride-2 3x3 conv) "
                "or 1 (a stride-2 3x3 conv with padding 1 on every side)")

    blocks = c["block_out_channels"]
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError(f"{where}: block_out_channels must be a non-empty list, got {blocks!r}")
    blocks = [_positive_int(where, "block_out_channels", b) for b in blocks]
    ch = blocks[0]
    if any(b % ch for b in blocks):
        _refuse(where, "block_out_channels", blocks,
                "widths that are integer multiples of the first (ch * ch_mult)")
    ch_mult = tuple(b // ch for b in blocks)
    levels = len(blocks)

    for key in ("down_block_types", "up_block_types"):
        if not isinstance(c[key], (list, tuple)):
            raise ValueError(f"{where}: {key} must be a list of block names, got {c[key]!r}")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"{where}: down_block_types ({len(down)}) and up_block_types ({len(up)}) "
                         f"must each have one entry per block_out_channels ({levels})")
    for kind in down:
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            _refuse(where, "down_block_types", kind, "'DownBlock2D', 'AttnDownBlock2D'")
    for kind in up:
        if kind not in ("UpBlock2D", "AttnUpBlock2D"):
            _refuse(where, "up_block_types", kind, "'UpBlock2D', 'AttnUpBlock2D'")
    attn_levels = [i for i, kind in enumerate(down) if kind == "AttnDownBlock2D"]
    attn_up = [levels - 1 - j for j, kind in enumerate(up) if kind == "AttnUpBlock2D"]
    if sorted(attn_up) != attn_levels:
        _refuse(where, "up_block_types", up, f"the mirror image of down_block_types {down} "
                "(attention at the same resolutions on the way down and up)")

    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            _refuse(where, "sample_size", size, "square images (an int or [s, s])")
        size = size[0]
    if size is None:
        if image_size is None:
            raise ValueError(f"{where}: sample_size is not set; pass image_size= to place attention "
                             "layers by resolution")
        size = image_size
    size = _positive_int(where, "sample_size", size)
    if size % (2 ** (levels - 1)):
        raise ValueError(f"{where}: sample_size {size} cannot be halved {levels - 1} times")

    groups = c["norm_num_groups"]
    if groups is None:
        _refuse(where, "norm_num_groups", None, "an integer number of GroupNorm groups")
    if c["attn_norm_num_groups"] not in (None, groups):
        _refuse(where, "attn_norm_num_groups", c["attn_norm_num_groups"],
                f"None or norm_num_groups ({groups})")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        _refuse(where, "time_embedding_dim", c["time_embedding_dim"],
                f"None or 4 * block_out_channels[0] = {4 * ch}")

    in_ch = _positive_int(where, "in_channels", c["in_channels"])
    out_ch = _positive_int(where, "out_channels", c["out_channels"])
    if learned_variance:
        if out_ch != 2 * in_ch:
            raise ValueError(f"{where}: variance_type 'learned_range' needs out_channels = 2 * "
                             f"in_channels = {2 * in_ch}, got out_channels={out_ch}")
        out_field = None
    else:
        out_field = None if out_ch == in_ch else out_ch

    num_classes = c["num_class_embeds"]
    if num_classes is not None:
        num_classes = _positive_int(where, "num_class_embeds", num_classes)
        if num_classes < 2:
            _refuse(where, "num_class_embeds", num_classes,
                    ">= 2 (our last class row doubles as 'no label')")
        num_classes -= 1
    if num_timesteps is None:
        num_timesteps = c["num_train_timesteps"]
        num_timesteps = 1000 if num_timesteps is None else _positive_int(where, "num_train_timesteps",
                                                                         num_timesteps)

    head_dim = c["attention_head_dim"]
    if isinstance(head_dim, (list, tuple)):
        if not head_dim or any(h != head_dim[0] for h in head_dim):
            _refuse(where, "attention_head_dim", head_dim, "one value for every block")
        head_dim = head_dim[0]
    if head_dim is not None:
        head_dim = _positive_int(where, "attention_head_dim", head_dim)
    groups = _positive_int(where, "norm_num_groups", groups)
    kwargs = dict(
        in_channels=in_ch, out_channels=out_field, image_size=size, ch=ch, ch_mult=ch_mult,
        num_res_blocks=_positive_int(where, "layers_per_block", c["layers_per_block"]),
        attn_resolutions=tuple(size // 2 ** i for i in attn_levels), head_dim=head_dim,
        dropout=_real(where, "dropout", c["dropout"]), groups=groups,
        norm_eps=_real(where, "norm_eps", c["norm_eps"]),
        num_classes=num_classes, learned_variance=bool(learned_variance),
        flip_sin_to_cos=_flag(where, "flip_sin_to_cos", c["flip_sin_to_cos"]),
        freq_shift=_integer(where, "freq_shift", c["freq_shift"]),
        mid_attention=_flag(where, "add_attention", c["add_attention"]),
        num_timesteps=int(num_timesteps), downsample_padding=pad)
    try:
        return UNetConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def unet_config_to_diffusers(config):
    """Our ``UNetConfig`` -> a UNet2DModel ``config.json`` dict (JSON-able)."""
    kw = config.diffusers_kwargs()
    out = {"_class_name": "UNet2DModel", "_diffusers_version": _DIFFUSERS_VERSION}
    for key, value in kw.items():
        out[key] = list(value) if isinstance(value, tuple) else value
    out["num_train_timesteps"] = int(config.num_timesteps)
    # every other UNet2DModel key at the value we implement, so no default is left to guess
    out.setdefault("downsample_type", "conv")
    out.setdefault("upsample_type", "conv")
    out.setdefault("class_embed_type", None)
    out.setdefault("num_class_embeds", None)
    out.setdefault("time_embedding_dim", None)
    out.setdefault("attn_norm_num_groups", None)
    return out


_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_old_attention(name):
    """Checkpoints from diffusers < 0.15 name the attention projections query/key/value/proj_attn."""
    parts = name.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _OLD_ATTENTION_NAMES:
        return ".".join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return name


def params_from_state_dict(model, state_dict, where="state_dict"):
    """Copy a UNet2DModel state_dict (name -> array with torch shapes) into a flat float32 buffer.

    Every parameter of ``model.layout`` must be present with its shape; extra tensors are refused
    (they belong to layers we do not implement). Returns the flat buffer (model.layout.size,).
    """
    state = {_rename_old_attention(k): v for k, v in state_dict.items()}
    layout = model.layout
    missing = [n for n in layout.names if n not in state]
    extra = sorted(set(state) - set(layout.names))
    if missing or extra:
        raise ValueError(f"{where}: the weights do not match the configuration: missing "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                         f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    flat = layout.zeros(np.float32)
    views = layout.named(flat)
    for name in layout.names:
        value = np.asarray(state[name])
        if value.shape != layout.shapes[name]:
            raise ValueError(f"{where}: {name} has shape {value.shape}, expected "
                             f"{layout.shapes[name]}")
        if value.dtype.kind != "f":
            raise ValueError(f"{where}: {name} has dtype {value.dtype}, expected floating point")
        views[name][...] = value
    if not np.all(np.isfinite(flat)):
        bad = next(n for n in layout.names if not np.all(np.isfinite(views[n])))
        raise ValueError(f"{where}: {bad} holds non-finite values")
    return flat


def state_dict_from_params(model, params):
    """Named float32 copies of a flat buffer: the UNet2DModel state_dict (torch shapes)."""
    model.layout.check(params, "params")
    return {name: np.ascontiguousarray(v, dtype=np.float32)
            for name, v in model.layout.named(params).items()}


# ----------------------------------------------------------------------------- scheduler config

def _scaled_linear(T, beta_start, beta_end):
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2


def _diffusers_sigmoid(T, beta_start, beta_end):
    """diffusers' "sigmoid" betas: sigmoid(linspace(-6, 6, T)) * (end - start) + start (GeoDiff).

    Not our Schedule.sigmoid (which shapes alpha_bar, Jabri et al.); a different schedule."""
    u = np.linspace(-6.0, 6.0, T, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-u)) * (beta_end - beta_start) + beta_start


def _laplace(T, max_beta=0.999):
    """diffusers' "laplace" betas (betas_for_alpha_bar with the Laplace noise-level transform)."""
    def alpha_bar(u):
        lmb = -0.5 * math.copysign(1.0, 0.5 - u) * math.log(1.0 - 2.0 * abs(0.5 - u) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1.0 + snr))
    return np.array([min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])


def schedule_from_diffusers(config, where="scheduler_config.json", sampler=None):
    """Map a DDPMScheduler / DDIMScheduler configuration onto ``(Schedule, sampler_settings)``.

    The Schedule holds the training betas (DDPM eq. 2) in float64. ``sampler_settings`` are keyword
    arguments for :func:`ddpm_ref.samplers.sample`: ``sampler`` ("ddpm" or "ddim"), ``num_steps``
    (the pipeline's default: None = all T for DDPM, 50 for DDIM), ``spacing``, ``offset`` (diffusers'
    ``steps_offset`` for "leading" spacing, else 0), ``eta`` (0.0), ``prediction``, ``variance``,
    ``clip`` and ``ddim_eps_from_clipped`` (False: DDIMPipeline's raw eps). ``sampler`` overrides the scheduler's own (a
    DDIMPipeline runs a DDPMScheduler configuration as DDIM, as diffusers does).
    """
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the scheduler configuration must be a dict, got {type(config).__name__}")
    cls = config.get("_class_name", "DDPMScheduler")
    if cls == "DDPMScheduler":
        defaults, own = DDPM_SCHEDULER_DEFAULTS, "ddpm"
    elif cls == "DDIMScheduler":
        defaults, own = DDIM_SCHEDULER_DEFAULTS, "ddim"
    else:
        _refuse(where, "_class_name", cls, "'DDPMScheduler', 'DDIMScheduler'")
    if sampler is not None and not (isinstance(sampler, str) and sampler in ("ddpm", "ddim")):
        raise ValueError(f"sampler must be None (the scheduler's own), 'ddpm' or 'ddim', got {sampler!r}")
    sampler = sampler or own
    known = set(DDPM_SCHEDULER_DEFAULTS) | set(DDIM_SCHEDULER_DEFAULTS)
    _unknown_keys(config, known, where)
    c = {**defaults, **config}

    T = _positive_int(where, "num_train_timesteps", c["num_train_timesteps"])
    kind = c["beta_schedule"]
    if c["trained_betas"] is None and kind in ("linear", "scaled_linear", "sigmoid"):
        beta_start = _real(where, "beta_start", c["beta_start"])
        beta_end = _real(where, "beta_end", c["beta_end"])
    try:
        if c["trained_betas"] is not None:
            try:
                betas = np.asarray(c["trained_betas"], dtype=np.float64)
            except (ValueError, TypeError):
                raise ValueError(f"trained_betas must be a list of {T} numbers, got "
                                 f"{str(c['trained_betas'])[:80]}") from None
            if betas.shape != (T,):
                raise ValueError(f"trained_betas has shape {betas.shape}, expected ({T},) "
                                 f"(num_train_timesteps={T})")
            schedule = Schedule(betas, "custom", {})
        elif kind == "linear":
            schedule = Schedule.linear(T, beta_start, beta_end)
        elif kind == "scaled_linear":
            schedule = Schedule(_scaled_linear(T, beta_start, beta_end), "scaled_linear",
                                {"T": T, "beta_start": beta_start, "beta_end": beta_end})
        elif kind == "squaredcos_cap_v2":
            schedule = Schedule.cosine(T, s=0.008, max_beta=0.999)
        elif kind == "sigmoid" and cls == "DDPMScheduler":
            schedule = Schedule(_diffusers_sigmoid(T, beta_start, beta_end), "diffusers_sigmoid",
                                {"T": T, "beta_start": beta_start, "beta_end": beta_end})
        elif kind == "laplace" and cls == "DDPMScheduler":
            schedule = Schedule(_laplace(T), "laplace", {"T": T})
        else:
            schedule = None
        if schedule is not None and c["rescale_betas_zero_snr"]:
            schedule = schedule.rescale_zero_terminal_snr()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if schedule is None:
        _refuse(where, "beta_schedule", kind, "'linear', 'scaled_linear', 'squaredcos_cap_v2' "
                "(and for DDPMScheduler 'sigmoid', 'laplace'), or trained_betas")

    prediction = c["prediction_type"]
    if not isinstance(prediction, str) or prediction not in _PREDICTION_FROM:
        _refuse(where, "prediction_type", prediction, "'epsilon', 'sample', 'v_prediction'")
    variance = c.get("variance_type", "fixed_small")
    if not isinstance(variance, str):
        _refuse(where, "variance_type", variance,
                "'fixed_small', 'fixed_small_log', 'fixed_large', 'learned_range'")
    if variance == "fixed_small_log":
        variance = "fixed_small"          # exp(0.5 log beta~) z: the same draw as sqrt(beta~) z
    if variance not in ("fixed_small", "fixed_large", "learned_range"):
        _refuse(where, "variance_type", variance,
                "'fixed_small', 'fixed_small_log', 'fixed_large', 'learned_range'")
    clip = bool(c["clip_sample"])
    if c["thresholding"]:
        # diffusers: s = clamp(quantile(|x0|, ratio), 1, sample_max_value); x0 = clamp(x0, -s, s) / s
        ratio = _real(where, "dynamic_thresholding_ratio", c["dynamic_thresholding_ratio"])
        cap = c["sample_max_value"]
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or math.isnan(cap):
            raise ValueError(f"{where}: sample_max_value must be a number, got {cap!r}")
        cap = float(cap)
        if cap == 1.0:
            clip = True                   # s is always exactly 1: plain clipping to [-1, 1]
        elif cap >= _NO_CAP and ratio == _DYNAMIC_PERCENTILE:
            clip = "dynamic"              # Imagen's thresholding, no upper bound on s (ours)
        elif ratio != _DYNAMIC_PERCENTILE:
            _refuse(where, "dynamic_thresholding_ratio", c["dynamic_thresholding_ratio"],
                    f"{_DYNAMIC_PERCENTILE} (Imagen's percentile)")
        else:
            _refuse(where, "sample_max_value", c["sample_max_value"],
                    f"1.0 (= clipping) or >= {_NO_CAP:.8g} (no cap) with thresholding")
    elif clip and (isinstance(c["clip_sample_range"], bool)
                  or not isinstance(c["clip_sample_range"], (int, float)) or c["clip_sample_range"] != 1.0):
        _refuse(where, "clip_sample_range", c["clip_sample_range"], "1.0 (x0 clipped to [-1, 1])")
    spacing = c["timestep_spacing"]
    if not isinstance(spacing, str) or spacing not in ("leading", "trailing", "linspace"):
        _refuse(where, "timestep_spacing", spacing, "'leading', 'trailing', 'linspace'")
    offset = 0 if c["steps_offset"] is None else c["steps_offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < T:
        _refuse(where, "steps_offset", c["steps_offset"], f"an integer in [0, {T}) (num_train_timesteps={T})")
    if spacing != "leading":
        offset = 0                        # diffusers adds steps_offset to "leading" timesteps only
    if cls == "DDIMScheduler" and not c["set_alpha_to_one"]:
        _refuse(where, "set_alpha_to_one", False, "True (the last DDIM step lands on alpha_bar = 1)")
    settings = {
        "sampler": sampler, "num_steps": _PIPELINE_STEPS[sampler], "spacing": spacing, "offset": offset,
        "eta": 0.0, "prediction": _PREDICTION_FROM[prediction], "variance": variance, "clip": clip,
        "ddim_eps_from_clipped": False,   # DDIMPipeline's use_clipped_model_output default
    }
    return schedule, settings


def scheduler_config_to_diffusers(schedule, settings=None):
    """``(Schedule, sampler_settings)`` -> a DDPMScheduler (or, for sampler "ddim", DDIMScheduler)
    ``scheduler_config.json`` dict that :func:`schedule_from_diffusers` maps back exactly
    (``offset`` becomes ``steps_offset``). ``num_steps``, ``eta`` and ``ddim_eps_from_clipped`` are
    call-time arguments of diffusers' pipelines and are not written.

    Linear schedules are written as ``beta_schedule="linear"``; the cosine schedule with s = 0.008 and
    max_beta = 0.999 as ``"squaredcos_cap_v2"``; a zero-terminal-SNR rescaling of those with
    ``rescale_betas_zero_snr``; anything else as ``trained_betas`` (float64 values, exact in JSON).
    """
    settings = dict(settings or {})
    sampler = settings.get("sampler", "ddpm")
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"settings['sampler'] must be 'ddpm' or 'ddim', got {sampler!r}")
    prediction = settings.get("prediction", "epsilon")
    if prediction not in _PREDICTION_TO:
        raise ValueError(f"settings['prediction'] must be one of {sorted(_PREDICTION_TO)}, got {prediction!r}")
    variance = settings.get("variance", "fixed_small")
    if variance not in ("fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"settings['variance'] must be 'fixed_small', 'fixed_large' or "
                         f"'learned_range', got {variance!r}")
    clip = settings.get("clip", True)
    if not (clip is True or clip is False or clip == "dynamic"):
        raise ValueError(f"settings['clip'] must be True, False or 'dynamic', got {clip!r}")
    spacing = settings.get("spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"settings['spacing'] must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    offset = settings.get("offset", 0)
    if (isinstance(offset, (bool, np.bool_)) or not isinstance(offset, (int, np.integer))
            or not 0 <= offset < schedule.T):
        raise ValueError(f"settings['offset'] must be an integer in [0, T) = [0, {schedule.T}), got {offset!r}")
    if offset and spacing != "leading":
        raise ValueError(f"settings['offset']={offset} applies to 'leading' spacing only (diffusers' "
                         f"steps_offset), got spacing={spacing!r}")

    # DDIMScheduler has no variance_type: a learned-variance model keeps a DDPMScheduler config
    # (a DDIMPipeline folder then records the sampler, see save_diffusers).
    ddim_class = sampler == "ddim" and variance != "learned_range"
    out = {"_class_name": "DDIMScheduler" if ddim_class else "DDPMScheduler",
           "_diffusers_version": _DIFFUSERS_VERSION, "num_train_timesteps": int(schedule.T),
           "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None,
           "rescale_betas_zero_snr": False, "prediction_type": _PREDICTION_TO[prediction],
           "clip_sample": clip is not False, "clip_sample_range": 1.0, "thresholding": False,
           "dynamic_thresholding_ratio": _DYNAMIC_PERCENTILE, "sample_max_value": 1.0,
           "timestep_spacing": spacing, "steps_offset": int(offset)}
    if clip == "dynamic":
        out.update(thresholding=True, sample_max_value=_NO_CAP)
    if ddim_class:
        out["set_alpha_to_one"] = True
    else:
        out["variance_type"] = variance

    def describe(s):
        if s.name == "linear" and np.array_equal(
                s.betas, Schedule.linear(s.T, s.params["beta_start"], s.params["beta_end"]).betas):
            return {"beta_schedule": "linear", "beta_start": s.params["beta_start"],
                    "beta_end": s.params["beta_end"]}
        if s.name == "scaled_linear" and np.array_equal(
                s.betas, _scaled_linear(s.T, s.params["beta_start"], s.params["beta_end"])):
            return {"beta_schedule": "scaled_linear", "beta_start": s.params["beta_start"],
                    "beta_end": s.params["beta_end"]}
        if s.name == "cosine" and np.array_equal(s.betas, Schedule.cosine(s.T).betas):
            return {"beta_schedule": "squaredcos_cap_v2"}
        return None

    base = describe(schedule)
    if base is None and schedule.name == "zero_terminal_snr" and "base" in schedule.params:
        try:
            parent = Schedule.from_dict(schedule.params["base"])
            parent = Schedule(parent.betas, schedule.params["base"].get("name", "custom"),
                              schedule.params["base"].get("params", {}))
        except (ValueError, KeyError, TypeError):
            parent = None
        if parent is not None and parent.rescale_zero_terminal_snr() == schedule:
            base = describe(parent)
            if base is not None:
                base["rescale_betas_zero_snr"] = True
    if base is None:
        base = {"trained_betas": [float(b) for b in schedule.betas]}
    out.update(base)
    return out


# ------------------------------------------------------------------------------- directories

def _pipeline_parts(path):
    """(unet_dir, scheduler_config_path or None, pipeline_sampler or None) for a directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory (expected a diffusers model or pipeline folder)")
    index_path = os.path.join(path, "model_index.json")
    if os.path.isfile(index_path):
        index = _json(index_path)
        cls = index.get("_class_name", "DDPMPipeline")
        if cls not in ("DDPMPipeline", "DDIMPipeline"):
            _refuse(index_path, "_class_name", cls, "'DDPMPipeline', 'DDIMPipeline'")
        for part in ("unet", "scheduler"):
            if part not in index:
                raise ValueError(f"{index_path}: the pipeline has no '{part}' entry")
        extra = sorted(k for k in index if not k.startswith("_") and k not in ("unet", "scheduler"))
        if extra:
            _refuse(index_path, "components", extra, "a unet and a scheduler only")
        unet_dir = os.path.join(path, "unet")
        sched = os.path.join(path, "scheduler", "scheduler_config.json")
        if not os.path.isfile(sched):
            raise ValueError(f"{path}: pipeline without scheduler/scheduler_config.json")
        return unet_dir, sched, ("ddim" if cls == "DDIMPipeline" else "ddpm")
    if os.path.isfile(os.path.join(path, "unet", "config.json")):
        sched = os.path.join(path, "scheduler", "scheduler_config.json")
        return os.path.join(path, "unet"), (sched if os.path.isfile(sched) else None), None
    if os.path.isfile(os.path.join(path, "config.json")):
        sched = os.path.join(path, "scheduler_config.json")
        return path, (sched if os.path.isfile(sched) else None), None
    raise ValueError(f"{path}: neither a diffusers model folder (config.json) nor a pipeline "
                     "folder (model_index.json, unet/, scheduler/)")


def load_unet(model_dir, image_size=None, learned_variance=None, num_timesteps=None, variant=None):
    """Load a UNet2DModel folder (``config.json`` + weights) -> ``(UNet, params)`` (flat float32).

    learned_variance None: taken from our own metadata when the file was written by
    :func:`save_diffusers`, else False (pass True when the scheduler says "learned_range").
    """
    from .models.unet import UNet, UNetConfig

    model_dir = os.fspath(model_dir)
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{model_dir}: no config.json (not a diffusers model folder)")
    weights = find_weights(model_dir, variant)
    ours = None
    if weights.endswith(".safetensors"):
        meta = st.read_metadata(weights)
        if _META_KEY in meta:
            try:
                ours = UNetConfig.from_dict(json.loads(meta[_META_KEY]))
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
                raise ValueError(f"{weights}: metadata {_META_KEY!r} is not a valid ddpm-ref UNetConfig "
                                 f"({type(e).__name__}: {e})") from None
    if learned_variance is None:
        learned_variance = bool(ours.learned_variance) if ours is not None else False
    if num_timesteps is None and ours is not None:
        num_timesteps = ours.num_timesteps
    config = unet_config_from_diffusers(_json(config_path), image_size=image_size,
                                        learned_variance=learned_variance,
                                        num_timesteps=num_timesteps, where=config_path)
    if (ours is not None and ours.diffusers_kwargs() == config.diffusers_kwargs()
            and ours.learned_variance == config.learned_variance):
        # the same network: keep our own spelling of it (e.g. out_channels=in_channels vs None)
        config = UNetConfig.from_dict({**ours.to_dict(), "num_timesteps": config.num_timesteps})
    model = UNet(config)
    params = params_from_state_dict(model, read_state_dict(weights), where=weights)
    return model, params


def load_diffusers(path, image_size=None, sampler=None, variant=None):
    """Load a diffusers DDPM folder -> ``(model, params, schedule, sampler_settings)``.

    ``path`` is a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a model folder
    (``config.json`` + weights, optionally ``scheduler_config.json`` beside it; without one the DDPM
    paper's linear schedule and DDPMScheduler's defaults are used). ``sampler_settings`` holds the
    keyword arguments for :func:`ddpm_ref.samplers.sample`, plus ``shape`` = (C, H, W) of one
    sample::

        model, params, schedule, settings = load_diffusers("ddpm-cifar10-32")
        x = samplers.sample(model.denoiser(params), schedule, n=16, seed=0, **settings)

    ``sampler`` ("ddpm" or "ddim") overrides the pipeline's choice; ``variant`` picks
    ``diffusion_pytorch_model.{variant}.safetensors`` (e.g. "fp16"; widened to float32).
    """
    unet_dir, sched_path, pipe_sampler = _pipeline_parts(path)
    if sched_path is not None:
        schedule, settings = schedule_from_diffusers(_json(sched_path), where=sched_path,
                                                     sampler=sampler or pipe_sampler)
    else:
        schedule, settings = schedule_from_diffusers({"_class_name": "DDPMScheduler"},
                                                     where=f"{path} (no scheduler config: defaults)",
                                                     sampler=sampler)
    model, params = load_unet(unet_dir, image_size=image_size,
                              learned_variance=settings["variance"] == "learned_range",
                              num_timesteps=schedule.T, variant=variant)
    cfg = model.config
    settings["shape"] = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return model, params, schedule, settings


def _looks_like_diffusers(folder):
    return any(os.path.exists(os.path.join(folder, name)) for name in
               ("model_index.json", "config.json", "scheduler_config.json", "unet", "scheduler"))


def _unique_sibling(folder, suffix):
    """A name beside ``folder`` (same parent, so renames stay on one filesystem) that is free now."""
    parent, base = os.path.split(folder)
    while True:
        candidate = os.path.join(parent, f".{base}.{secrets.token_hex(4)}.{suffix}")
        if not os.path.lexists(candidate):
            return candidate


def save_diffusers(path, model, params, schedule=None, settings=None, overwrite=False):
    """Write a model as diffusers reads it; export then :func:`load_diffusers` import is exact.

    Without a schedule: a UNet2DModel folder (``config.json`` + ``diffusion_pytorch_model.
    safetensors``). With one: a DDPMPipeline folder (``model_index.json``, ``unet/``,
    ``scheduler/scheduler_config.json``; a DDIMPipeline when ``settings["sampler"] == "ddim"``).
    The weights are float32 safetensors; our UNetConfig rides along in the file's metadata so that
    fields diffusers has no key for (``learned_variance``) survive the round trip. ``num_steps``,
    ``eta`` and ``ddim_eps_from_clipped`` are call-time arguments of diffusers' pipelines, not stored:
    they come back as the pipeline's defaults (all T steps for DDPM, 50 for DDIM; eta 0; the raw eps).

    ``path`` must not exist, or be an empty folder. An existing non-empty folder is refused
    (ValueError) unless ``overwrite=True``, and even then only when it looks like a diffusers model
    or pipeline folder (``model_index.json``, ``config.json``, ``unet/`` ...): the whole folder is then
    *replaced*, never merged, so no stale ``model_index.json``, ``unet/`` or weights of an earlier
    export survive to be loaded instead of the new model.

    The save is all or nothing: everything is written into a fresh hidden folder beside ``path``
    (``.{name}.{random}.tmp``), which is then renamed into place; an existing folder is first
    renamed aside and removed only after the new one is in place. If anything fails (a full disk,
    an invalid argument), the temporary folder is removed and ``path`` is left exactly as it was.
    Returns ``path``.
    """
    path = os.fspath(path)
    # Validate and convert everything before touching the disk.
    state = state_dict_from_params(model, params)
    metadata = {"format": "pt", _META_KEY: json.dumps(model.config.to_dict(), sort_keys=True)}
    unet_config = unet_config_to_diffusers(model.config)
    sched = None if schedule is None else scheduler_config_to_diffusers(schedule, settings)

    target = os.path.realpath(path)          # a symlinked folder: replace what it points to
    existing = os.path.lexists(target)
    if existing:
        if not os.path.isdir(target):
            raise ValueError(f"{path} exists and is not a folder; save_diffusers writes a folder")
        if os.listdir(target):
            if not overwrite:
                raise ValueError(f"{path} already exists and is not empty; pass overwrite=True to "
                                 "replace it (the old folder is removed only once the new one is "
                                 "complete), or choose a new path")
            if not _looks_like_diffusers(target):
                raise ValueError(f"{path} is not a diffusers model or pipeline folder (no "
                                 "model_index.json, config.json, unet/ or scheduler/); refusing to "
                                 "replace it even with overwrite=True")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _unique_sibling(target, "tmp")
    os.mkdir(tmp)
    try:
        if existing:                          # keep the permission bits of the folder we replace
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        if sched is None:
            unet_dir = tmp
        else:
            pipeline = "DDIMPipeline" if (settings or {}).get("sampler", "ddpm") == "ddim" else "DDPMPipeline"
            unet_dir = os.path.join(tmp, "unet")
            os.mkdir(os.path.join(tmp, "scheduler"))
            os.mkdir(unet_dir)
            _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
            _write_json(os.path.join(tmp, "model_index.json"), {
                "_class_name": pipeline, "_diffusers_version": _DIFFUSERS_VERSION,
                "scheduler": ["diffusers", sched["_class_name"]], "unet": ["diffusers", "UNet2DModel"]})
        st.save_file(state, os.path.join(unet_dir, f"{_WEIGHT_STEM}.safetensors"), metadata=metadata)
        _write_json(os.path.join(unet_dir, "config.json"), unet_config)
        if not existing:
            os.rename(tmp, target)
        elif not os.listdir(target):
            os.rmdir(target)
            os.rename(tmp, target)
        else:
            old = _unique_sibling(target, "old")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)        # put the previous export back
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
