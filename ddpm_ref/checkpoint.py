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

One set of rules: :func:`save_checkpoint` checks what it is about to write with the very function
:func:`load_checkpoint` checks a file with (``_check_content``), before it touches the disk, so it
never replaces a good checkpoint with one that cannot be loaded (NaN params, a config that is not a
JSON object, a step that is not a non-negative integer, an object array that would need pickle...).

Atomicity: :func:`atomic_write` writes to a temporary file in the destination directory, flushes
and ``fsync``s it, ``os.replace``s it over the destination (atomic on POSIX and Windows) and
``fsync``s the directory, so a crash at any instant leaves either the old or the new checkpoint,
both complete. A writer killed mid-write leaves its temp file behind; a later save of the same path
removes it once it is :data:`STALE_TEMP_SECONDS` old (never the fresh temp of a writer still at work,
nor the temps of another file).
"""
from __future__ import annotations

import json
import numbers
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from .optim import check_state

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "atomic_write",
           "FORMAT", "FORMAT_VERSION", "STALE_TEMP_SECONDS"]

FORMAT = "ddpm-ref-checkpoint"
FORMAT_VERSION = 1

# A temp file of this checkpoint (``.<name>.<random>.tmp``) untouched for this long is taken to be the
# leftover of a writer that died mid-write, and the next save removes it. A writer that is alive
# rewrites its temp continuously, so its mtime is seconds old; an hour leaves room for a slow fsync of
# a large file, a paused process or some clock skew on a network file system, while keeping the
# disk a killed run can waste to the temps of its last hour. Age, not the writer's pid, decides:
# pids are reused (a restarted container often gets the same one) and mean nothing across hosts or
# pid namespaces that share the directory.
STALE_TEMP_SECONDS = 3600.0


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


def _stale_temps(path: str, now: float | None = None) -> list:
    """The temp files of ``path`` itself that are stale: named exactly ``.<name>.<random>.tmp`` as
    :func:`atomic_write` names them (``<random>``: mkstemp's letters, digits and underscores, no dot,
    so the temps of ``<name>.npz`` or any other file never match) and not modified for
    :data:`STALE_TEMP_SECONDS`. The temp of a writer still at work, in this process or another, is
    fresh and kept."""
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape("." + os.path.basename(path) + ".") + r"[A-Za-z0-9_]+\.tmp")
    now = time.time() if now is None else now
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    stale = []
    for n in names:
        if not pattern.fullmatch(n):
            continue
        full = os.path.join(directory, n)
        try:
            st = os.lstat(full)
        except OSError:            # gone meanwhile (its writer finished)
            continue
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_TEMP_SECONDS:
            stale.append(full)
    return stale


def _clip(r: str) -> str:
    return r if len(r) <= 60 else r[:57] + "..."


def _short(v) -> str:
    """A loaded JSON value as JSON, cut short: a crafted value may be huge."""
    try:
        r = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        r = repr(v)
    return _clip(r)


def _kind(v) -> str:
    """The JSON name of a loaded value's type."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _is_count(v) -> bool:
    """A JSON integer >= 0 (JSON true/false load as bool, a subclass of int)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_meta(raw: np.ndarray, bad) -> dict:
    """The ``meta`` entry (uint8 bytes of UTF-8 JSON) as a dict; ``bad(why)`` makes the error."""
    try:
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError("meta is not a byte array")
        meta = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except RecursionError:
        raise bad("unreadable metadata (JSON nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"unreadable metadata ({e})") from None
    return meta


def _check_content(meta: dict, data: dict, bad) -> Checkpoint:
    """THE rules of a checkpoint's content, applied by :func:`load_checkpoint` to what it read and by
    :func:`save_checkpoint` to exactly what it is about to write (the parsed-back metadata and the
    arrays), so that a file ``save`` writes is one ``load`` accepts. ``meta``: the parsed JSON object;
    ``data``: the array entries (name -> ndarray) other than ``meta``. Returns the Checkpoint; raises
    ``bad(why)`` naming the first field that breaks a rule."""
    if meta.get("format") != FORMAT:
        raise bad(f"format is {_clip(repr(meta.get('format')))}, expected {FORMAT!r}")
    version = meta.get("version")
    if not _is_count(version) or version < 1:      # JSON true loads as bool: refused too
        raise bad(f"format version {_clip(repr(version))} is invalid")
    if version > FORMAT_VERSION:
        raise bad(f"format version {version} is newer than this ddpm-ref reads ({FORMAT_VERSION}); upgrade")
    for name, a in data.items():
        if not isinstance(a, np.ndarray) or a.dtype.hasobject:
            raise bad(f"entry {name!r} holds Python objects (dtype {getattr(a, 'dtype', type(a).__name__)}), "
                      "which cannot be stored without pickle: use numeric arrays")

    def get(name, required=True):
        if name not in data:
            if required:
                raise bad(f"missing entry {name!r}")
            return None
        a = data[name]
        if a.dtype != np.float32 or a.ndim != 1:
            raise bad(f"entry {name!r} is {a.dtype} {a.shape}, expected flat float32")
        return a

    step = meta.get("step")
    if not _is_count(step):
        raise bad(f"step {_short(step)} is not a non-negative integer")
    opt_step = meta.get("optimizer_step")
    if opt_step is not None and not _is_count(opt_step):
        raise bad(f"optimizer_step {_short(opt_step)} is not a non-negative integer or null")
    has_ema = meta.get("has_ema", False)
    if not isinstance(has_ema, bool):
        raise bad(f"has_ema {_short(has_ema)} is not true or false")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise bad(f"config is {_kind(config) if 'config' in meta else 'missing'}, expected a JSON object")
    metrics = meta.get("metrics")
    if metrics is None:
        metrics = {}
    if not isinstance(metrics, dict):
        raise bad(f"metrics is {_kind(metrics)}, expected a JSON object")
    sampler_scalars = meta.get("sampler_scalars")
    if sampler_scalars is not None and not isinstance(sampler_scalars, dict):
        raise bad(f"sampler_scalars is {_kind(sampler_scalars)}, expected a JSON object or null")
    sampler_arrays = meta.get("sampler_arrays")
    if sampler_arrays is None:
        sampler_arrays = []
    if not isinstance(sampler_arrays, list) or not all(isinstance(k, str) for k in sampler_arrays):
        raise bad(f"sampler_arrays {_short(sampler_arrays)} is not an array of names (strings)")

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
    if not np.isfinite(params).all():
        raise bad("params contain NaN or inf")
    if ema is not None and not np.isfinite(ema).all():
        raise bad("ema contains NaN or inf")
    if optimizer is not None:
        try:       # the optimizer's own rules (finite m, finite v >= 0), shared with AdamW.load_state_dict
            check_state(optimizer, params.size)
        except ValueError as e:
            raise bad(str(e)) from None
    return Checkpoint(params=params, config=config, step=step, ema=ema, optimizer=optimizer,
                      sampler=sampler, metrics=metrics)


def _plain(v):
    """A NumPy scalar as the Python value JSON stores (``np.int64(3)`` -> 3); anything else as is."""
    return v.item() if isinstance(v, np.generic) else v


def save_checkpoint(path, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` to ``path`` atomically (see the module docstring); returns the path.

    The content is first checked by the rules :func:`load_checkpoint` applies (``_check_content``,
    on the very metadata and arrays about to be written): content that could not be loaded back is a
    :class:`CheckpointError` (a ValueError) naming the field, raised before anything is written or
    removed, so the existing file at ``path`` stays as it was.

    Temp files of this same path that a writer killed mid-write left behind (``.<name>.<random>.tmp``,
    untouched for :data:`STALE_TEMP_SECONDS`) are removed; those of writers still at work are kept.
    """
    path = os.fspath(path)

    def bad(why):
        return CheckpointError(f"cannot save checkpoint {path}: {why}")

    if not isinstance(ckpt, Checkpoint):
        raise bad(f"expected a Checkpoint, got {type(ckpt).__name__}")
    if os.path.isdir(path):
        raise bad("it is a directory, expected a file name")

    def array(name, a):
        try:
            return np.asarray(a)
        except Exception as e:   # a ragged nested list, ...
            raise bad(f"{name} is not an array ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None

    arrays = {"params": array("params", ckpt.params)}
    if ckpt.ema is not None:
        arrays["ema"] = array("ema", ckpt.ema)
    opt_step = None
    if ckpt.optimizer is not None:
        if not isinstance(ckpt.optimizer, dict):
            raise bad(f"optimizer is {type(ckpt.optimizer).__name__}, expected AdamW.state_dict()'s dict or None")
        missing = [k for k in ("m", "v", "step") if k not in ckpt.optimizer]
        if missing:
            raise bad(f"optimizer state is missing {missing}")
        for k in ("m", "v"):
            arrays["optim." + k] = array(f"optimizer {k}", ckpt.optimizer[k])
        opt_step = _plain(ckpt.optimizer["step"])
    sampler_scalars, sampler_arrays = None, []
    if ckpt.sampler is not None:
        if not isinstance(ckpt.sampler, dict) or not all(isinstance(k, str) for k in ckpt.sampler):
            raise bad("sampler state must be a dict with string keys (the sampler's state_dict()) or None")
        sampler_scalars = {}
        for k, v in ckpt.sampler.items():
            if isinstance(v, np.ndarray):
                arrays["sampler." + k] = v
                sampler_arrays.append(k)
            else:
                sampler_scalars[k] = _plain(v)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": _plain(ckpt.step), "config": ckpt.config,
            "metrics": {} if ckpt.metrics is None else ckpt.metrics, "optimizer_step": opt_step,
            "has_ema": ckpt.ema is not None, "sampler_scalars": sampler_scalars, "sampler_arrays": sampler_arrays}
    try:
        text = json.dumps(meta, allow_nan=True, sort_keys=True)
    except RecursionError:
        raise bad("config/metrics/sampler state are nested too deeply for JSON") from None
    except (TypeError, ValueError) as e:
        raise bad(f"config/metrics/sampler state must be JSON-serialisable: {e}") from None
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    # load's rules on exactly what is written (the metadata as load will parse it back)
    _check_content(_parse_meta(raw, bad), arrays, bad)
    arrays["meta"] = raw
    now = time.time()
    for stale in _stale_temps(path, now):
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

    meta = _parse_meta(data.pop("meta"), bad)
    return _check_content(meta, data, bad)
