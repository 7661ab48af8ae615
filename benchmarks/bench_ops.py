"""Per-op rows of the benchmark suite: forward and backward of every distinct op shape in a U-Net
preset, ours (ddpm_ref.ops and friends) against the PyTorch / diffusers equivalent.

The shapes are not typed in: :func:`discover` runs one instrumented forward pass of the preset (at
batch 1; shapes scale with the batch) and records every call of ``conv2d_forward``,
``group_norm_silu_forward``, ``group_norm_forward``, ``attention_forward`` and ``linear_forward``,
with the FLOPs of the whole pass (2 * MACs of the GEMMs, see :mod:`benchmarks.common`).

Rows and their peers (all float32, NCHW):

* ``conv kxk Cin->Cout @HxW [s2]``: ``ops.conv2d_forward`` / ``conv2d_backward`` vs
  ``torch.nn.functional.conv2d`` forward (with ``F.pad`` first for the downsampler's (0, 1, 0, 1)
  padding, as diffusers' ``Downsample2D``) and its autograd backward (``torch.autograd.grad``, graph
  retained, so only the backward is timed);
* ``gn+silu C @HxW``: ``ops.group_norm_silu_forward`` / backward vs ``F.silu(F.group_norm(...))``;
* ``group_norm C @HxW`` (the attention blocks' norm): ``ops.group_norm_forward`` vs ``F.group_norm``;
* ``attention BxLxd``: ``ops.attention_forward`` / backward vs ``F.scaled_dot_product_attention``
  (what diffusers' ``AttnProcessor2_0`` calls);
* ``q_sample`` (DDPM eq. 4): ``diffusion.q_sample`` vs ``DDPMScheduler.add_noise``;
* ``ddpm step`` (eq. 11, Algorithm 2 line 4, noise drawn inside): ``rng.normal`` + ``samplers.ddpm_step``
  vs ``DDPMScheduler.step`` (which draws its noise with ``torch.randn``);
* ``ddim step`` (DDIM eq. 12, eta = 0): ``samplers.ddim_step`` vs ``DDIMScheduler.step``;
* ``adamw``: ``optim.AdamW.step`` on the preset's flat buffer vs ``torch.optim.AdamW`` (default
  implementation) over tensors of the same shapes (the diffusers state_dict shapes).

What it is not: end-to-end (see :mod:`benchmarks.bench_e2e`) or a test.
"""
from __future__ import annotations

import inspect

import numpy as np

from benchmarks.common import attention_flops, conv_flops, interleaved, linear_flops, peak_memory, stats

OPS_ROWS = ("conv", "gn_silu", "group_norm", "attention", "q_sample", "ddpm_step", "ddim_step", "adamw")


# --------------------------------------------------------------------------- shape discovery

def _instrumented(targets, record):
    """Patch ``module.name`` for (module, name) in ``targets`` with a recorder; returns an undo."""
    saved = []
    for mod, name in targets:
        fn = getattr(mod, name, None)
        if fn is None:
            continue
        sig = inspect.signature(fn)

        def wrapper(*a, __fn=fn, __name=name, __sig=sig, **k):
            bound = __sig.bind(*a, **k)
            bound.apply_defaults()
            out = __fn(*a, **k)
            record(__name, bound.arguments, out)
            return out

        saved.append((mod, name, fn))
        setattr(mod, name, wrapper)

    def undo():
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)

    return undo


def _pad4(padding):
    if isinstance(padding, (int, np.integer)):
        return (int(padding),) * 4
    return tuple(int(p) for p in padding)


def discover(preset: str) -> dict:
    """Run one forward pass of ``UNet.from_preset(preset)`` at batch 1 and return the distinct op shapes.

    Returns ``{"conv": [...], "gn_silu": [...], "group_norm": [...], "attention": [...],
    "forward_flops_per_image": int, "num_params": int, "layout": [(name, shape), ...], "config": dict}``;
    each shape entry carries ``count`` (calls in one forward pass) and shapes at batch 1.
    """
    from ddpm_ref.models import UNet
    from ddpm_ref.ops import attention, conv, linear, norm
    model = UNet.from_preset(preset)
    cfg = model.config
    params = model.init_params(0)
    found = {"conv": {}, "gn_silu": {}, "group_norm": {}, "attention": {}}
    flops = [0]
    depth = [0]

    def record(name, args, out):
        y = out[0]
        if name == "conv2d_forward":
            key = (tuple(args["x"].shape), tuple(args["w"].shape), int(args["stride"]), _pad4(args["padding"]),
                   args["b"] is not None)
            flops[0] += conv_flops(args["x"].shape, args["w"].shape, y.shape)
            d = found["conv"]
        elif name == "linear_forward":
            flops[0] += linear_flops(args["x"].shape, args["w"].shape)
            return
        elif name == "attention_forward":
            key = (tuple(args["q"].shape), tuple(args["k"].shape), tuple(args["v"].shape))
            flops[0] += attention_flops(args["q"].shape, args["k"].shape, args["v"].shape)
            d = found["attention"]
        elif name == "group_norm_silu_forward":
            key = (tuple(args["x"].shape), int(args["groups"]), float(args["eps"]))
            d = found["gn_silu"]
        else:                                              # group_norm_forward
            key = (tuple(args["x"].shape), int(args["groups"]), float(args["eps"]))
            d = found["group_norm"]
        d[key] = d.get(key, 0) + 1

    # An op that calls another patched op (a fused op built from its parts) is recorded once.
    def outer_only(name, args, out):
        if depth[0] == 0:
            record(name, args, out)

    targets = [(conv, "conv2d_forward"), (linear, "linear_forward"), (attention, "attention_forward"),
               (norm, "group_norm_silu_forward"), (norm, "group_norm_forward")]
    undo = _instrumented(targets, outer_only)
    try:
        x = np.zeros((1, cfg.in_channels, cfg.image_size, cfg.image_size), np.float32)   # (1, C, H, W)
        model.forward(params, x, np.array([500]), train=False)
    finally:
        undo()
    gn_keys = set(found["gn_silu"])
    # The attention blocks' plain group norms get their own rows only at shapes that no gn+silu row
    # covers already (in the presets they all coincide, so the group_norm row is usually empty).
    return {
        "conv": [dict(x=list(k[0]), w=list(k[1]), stride=k[2], padding=list(k[3]), bias=k[4], count=c)
                 for k, c in found["conv"].items()],
        "gn_silu": [dict(x=list(k[0]), groups=k[1], eps=k[2], count=c) for k, c in found["gn_silu"].items()],
        "group_norm": [dict(x=list(k[0]), groups=k[1], eps=k[2], count=c) for k, c in found["group_norm"].items()
                       if k not in gn_keys],
        "attention": [dict(q=list(k[0]), k=list(k[1]), v=list(k[2]), count=c) for k, c in found["attention"].items()],
        "forward_flops_per_image": int(flops[0]),
        "num_params": int(model.num_params),
        "layout": [(name, list(model.layout.shapes[name])) for name in model.layout.names],
        "config": cfg.to_dict(),
    }


def _batch(shape, n):
    return (int(n),) + tuple(int(s) for s in shape[1:])


# ------------------------------------------------------------------------------- the rows

def _conv_label(e):
    x, w = e["x"], e["w"]
    s = f" s{e['stride']}" if e["stride"] != 1 else ""
    return f"conv {w[2]}x{w[3]} {w[1]}->{w[0]} @{x[2]}x{x[3]}{s}"


def _torch_pair(torch, arrays, grad=True):
    return [torch.from_numpy(a).requires_grad_(grad) for a in arrays]


def _cases(disc: dict, batch: int, torch, diffusers, rows, gen):
    """Yield (row name, dict of phase -> (ours_fn, peer_fn or None, flops, count, peer name))."""
    from ddpm_ref import diffusion, rng, samplers
    from ddpm_ref import ops
    from ddpm_ref.optim import AdamW
    from ddpm_ref.schedule import Schedule
    F = torch.nn.functional if torch is not None else None

    def normal(shape, scale=1.0):
        return (scale * gen.standard_normal(shape)).astype(np.float32)

    if "conv" in rows:
        for e in disc["conv"]:
            xs, ws = _batch(e["x"], batch), tuple(e["w"])
            x, w = normal(xs), normal(ws, 1.0 / np.sqrt(ws[1] * ws[2] * ws[3]))
            b = normal((ws[0],), 0.1) if e["bias"] else None
            pad = tuple(e["padding"])
            s = e["stride"]
            y, cache = ops.conv2d_forward(x, w, b, s, pad)
            dy = normal(y.shape)
            fl = conv_flops(xs, ws, y.shape)
            fwd = (lambda x=x, w=w, b=b, s=s, pad=pad: ops.conv2d_forward(x, w, b, s, pad))
            bwd = (lambda dy=dy, cache=cache: ops.conv2d_backward(dy, cache))
            pf = pb = None
            if torch is not None:
                tx, tw = _torch_pair(torch, [x, w])
                tb = torch.from_numpy(b).requires_grad_(True) if b is not None else None
                sym = len(set(pad)) == 1

                def pf(tx=tx, tw=tw, tb=tb, s=s, pad=pad, sym=sym):
                    xin = tx if sym else F.pad(tx, (pad[2], pad[3], pad[0], pad[1]))
                    return F.conv2d(xin, tw, tb, stride=s, padding=pad[0] if sym else 0)

                ty = pf()
                tdy = torch.from_numpy(dy)
                inputs = [tx, tw] + ([tb] if tb is not None else [])
                pb = (lambda ty=ty, inputs=inputs, tdy=tdy:
                      torch.autograd.grad(ty, inputs, tdy, retain_graph=True))
            yield _conv_label(e), {"fwd": (fwd, pf, fl, e["count"]), "bwd": (bwd, pb, 2 * fl, e["count"])}, \
                "torch F.conv2d"

    for kind in ("gn_silu", "group_norm"):
        if kind not in rows:
            continue
        for e in disc[kind]:
            xs, G, eps = _batch(e["x"], batch), e["groups"], e["eps"]
            x = normal(xs)
            g, bta = 1.0 + normal((xs[1],), 0.1), normal((xs[1],), 0.1)
            fwd_op = ops.group_norm_silu_forward if kind == "gn_silu" else ops.group_norm_forward
            bwd_op = ops.group_norm_silu_backward if kind == "gn_silu" else ops.group_norm_backward
            y, cache = fwd_op(x, g, bta, G, eps)
            dy = normal(y.shape)
            fwd = (lambda x=x, g=g, bta=bta, G=G, eps=eps, f=fwd_op: f(x, g, bta, G, eps))
            bwd = (lambda dy=dy, cache=cache, f=bwd_op: f(dy, cache))
            pf = pb = None
            if torch is not None:
                tx, tg, tbb = _torch_pair(torch, [x, g, bta])
                if kind == "gn_silu":
                    def pf(tx=tx, tg=tg, tbb=tbb, G=G, eps=eps):
                        return F.silu(F.group_norm(tx, G, tg, tbb, eps))
                else:
                    def pf(tx=tx, tg=tg, tbb=tbb, G=G, eps=eps):
                        return F.group_norm(tx, G, tg, tbb, eps)
                ty, tdy = pf(), torch.from_numpy(dy)
                pb = (lambda ty=ty, ins=[tx, tg, tbb], tdy=tdy: torch.autograd.grad(ty, ins, tdy, retain_graph=True))
            label = ("gn+silu" if kind == "gn_silu" else "group_norm") + f" {xs[1]}/{G} @{xs[2]}x{xs[3]}"
            peer = "torch F.silu(F.group_norm)" if kind == "gn_silu" else "torch F.group_norm"
            yield label, {"fwd": (fwd, pf, None, e["count"]), "bwd": (bwd, pb, None, e["count"])}, peer

    if "attention" in rows:
        for e in disc["attention"]:
            qs, ks, vs = _batch(e["q"], batch * e["q"][0]), _batch(e["k"], batch * e["k"][0]), \
                _batch(e["v"], batch * e["v"][0])
            q, k, v = normal(qs), normal(ks), normal(vs)
            y, cache = ops.attention_forward(q, k, v)
            dy = normal(y.shape)
            fl = attention_flops(qs, ks, vs)
            fwd = (lambda q=q, k=k, v=v: ops.attention_forward(q, k, v))
            bwd = (lambda dy=dy, cache=cache: ops.attention_backward(dy, cache))
            pf = pb = None
            if torch is not None:
                tq, tk, tv = _torch_pair(torch, [q, k, v])
                pf = (lambda tq=tq, tk=tk, tv=tv: F.scaled_dot_product_attention(tq, tk, tv))
                ty, tdy = pf(), torch.from_numpy(dy)
                pb = (lambda ty=ty, ins=[tq, tk, tv], tdy=tdy: torch.autograd.grad(ty, ins, tdy, retain_graph=True))
            yield f"attention {qs[0]}x{qs[1]}x{qs[2]}", \
                {"fwd": (fwd, pf, fl, e["count"]), "bwd": (bwd, pb, 2 * fl, e["count"])}, \
                "torch F.scaled_dot_product_attention"

    cfg = disc["config"]
    img = (batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    schedule = Schedule.linear(1000)
    if "q_sample" in rows:
        x0, noise = normal(img), normal(img)
        t = gen.integers(0, 1000, batch)
        fwd = (lambda x0=x0, t=t, noise=noise: diffusion.q_sample(schedule, x0, t, noise))
        pf = None
        if diffusers is not None:
            sch = diffusers.DDPMScheduler()
            tx0, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
            pf = (lambda: sch.add_noise(tx0, tn, tt))
        yield "q_sample", {"fwd": (fwd, pf, None, 1)}, "diffusers DDPMScheduler.add_noise"

    if "ddpm_step" in rows or "ddim_step" in rows:
        xt, eps = normal(img), normal(img)
        index = np.arange(batch)
        t_now = 500
        if "ddpm_step" in rows:
            def fwd(xt=xt, eps=eps):
                z = rng.normal(0, rng.Stream.SAMPLE_STEP, index, t_now, img[1:])    # (N, C, H, W)
                return samplers.ddpm_step(schedule, eps, xt, t_now, t_now - 1, z)
            pf = None
            if diffusers is not None:
                sch = diffusers.DDPMScheduler()
                sch.set_timesteps(1000)
                txt, teps = torch.from_numpy(xt), torch.from_numpy(eps)
                g = torch.Generator().manual_seed(0)
                pf = (lambda: sch.step(teps, t_now, txt, generator=g).prev_sample)
            yield "ddpm step (with noise)", {"step": (fwd, pf, None, 1)}, "diffusers DDPMScheduler.step"
        if "ddim_step" in rows:
            ts = samplers.timesteps(1000, 50, "leading")
            t_a, t_b = int(ts[25]), int(ts[26])
            fwd = (lambda xt=xt, eps=eps: samplers.ddim_step(schedule, eps, xt, t_a, t_b, 0.0, None))
            pf = None
            if diffusers is not None:
                sch2 = diffusers.DDIMScheduler()
                sch2.set_timesteps(50)
                txt, teps = torch.from_numpy(xt), torch.from_numpy(eps)
                pf = (lambda: sch2.step(teps, t_a, txt, eta=0.0).prev_sample)
            yield "ddim step (eta 0)", {"step": (fwd, pf, None, 1)}, "diffusers DDIMScheduler.step"

    if "adamw" in rows:
        size = disc["num_params"]
        params, grad = normal((size,), 0.05), normal((size,), 1e-3)
        opt = AdamW(size, lr=1e-4)
        fwd = (lambda: opt.step(params, grad))
        pf = None
        if torch is not None:
            tensors, off = [], 0
            for _, shape in disc["layout"]:
                n = int(np.prod(shape))
                p = torch.from_numpy(params[off:off + n].copy().reshape(shape)).requires_grad_(True)
                p.grad = torch.from_numpy(grad[off:off + n].copy().reshape(shape))
                tensors.append(p)
                off += n
            topt = torch.optim.AdamW(tensors, lr=1e-4, weight_decay=0.0)
            pf = topt.step
        yield f"adamw ({size:,} params)", {"step": (fwd, pf, None, 1)}, "torch.optim.AdamW (default impl)"


def run_ops(spec: dict) -> list:
    """Measure the op rows of ``spec`` (``preset``, ``batch``, ``repeats``, ``warmup``, ``peers``,
    ``rows``, ``mode``) in this process; return a list of row dicts (see :mod:`benchmarks.suite`).

    ``mode``: "time" (interleaved medians only), "memory" (one warm-up call, then the peak RSS rise
    of one call of each side, :func:`benchmarks.common.peak_memory`; the suite runs this in its own
    worker with glibc's ``MALLOC_MMAP_THRESHOLD_`` lowered so that every large array is mapped
    fresh and returned when freed, which makes the RSS rise the call's own memory), or "both".
    """
    preset, batch = spec["preset"], int(spec["batch"])
    mode = spec.get("mode", "both")
    if mode not in ("time", "memory", "both"):
        raise ValueError(f"mode must be 'time', 'memory' or 'both', got {mode!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rows = spec.get("rows") or OPS_ROWS
    unknown = sorted(set(rows) - set(OPS_ROWS))
    if unknown:
        raise ValueError(f"unknown op rows {unknown}; expected a subset of {list(OPS_ROWS)}")
    torch = diffusers = None
    if spec.get("peers", True):
        import torch
        import diffusers
        torch.manual_seed(0)
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))     # the same count as NumPy's BLAS
    disc = discover(preset)
    gen = np.random.default_rng(0)
    out = []
    for name, phases, peer_name in _cases(disc, batch, torch, diffusers, rows, gen):
        for phase, (ours_fn, peer_fn, flops, count) in phases.items():
            fns = {"ours": ours_fn}
            if peer_fn is not None:
                fns["peer"] = peer_fn
            ctx = torch.no_grad() if (torch is not None and phase == "step") else _nullctx()
            row = {"preset": preset, "family": "op", "name": name, "phase": phase, "batch": batch,
                   "unit": "ms", "flops": flops, "calls_per_forward": count, "peer_name": peer_name if peer_fn else None}
            with ctx:
                if mode in ("time", "both"):
                    times = interleaved(fns, spec["repeats"], spec["warmup"])
                    for side, ts in times.items():
                        row[side] = stats(ts)
                if mode in ("memory", "both"):
                    for side, fn in fns.items():
                        if mode == "memory":
                            fn()                      # warm-up: one-time allocations are not the op's
                        row.setdefault(side, {}).update(peak_memory(fn))
            out.append(row)
    return out


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
