"""End-to-end rows of the benchmark suite: one training step and sampling throughput, ours against
diffusers' ``UNet2DModel`` (the same configuration, ``UNetConfig.diffusers_kwargs()``, and the same
weights: our parameter names are its state_dict keys) on PyTorch CPU at the same thread count.

* ``train step``: draw t (uniform) and eps, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
  (DDPM eq. 4), eps_theta(x_t, t) in train mode (dropout on), L_simple = mean ||eps - eps_theta||^2
  (eq. 14), backward to every parameter, one AdamW update (lr 2e-4, no weight decay, no EMA).
  Ours: ``rng.randint`` / ``rng.normal``, ``diffusion.q_sample``, ``UNet.forward/backward``,
  ``ops.mse_forward/backward``, ``optim.AdamW``. Peer: ``torch.randint`` / ``torch.randn``,
  ``DDPMScheduler.add_noise``, ``UNet2DModel(...).train()``, ``F.mse_loss``, ``torch.optim.AdamW``.
* ``ddpm 1000`` / ``ddim 50`` sampling: ``samplers.sample`` (Algorithm 2, fixed_small variance,
  clipped x0; DDIM eta = 0, "leading" spacing) vs the ``DDPMPipeline`` / ``DDIMPipeline`` loop
  (``unet(x, t).sample`` then ``scheduler.step``) under ``torch.inference_mode()``, reported as
  images per second. ``quick`` > 0 times that many steps of a respaced chain (each step does the same
  work as a step of the full chain: one network evaluation and one update) and extrapolates:
  chain time = median step time x number of steps; the output says so. The measured steps are
  ``max(quick, repeats)``, capped at the chain's length (:func:`quick_steps`).

Timing: the training step of ours and of the peer run in one worker, alternating step by step
(:func:`train_pair`), so that both meet the same machine load; each sampling (row, side) runs in a
fresh worker (``--rounds`` alternates several). Memory: every (row, side) also runs in a fresh worker
process (:func:`benchmarks.common.run_worker`) so that the peak RSS is that of the measurement alone.
``+work`` (``delta_mib``) is the peak minus the RSS after building the model: ours includes no
optimizer state (AdamW's moments are allocated when it is built), torch's includes AdamW's moments
(allocated at the first step), about 8 bytes per parameter. The figures are medians of ``repeats``
timed runs (steps or chains) after ``warmup`` untimed ones.

What it is not: a training-quality or sample-quality benchmark (the weights are an initialisation).
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from benchmarks.common import MIB, interleaved, median, reset_peak, rss_kib, stats

E2E_ROWS = ("train", "ddpm", "ddim")
SAMPLER_STEPS = {"ddpm": 1000, "ddim": 50}


def _params(model, seed=0):
    """Our initialisation plus small noise everywhere, so that no layer is exactly zero (the paper's
    zero-initialised output layers would make some products trivially zero)."""
    params = model.init_params(seed)
    gen = np.random.default_rng(seed + 1)
    params += (0.01 * gen.standard_normal(params.shape)).astype(np.float32)
    return params


def _peer_model(model, params, torch, diffusers):
    net = diffusers.UNet2DModel(**model.config.diffusers_kwargs())
    sd = {k: torch.from_numpy(np.array(v)) for k, v in model.named(params).items()}
    net.load_state_dict(sd, strict=True)          # raises on any missing or unexpected key
    return net


def _threads_used(side):
    """The thread count the measurement really ran with (torch's for the peer), for the record."""
    if side == "peer":
        import torch
        return {"threads_used": torch.get_num_threads()}
    try:
        import threadpoolctl
        blas = [d for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
        mine = [d for d in blas if "numpy" in (d.get("filepath") or "")] or blas   # NumPy's own BLAS
        return {"threads_used": max(d["num_threads"] for d in mine)}
    except (ImportError, ValueError):
        return {}


def _memory_record(setup_kib, before_kib, ok):
    peak = rss_kib("VmHWM")
    if not ok or peak is None or setup_kib is None:
        return {"peak_mib": None, "delta_mib": None, "setup_mib": None}
    return {"peak_mib": peak / MIB, "delta_mib": max(peak - setup_kib, 0) / MIB, "setup_mib": setup_kib / MIB,
            "before_timed_mib": before_kib / MIB if before_kib is not None else None}


def build_train_step(spec: dict):
    """``step(k) -> loss`` doing training step k of ``spec`` (``preset``, ``batch``, ``side`` "ours" or
    "peer"), with the model, optimizer and data built once here."""
    from ddpm_ref.models import UNet
    preset, batch, side = spec["preset"], int(spec["batch"]), spec["side"]
    model = UNet.from_preset(preset)
    cfg = model.config
    params = _params(model)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    x0 = np.random.default_rng(2).uniform(-1, 1, (batch,) + shape).astype(np.float32)    # (N, C, H, W)
    T = 1000
    if side == "ours":
        from ddpm_ref import diffusion, rng
        from ddpm_ref.ops import loss as L
        from ddpm_ref.optim import AdamW
        from ddpm_ref.schedule import Schedule
        schedule = Schedule.linear(T)
        opt = AdamW(model.num_params, lr=2e-4)
        grad = model.layout.zeros(np.float32)

        def step(k):
            index = np.arange(batch) + k * batch                           # sample ids of this batch
            t = rng.randint(0, rng.Stream.TIMESTEP, index, T, step=k)      # (N,)
            eps = rng.normal(0, rng.Stream.TRAIN_NOISE, index, k, shape)   # (N, C, H, W)
            xt = diffusion.q_sample(schedule, x0, t, eps).astype(np.float32, copy=False)
            out, cache = model.forward(params, xt, t, train=True, seed=0, index=index, step=k)
            loss, lc = L.mse_forward(out, eps)
            dout = L.mse_backward(lc)
            del out, lc
            model.backward(dout, cache, out=grad)
            del cache
            opt.step(params, grad)
            return float(loss)
    elif side == "peer":
        import torch
        import diffusers
        torch.manual_seed(0)
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))     # the same count as NumPy's BLAS
        net = _peer_model(model, params, torch, diffusers).train()
        sch = diffusers.DDPMScheduler(num_train_timesteps=T)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=0.0)
        tx0 = torch.from_numpy(x0)

        def step(k):
            t = torch.randint(0, T, (batch,))
            eps = torch.randn(tx0.shape)
            xt = sch.add_noise(tx0, eps, t)
            net.zero_grad(set_to_none=True)
            out = net(xt, t).sample
            loss = torch.nn.functional.mse_loss(out, eps)
            loss.backward()
            opt.step()
            return float(loss.detach())
    else:
        raise ValueError(f"side must be 'ours' or 'peer', got {side!r}")
    return step


def train_step(spec: dict) -> dict:
    """Time ``spec["repeats"]`` training steps after ``spec["warmup"]`` (ours or the peer, per
    ``spec["side"]``). Returns stats, memory (see :mod:`benchmarks.common`) and the last loss."""
    step = build_train_step(spec)
    setup = rss_kib("VmRSS")
    ok = reset_peak()
    for k in range(int(spec["warmup"])):
        step(k)
    before = rss_kib("VmRSS")
    times, loss = [], float("nan")
    for k in range(int(spec["repeats"])):
        t0 = time.perf_counter()
        loss = step(int(spec["warmup"]) + k)
        times.append(time.perf_counter() - t0)
    return {**stats(times), **_memory_record(setup, before, ok), "loss": loss, **_threads_used(spec["side"])}


def quick_steps(quick, repeats, steps) -> tuple:
    """(steps to measure, extra JSON fields) of a ``--quick`` sampling row: ``max(quick, repeats)``,
    capped at the chain's length ``steps`` (a respaced chain has at most T = 1000 steps, and timing
    more steps than the chain has adds nothing); when capped, the extra fields say so."""
    want = max(int(quick or 0), int(repeats))
    if want <= int(steps):
        return want, {}
    return int(steps), {"requested_steps": want, "capped_at_chain_length": True}


def _sampling_setup(spec: dict):
    """Validate a sampling ``spec`` and build its model: (batch, side, sampler, steps, model, params,
    image shape)."""
    from ddpm_ref.models import UNet
    batch, side, sampler, steps = int(spec["batch"]), spec["side"], spec["sampler"], int(spec["steps"])
    if sampler not in SAMPLER_STEPS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLER_STEPS)}, got {sampler!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = UNet.from_preset(spec["preset"])
    cfg = model.config
    return batch, side, sampler, steps, model, _params(model), (cfg.in_channels, cfg.image_size, cfg.image_size)


def sample(spec: dict) -> dict:
    """Sampling throughput (``spec``: preset, batch, side, sampler "ddpm"|"ddim", steps, quick,
    repeats, warmup). Full mode times ``repeats`` whole chains; quick mode times one respaced chain of
    ``max(quick, repeats)`` steps (at most the chain's ``steps``: :func:`quick_steps`) and
    extrapolates from the median step."""
    batch, side, sampler, steps, model, params, shape = _sampling_setup(spec)
    quick = int(spec.get("quick") or 0)
    if side == "ours":
        from ddpm_ref import samplers
        from ddpm_ref.schedule import Schedule
        schedule = Schedule.linear(1000)
        den = model.denoiser(params)

        def chain(n_steps):
            marks = [time.perf_counter()]
            num = None if (sampler == "ddpm" and n_steps == 1000) else n_steps
            x = samplers.sample(den, schedule, shape, batch, seed=0, sampler=sampler, num_steps=num,
                                eta=0.0, progress=lambda i, n, t: marks.append(time.perf_counter()))
            return x, np.diff(marks)
    elif side == "peer":
        import torch
        import diffusers
        torch.manual_seed(0)
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        net = _peer_model(model, params, torch, diffusers).eval()
        sch = diffusers.DDPMScheduler() if sampler == "ddpm" else diffusers.DDIMScheduler()
        gen = torch.Generator().manual_seed(0)

        def chain(n_steps):
            marks = [time.perf_counter()]
            with torch.inference_mode():
                sch.set_timesteps(n_steps)
                x = torch.randn((batch,) + shape, generator=gen)
                for t in sch.timesteps:
                    out = net(x, t).sample
                    x = (sch.step(out, t, x, generator=gen) if sampler == "ddpm" else sch.step(out, t, x, eta=0.0)
                         ).prev_sample
                    marks.append(time.perf_counter())
            return x.numpy(), np.diff(marks)
    else:
        raise ValueError(f"side must be 'ours' or 'peer', got {side!r}")
    setup = rss_kib("VmRSS")
    ok = reset_peak()
    for _ in range(int(spec["warmup"])):
        chain(2)                                                 # warm-up: a short chain
    before = rss_kib("VmRSS")
    if quick:
        n_meas, capped = quick_steps(quick, spec["repeats"], steps)
        x, step_s = chain(n_meas)
        step_med = median(step_s)
        chain_s = [step_med * steps]
        result = {**stats(chain_s), "step": stats(step_s), "extrapolated": True, "measured_steps": n_meas,
                  **capped}
    else:
        chains, step_s = [], []
        for _ in range(int(spec["repeats"])):
            t0 = time.perf_counter()
            x, st = chain(steps)
            chains.append(time.perf_counter() - t0)
            step_s.extend(st)
        result = {**stats(chains), "step": stats(step_s), "extrapolated": False, "measured_steps": len(step_s)}
    result["images_per_s"] = batch / (result["median_ms"] * 1e-3)
    result["finite_samples"] = bool(np.all(np.isfinite(x)))
    return {**result, **_memory_record(setup, before, ok), **_threads_used(side)}


def build_sample_step(spec: dict):
    """``step() -> None`` doing the next step of a respaced sampling chain of ``spec`` (``preset``,
    ``batch``, ``side``, ``sampler``, ``steps``), cycling through the chain when it ends: one network
    evaluation and one sampler update, the work of one iteration of the chain's loop.

    Ours is the loop body of ``ddpm_ref.samplers.sample`` (denoiser call, the finiteness check, the
    step's counter-RNG noise, ``ddpm_step`` / ``ddim_step`` with clipping); the peer's is diffusers'
    ``UNet2DModel`` forward plus ``DDPMScheduler.step`` / ``DDIMScheduler.step`` (eta 0)."""
    batch, side, sampler, n_steps, model, params, shape = _sampling_setup(spec)
    if side == "ours":
        from ddpm_ref import diffusion, rng, samplers
        from ddpm_ref.schedule import Schedule
        schedule = Schedule.linear(1000)
        den = model.denoiser(params)
        ts = samplers.timesteps(1000, n_steps, "leading")
        ts_prev = samplers.previous_timesteps(ts)
        index = np.arange(batch, dtype=np.int64)
        state = {"i": 0, "x": rng.normal(0, rng.Stream.SAMPLE_INIT, index, 0, shape)}

        def step():
            i = state["i"]
            t, t_prev = int(ts[i]), int(ts_prev[i])
            x, tt = state["x"], np.full(batch, t, dtype=np.int64)
            out = np.asarray(den(x, tt, None))
            if not np.all(np.isfinite(out)):
                raise RuntimeError(f"non-finite network output at t = {t}")
            noisy = t_prev >= 0 and sampler == "ddpm"
            z = rng.normal(0, rng.Stream.SAMPLE_STEP, index, t, shape) if noisy else None
            if sampler == "ddpm":
                x_new, _ = samplers.ddpm_step(schedule, out, x, tt, t_prev, z)
            else:
                x_new, _ = samplers.ddim_step(schedule, diffusion.split_output(out, "fixed_small")[0], x, tt,
                                              t_prev, 0.0, z)
            state["x"] = x_new.astype(np.float32, copy=False)
            state["i"] = (i + 1) % len(ts)
    elif side == "peer":
        import torch
        import diffusers
        torch.manual_seed(0)
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))     # the same count as NumPy's BLAS
        net = _peer_model(model, params, torch, diffusers).eval()
        sch = diffusers.DDPMScheduler() if sampler == "ddpm" else diffusers.DDIMScheduler()
        sch.set_timesteps(n_steps)
        gen = torch.Generator().manual_seed(0)
        state = {"i": 0, "x": torch.randn((batch,) + shape, generator=gen)}

        def step():
            t = sch.timesteps[state["i"]]
            with torch.inference_mode():
                out = net(state["x"], t).sample
                res = sch.step(out, t, state["x"], generator=gen) if sampler == "ddpm" else sch.step(
                    out, t, state["x"], eta=0.0)
            state["x"] = res.prev_sample
            state["i"] = (state["i"] + 1) % len(sch.timesteps)
    else:
        raise ValueError(f"side must be 'ours' or 'peer', got {side!r}")
    step.state = state                  # {"i": next step of the chain, "x": the current sample}
    return step


def sample_pair(spec: dict) -> dict:
    """Time one sampling step of ours and of the peer in one process, alternating step by step
    (:func:`benchmarks.common.interleaved`), so that both meet the same machine load; the chain time
    is the median step times ``spec["steps"]`` (every step of a respaced chain does the same work).
    Returns ``{"ours": {...}, "peer": {...}}`` with ``step`` stats and the extrapolated chain."""
    steps = {side: build_sample_step({**spec, "side": side}) for side in ("ours", "peer")}
    n_meas, capped = quick_steps(spec.get("quick"), spec["repeats"], spec["steps"])
    times = interleaved(steps, n_meas, spec["warmup"])
    out = {}
    for side in steps:
        step_stats = stats(times[side])
        chain = stats([step_stats["median_ms"] * 1e-3 * int(spec["steps"])])
        out[side] = {**chain, "step": step_stats, "extrapolated": True, "measured_steps": n_meas, **capped,
                     "images_per_s": int(spec["batch"]) / (chain["median_ms"] * 1e-3),
                     "finite_samples": bool(np.all(np.isfinite(np.asarray(steps[side].state["x"])))),
                     **_threads_used(side)}
    return out


def combine(results: list, spec: dict) -> dict:
    """Pool the runs of several workers of one (row, side) (``--rounds``): times concatenated and the
    median retaken, peak memory the largest, throughput recomputed from the pooled median."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    mem = [r for r in results if r.get("peak_mib") is not None]
    if mem:
        worst = max(mem, key=lambda r: r["peak_mib"])
        out.update({k: worst.get(k) for k in ("peak_mib", "delta_mib", "setup_mib", "before_timed_mib")})
    if spec["kind"] == "sample":
        steps_ms = [t for r in results for t in r["step"]["times_ms"]]
        out["step"] = stats([t * 1e-3 for t in steps_ms])
        out["measured_steps"] = sum(r["measured_steps"] for r in results)
        out["finite_samples"] = all(r["finite_samples"] for r in results)
        if out.get("extrapolated"):
            chain = [out["step"]["median_ms"] * 1e-3 * int(spec["steps"])]
        else:
            chain = [t * 1e-3 for r in results for t in r["times_ms"]]
        out.update(stats(chain))
        out["images_per_s"] = int(spec["batch"]) / (out["median_ms"] * 1e-3)
    else:
        out.update(stats([t * 1e-3 for r in results for t in r["times_ms"]]))
        out["loss"] = results[-1]["loss"]
    out["rounds"] = len(results)
    return out


def train_pair(spec: dict) -> dict:
    """Time our training step and the peer's in one process, alternating step by step
    (:func:`benchmarks.common.interleaved`: ours, peer, peer, ours, ...), so that both meet the same
    machine load. Returns ``{"ours": {...}, "peer": {...}}`` (stats, last loss, threads). Memory is not
    measured here (both models share this process); the suite takes it from fresh workers."""
    steps = {side: build_train_step({**spec, "side": side}) for side in ("ours", "peer")}
    counters = {side: itertools.count() for side in steps}
    losses = {}

    def run_one(side):
        def fn():
            losses[side] = steps[side](next(counters[side]))
        return fn

    times = interleaved({side: run_one(side) for side in steps}, spec["repeats"], spec["warmup"])
    return {side: {**stats(times[side]), "loss": losses[side], **_threads_used(side)} for side in steps}


WORKERS = {"train": train_step, "sample": sample, "train_pair": train_pair, "sample_pair": sample_pair}
