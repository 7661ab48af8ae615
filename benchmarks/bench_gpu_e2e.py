"""End-to-end GPU benchmark: a training step and a sampling step of the U-Net on our kernels
(``Trainer(device="gpu")``, ``UNet.to("gpu")``) against diffusers' UNet2DModel in PyTorch eager FP32.

What it measures (on a real NVIDIA GPU; refuses to run in the simulator):

1. Training step, ``--preset`` (default ``cifar``: 35.7M parameters) at ``--batch`` (default 128):
   ours is one ``Trainer.train_step()`` (batch gather on the host, the fused forward-process kernel,
   the U-Net forward and backward on our kernels, the fused L_simple kernel, global-norm clipping,
   AdamW + EMA in one kernel, the loss read back to the host). The peer does the same work in
   PyTorch: ``DDPMScheduler.add_noise``, ``UNet2DModel`` forward, MSE, backward,
   ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` (foreach), an EMA by ``torch._foreach_lerp_``, and
   ``loss.item()``. Same configuration (``UNetConfig.diffusers_kwargs``), dropout 0.1, both FP32;
   the peer with TF32 off (the target's reference) and with TF32 on.
2. Sampling step at ``--sample-batch``: one network evaluation in eval mode plus one DDPM reverse
   step (ours: the fused step kernel; peer: ``DDPMScheduler.step``), reported as images per second of
   1000-step DDPM sampling (batch / (1000 x step time)).
3. Peak device memory of the training step: PyTorch's ``max_memory_allocated``; ours, the CuPy
   memory pool's ``total_bytes`` (bytes held from the driver, a peak-like figure since freed blocks
   stay in the pool) after the timed steps.
4. ``--breakdown``: where our training step's time goes, by op: each op call timed between device
   synchronisations (host work plus kernels), and by CUDA events around each call in an
   unsynchronised step (device time only); see :func:`_breakdown`.

Each time is the median of ``--repeats`` steps after ``--warmup`` steps (the first step also
JIT-compiles our kernels), measured with a device synchronisation on both sides of each step.
Writes JSON (``--out``) and prints a table. Usage:
``python benchmarks/bench_gpu_e2e.py --out e2e.json [--preset cifar --batch 128 --repeats 5]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402



def save_result(path, result):
    """Write ``result`` to ``path`` (when given) atomically (:func:`benchmarks.common.write_json`)."""
    if path:
        common.write_json(path, result)


def _our_sync_and_pool():
    """(synchronise, memory pool or None) for our side: CuPy's on a GPU; no-ops in the simulator."""
    try:
        import cupy
    except ImportError:
        return (lambda: None), None
    return cupy.cuda.Device().synchronize, cupy.get_default_memory_pool()


def _torch_sync(torch, device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _median_time(fn, sync, warmup, repeats):
    """(median seconds, the times) of ``fn`` followed by a device synchronisation (common.interleaved)."""
    times = common.interleaved({"fn": lambda: (fn(), sync())}, repeats, warmup)["fn"]
    return common.median(times), [round(t, 5) for t in times]


def _dataset(shape, n=1024):
    from ddpm_ref.data import Dataset
    x = np.random.default_rng(0).uniform(-1, 1, size=(n,) + shape).astype(np.float32)
    return Dataset(x=x, y=None, num_classes=0, name="random")


def ours_train(preset, batch, warmup, repeats, breakdown):
    from ddpm_ref.models.unet import UNET_PRESETS
    from ddpm_ref.train import TrainConfig, Trainer
    p = UNET_PRESETS[preset]
    shape = (p["in_channels"], p["image_size"], p["image_size"])
    cfg = TrainConfig(data="random", model="unet", preset=preset, batch=batch, steps=10**6, lr=2e-4,
                      warmup=0, ema_decay=0.9999, grad_clip=1.0)
    sync, pool = _our_sync_and_pool()
    if pool is not None:
        pool.free_all_blocks()
    tr = Trainer(cfg, _dataset(shape), device="gpu")
    t0 = time.perf_counter()
    tr.train_step()                                  # compiles every kernel specialisation
    sync()
    first = time.perf_counter() - t0
    med, times = _median_time(tr.train_step, sync, warmup, repeats)
    row = {"median_s": med, "times_s": times, "first_step_s": round(first, 2),
           "pool_bytes": None if pool is None else int(pool.total_bytes()), "params": int(tr.params.size)}
    if breakdown:
        row["breakdown_s"] = _breakdown(tr.model.backend, tr.train_step, sync)
    return row, tr


def _wrap_ops(B, wrapper):
    """Replace every op ``*_forward`` / ``*_backward`` of the backend ``B`` by ``wrapper(fn, key)``;
    returns the list to restore."""
    saved = []
    for mod_name in ("conv", "norm", "attention", "activation", "resample", "linear", "embedding"):
        mod = getattr(B, mod_name)
        for fname in [f for f in dir(mod) if not f.startswith("_") and f.endswith(("_forward", "_backward"))]:
            fn = getattr(mod, fname)
            if callable(fn):
                saved.append((mod, fname, fn))
                setattr(mod, fname, wrapper(fn, f"{mod_name}.{fname}"))
    return saved


def _breakdown(B, run, sync):
    """Where one call of ``run`` (a training or sampling step on backend ``B``) spends its time, by
    op: ``wall_s``, each op call bracketed by device synchronisations (its host work plus its
    kernels, run alone); ``gpu_s``, from CUDA events recorded
    around each call without synchronising (the device time between the call's first and last
    launch, as in the real step); ``calls``. Returns {op: {"wall_s", "gpu_s", "calls"}} plus the
    whole step's two figures. Without CuPy (the simulator, where kernels run synchronously on the
    host) the "events" are host clock readings."""
    try:
        import cupy
        new_event = cupy.cuda.Event
        elapsed = lambda a, b: cupy.cuda.get_elapsed_time(a, b) / 1e3  # noqa: E731
    except ImportError:
        class new_event:                   # noqa: N801  (stands in for cupy.cuda.Event)
            def record(self):
                self.t = time.perf_counter()
        elapsed = lambda a, b: b.t - a.t  # noqa: E731
    wall: dict = {}
    events: dict = {}
    calls: dict = {}

    def timed(fn, key):
        def run(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            wall[key] = wall.get(key, 0.0) + time.perf_counter() - t0
            calls[key] = calls.get(key, 0) + 1
            return out
        return run

    def evented(fn, key):
        def run(*a, **k):
            start, end = new_event(), new_event()
            start.record()
            out = fn(*a, **k)
            end.record()
            events.setdefault(key, []).append((start, end))
            return out
        return run

    result = {}
    for name, wrapper in (("wall_s", timed), ("gpu_s", evented)):
        saved = _wrap_ops(B, wrapper)
        try:
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            result[f"(whole step, {name})"] = round(time.perf_counter() - t0, 5)
        finally:
            for mod, fname, fn in saved:
                setattr(mod, fname, fn)
    gpu = {k: sum(elapsed(a, b) for a, b in v) for k, v in events.items()}
    rows = {k: {"wall_s": round(wall[k], 5), "gpu_s": round(gpu.get(k, 0.0), 5), "calls": calls[k]}
            for k in sorted(wall, key=lambda k: -wall[k])}
    rows["(sum of ops)"] = {"wall_s": round(sum(wall.values()), 5), "gpu_s": round(sum(gpu.values()), 5),
                            "calls": sum(calls.values())}
    result.update(rows)
    return result


def peer_train(torch, preset, batch, warmup, repeats, tf32, device="cuda"):
    from diffusers import DDPMScheduler, UNet2DModel
    from ddpm_ref.models.unet import UNet
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    cfg = UNet.from_preset(preset).config
    dev = torch.device(device)
    torch.manual_seed(0)
    model = UNet2DModel(**cfg.diffusers_kwargs()).to(dev).train()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    sched = DDPMScheduler(num_train_timesteps=1000)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    data = torch.rand((1024,) + shape, device=dev) * 2 - 1
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        idx = torch.randint(0, data.shape[0], (batch,), device=dev)
        x0 = data[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=dev)
        xt = sched.add_noise(x0, noise, t)
        pred = model(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - 0.9999)
        return loss.item()

    med, times = _median_time(step, _torch_sync(torch, device), warmup, repeats)
    return {"median_s": med, "times_s": times,
            "max_allocated_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None}


def ours_sample(preset, batch, warmup, repeats, details=None):
    """Median seconds of one sampling step (network + fused DDPM step); with a ``details`` dict, also
    its per-op breakdown (``details["breakdown_s"]``, as for training)."""
    from ddpm_ref.kernels import noise as knoise
    from ddpm_ref.models.unet import UNet
    from ddpm_ref.rng import Stream
    from ddpm_ref.schedule import Schedule
    net = UNet.from_preset(preset).to("gpu")
    params = net.backend.asarray(net.init_params(0))
    sched = Schedule.linear()
    c, s = net.config.in_channels, net.config.image_size
    index = np.arange(batch)
    x = knoise.normal(0, Stream.SAMPLE_INIT, index, 0, (c, s, s))
    f = net.denoiser(params)
    tt = np.full(batch, 500, dtype=np.int64)

    def step():
        out = f(x, tt)
        knoise.ddpm_step(sched, out, x, tt, 499, seed=0, index=index)

    sync = _our_sync_and_pool()[0]
    med = _median_time(step, sync, warmup, repeats)[0]
    if details is not None:
        details["breakdown_s"] = _breakdown(net.backend, step, sync)
    return med


def peer_sample(torch, preset, batch, warmup, repeats, tf32, device="cuda"):
    from diffusers import DDPMScheduler, UNet2DModel
    from ddpm_ref.models.unet import UNet
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    cfg = UNet.from_preset(preset).config
    dev = torch.device(device)
    model = UNet2DModel(**cfg.diffusers_kwargs()).to(dev).eval()
    sched = DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(1000)
    x = torch.randn((batch, cfg.in_channels, cfg.image_size, cfg.image_size), device=dev)
    t = int(sched.timesteps[500])

    def step():
        with torch.no_grad():
            out = model(x, t).sample
            sched.step(out, t, x)

    return _median_time(step, _torch_sync(torch, device), warmup, repeats)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description="U-Net training and sampling on our GPU kernels vs diffusers",
                                 allow_abbrev=False)
    ap.add_argument("--preset", default="cifar")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sample-batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        common.check_json_path(args.out, "--out")        # before minutes of measurements
    except ValueError as e:
        ap.error(str(e))
    from ddpm_ref.kernels import runtime
    if runtime.backend() != "cuda":
        raise SystemExit("bench_gpu_e2e.py needs a real GPU (the simulator would take days)")
    result = {"preset": args.preset, "batch": args.batch, "sample_batch": args.sample_batch,
              "repeats": args.repeats, "warmup": args.warmup}

    def save():                                  # after every part: atomic, so a timeout keeps what was measured
        save_result(args.out, result)

    row, tr = ours_train(args.preset, args.batch, args.warmup, args.repeats, args.breakdown)
    result["train_ours"] = row
    result["autotuner_after_training"] = runtime.tuning_report()
    del tr
    save()
    print(f"ours train step ({args.preset}, batch {args.batch}): {row['median_s'] * 1e3:.1f} ms "
          f"(first step {row['first_step_s']} s), pool {row['pool_bytes'] / 2**20:.0f} MiB", flush=True)
    if "breakdown_s" in row:
        print(json.dumps(row["breakdown_s"], indent=1), flush=True)
    try:
        import torch
        import diffusers  # noqa: F401
        have_peer = torch.cuda.is_available()
    except ImportError as exc:
        print(f"no peer: {exc}")
        have_peer = False
    if have_peer:
        for tf32 in (False, True):
            key = f"train_diffusers_tf32_{'on' if tf32 else 'off'}"
            result[key] = peer_train(torch, args.preset, args.batch, args.warmup, args.repeats, tf32)
            result[key]["ratio_ours_over_peer"] = row["median_s"] / result[key]["median_s"]
            torch.cuda.empty_cache()
            save()
            print(f"diffusers train step, TF32 {'on' if tf32 else 'off'}: {result[key]['median_s'] * 1e3:.1f} ms "
                  f"(ours/peer {result[key]['ratio_ours_over_peer']:.2f}), max allocated "
                  f"{result[key]['max_allocated_bytes'] / 2**20:.0f} MiB", flush=True)
    details = {} if args.breakdown else None
    s_ours = ours_sample(args.preset, args.sample_batch, args.warmup, args.repeats, details)
    result["sample_ours"] = {"step_s": s_ours, "images_per_s_ddpm1000": args.sample_batch / (1000 * s_ours),
                             **(details or {})}
    save()
    print(f"ours sampling step (batch {args.sample_batch}): {s_ours * 1e3:.2f} ms = "
          f"{result['sample_ours']['images_per_s_ddpm1000']:.2f} images/s of DDPM-1000", flush=True)
    if have_peer:
        for tf32 in (False, True):
            key = f"sample_diffusers_tf32_{'on' if tf32 else 'off'}"
            s_p = peer_sample(torch, args.preset, args.sample_batch, args.warmup, args.repeats, tf32)
            result[key] = {"step_s": s_p, "images_per_s_ddpm1000": args.sample_batch / (1000 * s_p),
                           "ratio_ours_over_peer": s_ours / s_p}
            save()
            print(f"diffusers sampling step, TF32 {'on' if tf32 else 'off'}: {s_p * 1e3:.2f} ms "
                  f"(ours/peer {s_ours / s_p:.2f})", flush=True)
    result["autotuner"] = runtime.tuning_report()
    save()
    return result


if __name__ == "__main__":
    main()
