"""The ``ddpm`` command line (also ``python -m ddpm_ref``): train, sample, forward, eval, demo.

What it is: a thin argparse front end over ``train.py`` (the loop and run directories),
``samplers.py`` (the reverse process, DDPM algorithm 2 and DDIM), ``diffusion.py`` (the forward
process, eq. 4, and the variational bound in bits/dim, sec. 3.3), ``metrics.py`` (sample quality)
and ``image.py`` (PNG, GIF/APNG, plots). What it is not: a place for maths; every number it prints
comes from those modules.

    ddpm train  --data digits --preset digits --steps 3000 --batch 128 --out runs/x [--resume|--force]
    ddpm sample --ckpt runs/x/checkpoint.npz -n 64 --sampler ddim --steps 100 [--animate gif]
    ddpm sample --from-diffusers ddpm-cifar10-32 -n 16 --steps 50   # a diffusers folder, no torch
    ddpm forward --data digits                      # one image noised at increasing t, as a strip
    ddpm eval   --ckpt runs/x/checkpoint.npz        # bits/dim on the test split + sample quality
    ddpm demo                                       # train digits for a few minutes, sample, plot

Conventions: ``--help`` everywhere; usage errors print one line and exit with code 2; unusable
files (a corrupt checkpoint, unreadable data) and refused actions (a non-empty ``--out`` without
``--resume`` or ``--force``) print one line and exit with code 1; a run stopped by a non-finite
loss exits with code 1 naming the step. Set ``DDPM_DEBUG=1`` for full tracebacks.

What a user made is kept: ``--resume`` refuses the training options it would ignore (the
checkpoint's configuration rules) instead of dropping them; an output file (``--out`` of
``forward``, ``--json``) is refused before any work when it is a folder, lies in a missing folder or
would replace a checkpoint or a run's config/metrics; ``sample``'s default file names carry every
option that changes the samples, so runs with different options never overwrite each other. Data
files are recorded by absolute path, so a run resumes and evaluates from any working directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

__all__ = ["main", "build_parser"]

# ------------------------------------------------------------------------------------ argparse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= low, else a one-line usage error naming the value."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {s!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")
_sets = _int_at_least(2, "2 or more (sample sets; the standard error needs two)")


def _float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _nonneg_float(s):
    v = _float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {s!r}")
    return v


def _positive_float(s):
    v = _float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _bpd_timesteps(s):
    if s == "all":
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or an integer >= 2, got {s!r}") from None
    if v < 2:
        raise argparse.ArgumentTypeError(f"expected 'all' or an integer >= 2, got {s!r}")
    return v


TOY_NAMES = ("swiss_roll", "moons", "8gaussians", "checkerboard", "rings")


# The demo's optimisation defaults, chosen by measurement for a 10-minute CPU budget (README, "Quality"):
# with few steps a higher learning rate and a shorter EMA horizon than the paper's 0.9999 help, and
# training stops at --minutes whatever --steps says.
DEMO_DEFAULTS = dict(steps=20000, lr=2e-3, ema_decay=0.995, minutes=10.0)


def _add_train_args(p, demo=False):
    from dataclasses import replace

    from .train import TrainConfig

    d = TrainConfig()
    if demo:
        d = replace(d, **{k: v for k, v in DEMO_DEFAULTS.items() if k != "minutes"})
    g = p.add_argument_group("data and model")
    if demo:
        g.add_argument("--preset", default="digits", choices=("tiny", "digits", "small"),
                       help="U-Net preset for the 8x8 digits (default digits)")
    else:
        g.add_argument("--data", default="digits",
                       help="'digits' (embedded), a 2-D toy (" + ", ".join(TOY_NAMES) + "), an IDX file, "
                            "an image folder or a .npy/.npz file (default: digits)")
        g.add_argument("--value-range", type=_float, nargs=2, metavar=("LO", "HI"), default=None,
                       help="the value range of a data file's float images, rescaled to [-1, 1] (e.g. 0 1 "
                            "for [0, 1] images; default: float images are taken to be in [-1, 1])")
        g.add_argument("--model", choices=("unet", "mlp"), default=None,
                       help="network (default: mlp for 2-D data, unet for images)")
        g.add_argument("--preset", default=None,
                       help="model preset: unet tiny|digits|small|cifar, mlp tiny|toy "
                            "(default: digits for images, toy for 2-D data)")
        g.add_argument("--dropout", type=_float, default=None, help="override the preset's dropout")
        g.add_argument("--class-cond", action="store_true",
                       help="condition on the data set's labels (for --label/--guidance at sampling)")
        g.add_argument("--p-uncond", type=_float, default=d.p_uncond,
                       help=f"label-drop probability for classifier-free guidance (default {d.p_uncond})")
        g.add_argument("--hflip", action="store_true", help="random horizontal flips (images)")
        g = p.add_argument_group("objective")
        g.add_argument("--schedule", choices=("linear", "cosine", "sigmoid"), default=d.schedule)
        g.add_argument("--T", type=_positive_int, default=d.T, help=f"diffusion steps (default {d.T})")
        g.add_argument("--prediction", choices=("epsilon", "sample", "v"), default=d.prediction)
        g.add_argument("--loss", choices=("simple", "hybrid"), default=d.loss,
                       help="L_simple, or improved-diffusion's hybrid loss (learned-range variance)")
        g.add_argument("--weighting", choices=("uniform", "min_snr"), default=d.weighting)
        g.add_argument("--timestep-sampler", choices=("uniform", "loss_aware"), default=d.timestep_sampler)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=_positive_int, default=None,
                   help=f"total training steps (default {d.steps}{'; the demo also stops at --minutes' if demo else ''})")
    g.add_argument("--batch", type=_positive_int, default=d.batch, help=f"batch size (default {d.batch})")
    g.add_argument("--lr", type=_float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--warmup", type=_nonneg_int, default=d.warmup, help=f"warmup steps (default {d.warmup})")
    g.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), default=d.lr_schedule,
                   help="after the warmup: constant, or a cosine or linear decay to 0 at --steps "
                        f"(default {d.lr_schedule})")
    g.add_argument("--grad-clip", type=_nonneg_float, default=d.grad_clip,
                   help=f"global-norm clip, 0 for none (default {d.grad_clip})")
    g.add_argument("--weight-decay", type=_float, default=d.weight_decay)
    g.add_argument("--ema", type=_float, default=d.ema_decay, help=f"EMA decay, 0 for none (default {d.ema_decay})")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="seed of every random stream (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/demo" if demo else None, required=not demo,
                   help="run directory (checkpoint.npz, metrics.jsonl, config.json)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--force", action="store_true", help="start over in a non-empty --out (replaces its run)")
    minutes = DEMO_DEFAULTS["minutes"] if demo else None
    g.add_argument("--minutes", type=_positive_float, default=minutes,
                   help="stop (with a checkpoint) after this much training time" +
                        (f" (default {minutes:g})" if demo else ""))
    g.add_argument("--checkpoint-every", type=_positive_int, default=d.checkpoint_every)
    g.add_argument("--log-every", type=_positive_int, default=d.log_every)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device_arg(g, "each step matches the CPU's to float32 rounding, and a run may resume on either")


def _add_device_arg(p, same):
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help=f"cpu: the NumPy reference; gpu: our CUDA kernels (the U-Net only; needs the `gpu` "
                        f"extra and an NVIDIA GPU); {same} (default cpu)")


def _add_sample_args(p, n_default, sampler_default, steps_help, from_diffusers=False):
    """Sampling options. With ``from_diffusers`` (``ddpm sample``) --sampler, --spacing and --eta
    default to None ("not given"): a diffusers pipeline's own settings apply unless they are given,
    and :func:`_checkpoint_sample_defaults` fills in the checkpoint defaults."""
    also = "; with --from-diffusers: the pipeline's" if from_diffusers else ""
    p.add_argument("-n", type=_positive_int, default=n_default, help=f"number of samples (default {n_default})")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None if from_diffusers else sampler_default,
                   help=f"reverse process (default {sampler_default}{also})")
    p.add_argument("--steps", type=_positive_int, default=None, help=steps_help)
    p.add_argument("--spacing", choices=("leading", "trailing", "linspace"),
                   default=None if from_diffusers else "leading",
                   help=f"timestep respacing when --steps < T (default leading{also})")
    p.add_argument("--eta", type=_float, default=None if from_diffusers else 0.0,
                   help=f"DDIM eta (0: deterministic; default 0{also})")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    p.add_argument("--batch", type=_positive_int, default=500, help="samples per network call (default 500)")
    _add_device_arg(p, "samples match the CPU's to float32 rounding")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm", description="Denoising diffusion probabilistic models in NumPy "
                     "(Ho et al. 2020): train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a model into a run directory",
                       description="Train a DDPM; writes checkpoint.npz, metrics.jsonl and config.json "
                                   "into --out. A non-empty --out needs --resume or --force.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("sample", help="draw samples from a checkpoint or a diffusers model",
                       description="Sample with DDPM ancestral steps or DDIM; writes a PNG (grid, or a "
                                   "scatter plot for 2-D data) and the raw float32 array (.npy). The model "
                                   "is a checkpoint (--ckpt) or a diffusers UNet2DModel / DDPMPipeline / "
                                   "DDIMPipeline folder (--from-diffusers, read with NumPy alone), whose "
                                   "scheduler settings apply unless --sampler/--steps/--spacing/--eta/--clip "
                                   "are given.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint.npz (or a run directory)")
    src.add_argument("--from-diffusers", metavar="DIR",
                     help="a diffusers model folder (config.json + weights) or pipeline folder "
                          "(model_index.json, unet/, scheduler/)")
    _add_sample_args(p, 64, "ddpm", "reverse steps (default: T for ddpm, 100 for ddim; with --from-diffusers "
                                    "the pipeline's: T for DDPMPipeline, 50 for DDIMPipeline)",
                     from_diffusers=True)
    p.add_argument("--label", type=_nonneg_int, default=None, help="class to draw (class-conditional models)")
    p.add_argument("--guidance", type=_float, default=0.0,
                   help="classifier-free guidance scale w: (1 + w) eps(x, y) - w eps(x) (default 0)")
    p.add_argument("--clip", choices=("auto", "on", "off", "dynamic"), default="auto",
                   help="clip x0 predictions to [-1, 1]: auto (default) = on for images, off for vectors "
                        "(the 2-D toys are standardised, not bounded); with --from-diffusers auto = the "
                        "scheduler's clip_sample / thresholding")
    p.add_argument("--animate", choices=("gif", "apng", "strip"), default=None,
                   help="also write the reverse process: an animation, or a PNG strip")
    p.add_argument("--frames", type=_positive_int, default=40, help="animation frames (default 40)")
    p.add_argument("--out", default=None, help="output path prefix (default: next to the checkpoint; with "
                                               "--from-diffusers in the current directory)")
    p.set_defaults(func=cmd_sample, parser=p)

    p = sub.add_parser("forward", help="picture the forward process q(x_t | x_0)",
                       description="One data image noised at increasing t (DDPM eq. 4), as a PNG strip.")
    p.add_argument("--data", default="digits", help="data set (default digits)")
    p.add_argument("--value-range", type=_float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="the value range of a data file's float images (as for train)")
    p.add_argument("--index", type=_nonneg_int, default=0, help="which training image (default 0)")
    p.add_argument("--frames", type=_positive_int, default=11, help="images in the strip (default 11)")
    p.add_argument("--schedule", choices=("linear", "cosine", "sigmoid"), default="linear")
    p.add_argument("--T", type=_positive_int, default=1000)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--scale", type=_positive_int, default=8, help="pixel magnification (default 8)")
    p.add_argument("--out", default="forward.png", help="output PNG (default forward.png)")
    p.set_defaults(func=cmd_forward, parser=p)

    p = sub.add_parser("eval", help="bits/dim and sample quality of a checkpoint",
                       description="Images: the variational bound in bits/dim on the test split (all T "
                                   "terms unless --bpd-timesteps), k-NN precision/recall (k=3) of samples "
                                   "against the test split beside the train-vs-test ceiling, near-copy "
                                   "share, and two likelihood baselines. 2-D data: energy distance of "
                                   "samples to held-out data beside the floor between two held-out draws, "
                                   "as expected values over --sets sample sets, with their ratio and its "
                                   "standard error.")
    p.add_argument("--ckpt", required=True, help="checkpoint.npz (or a run directory)")
    _add_sample_args(p, 1000, "ddim", "reverse steps (default: 100 for ddim, T for ddpm)")
    p.add_argument("--bpd-timesteps", type=_bpd_timesteps, default=None,
                   help="'all' (default: the full bound) or K for an unbiased K-term estimate")
    p.add_argument("--bpd-n", type=_positive_int, default=None, help="test images for bits/dim (default all)")
    p.add_argument("--no-bpd", action="store_true", help="skip bits/dim")
    p.add_argument("--sets", type=_sets, default=4,
                   help="2-D data: sample sets of -n points (and as many held-out sets) that the expected "
                        "distance and floor are estimated from (default 4; at least 2; more sets cost "
                        "sampling time and shrink the standard error, about like 1/sets for a good model)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval, parser=p)

    p = sub.add_parser("demo", help="train on the embedded digits for a few minutes, then sample",
                       description="The main job in one command: trains the digits preset on the "
                                   "embedded 8x8 digits (CPU, a few minutes), then writes samples, the "
                                   "reverse-process animation and a loss curve into --out.")
    _add_train_args(p, demo=True)
    p.add_argument("--samples", type=_positive_int, default=64, help="samples to draw (default 64)")
    p.add_argument("--sample-steps", type=_positive_int, default=100, help="DDIM steps (default 100)")
    p.set_defaults(func=cmd_demo, parser=p)
    return parser


# ------------------------------------------------------------------------------------ helpers

def _say(msg: str) -> None:
    print(msg, flush=True)


def _train_config(args, demo=False):
    """TrainConfig from parsed arguments."""
    from .train import TrainConfig

    if demo:
        data, model, preset = "digits", "unet", args.preset
        over, class_cond, p_uncond, hflip = {}, False, 0.1, False
        schedule, T, prediction, loss, weighting, ts = "linear", 1000, "epsilon", "simple", "uniform", "uniform"
    else:
        data = args.data
        if data != "digits" and data not in TOY_NAMES and os.path.exists(os.path.expanduser(data)):
            # stored absolute, so that --resume and eval find it from any working directory
            data = os.path.abspath(os.path.expanduser(data))
        value_range = args.value_range
        if value_range is not None and not value_range[0] < value_range[1]:
            raise ValueError(f"--value-range {value_range[0]:g} {value_range[1]:g}: expected LO < HI")
        model = args.model or ("mlp" if _holds_vectors(data, value_range) else "unet")
        preset = args.preset or ("toy" if model == "mlp" else "digits")
        over = {} if args.dropout is None else {"dropout": args.dropout}
        class_cond, p_uncond, hflip = args.class_cond, args.p_uncond, args.hflip
        if "p_uncond" in _explicit_options(args) and not class_cond:
            raise ValueError("--p-uncond is the label-drop probability of a class-conditional run: "
                             "it needs --class-cond")
        schedule, T, prediction, loss = args.schedule, args.T, args.prediction, args.loss
        weighting, ts = args.weighting, args.timestep_sampler
    steps = args.steps if args.steps is not None else (DEMO_DEFAULTS["steps"] if demo else TrainConfig().steps)
    return TrainConfig(
        data=data, model=model, preset=preset, model_overrides=over, schedule=schedule, T=T,
        prediction=prediction, variance="learned_range" if loss == "hybrid" else "fixed_small", loss=loss,
        weighting=weighting, timestep_sampler=ts, steps=steps, batch=args.batch, lr=args.lr,
        warmup=args.warmup, grad_clip=args.grad_clip or None,          # 0: no clipping
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, ema_decay=args.ema,
        class_cond=class_cond, p_uncond=p_uncond,
        hflip=hflip, seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        value_range=None if demo else args.value_range)


def _holds_vectors(data, value_range=None) -> bool:
    """Whether a --data source holds vectors (N, D) rather than images: the 2-D toys, and .npy/.npz
    arrays of rank 2 (the only user files that can hold vectors; loaded here to look)."""
    if data in TOY_NAMES:
        return True
    if not str(data).lower().endswith((".npy", ".npz")):
        return False
    from .data import load_dataset

    return load_dataset(data, split="all", value_range=value_range).x.ndim == 2


# Options that a resumed run takes from the command line; every other training option is the
# checkpoint's saved configuration, so giving one with --resume is refused rather than ignored.
_RESUME_OPTIONS = {"out", "resume", "steps", "minutes", "quiet", "device", "samples", "sample_steps"}


def _explicit_options(args) -> dict:
    """{dest: flag} of the options typed on the command line (not defaults), from ``args.argv``
    (kept by :func:`main`) and the subcommand's parser; abbreviations count as argparse reads them."""
    parser, argv = getattr(args, "parser", None), getattr(args, "argv", None)
    if parser is None or argv is None:
        return {}
    by_flag = {f: a for a in parser._actions for f in a.option_strings}
    given = {}
    for tok in argv:
        if tok == "--":
            break
        if not tok.startswith("-"):
            continue
        flag = tok.split("=", 1)[0]
        hits = [by_flag[flag]] if flag in by_flag else \
            {a for f, a in by_flag.items() if flag.startswith("--") and f.startswith(flag)}
        if len(hits) == 1:
            (action,) = hits
            given[action.dest] = max(action.option_strings, key=len)
    return given


def _run_training(args, cfg):
    from .train import train

    time_limit = None if args.minutes is None else 60.0 * args.minutes
    t0 = time.monotonic()
    if args.resume and args.force:
        raise ValueError("--resume and --force contradict each other: pick one")
    if args.resume:
        ignored = sorted(f for d, f in _explicit_options(args).items() if d not in _RESUME_OPTIONS)
        if ignored:
            raise ValueError(f"--resume continues {args.out} with the configuration saved in its checkpoint; "
                             f"{', '.join(ignored)} would be ignored (on resume only --steps, to raise the "
                             f"total, --minutes, --device and --quiet apply)")
    # On --resume the saved configuration rules; only the total --steps may be raised.
    tr = train(None if args.resume else cfg, args.out, resume=args.resume, force=args.force,
               progress=not args.quiet, time_limit=time_limit, steps=args.steps if args.resume else None,
               device=args.device)
    dt = time.monotonic() - t0
    loss = tr.metrics.get("loss_ema")
    _say(f"trained to step {tr.step}/{tr.cfg.steps} in {dt:.0f} s "
         f"({tr.model.__class__.__name__}, {tr.params.size:,} parameters"
         + (f", smoothed loss {loss:.4f}" if loss is not None else "") + ")")
    _say(f"checkpoint: {os.path.join(args.out, 'checkpoint.npz')}")
    return tr


def _load(ckpt_path, no_ema=False):
    """(checkpoint, model, schedule, params, train config dict) from a checkpoint or run directory."""
    from .checkpoint import load_checkpoint
    from .schedule import Schedule
    from .train import CHECKPOINT_NAME, model_from_config

    if os.path.isdir(ckpt_path):
        ckpt_path = os.path.join(ckpt_path, CHECKPOINT_NAME)
    ck = load_checkpoint(ckpt_path)
    try:
        model = model_from_config(ck.config["model"])
        schedule = Schedule.from_dict(ck.config["schedule"])
        tcfg = dict(ck.config.get("train", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ckpt_path}: its configuration is unusable ({e})") from None
    params = ck.params if (no_ema or ck.ema is None) else ck.ema
    if params.size != model.layout.size:
        raise ValueError(f"{ckpt_path}: {params.size} parameters, the configured model needs {model.layout.size}")
    return ckpt_path, ck, model, schedule, params, tcfg


def _draw(model, schedule, params, tcfg, n, args, y=None, guidance=0.0, trajectory=False, clip="auto",
          progress=True, settings=None):
    """Samples (n, ...) float32 (and the trajectory, if asked) in chunks of args.batch, with
    index_offset so that sample i's noise is the same whatever the chunking. ``clip="auto"`` clips
    x0 predictions to [-1, 1] for images (data scaled to [-1, 1]) and not for vectors.

    ``settings``: the complete keyword arguments of :func:`ddpm_ref.samplers.sample` plus ``shape``
    (as :func:`ddpm_ref.interop.load_diffusers` returns them, CLI overrides applied); then ``tcfg``,
    ``clip`` and the sampling options of ``args`` are not consulted."""
    from . import samplers

    if settings is None:
        shape = tuple(int(s) for s in _data_shape(model))
        if clip == "auto":
            clip = len(shape) == 3
        num_steps = args.steps
        if num_steps is None:
            num_steps = schedule.T if args.sampler == "ddpm" else min(100, schedule.T)
        kw = dict(sampler=args.sampler, num_steps=num_steps, spacing=args.spacing, eta=args.eta,
                  prediction=tcfg.get("prediction", "epsilon"), variance=tcfg.get("variance", "fixed_small"),
                  clip=clip)
    else:
        kw = dict(settings)
        shape = tuple(int(s) for s in kw.pop("shape"))
        num_steps = kw.get("num_steps") or schedule.T
    if num_steps > schedule.T:
        raise ValueError(f"--steps {num_steps} exceeds the model's T = {schedule.T}")
    den = _denoiser(model, params, getattr(args, "device", "cpu"))
    outs, trajs = [], []
    t0 = time.monotonic()
    last = [0.0]
    for start in range(0, n, args.batch):
        m = min(args.batch, n - start)
        yy = None if y is None else y[start:start + m]

        def report(i, total, t, start=start, m=m):
            now = time.monotonic()
            if progress and (now - last[0] >= 0.5 or i + 1 == total):
                last[0] = now
                sys.stderr.write(f"\rsampling {start + m}/{n}: step {i + 1}/{total} ({kw['sampler']}, "
                                 f"{now - t0:.0f} s)   ")
                sys.stderr.flush()

        res = samplers.sample(den, schedule, shape, m, args.seed, **kw, y=yy, guidance=guidance,
                              return_trajectory=trajectory, index_offset=start, progress=report)
        if trajectory:
            x, traj = res
            trajs.append(traj.states() if hasattr(traj, "states") else np.asarray(traj))
        else:
            x = res
        outs.append(np.asarray(x, dtype=np.float32))
    if progress:
        sys.stderr.write("\n")
    x = np.concatenate(outs)
    if trajectory:
        return x, np.concatenate(trajs, axis=1)
    return x


def _denoiser(model, params, device):
    """The model's eval-mode ``f(x, t, y=None)`` on host arrays, its network run on ``device``.

    On the GPU the network runs on our kernels and the reverse step on the host (the reference
    sampler, so every option works: guidance, trajectories, dynamic thresholding); each step copies
    x to the device and the output back, a few MB against the network's work. The fused reverse-step
    kernels are ``ddpm_ref.kernels.noise.sample``."""
    if device == "cpu" and getattr(getattr(model, "backend", None), "name", "cpu") == "cpu":
        return model.denoiser(params)
    if not hasattr(model, "to"):
        raise ValueError(f"--device {device}: the GPU backend runs the U-Net; this model is a "
                         f"{type(model).__name__} (use --device cpu)")
    net = model.to("gpu")
    B = net.backend
    f = net.denoiser(B.asarray(params, dtype=np.float32))

    def on_host(x, t, y=None):
        return B.to_host(f(B.asarray(x, dtype=np.float32), t, y))
    return on_host


def _data_shape(model):
    c = model.config
    if hasattr(c, "image_size"):
        return (c.in_channels, c.image_size, c.image_size)
    return (c.dim,)


def _labels(model, n, label):
    nc = getattr(model.config, "num_classes", None)
    if label is None:
        return None
    if not nc:
        raise ValueError(f"--label {label}: this model is not class-conditional (train with --class-cond)")
    if label >= nc:
        raise ValueError(f"--label must be in [0, {nc}), got {label}")
    return np.full(n, label, dtype=np.int64)


def _grid_png(path, x, scale=4):
    """Write images (N, C, H, W) in [-1, 1] as a grid PNG."""
    from . import image

    image.write_png(path, image.make_grid(np.clip(x, -1, 1), scale=scale, pad_value=96))


def _scatter(x, size=256, lim=None):
    """A 2-D point cloud (N, 2) rendered as a density raster: uint8 (size, size), dark = many points.

    The view is [-lim, lim]^2 with lim the 99.5th percentile of |x| (times 1.1) unless given.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"scatter needs points of shape (N, 2), got {x.shape}")
    fin = x[np.all(np.isfinite(x), axis=1)]
    if lim is None:
        lim = 1.1 * float(np.percentile(np.abs(fin), 99.5)) if fin.size else 1.0
        lim = lim if lim > 0 else 1.0
    ij = np.floor((fin + lim) / (2 * lim) * size).astype(np.int64)
    ok = np.all((ij >= 0) & (ij < size), axis=1)
    counts = np.zeros((size, size))
    np.add.at(counts, (size - 1 - ij[ok, 1], ij[ok, 0]), 1.0)    # row = -y (up is up)
    dens = np.log1p(counts) / max(np.log1p(counts.max()), 1e-12)
    return np.where(counts > 0, 175 - np.round(175 * dens), 255).astype(np.uint8)   # any point: <= 175


def _scatter_png(path, x, lim=None):
    from . import image

    image.write_png(path, _scatter(x, lim=lim))


def _frames_from_trajectory(traj, frames):
    """Pick ``frames`` evenly spaced states (first: x_T, last: the sample) from (S+1, N, ...)."""
    k = np.unique(np.round(np.linspace(0, traj.shape[0] - 1, min(frames, traj.shape[0]))).astype(int))
    return traj[k]


# ------------------------------------------------------------------------------------ commands

def cmd_train(args):
    # on --resume the checkpoint's configuration rules (_run_training refuses other options)
    cfg = None if args.resume else _train_config(args)
    _run_training(args, cfg)
    return 0


def _diffusers_settings(args, settings):
    """interop's sampler settings with the options given on the command line applied on top."""
    kw = dict(settings)
    if args.sampler is not None:
        kw["sampler"] = args.sampler
    if args.steps is not None:
        kw["num_steps"] = args.steps
    if args.spacing is not None:
        kw["spacing"] = args.spacing
    if args.eta is not None:
        kw["eta"] = args.eta
    if args.clip != "auto":
        kw["clip"] = {"on": True, "off": False, "dynamic": "dynamic"}[args.clip]
    return kw


def _checkpoint_sample_defaults(args):
    """The checkpoint defaults of the options ``ddpm sample`` leaves unset for --from-diffusers."""
    args.sampler = args.sampler or "ddpm"
    args.spacing = args.spacing or "leading"
    args.eta = 0.0 if args.eta is None else args.eta


def _sample_name(args, sampler, steps, T, spacing, eta):
    """The default file name (no extension) of ``ddpm sample``'s output: every option that changes
    the samples is in it (``spacing`` and ``eta`` as used: a diffusers pipeline's own when not given),
    so that two different runs never overwrite each other's files."""
    parts = [f"samples_{sampler}{steps}", f"seed{args.seed}"]
    if args.label is not None:
        parts.append(f"label{args.label}")
    if args.guidance:
        parts.append(f"w{args.guidance:g}")
    if sampler == "ddim" and eta:
        parts.append(f"eta{eta:g}")
    if spacing not in (None, "leading") and steps < T:
        parts.append(spacing)
    if args.clip != "auto":
        parts.append(f"clip-{args.clip}")
    if args.no_ema:
        parts.append("raw")
    return "_".join(parts)


def _check_output(path, flag):
    """Refuse, before any work, an output file path that cannot be written or would destroy what a
    user made: a folder, a path in a missing folder, an existing ``.npz`` (a checkpoint) or a run
    directory's config/metrics file."""
    from .train import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME

    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.exists(path):
        base = os.path.basename(path)
        if base.lower().endswith(".npz") or (
                base in (CONFIG_NAME, METRICS_NAME) and os.path.exists(os.path.join(folder, CHECKPOINT_NAME))):
            raise ValueError(f"{flag} {path}: refusing to overwrite a checkpoint or a run's file; "
                             f"choose another path")


def cmd_sample(args):
    if args.animate == "gif" and not _has_pillow():      # fail before sampling, not after
        raise ImportError("--animate gif needs Pillow: pip install 'ddpm-ref[cli]' (or use --animate apng)")
    if args.animate in ("gif", "apng") and args.frames < 2:
        raise ValueError(f"--frames {args.frames}: an animation needs at least 2 frames (x_T and the samples)")
    settings = None
    if args.from_diffusers is not None:
        from . import interop

        if args.no_ema:
            raise ValueError("--no-ema picks a checkpoint's raw weights over their EMA; a diffusers folder "
                             "holds one set of weights")

        src = args.from_diffusers
        model, params, schedule, loaded = interop.load_diffusers(src)
        settings = _diffusers_settings(args, loaded)
        tcfg = {}
        name = os.path.basename(os.path.normpath(os.path.abspath(src))) or "diffusers"
        sampler, steps = settings["sampler"], settings["num_steps"] or schedule.T
        default_prefix = os.path.join(os.getcwd(), f"{name}_" + _sample_name(
            args, sampler, steps, schedule.T, settings.get("spacing"), settings.get("eta")))
    else:
        _checkpoint_sample_defaults(args)
        ckpt_path, ck, model, schedule, params, tcfg = _load(args.ckpt, args.no_ema)
        steps = args.steps or (schedule.T if args.sampler == "ddpm" else min(100, schedule.T))
        default_prefix = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)),
                                      _sample_name(args, args.sampler, steps, schedule.T, args.spacing,
                                                   args.eta))
    y = _labels(model, args.n, args.label)
    if args.guidance and y is None:
        raise ValueError("--guidance needs --label (and a class-conditional model)")
    clip = {"auto": "auto", "on": True, "off": False, "dynamic": "dynamic"}[args.clip]
    want_traj = args.animate is not None
    res = _draw(model, schedule, params, tcfg, args.n, args, y=y, guidance=args.guidance, trajectory=want_traj,
                clip=clip, settings=settings)
    x, traj = res if want_traj else (res, None)
    prefix = args.out or default_prefix
    if args.out is not None and (args.out.endswith(("/", os.sep)) or os.path.isdir(args.out)):
        prefix = os.path.join(args.out, os.path.basename(default_prefix))      # --out a folder
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    np.save(prefix + ".npy", x)
    if x.ndim == 4:
        _grid_png(prefix + ".png", x)
    else:
        _scatter_png(prefix + ".png", x)
    written = [prefix + ".png", prefix + ".npy"]
    if want_traj:
        written.append(_write_reverse(prefix, traj, args.animate, args.frames))
    for w in written:
        _say(f"wrote {w}")
    return 0


def _has_pillow() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def _write_reverse(prefix, traj, kind, frames):
    """The reverse process as an animation (gif/apng) or a PNG strip; returns the path."""
    from . import image
    from .data import to_uint8

    traj = np.asarray(traj)                 # (S+1, N, ...) from x_T to x_0
    if traj.ndim == 3:                      # 2-D data: scatter plots
        sel = _frames_from_trajectory(traj, frames if kind != "strip" else 8)
        lim = 1.1 * float(np.percentile(np.abs(sel[-1]), 99.5)) or 1.0
        pics = [_scatter(f, size=192, lim=lim) for f in sel]
        if kind == "strip":
            path = prefix + "_reverse.png"
            image.write_png(path, np.concatenate(pics, axis=1))
            return path
    else:
        nshow = min(traj.shape[1], 16)
        if kind == "strip":
            sel = _frames_from_trajectory(traj[:, :nshow], 10)        # (F, n, C, H, W)
            # rows: samples; columns: time from x_T (left) to x_0 (right)
            u8 = to_uint8(np.clip(np.swapaxes(sel, 0, 1).reshape((-1,) + sel.shape[2:]), -1, 1))
            path = prefix + "_reverse.png"
            image.write_png(path, image.make_grid(u8, nrow=sel.shape[0], scale=4, pad_value=96))
            return path
        sel = _frames_from_trajectory(traj[:, :nshow], frames)
        pics = [image.make_grid(to_uint8(np.clip(f, -1, 1)), scale=4, pad_value=96) for f in sel]
    path = prefix + ("_reverse.gif" if kind == "gif" else "_reverse_anim.png")
    delays = [80] * (len(pics) - 1) + [1500]      # hold the final samples
    if kind == "gif":
        image.write_gif(path, pics, delay_ms=delays)
    else:
        image.write_apng(path, pics, delay_ms=delays)
    return path


def cmd_forward(args):
    from . import diffusion, image, rng
    from .data import load_dataset, to_uint8
    from .schedule import Schedule

    _check_output(args.out, "--out")
    ds = load_dataset(args.data, split="train", value_range=args.value_range)
    if args.index >= len(ds):
        raise ValueError(f"--index must be < {len(ds)} (the training set's size), got {args.index}")
    schedule = getattr(Schedule, args.schedule)(T=args.T)
    k = max(args.frames, 2)
    t = np.unique(np.round(np.linspace(0, args.T - 1, k - 1)).astype(np.int64))   # x0, then x_t
    x0 = np.repeat(ds.x[args.index:args.index + 1], t.size, axis=0)                 # (K, ...)
    # one eps for every frame (same index and step), so the strip shows the same noise growing
    noise = rng.normal(args.seed, rng.Stream.EVAL, np.full(t.size, args.index), 0, x0.shape[1:])
    xt = diffusion.q_sample(schedule, x0, t, noise).astype(np.float32)
    seq = np.concatenate([ds.x[args.index:args.index + 1], xt])                       # (K, ...)
    if ds.x.ndim == 4:
        image.write_png(args.out, image.make_strip(to_uint8(np.clip(seq, -1, 1)), scale=args.scale, pad_value=96))
    else:
        raise ValueError(f"ddpm forward pictures images; {args.data!r} holds {ds.x.shape[1]}-D points")
    _say(f"wrote {args.out}: {args.data} image {args.index} at t = 0 (data), "
         + ", ".join(str(int(v) + 1) for v in t) + f" of T = {args.T}")
    return 0


def cmd_eval(args):
    from . import diffusion, metrics, rng
    from .data import load_dataset, to_uint8

    from .checkpoint import atomic_write

    if args.json:
        _check_output(args.json, "--json")
    ckpt_path, ck, model, schedule, params, tcfg = _load(args.ckpt, args.no_ema)
    data_name = tcfg.get("data", "digits")
    data_seed = int(tcfg.get("data_seed", 0))
    value_range = tcfg.get("value_range")
    results = {"checkpoint": ckpt_path, "step": ck.step, "data": data_name, "sampler": args.sampler,
               "steps": args.steps or (schedule.T if args.sampler == "ddpm" else min(100, schedule.T)),
               "n": args.n, "seed": args.seed, "ema": not args.no_ema and ck.ema is not None}
    test = load_dataset(data_name, split="test", seed=data_seed, value_range=value_range)
    if test.x.ndim == 2:
        # The energy distance of n samples to n held-out points, beside the same figure for two held-out
        # draws (the floor). One such figure is mostly noise (a perfect model's spreads over 0.5x-2x),
        # so the reported figures are their expected values, estimated by metrics.energy_ratio from M
        # sample sets (one sampling run of M * n samples, set j = samples j*n .. (j+1)*n - 1, so set 0
        # is what `-n n` alone draws) and M held-out sets r_j (the toy's draws with the M seeds after
        # the data seed), with a jackknife standard error. Single-set figures are kept in the JSON:
        # ED(set j, r_j) and ED(s_j, r_j), s_j M further held-out draws.
        n, sets = args.n, args.sets
        if n < 2:
            raise ValueError(f"-n {n}: 2-D evaluation needs at least 2 samples per set")

        if data_name in TOY_NAMES:
            def draw(k):                  # a fresh held-out draw from the toy's distribution
                return load_dataset(data_name, split="test", seed=(data_seed + k) % 2**32, n=n).x
        else:
            # A data file: the held-out sets are disjoint parts of its test split (another seed would
            # re-split the file and hand back points the model was trained on).
            need = 2 * sets * n
            if need > len(test):
                raise ValueError(f"-n {n} --sets {sets}: evaluating on a data file needs 2 x sets x n = {need} "
                                 f"held-out points, and its test split has {len(test)}; lower -n or --sets")
            order = rng.permutation(data_seed, rng.Stream.EVAL, len(test))

            def draw(k):                  # k = 1 .. 2 sets
                return test.x[order[(k - 1) * n:k * n]]

        nc = getattr(model.config, "num_classes", None)
        x = _draw(model, schedule, params, tcfg, n * sets, args,
                  y=(np.arange(n * sets) % nc).astype(np.int64) if nc else None)
        xs = [x[j * n:(j + 1) * n] for j in range(sets)]
        refs = [draw(1 + j) for j in range(sets)]
        est = metrics.energy_ratio(xs, refs, n=n)
        single = [metrics.energy_distance(a, r) for a, r in zip(xs, refs)]
        single_floor = [metrics.energy_distance(draw(1 + sets + j), r) for j, r in enumerate(refs)]
        results.update(energy_distance=est.distance, energy_floor=est.floor, ratio_to_floor=est.ratio,
                       ratio_stderr=est.ratio_stderr, population_energy_distance=est.population, sets=sets,
                       n_total=n * sets, single_set_distances=single, single_set_floors=single_floor)
        _say(f"energy distance, {n} samples vs {n} held-out, expected: {est.distance:.3e}  (floor, "
             f"held-out vs held-out: {est.floor:.3e}); ratio {est.ratio:.3f} +- {est.ratio_stderr:.3f} "
             f"(from {sets} sets of {n}; the distributions' own energy distance {est.population:.2e})")
        _say(f"single sets of {n}, for scale: distance {min(single):.2e}-{max(single):.2e}, "
             f"floor {min(single_floor):.2e}-{max(single_floor):.2e}")
    else:
        if args.n < 4:                    # before bits/dim, which may take long
            raise ValueError(f"-n {args.n}: precision/recall (k = 3 nearest neighbours) needs at least 4 samples")
        train = load_dataset(data_name, split="train", seed=data_seed, value_range=value_range)
        if not args.no_bpd:
            xb = test.x if args.bpd_n is None else test.x[:args.bpd_n]
            t0 = time.monotonic()
            k = "all" if args.bpd_timesteps is None else args.bpd_timesteps

            def prog(done, total):
                sys.stderr.write(f"\rbits/dim: {done}/{total} (sample, timestep) terms   ")
                sys.stderr.flush()

            bpd = diffusion.bits_per_dim(schedule, model.denoiser(params), xb,
                                         prediction=tcfg.get("prediction", "epsilon"),
                                         variance=tcfg.get("variance", "fixed_small"), seed=args.seed,
                                         timesteps=args.bpd_timesteps, batch_size=args.batch, progress=prog)
            sys.stderr.write("\n")
            total = np.asarray(bpd["total"])
            results["bpd"] = float(total.mean())
            results["bpd_stderr"] = float(total.std(ddof=1) / np.sqrt(total.size)) if total.size > 1 else 0.0
            results["bpd_terms"] = k
            results["bpd_n"] = int(total.size)
            results["bpd_prior"] = float(np.mean(bpd["prior"]))
            results["bpd_decoder"] = float(np.mean(bpd["decoder"]))
            _say(f"bits/dim on {total.size} test images ({k} terms): {results['bpd']:.3f} "
                 f"+- {results['bpd_stderr']:.3f}  ({time.monotonic() - t0:.0f} s)")
            train_u8, test_u8 = to_uint8(train.x), to_uint8(test.x)
            levels = getattr(train, "levels", None)
            results["gaussian_bpd"] = metrics.gaussian_bpd(train_u8, test_u8, levels, seed=args.seed)
            results["histogram_bpd"] = metrics.histogram_bpd(train_u8, test_u8, levels)
            _say(f"baselines: dequantised full-covariance Gaussian {results['gaussian_bpd']:.3f}, "
                 f"per-pixel histograms {results['histogram_bpd']:.3f} bits/dim")
        nc = getattr(model.config, "num_classes", None)
        y = (np.arange(args.n) % nc).astype(np.int64) if nc else None   # balanced classes if conditional
        x = _draw(model, schedule, params, tcfg, args.n, args, y=y)
        pr = metrics.precision_recall(test.x, x, k=3)
        ceil = metrics.precision_recall(test.x, train.x, k=3)
        copies = metrics.near_copy_share(x, train.x)
        results.update(precision=pr.precision, recall=pr.recall, ceiling_precision=ceil.precision,
                       ceiling_recall=ceil.recall, near_copy_share=copies.share)
        _say(f"precision {pr.precision:.3f}  recall {pr.recall:.3f}  ({args.n} samples vs {len(test)} test "
             f"images, k = 3)")
        _say(f"real-vs-real ceiling (train vs test): precision {ceil.precision:.3f}  recall {ceil.recall:.3f}")
        _say(f"near-copies of training images: {100 * copies.share:.1f}%")
    if args.json:
        text = json.dumps(results, indent=1) + "\n"
        atomic_write(args.json, lambda f: f.write(text.encode("utf-8")))
        _say(f"wrote {args.json}")
    return 0


def _loss_curve(run_dir, path):
    from . import image
    from .train import METRICS_NAME, read_metrics

    recs = read_metrics(os.path.join(run_dir, METRICS_NAME))
    if not recs:
        return None
    steps = np.array([r["step"] for r in recs], dtype=np.float64)
    loss = np.array([r["loss"] for r in recs], dtype=np.float64)
    image.write_loss_curve(path, loss, steps=steps, log_y=True, smooth=10 if loss.size > 30 else 0)
    return path


def cmd_demo(args):
    cfg = _train_config(args, demo=True)
    if args.resume:                      # the checkpoint's configuration, not the command line's defaults
        _say(f"ddpm demo: resuming the run in {args.out} with its saved configuration for up to "
             f"{args.minutes:g} minutes")
    else:
        _say(f"ddpm demo: training the '{cfg.preset}' U-Net on the embedded 8x8 digits for up to "
             f"{args.minutes:g} minutes (batch {cfg.batch}, lr {cfg.lr:g}, EMA {cfg.ema_decay:g}) into {args.out}")
    tr = _run_training(args, cfg)
    model, schedule = tr.model, tr.schedule
    params = tr.ema if tr.ema is not None else tr.params
    sargs = argparse.Namespace(steps=args.sample_steps, sampler="ddim", spacing="leading", eta=0.0,
                               seed=args.seed, batch=500, device=args.device)
    x, traj = _draw(model, schedule, params, tr.cfg.to_dict(), args.samples, sargs, trajectory=True)
    out = args.out
    np.save(os.path.join(out, "samples.npy"), x)
    paths = [os.path.join(out, "samples.png")]
    _grid_png(paths[0], x)
    # GIF through Pillow (the `cli` extra) when installed; otherwise an APNG, which needs nothing.
    paths.append(_write_reverse(os.path.join(out, "samples"), traj, "gif" if _has_pillow() else "apng", 40))
    paths.append(_write_reverse(os.path.join(out, "samples"), traj, "strip", 10))
    lc = _loss_curve(out, os.path.join(out, "loss.png"))
    if lc:
        paths.append(lc)
    _say("wrote:")
    for p in paths:
        _say(f"  {p}")
    _say(f"next: ddpm eval --ckpt {os.path.join(out, 'checkpoint.npz')}   (bits/dim, precision/recall)")
    return 0


# ------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    """Entry point of ``ddpm``; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    from .train import NonFiniteLossError
    try:
        from .kernels.runtime import GPUUnavailableError
    except ImportError:                    # a checkout run without installing: no GPU backend at all
        GPUUnavailableError = ImportError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, NonFiniteLossError, ImportError, GPUUnavailableError) as e:
        if os.environ.get("DDPM_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"ddpm {args.command}: error: {msg}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"ddpm {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
