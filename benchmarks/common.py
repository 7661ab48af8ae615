"""Shared pieces of the benchmark suite: timing, machine information, the measured GEMM peak,
resident memory, worker subprocesses, FLOP counts, the table and the JSON file.

Conventions (stated once here and printed with every table):

* A figure is the median of ``repeats`` (>= 5 by default) timed runs after ``warmup`` untimed runs.
  Where ours and a peer are timed in the same process, their runs are interleaved (ours, peer, peer,
  ours, ...: the order alternates each round) so that load from other processes and a BLAS thread
  pool still spinning from the previous call hit both alike.
* FLOPs count the GEMM work only (convolutions, dense layers, attention products) as 2 * MACs
  (one multiply-add = 2 FLOPs); element-wise work (norms, activations, the samplers' updates) is not
  counted, so GFLOP/s understates the arithmetic done. A backward pass counts 2x its forward (the
  gradients with respect to the input and to the weights are one GEMM each).
* The GEMM peak is the best GFLOP/s of 10 runs of a large ``numpy.matmul`` of float32 square
  matrices at the suite's thread count, measured in the same run; "% peak" = achieved GFLOP/s / that
  peak. On a busy machine a row can exceed 100% (its runs met a quieter moment than the peak's).
* Memory is the resident set size (RSS, Linux ``/proc/self/status``). ``peak MiB`` is the largest
  RSS of the process while the measured work ran (the counter is reset just before, through
  ``/proc/self/clear_refs``); ``+MiB`` is that peak minus the RSS just before (the work's own
  memory: activations, caches, gradients, optimizer scratch). End-to-end rows run every measurement
  in a fresh subprocess, ours and the peer's alike.

What it is not: a profiler (see ``python -m benchmarks --profile``) or a test.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
# Variables that change BLAS speed on some machines: reported, never changed by the suite.
BLAS_HINT_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_VERBOSE", "MKL_ENABLE_INSTRUCTIONS",
                  "MKL_DEBUG_CPU_TYPE", "KMP_AFFINITY", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024.0


# ------------------------------------------------------------------------------------- threads

def thread_env(threads: int, base: dict | None = None) -> dict:
    """A copy of the environment with every BLAS / OpenMP thread variable set to ``threads``."""
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    env = dict(os.environ if base is None else base)
    for var in THREAD_VARS:
        env[var] = str(int(threads))
    return env


_LIMITER = []          # keeps the threadpoolctl controller alive


def limit_threads(threads: int) -> dict:
    """Pin this process's BLAS pools (threadpoolctl, when installed) and torch (when imported) to
    ``threads``. Returns what was set, for the record. Subprocess workers get the environment
    variables instead (set before NumPy starts), which is the reliable way."""
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    done = {}
    try:
        import threadpoolctl
        _LIMITER.append(threadpoolctl.threadpool_limits(limits=int(threads)))
        done["threadpoolctl"] = int(threads)
    except ImportError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(int(threads))
        done["torch"] = int(threads)
    return done


# -------------------------------------------------------------------------------------- timing

def _check_counts(repeats: int, warmup: int):
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if int(warmup) < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Time each callable of ``fns`` (name -> fn()) ``repeats`` times after ``warmup`` calls each.

    Round r calls the functions in order when r is even and in reverse order when r is odd, so no
    function always follows the same other one. Returns name -> list of seconds.
    """
    _check_counts(repeats, warmup)
    names = list(fns)
    for _ in range(int(warmup)):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(int(repeats)):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values) -> float:
    """The median of a non-empty sequence of numbers (the mean of the middle two for an even count)."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("median of an empty sequence")
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * (v[m - 1] + v[m])


def stats(seconds) -> dict:
    """``{"median_ms", "min_ms", "max_ms", "runs", "times_ms"}`` of a list of durations in seconds."""
    ms = [1e3 * s for s in seconds]
    return {"median_ms": median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs": len(ms),
            "times_ms": [round(x, 4) for x in ms]}


# -------------------------------------------------------------------------------------- memory

def rss_kib(field: str = "VmRSS") -> int | None:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in KiB from /proc; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    if field == "VmHWM":
        try:
            import resource
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)   # KiB on Linux
        except (ImportError, OSError):
            return None
    return None


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: write 5 to
    /proc/self/clear_refs). Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn) -> dict:
    """Run ``fn()`` once and return ``{"peak_mib", "delta_mib"}``: the largest RSS while it ran and that
    minus the RSS just before (None where the peak counter cannot be reset). No ``gc.collect()``
    first: arrays are freed by reference counting, and a full collection with torch loaded takes
    most of a second."""
    ok = reset_peak()
    before = rss_kib("VmRSS")
    fn()
    peak = rss_kib("VmHWM")
    if not ok or before is None or peak is None:
        return {"peak_mib": None, "delta_mib": None}
    return {"peak_mib": peak / MIB, "delta_mib": max(peak - before, 0) / MIB}


# ---------------------------------------------------------------------------------------- FLOPs

def conv_flops(x_shape, w_shape, y_shape) -> int:
    """2 * MACs of one conv2d forward: 2 N O C kh kw Ho Wo."""
    n, c = x_shape[0], x_shape[1]
    o, _, kh, kw = w_shape
    return 2 * n * o * c * kh * kw * y_shape[2] * y_shape[3]


def linear_flops(x_shape, w_shape) -> int:
    """2 * MACs of one dense layer forward: 2 M in out (M = rows of x)."""
    m = int(math.prod(x_shape[:-1]))
    return 2 * m * w_shape[0] * w_shape[1]


def attention_flops(q_shape, k_shape, v_shape) -> int:
    """2 * MACs of softmax(q k^T) v forward: 2 B Lq Lk d (scores) + 2 B Lq Lk dv (weighted sum)."""
    b, lq, d = q_shape
    lk, dv = k_shape[1], v_shape[2]
    return 2 * b * lq * lk * d + 2 * b * lq * lk * dv


def gflops(flops, median_ms):
    """GFLOP/s of ``flops`` done in ``median_ms`` (None when there is no FLOP count)."""
    if not flops or not median_ms:
        return None
    return flops / (median_ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------ the GEMM peak

def gemm_peak(n: int = 2048, repeats: int = 10, warmup: int = 1) -> dict:
    """The machine's single-precision GEMM rate as NumPy reaches it: ``a @ b`` for two (n, n) float32
    matrices (2 n^3 FLOPs each), at this process's thread count, timed ``repeats`` times.

    ``gflops`` (the peak the suite divides by) is the best run: a peak is what the machine can do,
    and on a shared machine the median is pulled down by other processes. ``median_gflops`` is
    reported beside it; a large gap between the two says the machine was busy.
    """
    import numpy as np
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gen = np.random.default_rng(0)
    a = gen.standard_normal((n, n), dtype=np.float32)
    b = gen.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    t = interleaved({"gemm": lambda: np.matmul(a, b, out=out)}, repeats, warmup)["gemm"]
    med = median(t)
    return {"n": int(n), "median_ms": 1e3 * med, "gflops": 2.0 * n ** 3 / min(t) / 1e9,
            "median_gflops": 2.0 * n ** 3 / med / 1e9, "runs": len(t)}


# ---------------------------------------------------------------------------------- machine info

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_info() -> list:
    try:
        import threadpoolctl
        return [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer",
                                       "architecture", "filepath")}
                for d in threadpoolctl.threadpool_info()]
    except ImportError:
        pass
    try:
        import numpy as np
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return [{"internal_api": blas.get("name"), "version": blas.get("version"),
                 "configuration": blas.get("openblas configuration")}]
    except Exception as e:          # np.show_config's dict mode is numpy >= 1.26
        return [{"error": f"no BLAS information: {e}"}]


def machine_info(threads: int, torch_too: bool = True) -> dict:
    """What the figures depend on: CPU, cores, load, library versions, BLAS and thread settings."""
    import numpy as np
    info = {
        "cpu": _cpu_model(), "machine": platform.machine(), "system": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "numpy": np.__version__, "blas": _blas_info(),
        "threads": int(threads),
        "thread_env": {v: os.environ.get(v) for v in THREAD_VARS if os.environ.get(v) is not None},
        "blas_env": {v: os.environ.get(v) for v in BLAS_HINT_VARS if os.environ.get(v) is not None},
    }
    if torch_too:
        try:
            import torch
            info["torch"] = torch.__version__
            info["torch_threads"] = torch.get_num_threads()
            info["torch_blas"] = "MKL" if torch.backends.mkl.is_available() else "other"
        except ImportError:
            info["torch"] = None
        try:
            import diffusers
            info["diffusers"] = diffusers.__version__
        except ImportError:
            info["diffusers"] = None
    try:
        import ddpm_ref
        info["ddpm_ref"] = getattr(ddpm_ref, "__version__", "unknown")
    except ImportError:
        info["ddpm_ref"] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        info["git"] = rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def machine_lines(info: dict, peak: dict | None) -> list:
    """The machine block printed above the table."""
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture') or b.get('configuration')}"
                     f", {b.get('num_threads')} threads)" for b in info.get("blas", []))
    lines = [f"# machine: {info['cpu']} ({info['machine']}), {info['logical_cpus']} logical CPUs "
             f"({info['usable_cpus']} usable), load average {info['loadavg_1m']:.2f} at start"
             if info.get("loadavg_1m") is not None else f"# machine: {info['cpu']}",
             f"# python {info['python']}, numpy {info['numpy']} with {blas}",
             f"# torch {info.get('torch')} ({info.get('torch_blas')}), diffusers {info.get('diffusers')}, "
             f"ddpm_ref {info.get('ddpm_ref')} (git {info.get('git')})",
             f"# threads: {info['threads']} for NumPy's BLAS and for torch (torch.set_num_threads)",
             "# BLAS environment: " + (", ".join(f"{k}={v}" for k, v in info["blas_env"].items())
                                       if info.get("blas_env") else "none of " + ", ".join(BLAS_HINT_VARS[:2]) + " set")]
    if peak:
        lines.append(f"# float32 GEMM peak (numpy.matmul {peak['n']}x{peak['n']}, best of {peak['runs']}): "
                     f"{peak['gflops']:.1f} GFLOP/s (median {peak['median_gflops']:.1f})")
    return lines


# ------------------------------------------------------------------------------------ subprocesses

class WorkerError(RuntimeError):
    """A worker subprocess failed. ``str()`` is one line (what failed and the last line of its
    stderr); ``detail`` keeps the tail of its stderr / stdout."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def run_worker(spec: dict, threads: int, timeout: float | None = None, extra_env: dict | None = None) -> dict:
    """Run one measurement ``spec`` in a fresh ``python -m benchmarks --worker`` process with every
    thread variable set to ``threads`` (and ``extra_env``); return the JSON dict it prints last."""
    cmd = [sys.executable, "-m", "benchmarks", "--worker", json.dumps(spec), "--threads", str(int(threads))]
    env = thread_env(threads)
    env.update(extra_env or {})
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    kind = spec.get("kind")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise WorkerError(f"worker {kind} timed out after {timeout} s", f"spec: {json.dumps(spec)}") from e
    if out.returncode:
        raise WorkerError(f"worker {kind} failed (exit {out.returncode}): {_last_line(out.stderr)}",
                          f"spec: {json.dumps(spec)}\n{out.stderr[-4000:]}")
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise WorkerError(f"worker {kind} printed no JSON result: {_last_line(out.stderr or out.stdout)}",
                          f"spec: {json.dumps(spec)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------- table / JSON

def _fmt(v, spec: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


COLUMNS = [("preset", "<7"), ("row", "<30"), ("pass", "<5"), ("ours", ">10"), ("peer", ">10"),
           ("ratio", ">6"), ("GFLOP/s", ">8"), ("%peak", ">6"), ("peer GF/s", ">9"), ("ours MiB", ">10"),
           ("peer MiB", ">10")]


def _mem_cell(side: dict, family: str) -> str:
    """Op rows: the RSS rise during one call; end-to-end rows: "peak/+work" (peak RSS of the fresh
    process while it ran, and that peak minus the RSS after building the model)."""
    if family == "e2e":
        if side.get("peak_mib") is None:
            return "-"
        return f"{side['peak_mib']:.0f}/+{side['delta_mib']:.0f}"
    return _fmt(side.get("delta_mib"), ".0f")


def table_lines(rows: list) -> list:
    """One line per row: times in ms (or images/s for sampling), ratio = our time / the peer's time
    (below 1: we are faster), GFLOP/s and % of the GEMM peak, memory (+MiB for op rows measured in
    one process, peak RSS for end-to-end rows run in fresh processes)."""
    head = " ".join(format(name, spec) for name, spec in COLUMNS)
    out = [head, "-" * len(head)]
    for r in rows:
        ours, peer = r.get("ours") or {}, r.get("peer") or {}
        if r.get("unit") == "images/s":
            a, b = _fmt(ours.get("images_per_s"), ".3g"), _fmt(peer.get("images_per_s"), ".3g")
        else:
            a, b = _fmt(ours.get("median_ms"), ".3f"), _fmt(peer.get("median_ms"), ".3f")
        cells = [r["preset"], r["name"][:30], r.get("phase", "")[:5], a, b, _fmt(r.get("ratio"), ".2f"),
                 _fmt(ours.get("gflops"), ".1f"), _fmt(None if ours.get("peak_fraction") is None
                                                      else 100 * ours["peak_fraction"], ".1f"),
                 _fmt(peer.get("gflops"), ".1f"), _mem_cell(ours, r.get("family")), _mem_cell(peer, r.get("family"))]
        out.append(" ".join(format(c, spec) for c, (_, spec) in zip(cells, COLUMNS)))
    return out


def check_json_path(path: str, option: str = "--json") -> None:
    """ValueError naming ``path`` unless a JSON file can be written there: not an existing folder (or
    other non-file), and its folder either exists and is writable or can be created (its nearest
    existing ancestor is a writable folder). Checked before a run, so that results are not measured
    only to be lost at the end. An empty path means "write nowhere" and passes."""
    if not path:
        return
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a folder; give a file name in it (e.g. {os.path.join(path, 'results.json')!r})")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ValueError(f"{option} {path!r} exists and is not a regular file")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{option} {path!r}: cannot create its folder {folder!r}: {probe!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "its folder" if probe == folder else f"its folder {folder!r}: {probe!r}"
        raise ValueError(f"{option} {path!r}: {what} is not writable")


def write_json(path: str, result: dict) -> None:
    """Write ``result`` as indented JSON, atomically: a uniquely named temporary file in the target's
    folder (created if missing), flushed to disk, then renamed over ``path``. On any failure the
    temporary file is removed and ``path`` is left as it was."""
    from ddpm_ref.checkpoint import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(result, indent=1, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
