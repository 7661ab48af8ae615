"""Training checkpoints: one ``.npz`` of plain arrays, written atomically, read without pickle.

What it is: everything a run needs to continue exactly where it stopped (resume must be
bit-identical to the uninterrupted run, see ``train.py``): the flat parameter buffer, its EMA, the
AdamW moments and update count, the step, the full configuration (model, schedule, training
hyper-parameters, data) as JSON, the timestep sampler's state (improved-diffusion's loss-aware
sampler keeps a history of losses) and the few running metrics the loop reports.
What it is not: a general serialisation library, or a weight-exchange format (``interop.py`` converts
to and from diffusers' safetensors).

Layout of the ``.npz`` (a zip of ``.npy`` members, each with a CRC-32 that NumPy checks on read):

=================  ==========================================================================
``meta``           uint8 bytes of a UTF-8 JSON object: ``format`` ("ddpm-ref-checkpoint"),
                   ``version`` (FORMAT_VERSION), ``step``, ``config``, ``metrics``,
                   ``optimizer_step``, ``sampler_scalars``, ``sampler_arrays``, ``has_ema``
``params``         float32 (P,): the weights theta
``ema``            float32 (P,): the EMA of the weights (absent when the run keeps none)
``optim.m``        float32 (P,): AdamW first moment (absent for weights-only checkpoints)
``optim.v``        float32 (P,): AdamW second moment
``sampler.<key>``  the array entries of the timestep sampler's ``state_dict()``
=================  ==========================================================================

Safety: files are read with ``np.load(..., allow_pickle=False)``, so loading never executes code
(a pitfall of pickle-based checkpoints). Any corrupt, truncated or foreign file raises one
:class:`CheckpointError` (a ``ValueError``) naming the file and what is wrong, never a traceback from
inside NumPy or zipfile.

Atomicity: :func:`atomic_write` writes to a temporary file in the destination directory, flushes
and ``fsync``s it, ``os.replace``s it over the destination (atomic on POSIX and Windows) and
``fsync``s the directory, so a crash at any instant leaves either the old or the new checkpoint,
both complete.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "atomic_write",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "ddpm-ref-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, truncated, foreign or inconsistent."""


@dataclass
class Checkpoint:
    """The content of one checkpoint. Arrays are flat float32 (P,) in the model's ParamLayout order.

    ``optimizer`` is ``AdamW.state_dict()`` (``{"m", "v", "step"}``) or None; ``sampler`` is the
    timestep sampler's ``state_dict()`` (arrays and JSON scalars) or None; ``metrics`` is JSON.
    """

    params: np.ndarray
    config: dict
    step: int = 0
    ema: np.ndarray | None = None
    optimizer: dict | None = None
    sampler: dict | None = None
    metrics: dict = field(default_factory=dict)


def _fsync_dir(directory: str) -> None:
    """fsync a directory so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    """The process umask. POSIX has no call that only reads it: ``os.umask(x)`` sets it and returns
    the old value, so the portable way is to set it and put it back at once. That pair briefly
    changes the umask of the whole process (a file another thread creates in between would get mode
    0666/0777), so on Linux it is read from /proc/self/status instead, which changes nothing.
    Read per call, not once at import, so that a umask the program sets later is honoured."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(path: str) -> int:
    """The permission bits the file at ``path`` should end with: those of the file it replaces, or
    for a new file those of a plain ``open(path, "w")`` (0o666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:
        return 0o666 & ~_current_umask()


def atomic_write(path, write) -> None:
    """Atomically create or replace ``path``; ``write(fileobj)`` writes the content (binary).

    Temp file ``.<name>.<random>.tmp`` in the same directory -> flush -> fsync -> os.replace ->
    fsync(directory). On any exception the temp file is removed and the old ``path`` is untouched.
    The result has the permission bits of the file it replaces, or those of a plain ``open()`` for a
    new file (``mkstemp`` alone would make every file owner-only, 0600).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    mode = _target_mode(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            else:  # Windows: only the read-only bit exists
                os.chmod(tmp, mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _stale_temps(path: str) -> list:
    directory = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names if n.startswith(prefix) and n.endswith(".tmp")]


def _flat_f32(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or a.dtype != np.float32:
        raise ValueError(f"checkpoint {name} must be a flat float32 array, got {a.dtype} {a.shape}")
    return a


def save_checkpoint(path, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` to ``path`` atomically (see the module docstring); returns the path.

    Temp files left by an earlier writer that was killed mid-write (``.<name>.*.tmp``) are removed.
    """
    path = os.fspath(path)
    params = _flat_f32("params", ckpt.params)
    arrays = {"params": params}
    if ckpt.ema is not None:
        arrays["ema"] = _flat_f32("ema", ckpt.ema)
        if arrays["ema"].shape != params.shape:
            raise ValueError(f"checkpoint ema shape {arrays['ema'].shape} != params shape {params.shape}")
    opt_step = None
    if ckpt.optimizer is not None:
        for k in ("m", "v"):
            a = _flat_f32(f"optimizer {k}", ckpt.optimizer[k])
            if a.shape != params.shape:
                raise ValueError(f"checkpoint optimizer {k} shape {a.shape} != params shape {params.shape}")
            arrays["optim." + k] = a
        opt_step = int(ckpt.optimizer["step"])
    step = int(ckpt.step)
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    sampler_scalars, sampler_arrays = None, []
    if ckpt.sampler is not None:
        sampler_scalars = {}
        for k, v in ckpt.sampler.items():
            if isinstance(v, np.ndarray):
                arrays["sampler." + k] = v
                sampler_arrays.append(k)
            else:
                sampler_scalars[k] = v.item() if isinstance(v, np.generic) else v
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "config": ckpt.config,
            "metrics": ckpt.metrics or {}, "optimizer_step": opt_step, "has_ema": ckpt.ema is not None,
            "sampler_scalars": sampler_scalars, "sampler_arrays": sampler_arrays}
    try:
        text = json.dumps(meta, allow_nan=True, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"checkpoint config/metrics/sampler state must be JSON-serialisable: {e}") from None
    arrays["meta"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    for stale in _stale_temps(path):
        try:
            os.unlink(stale)
        except OSError:
            pass
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`. Raises :class:`CheckpointError` naming
    ``path`` for a missing, corrupt, truncated, foreign, newer-format or inconsistent file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, expected a .npz file")

    def bad(why):
        return CheckpointError(f"{path} is not a usable ddpm-ref checkpoint: {why}")

    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise bad("it is a single .npy array, not a .npz checkpoint")
        with z:
            files = set(z.files)
            if "meta" not in files:
                raise bad(f"no 'meta' entry (entries: {sorted(files)[:8]})")
            data = {k: z[k] for k in z.files}   # reads every member: zip CRC checks happen here
    except CheckpointError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, ...
        msg = str(e).splitlines()[0] if str(e) else ""
        raise bad(f"cannot read it ({type(e).__name__}: {msg})") from None

    meta_raw = data.pop("meta")
    try:
        if meta_raw.dtype != np.uint8 or meta_raw.ndim != 1:
            raise ValueError("meta is not a byte array")
        meta = json.loads(meta_raw.tobytes().decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"unreadable metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise bad(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise bad(f"format version {version!r} is invalid")
    if version > FORMAT_VERSION:
        raise bad(f"format version {version} is newer than this ddpm-ref reads ({FORMAT_VERSION}); upgrade")

    def get(name, required=True):
        if name not in data:
            if required:
                raise bad(f"missing entry {name!r}")
            return None
        a = data[name]
        if a.dtype != np.float32 or a.ndim != 1:
            raise bad(f"entry {name!r} is {a.dtype} {a.shape}, expected flat float32")
        return a

    def short(v):      # the value as JSON, cut short: a crafted value may be huge
        r = json.dumps(v)
        return r if len(r) <= 60 else r[:57] + "..."

    def kind(v):       # the JSON name of a loaded value's type
        return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
                dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)

    def is_count(v):   # a JSON integer >= 0 (JSON true/false load as bool, a subclass of int)
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    step = meta.get("step")
    if not is_count(step):
        raise bad(f"step {short(step)} is not a non-negative integer")
    opt_step = meta.get("optimizer_step")
    if opt_step is not None and not is_count(opt_step):
        raise bad(f"optimizer_step {short(opt_step)} is not a non-negative integer or null")
    has_ema = meta.get("has_ema", False)
    if not isinstance(has_ema, bool):
        raise bad(f"has_ema {short(has_ema)} is not true or false")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise bad("config is missing or not a JSON object")
    metrics = meta.get("metrics")
    if metrics is None:
        metrics = {}
    if not isinstance(metrics, dict):
        raise bad(f"metrics is {kind(metrics)}, expected a JSON object")
    sampler_scalars = meta.get("sampler_scalars")
    if sampler_scalars is not None and not isinstance(sampler_scalars, dict):
        raise bad(f"sampler_scalars is {kind(sampler_scalars)}, expected a JSON object or null")
    sampler_arrays = meta.get("sampler_arrays")
    if sampler_arrays is None:
        sampler_arrays = []
    if not isinstance(sampler_arrays, list) or not all(isinstance(k, str) for k in sampler_arrays):
        raise bad(f"sampler_arrays {short(sampler_arrays)} is not an array of names (strings)")

    params = get("params")
    ema = get("ema", required=has_ema)
    optimizer = None
    if opt_step is not None:
        m, v = get("optim.m"), get("optim.v")
        optimizer = {"m": m, "v": v, "step": opt_step}
    for name, a in (("ema", ema), ("optim.m", optimizer and optimizer["m"]),
                    ("optim.v", optimizer and optimizer["v"])):
        if a is not None and a.shape != params.shape:
            raise bad(f"entry {name!r} has shape {a.shape}, params has {params.shape}")
    sampler = None
    if sampler_scalars is not None:
        sampler = dict(sampler_scalars)
        for k in sampler_arrays:
            if "sampler." + k not in data:
                raise bad(f"missing sampler entry {k!r}")
            sampler[k] = data["sampler." + k]
    if not np.all(np.isfinite(params)):
        raise bad("params contain NaN or inf")
    return Checkpoint(params=params, config=config, step=step, ema=ema, optimizer=optimizer,
                      sampler=sampler, metrics=metrics)

