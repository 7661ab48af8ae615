"""The benchmark suite's command line: ``python -m benchmarks [options]``.

    python -m benchmarks                                  # small preset, every row, 1 thread
    python -m benchmarks --preset cifar --rows ops train --quick 10
    python -m benchmarks --preset small cifar --threads 2 --json bench_results/run.json
    python -m benchmarks --profile cifar:8                # where our cifar training step spends its time

Prints the machine, the measured float32 GEMM peak, then one table row per (preset, row, pass):
our median time, the peer's, the ratio ours / peer (below 1: we are faster), our GFLOP/s, its share
of the GEMM peak, the peer's GFLOP/s, and memory; writes everything (every run's time included) to a
JSON file. See :mod:`benchmarks.common` for the conventions, :mod:`benchmarks.bench_ops` and
:mod:`benchmarks.bench_e2e` for what each row does and which peer it is measured against.

Process layout: the op rows of a preset run in one worker subprocess (ours and the peer interleaved,
memory as the peak RSS rise of each call); every end-to-end (row, side) runs in its own fresh worker
so its peak RSS is its own; the GEMM peak is measured in a worker too. Every worker gets the thread
count through OMP/OPENBLAS/MKL_NUM_THREADS (set before NumPy starts) and torch.set_num_threads.
``--inline`` runs everything in this process instead (quicker to start; used by the smoke test).

The default thread count is 1: on a machine where other processes compete for the cores, BLAS
thread pools that spin-wait for a busy core can make a multi-threaded run many times slower than a
single-threaded one, for both libraries alike, which measures the machine's load and not the code.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.bench_e2e import E2E_ROWS, combine, quick_steps
from benchmarks.bench_ops import OPS_ROWS
from benchmarks.common import (WorkerError, check_json_path, gflops, limit_threads, machine_info, machine_lines,
                               run_worker, table_lines, write_json)

PRESETS = ("tiny", "digits", "small", "cifar")
# Batch of the op rows and of the training step; batch of the sampling rows ("a small batch").
TRAIN_BATCH = {"tiny": 4, "digits": 128, "small": 64, "cifar": 8}
SAMPLE_BATCH = {"tiny": 2, "digits": 64, "small": 16, "cifar": 4}
ROW_GROUPS = {"ops": OPS_ROWS, "e2e": E2E_ROWS, "all": OPS_ROWS + E2E_ROWS}
DEFAULT_JSON = {"cpu": os.path.join("bench_results", "suite.json"), "gpu": os.path.join("bench_results", "gpu.json"),
                "profile": os.path.join("bench_results", "profile.json")}
# The options --device gpu honours; every other option is the CPU suite's (refused with --device gpu).
GPU_OPTIONS = ("device", "repeats", "json")


def _preset_batches(items, default):
    out = dict(default)
    for item in items or ():
        if ":" not in item:
            raise ValueError(f"expected PRESET:BATCH, got {item!r}")
        name, n = item.split(":", 1)
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} in {item!r}; expected one of {list(PRESETS)}")
        if not n.isdecimal() or int(n) < 1:
            raise ValueError(f"batch must be a positive integer, got {n!r} in {item!r}")
        out[name] = int(n)
    return out


def _e2e_json(path: str) -> str:
    """Where ``--device gpu`` writes bench_gpu_e2e.py's results: beside ``path``, with an _e2e suffix."""
    return os.path.splitext(path)[0] + "_e2e.json"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error: ...`` line (exit 2), like the suite's own checks."""

    def error(self, message):
        self.exit(2, f"error: {message} (see python -m benchmarks --help)\n")


def parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an abbreviation (--thr 2) would escape __main__'s early thread setup, which
    # reads --threads before NumPy loads; so only full option names are accepted.
    ap = _Parser(prog="python -m benchmarks", description="\n\n".join(__doc__.split("\n\n")[:3]),
                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                 epilog="rows: groups " + ", ".join(ROW_GROUPS) + "; op rows " + ", ".join(OPS_ROWS)
                 + "; end-to-end rows " + ", ".join(E2E_ROWS) + ". Files written: "
                 f"the CPU suite {DEFAULT_JSON['cpu']}; --profile {DEFAULT_JSON['profile']}; "
                 f"--device gpu {DEFAULT_JSON['gpu']} (bench_kernels.py) and "
                 f"{_e2e_json(DEFAULT_JSON['gpu'])} (bench_gpu_e2e.py); --json NAME.json writes NAME.json "
                 "instead (with --device gpu also NAME_e2e.json beside it).")
    ap.add_argument("--preset", nargs="+", default=["small"], choices=PRESETS, help="U-Net presets (default small)")
    ap.add_argument("--rows", nargs="+", default=["all"], help="row groups or names (default all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                    help="cpu (default): the suite below. gpu: the fixed GPU scripts instead, "
                         "benchmarks/bench_kernels.py (our CUDA kernels vs cuDNN/torch eager FP32) then "
                         "benchmarks/bench_gpu_e2e.py (cifar training and sampling steps at batch 128 vs "
                         "diffusers); needs ddpm_ref.kernels with CuPy on an NVIDIA GPU. It honours only "
                         "--repeats (at least 5) and --json (default " + DEFAULT_JSON["gpu"] + ", and "
                         + _e2e_json(DEFAULT_JSON["gpu"]) + " beside it); the other options are refused")
    ap.add_argument("--threads", type=int, default=1, help="BLAS and torch threads, both sides (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per figure, median reported (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="sampling rows (unless --quick with peers) and the train row with --no-peers: "
                         "run ours and the peer in this many fresh workers each, alternating, and pool the "
                         "runs; 2 or more on a busy machine. The other end-to-end rows ignore it: with peers "
                         "the train row, and with --quick the sampling rows, alternate ours and the peer step "
                         "by step in one worker, with memory from a fresh worker per side")
    ap.add_argument("--batch", nargs="+", metavar="PRESET:N", help="op/train batch (default "
                    + ", ".join(f"{k}:{v}" for k, v in TRAIN_BATCH.items()) + ")")
    ap.add_argument("--sample-batch", nargs="+", metavar="PRESET:N", help="sampling batch (default "
                    + ", ".join(f"{k}:{v}" for k, v in SAMPLE_BATCH.items()) + ")")
    ap.add_argument("--quick", type=int, default=0, metavar="K",
                    help="sampling: time max(K, repeats) steps, at most the chain's length, and "
                         "extrapolate to the full chain; with peers, "
                         "ours and the peer's steps alternate in one process (memory from a fresh one each)")
    ap.add_argument("--ddpm-steps", type=int, default=1000, help="DDPM chain length (default 1000)")
    ap.add_argument("--ddim-steps", type=int, default=50, help="DDIM chain length (default 50)")
    ap.add_argument("--gemm-n", type=int, default=2048, help="matrix size of the GEMM peak (default 2048)")
    ap.add_argument("--no-peers", action="store_true", help="time ddpm_ref alone (no torch/diffusers)")
    ap.add_argument("--inline", action="store_true", help="measure in this process (no worker subprocesses)")
    ap.add_argument("--json", default=None, help=f"where to write JSON (default {DEFAULT_JSON['cpu']}; "
                    f"{DEFAULT_JSON['profile']} with --profile; {DEFAULT_JSON['gpu']} with --device gpu, whose "
                    "end-to-end part goes beside it with an _e2e suffix; '' = nowhere). Checked before "
                    "anything runs; written atomically")
    ap.add_argument("--profile", metavar="PRESET:BATCH", help="per-op time of our CPU training step, then exit "
                    "(not with --device gpu)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def _rows_selected(tokens):
    sel = []
    for tok in tokens:
        names = ROW_GROUPS.get(tok, (tok,))
        for name in names:
            if name not in OPS_ROWS + E2E_ROWS:
                raise ValueError(f"unknown row {tok!r}; expected a group {list(ROW_GROUPS)} or one of "
                                 f"{list(OPS_ROWS + E2E_ROWS)}")
            if name not in sel:
                sel.append(name)
    return sel


def check_args(args) -> None:
    """ValueError naming the first bad option."""
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.quick < 0:
        raise ValueError(f"--quick must be >= 0 steps, got {args.quick}")
    for name in ("ddpm_steps", "ddim_steps", "gemm_n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ddpm_steps > 1000 or args.ddim_steps > 1000:
        raise ValueError(f"chains have at most T = 1000 steps, got --ddpm-steps {args.ddpm_steps}, "
                         f"--ddim-steps {args.ddim_steps}")
    if args.device == "gpu":
        if args.profile:
            raise ValueError(f"--profile {args.profile} profiles the CPU training step; it cannot be combined "
                             "with --device gpu")
        defaults = parser().parse_args([])
        for name, value in vars(args).items():
            if name in GPU_OPTIONS or name in ("worker", "profile") or value == getattr(defaults, name):
                continue
            raise ValueError(f"--device gpu runs the fixed GPU scripts and does not take "
                             f"--{name.replace('_', '-')} (got {value!r}); it honours only --repeats and --json")
    for path in json_paths(args):
        check_json_path(path)


def json_paths(args) -> list:
    """The JSON files this run will write (``args.json`` as given; None = nothing decided yet)."""
    if not args.json:
        return []
    if args.device == "gpu" and not args.profile:
        return [args.json, _e2e_json(args.json)]
    return [args.json]


def rounds_rows(rows_sel, args) -> list:
    """The end-to-end rows of ``rows_sel`` that take ``--rounds`` (fresh workers per round, pooled): the
    sampling rows unless ``--quick`` with peers (then both sides alternate step by step in one worker)
    and the train row only with ``--no-peers`` (with peers it alternates step by step in one worker)."""
    out = []
    for name in rows_sel:
        if name not in E2E_ROWS:
            continue
        if name == "train" and not args.no_peers:
            continue
        if name != "train" and args.quick and not args.no_peers:
            continue
        out.append(name)
    return out


# ------------------------------------------------------------------------------------ workers

def worker_main(spec: dict) -> dict:
    """Do one measurement described by ``spec["kind"]`` in this process and return its JSON dict."""
    kind = spec.get("kind")
    if kind == "gemm":
        from benchmarks.common import gemm_peak
        return gemm_peak(spec["n"], spec["repeats"], spec["warmup"])
    if kind == "ops":
        from benchmarks.bench_ops import run_ops
        return {"rows": run_ops(spec)}
    if kind in ("train", "sample", "train_pair", "sample_pair"):
        from benchmarks.bench_e2e import WORKERS
        return WORKERS[kind](spec)
    raise ValueError(f"unknown worker kind {kind!r}; expected gemm, ops, train, sample, train_pair or sample_pair")


def _measure(spec, args):
    if args.inline:
        return json.loads(json.dumps(worker_main(spec)))       # the same JSON round trip as a worker
    return run_worker(spec, args.threads)


# ----------------------------------------------------------------------------------- the run

def _derive(row, peak_gflops):
    """Ratio (ours / peer time), GFLOP/s and share of the GEMM peak for both sides."""
    for side in ("ours", "peer"):
        r = row.get(side)
        if r:
            r["gflops"] = gflops(row.get("flops"), r["median_ms"])
            r["peak_fraction"] = (r["gflops"] / peak_gflops) if (r["gflops"] and peak_gflops) else None
    if row.get("ours") and row.get("peer"):
        row["ratio"] = row["ours"]["median_ms"] / row["peer"]["median_ms"]
    else:
        row["ratio"] = None
    return row


def summarize(rows: list) -> list:
    """Per preset and op family (conv, gn+silu, attention), fwd and bwd: the time of one U-Net pass
    spent in that family, i.e. the sum over its distinct shapes of median x calls per forward pass,
    ours and the peer's (rows without a peer are left out of both sums)."""
    acc = {}
    for r in rows:
        if r.get("family") != "op" or not r.get("peer") or r.get("phase") not in ("fwd", "bwd"):
            continue
        fam = r["name"].split(" ")[0]
        key = (r["preset"], fam, r["phase"])
        a = acc.setdefault(key, {"preset": key[0], "family": fam, "phase": key[2], "shapes": 0,
                                 "ours_ms": 0.0, "peer_ms": 0.0})
        n = int(r.get("calls_per_forward") or 1)
        a["shapes"] += 1
        a["ours_ms"] += n * r["ours"]["median_ms"]
        a["peer_ms"] += n * r["peer"]["median_ms"]
    out = list(acc.values())
    for a in out:
        a["ratio"] = a["ours_ms"] / a["peer_ms"] if a["peer_ms"] else None
    return out


def run(args, out=print) -> dict:
    """Run the suite described by parsed ``args``; print with ``out``; return the result dict."""
    check_args(args)
    rows_sel = _rows_selected(args.rows)
    train_b = _preset_batches(args.batch, TRAIN_BATCH)
    sample_b = _preset_batches(args.sample_batch, SAMPLE_BATCH)
    if args.inline:
        if not args.no_peers:
            try:
                import torch  # noqa: F401  (imported first so that limit_threads pins it too)
            except ImportError:
                pass
        limit_threads(args.threads)
    from benchmarks.bench_ops import discover
    info = machine_info(args.threads, torch_too=not args.no_peers)
    t_start = time.time()
    try:
        peak = _measure({"kind": "gemm", "n": args.gemm_n, "repeats": max(args.repeats, 10), "warmup": 1}, args)
    except WorkerError as e:
        raise WorkerError(f"the GEMM peak measurement failed (no rows measured yet): {e}", e.detail) from None
    for line in machine_lines(info, peak):
        out(line)
    pooled = rounds_rows(rows_sel, args) if args.rounds > 1 else []
    out(f"# median of {args.repeats} timed runs after {args.warmup} warm-up"
        + (f" ({', '.join(pooled)} rows: {args.rounds} alternating rounds of fresh workers, runs pooled)"
           if pooled else "")
        + "; FLOPs = 2 x MACs of the GEMMs "
        "(conv, dense, attention), backward = 2 x forward; ratio = our time / peer time (< 1: we are faster)")
    out("# ours/peer: ms per call (op rows, train step) or images/s (sampling chains); memory: op rows MiB of "
        "peak RSS rise during one call (after one warm-up call, arrays >= 64 KiB mmapped); end-to-end rows peak/+work MiB = peak RSS "
        "of a fresh process per measurement / that minus its RSS after building the model"
        + (" (--inline: this process, not fresh)" if args.inline else ""))
    result = {"suite": "ddpm_ref benchmarks", "format": 1, "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
              "machine": info, "gemm_peak": peak,
              "settings": {"presets": args.preset, "rows": rows_sel, "threads": args.threads, "repeats": args.repeats,
                           "warmup": args.warmup, "rounds": args.rounds, "quick": args.quick, "device": args.device,
                           "peers": not args.no_peers, "inline": args.inline, "ddpm_steps": args.ddpm_steps,
                           "ddim_steps": args.ddim_steps, "train_batch": train_b, "sample_batch": sample_b},
              "flop_convention": "2 x multiply-adds of conv/dense/attention GEMMs; backward = 2 x forward; "
                                 "train step = 3 x forward; sampling = steps x forward",
              "rows": []}
    notes = []
    common = {"repeats": args.repeats, "warmup": args.warmup, "threads": args.threads}
    if args.rounds > 1 and not pooled:
        notes.append(f"--rounds {args.rounds} applies to none of the selected rows (the train row with peers and "
                     "--quick sampling with peers alternate both sides step by step in one worker)")
    current = {"what": "setup"}
    try:
        for preset in args.preset:
            current["what"] = f"{preset} model discovery"
            disc = discover(preset)
            fwd_flops = disc["forward_flops_per_image"]
            result.setdefault("models", {})[preset] = {"num_params": disc["num_params"],
                                                       "forward_gflop_per_image": fwd_flops / 1e9,
                                                       "distinct_conv_shapes": len(disc["conv"])}
            op_rows = [r for r in rows_sel if r in OPS_ROWS]
            if op_rows:
                current["what"] = f"{preset} op rows ({', '.join(op_rows)})"
                ops_spec = {"kind": "ops", "preset": preset, "batch": train_b[preset], "rows": op_rows,
                            "peers": not args.no_peers, **common}
                if args.inline:
                    res = _measure({**ops_spec, "mode": "both"}, args)
                else:
                    res = _measure({**ops_spec, "mode": "time"}, args)
                    # memory in a second worker, where every array >= 64 KiB is mapped fresh (see bench_ops)
                    mem = run_worker({**ops_spec, "mode": "memory"}, args.threads,
                                     extra_env={"MALLOC_MMAP_THRESHOLD_": "65536"})
                    for row, m in zip(res["rows"], mem["rows"]):
                        if (row["name"], row["phase"]) != (m["name"], m["phase"]):
                            raise RuntimeError(f"op rows out of step: {row['name']} vs {m['name']}")
                        for side in ("ours", "peer"):
                            if side in row:
                                row[side].update(m[side])
                for row in res["rows"]:
                    result["rows"].append(_derive(row, peak["gflops"]))
            for name in (r for r in rows_sel if r in E2E_ROWS):
                row = {"preset": preset, "family": "e2e", "unit": "ms"}
                if name == "train":
                    b = train_b[preset]
                    row.update(name=f"train step (batch {b})", phase="step", batch=b, flops=3 * fwd_flops * b,
                               peer_name="diffusers UNet2DModel + torch.optim.AdamW")
                    spec = {"kind": "train", "preset": preset, "batch": b, **common}
                else:
                    b = sample_b[preset]
                    steps = args.ddpm_steps if name == "ddpm" else args.ddim_steps
                    row.update(name=f"{name} {steps} steps (batch {b})", phase="chain", batch=b, unit="images/s",
                               flops=fwd_flops * b * steps, steps=steps,
                               peer_name=f"diffusers UNet2DModel + {'DDPM' if name == 'ddpm' else 'DDIM'}Scheduler")
                    spec = {"kind": "sample", "preset": preset, "batch": b, "sampler": name, "steps": steps,
                            "quick": args.quick, **common}
                    if args.quick:
                        n_meas, capped = quick_steps(args.quick, args.repeats, steps)
                        notes.append(f"{preset} {name}: chain time extrapolated from the median of "
                                     f"{n_meas} measured steps x {steps} steps (--quick)"
                                     + (f"; {capped['requested_steps']} requested, capped at the chain's length"
                                        if capped else ""))
                sides = ("ours",) if args.no_peers else ("ours", "peer")
                current["what"] = f"{preset} {row['name']}"
                if name == "train" and not args.no_peers:
                    # Time: both steps in one worker, alternating step by step (same load for both).
                    # Memory: a fresh worker per side (2 steps each), whose own timing is kept as "isolated".
                    pair = _measure({**spec, "kind": "train_pair"}, args)
                    for side in sides:
                        iso = _measure({**spec, "side": side, "repeats": 2, "warmup": 0}, args)
                        row[side] = {**pair[side], "timing": "alternating steps in one process",
                                     **{k: iso.get(k) for k in ("peak_mib", "delta_mib", "setup_mib", "before_timed_mib")},
                                     "isolated_median_ms": iso["median_ms"]}
                    result["rows"].append(_derive(row, peak["gflops"]))
                    continue
                if name != "train" and args.quick and not args.no_peers:
                    # --quick sampling: time both sides' steps in one worker, alternating step by step
                    # (same load for both); memory and a short isolated run from a fresh worker per side.
                    pair = _measure({**spec, "kind": "sample_pair"}, args)
                    for side in sides:
                        iso = _measure({**spec, "side": side, "repeats": 2, "warmup": 1, "quick": 2}, args)
                        row[side] = {**pair[side], "timing": "alternating steps in one process",
                                     **{k: iso.get(k) for k in ("peak_mib", "delta_mib", "setup_mib", "before_timed_mib")},
                                     "isolated_median_ms": iso["median_ms"]}
                    result["rows"].append(_derive(row, peak["gflops"]))
                    continue
                got = {side: [] for side in sides}
                for r in range(args.rounds):                  # alternate, so drifting load hits both sides
                    for side in (sides if r % 2 == 0 else sides[::-1]):
                        current["what"] = f"{preset} {row['name']}, {side}" + (
                            f", round {r + 1} of {args.rounds}" if args.rounds > 1 else "")
                        got[side].append(_measure({**spec, "side": side}, args))
                for side in sides:
                    row[side] = combine(got[side], spec)
                row["rounds"] = args.rounds
                result["rows"].append(_derive(row, peak["gflops"]))
    except (Exception, KeyboardInterrupt) as e:
        # Keep what was measured: the finished rows go to the JSON file with what failed.
        what = current["what"]
        detail = getattr(e, "detail", "") or ""
        result["incomplete"] = {"failed": what, "error": f"{type(e).__name__}: {e}", "detail": detail[-4000:],
                                "rows_finished": len(result["rows"])}
        try:
            _finish(result, notes, args, out, t_start)
        except OSError as w:                       # (--json was checked up front: should not happen)
            out(f"# could not write {args.json}: {w}")
        if isinstance(e, WorkerError):
            saved = f"; the {len(result['rows'])} rows finished before it are in {args.json}" if args.json else ""
            raise WorkerError(f"{what}: {e}{saved}", detail) from None
        raise
    _finish(result, notes, args, out, t_start)
    return result


def _finish(result, notes, args, out, t_start) -> None:
    """Print the table, the summary and the notes of the rows in ``result`` and write the JSON file
    (also after a failure, then with ``result["incomplete"]`` saying what failed)."""
    result["seconds"] = time.time() - t_start
    result["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["notes"] = notes
    for line in table_lines(result["rows"]):
        out(line)
    result["summary"] = summarize(result["rows"])
    for a in result["summary"]:
        out(f"# per U-Net pass, {a['preset']} {a['family']} {a['phase']} ({a['shapes']} shapes x calls): "
            f"ours {a['ours_ms']:.1f} ms, peer {a['peer_ms']:.1f} ms, ratio {a['ratio']:.2f}")
    for n in notes:
        out(f"# note: {n}")
    if result.get("incomplete"):
        out(f"# INCOMPLETE: {result['incomplete']['failed']} failed ({result['incomplete']['error'].splitlines()[0]}); "
            f"{len(result['rows'])} rows finished before it")
    out(f"# {len(result['rows'])} rows in {result['seconds']:.0f} s; load average at the end "
        + (f"{result['loadavg_1m_end']:.2f}" if result["loadavg_1m_end"] is not None else "unknown")
        + " (other processes on the machine slow both sides)")
    if args.json:
        write_json(args.json, result)                 # creates the folder (checked up front)
        out(f"# JSON: {args.json}")


def run_gpu(args, out=print) -> dict:
    """The GPU rows: :func:`benchmarks.bench_kernels.main` (noise kernels vs the copy bandwidth, every
    cifar convolution fwd+bwd vs cuDNN FP32 with TF32 off, norm / attention vs torch eager), then
    :func:`benchmarks.bench_gpu_e2e.main` (the cifar training step at batch 128 and a sampling step vs
    diffusers eager FP32, TF32 off and on), after checking that the backend is a real GPU.
    ValueError naming what is missing otherwise. Returns ``{"kernels": ..., "e2e": ...}``."""
    check_args(args)
    try:
        from ddpm_ref.kernels import runtime
        name = runtime.backend()
    except Exception as e:                       # GPUUnavailableError or an import failure
        raise ValueError(f"--device gpu needs ddpm_ref.kernels on a CUDA GPU: {e}") from None
    if name != "cuda":
        raise ValueError(f"--device gpu needs a real CUDA GPU; the kernels backend is {name!r} "
                         "(the simulator is for tests, far too slow to time)")
    from benchmarks import bench_kernels
    from benchmarks import bench_gpu_e2e
    repeats = ["--repeats", str(max(args.repeats, 5))]
    e2e_json = _e2e_json(args.json) if args.json else None
    out("# --device gpu: benchmarks/bench_kernels.py (CUDA-event medians; its own table follows)"
        + (f"; JSON: {args.json}" if args.json else ""))
    result = {"kernels": bench_kernels.main(repeats + (["--out", args.json] if args.json else []))}
    out("# --device gpu: benchmarks/bench_gpu_e2e.py (the cifar training and sampling steps on our kernels "
        "vs diffusers eager FP32, TF32 off and on)" + (f"; JSON: {e2e_json}" if e2e_json else ""))
    result["e2e"] = bench_gpu_e2e.main(repeats + ["--breakdown"] + (["--out", e2e_json] if e2e_json else []))
    return result


# ----------------------------------------------------------------------------------- profile

def profile(spec_text: str, threads: int, repeats: int, warmup: int, out=print) -> dict:
    """Per-op wall time of our training step (:func:`benchmarks.bench_e2e.build_train_step`).

    Every public ``*_forward`` / ``*_backward`` function of ``ddpm_ref.ops`` (and the timestep
    embedding) is wrapped by a timer, as are the step's other parts (``rng.normal`` / ``randint``,
    ``diffusion.q_sample``, ``AdamW.step``). Only the outermost timed call counts (an op calling
    another wrapped op is charged once). What no wrapper covers (reshapes, concatenations of weights,
    gradient bookkeeping in the model) is the "not in any op" row. Returns the table as a dict.
    """
    if ":" not in spec_text:
        raise ValueError(f"--profile expects PRESET:BATCH, got {spec_text!r}")
    preset, batch = spec_text.split(":", 1)
    if preset not in PRESETS or not batch.isdecimal() or int(batch) < 1:
        raise ValueError(f"--profile expects PRESET:BATCH with a preset in {list(PRESETS)} and a batch >= 1, "
                         f"got {spec_text!r}")
    limit_threads(threads)
    from ddpm_ref import diffusion, rng
    from ddpm_ref import optim
    from ddpm_ref.ops import activation, attention, conv, embedding, linear, loss, norm, resample
    from benchmarks.bench_e2e import build_train_step
    totals, depth, saved = {}, [0], []

    def key_of(name, a):
        if name == "conv2d_forward":
            x, w = a[0], a[1]
            s = a[3] if len(a) > 3 else 1
            return f"conv2d_forward {w.shape[2]}x{w.shape[3]}{' s2' if s == 2 else ''} @{x.shape[2]}x{x.shape[3]}"
        if name == "conv2d_backward":
            return f"conv2d_backward @{a[0].shape[2]}x{a[0].shape[3]} (dy)"
        return name

    def wrap(owner, name, label=None):
        fn = getattr(owner, name)

        def timed(*a, **k):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                depth[0] -= 1
                if depth[0] == 0:
                    key = label or key_of(name, a)
                    tot = totals.setdefault(key, [0.0, 0])
                    tot[0] += dt
                    tot[1] += 1

        saved.append((owner, name, fn))
        setattr(owner, name, timed)

    try:
        for mod in (activation, attention, conv, embedding, linear, loss, norm, resample):
            for name in dir(mod):
                if (name.endswith(("_forward", "_backward")) or name == "timestep_embedding") and \
                        callable(getattr(mod, name)) and not name.startswith("_"):
                    wrap(mod, name)
        wrap(rng, "normal", "rng.normal (training noise)")
        wrap(rng, "randint", "rng.randint (timesteps)")
        wrap(diffusion, "q_sample", "diffusion.q_sample")
        wrap(optim.AdamW, "step", "AdamW.step")
        step = build_train_step({"preset": preset, "batch": int(batch), "side": "ours"})
        for k in range(max(warmup, 1)):
            step(k)
        totals.clear()
        n = max(repeats, 1)
        t0 = time.perf_counter()
        for k in range(n):
            step(max(warmup, 1) + k)
        wall = (time.perf_counter() - t0) / n
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    table = [{"op": k, "calls": c // n, "ms": s / n * 1e3, "share": s / n / wall} for k, (s, c) in rows]
    rest = wall - sum(s for s, _ in totals.values()) / n
    table.append({"op": "(not in any op: model glue)", "calls": None, "ms": rest * 1e3, "share": rest / wall})
    out(f"# our {preset} training step at batch {batch}, {threads} thread(s): {wall * 1e3:.1f} ms per step "
        f"(mean of {n} after {max(warmup, 1)} warm-up); per op, per step:")
    out(f"{'op':<44}{'calls':>6}{'total ms':>11}{'share':>8}")
    for r in table:
        calls = "" if r["calls"] is None else str(r["calls"])
        out(f"{r['op']:<44}{calls:>6}{r['ms']:>11.1f}{100 * r['share']:>7.1f}%")
    return {"preset": preset, "batch": int(batch), "threads": threads, "step_ms": wall * 1e3, "ops": table}


def main(argv=None) -> int:
    """The command line: 0 on success; 2 and one ``error:`` line for a bad option (checked before
    anything runs, --json included); 1 and one ``error:`` line naming the row when a measurement
    worker fails (the rows finished before it are written to the JSON file, marked incomplete)."""
    args = parser().parse_args(argv)
    try:
        if args.worker:
            limit_threads(args.threads)
            print(json.dumps(worker_main(json.loads(args.worker))))
            return 0
        if args.json is None:
            args.json = DEFAULT_JSON["profile" if args.profile else args.device]
        check_args(args)                              # every option and the JSON path(s), up front
        if args.profile:
            res = profile(args.profile, args.threads, args.repeats, args.warmup)
            if args.json:
                write_json(args.json, res)
                print(f"# JSON: {args.json}")
            return 0
        if args.device == "gpu":
            run_gpu(args)
            return 0
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
