"""Where the CPU sampling forward pass spends its time, and in-process A/B of two versions of the ops.

What it measures (one process, NumPy only, no peer):

* ``profile``: the U-Net denoiser forward pass (``keep_cache=False``, as sampling calls it) with
  every public function of ``ddpm_ref.ops`` wrapped in a timer, per op and per (op, shape, path):
  the median over ``--repeats`` passes of the time spent in each, next to the pass's median.
* ``ab``: the same pass on the ops of the working tree ("new") and on the ops of a git revision
  ("base", ``git show REV:ddpm_ref/ops/*.py`` loaded as a second package), alternating pass by pass
  (base, new, new, base, ...) so that both meet the same machine load; medians of wall and CPU time
  (``time.process_time``: less sensitive to other processes on a shared machine). The model code,
  weights and input are the same for both; only the op modules differ.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.sampling_cpu profile [--preset small --batch 16]
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.sampling_cpu ab --base HEAD [--repeats 40] [--train]

(``python benchmarks/sampling_cpu.py ...`` works too.) Both also return their figures (a dict), for
tests/test_benchmarks_smoke.py.

No test asserts a time. Set one BLAS thread (the suite's default) for figures comparable to the
suite's sampling rows.
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # run as a script, too

from benchmarks.common import median  # noqa: E402
from ddpm_ref import backend as backend_mod  # noqa: E402
from ddpm_ref.models.unet import UNet  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]


def _model(preset, batch, seed=0):
    """The preset's U-Net, our init plus small noise (as benchmarks.bench_e2e), an input and t."""
    model = UNet.from_preset(preset)
    params = model.init_params(seed)
    params += (0.01 * np.random.default_rng(seed + 1).standard_normal(params.shape)).astype(np.float32)
    cfg = model.config
    x = np.random.default_rng(seed + 2).standard_normal(
        (batch, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    t = np.full(batch, 500, dtype=np.int64)
    return model, params, x, t


def _forward(model, params, x, t):
    return model.forward(params, x, t, train=False, keep_cache=False)[0]


def _train_pass(model, params, x, t):
    """Forward with the cache (dropout off, so both sides see the same numbers) and backward of
    a fixed output gradient: the work of a training step without the loss and the optimizer."""
    out, cache = model.forward(params, x, t, train=False, keep_cache=True)
    return model.backward(np.cos(out), cache)


def _shape_key(name, args, kwargs, result):
    shapes = [tuple(a.shape) for a in args if isinstance(a, np.ndarray)][:2]
    path = ""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        path = result[1].get("path", "")
    return f"{name} {' '.join('x'.join(map(str, s)) for s in shapes)} {path}".strip()


def profile(preset, batch, repeats):
    """Prints per-op and per-(op, shape) medians of one forward pass."""
    model, params, x, t = _model(preset, batch)
    B = backend_mod.get_backend("cpu")
    acc = collections.defaultdict(float)
    calls = collections.Counter()
    depth = [0]
    originals = []
    for family in ("conv", "norm", "attention", "activation", "resample", "linear", "embedding"):
        mod = getattr(B, family)
        for name in getattr(mod, "__all__", []):
            fn = getattr(mod, name)
            if not callable(fn) or name.endswith("backward"):
                continue

            def wrapped(*a, __fn=fn, __name=f"{family}.{name}", **k):
                depth[0] += 1
                t0 = time.perf_counter()
                try:
                    r = __fn(*a, **k)
                finally:
                    depth[0] -= 1
                if depth[0] == 0:
                    acc[_shape_key(__name, a, k, r)] += time.perf_counter() - t0
                    calls[_shape_key(__name, a, k, r)] += 1
                return r
            originals.append((mod, name, fn))
            setattr(mod, name, functools.wraps(fn)(wrapped))
    try:
        _forward(model, params, x, t)                  # warm-up
        per = collections.defaultdict(list)
        totals = []
        for _ in range(repeats):
            acc.clear()
            calls.clear()
            t0 = time.perf_counter()
            _forward(model, params, x, t)
            totals.append(time.perf_counter() - t0)
            for k, v in acc.items():
                per[k].append(v)
        ncalls = dict(calls)
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    total = median(totals) * 1e3
    rows = sorted(((median(v) * 1e3, k) for k, v in per.items()), reverse=True)
    fam = collections.defaultdict(float)
    for ms, k in rows:
        fam[k.split()[0]] += ms
    print(f"# {preset} batch {batch}: forward pass median {total:.1f} ms over {repeats} passes")
    print(f"{'op':40s} {'ms':>8s} {'share':>6s}")
    for k, ms in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"{k:40s} {ms:8.2f} {100 * ms / total:5.1f}%")
    print(f"{'(outside the ops)':40s} {total - sum(fam.values()):8.2f} {100 * (total - sum(fam.values())) / total:5.1f}%")
    print()
    print(f"{'op shapes path':64s} {'calls':>5s} {'ms':>8s} {'share':>6s}")
    for ms, k in rows:
        print(f"{k:64s} {ncalls[k]:5d} {ms:8.2f} {100 * ms / total:5.1f}%")
    return {"pass_ms": total, "families_ms": dict(fam), "shapes": {k: (ncalls[k], ms) for ms, k in rows}}


def _base_backend(rev):
    """A cpu Backend whose op modules are ``ddpm_ref/ops/*.py`` at git revision ``rev``."""
    tmp = Path(tempfile.mkdtemp(prefix="ops_base_"))
    files = subprocess.run(["git", "ls-tree", "--name-only", rev, "ddpm_ref/ops/"], cwd=_ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for f in files:
        src = subprocess.run(["git", "show", f"{rev}:{f}"], cwd=_ROOT, check=True,
                             capture_output=True, text=True).stdout
        (tmp / Path(f).name).write_text(src)
    pkg_name = "ddpm_ref._ops_base"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(tmp)]
    pkg.__package__ = pkg_name
    sys.modules[pkg_name] = pkg
    mods = {}
    for name in backend_mod._OPS:
        spec = importlib.util.spec_from_file_location(f"{pkg_name}.{name}", tmp / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return backend_mod.Backend(name="cpu", xp=np, **mods)


def ab(preset, batch, repeats, rev, train=False):
    model, params, x, t = _model(preset, batch)
    run = _train_pass if train else _forward
    new_b = backend_mod.get_backend("cpu")
    base_b = _base_backend(rev)
    sides = {"base": base_b, "new": new_b}
    outs = {}
    for name, b in sides.items():                      # warm-up, and the outputs to compare
        model.backend = b
        outs[name] = run(model, params, x, t)
    diff = float(np.max(np.abs(outs["base"] - outs["new"])))
    wall = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    for r in range(repeats):
        order = ("base", "new") if r % 2 == 0 else ("new", "base")
        for name in order:
            model.backend = sides[name]
            w0, c0 = time.perf_counter(), time.process_time()
            run(model, params, x, t)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    model.backend = new_b
    what = "forward + backward passes" if train else "forward passes"
    print(f"# {preset} batch {batch}, {repeats} {what} each, alternating; base = {rev}, new = working tree")
    print(f"# max |new - base| = {diff:.3g} ({'parameter gradients' if train else 'outputs'})")
    for label, t in (("cpu ", cpu), ("wall", wall)):
        for stat, fn in (("median", median), ("p25", _p25), ("min", min)):
            b, n = fn(t["base"]) * 1e3, fn(t["new"]) * 1e3
            print(f"{label} {stat:6s} ms: base {b:8.2f}  new {n:8.2f}  new/base {n / b:.3f}")
    return {"max_abs_diff": diff, "cpu_s": cpu, "wall_s": wall}


def _p25(values):
    v = sorted(values)
    return v[len(v) // 4]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("profile", "ab"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--base", default="HEAD", help="ab: the git revision of the base ops (default HEAD)")
    ap.add_argument("--train", action="store_true",
                    help="ab: time forward (with cache) + backward instead of the sampling forward pass")
    args = ap.parse_args(argv)
    if args.mode == "profile":
        return profile(args.preset, args.batch, args.repeats)
    return ab(args.preset, args.batch, args.repeats, args.base, args.train)


if __name__ == "__main__":
    main()
