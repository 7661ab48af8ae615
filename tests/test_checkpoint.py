"""Tests for ddpm_ref/checkpoint.py: round trip, atomic writes under SIGKILL, clear errors."""
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from ddpm_ref.checkpoint import (Checkpoint, CheckpointError, FORMAT_VERSION, STALE_TEMP_SECONDS, atomic_write,
                                 load_checkpoint, save_checkpoint)


def _ckpt(p=1000, seed=0, step=7):
    g = np.random.default_rng(seed)
    f = lambda: g.standard_normal(p).astype(np.float32)  # noqa: E731
    return Checkpoint(params=f(), ema=f(), optimizer={"m": f(), "v": np.abs(f()), "step": step},
                      step=step, config={"model": {"kind": "unet", "ch": 8}, "train": {"lr": 1e-3}},
                      sampler={"history": g.standard_normal((10, 4)), "count": np.arange(10), "T": 10},
                      metrics={"loss_ema": 0.25, "wall_time": 3.5})


def test_roundtrip_bit_exact(tmp_path):
    c = _ckpt()
    path = tmp_path / "c.npz"
    save_checkpoint(path, c)
    d = load_checkpoint(path)
    for name in ("params", "ema"):
        np.testing.assert_array_equal(getattr(d, name), getattr(c, name))  # bit-exact storage
    np.testing.assert_array_equal(d.optimizer["m"], c.optimizer["m"])
    np.testing.assert_array_equal(d.optimizer["v"], c.optimizer["v"])
    assert d.optimizer["step"] == 7 and d.step == 7
    assert d.config == c.config and d.metrics == c.metrics
    np.testing.assert_array_equal(d.sampler["history"], c.sampler["history"])
    np.testing.assert_array_equal(d.sampler["count"], c.sampler["count"])
    assert d.sampler["T"] == 10
    # plain arrays only: loading with allow_pickle=False works on every member
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
    assert meta["version"] == FORMAT_VERSION and meta["format"] == "ddpm-ref-checkpoint"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_weights_only(tmp_path):
    c = Checkpoint(params=np.ones(5, np.float32), config={})
    save_checkpoint(tmp_path / "w.npz", c)
    d = load_checkpoint(tmp_path / "w.npz")
    assert d.ema is None and d.optimizer is None and d.sampler is None and d.step == 0
    np.testing.assert_array_equal(d.params, 1.0)


def _expect(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg  # one line, naming the file
    return msg


def test_corrupt_truncated_foreign(tmp_path):
    good = tmp_path / "good.npz"
    save_checkpoint(good, _ckpt(p=20000))
    raw = good.read_bytes()
    # truncated at several points: the zip directory or a member is missing
    for i, frac in enumerate((0.0, 0.1, 0.5, 0.99)):
        p = tmp_path / f"trunc{i}.npz"
        p.write_bytes(raw[:int(len(raw) * frac)])
        _expect(p, "not a usable ddpm-ref checkpoint")
    # a flipped byte in the middle of the params data: zip CRC-32 catches it
    p = tmp_path / "flip.npz"
    b = bytearray(raw)
    b[len(b) // 3] ^= 0xFF
    p.write_bytes(bytes(b))
    _expect(p, "not a usable ddpm-ref checkpoint")
    # foreign files: random bytes, a text file, an .npy, an npz without meta, a pickle-bearing npz
    (tmp_path / "rand.npz").write_bytes(np.random.default_rng(0).bytes(5000))
    _expect(tmp_path / "rand.npz", "cannot read")
    (tmp_path / "t.npz").write_text("hello")
    _expect(tmp_path / "t.npz", "not a usable")
    np.save(tmp_path / "a.npy", np.zeros(3))
    _expect(tmp_path / "a.npy", "single .npy")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    _expect(tmp_path / "other.npz", "no 'meta'")
    np.savez(tmp_path / "pick.npz", meta=np.array([{"a": 1}], dtype=object))
    _expect(tmp_path / "pick.npz", "cannot read")
    # well-formed zip, wrong format name / newer version / inconsistent shapes
    for name, meta in (("fmt", {"format": "something-else", "version": 1}),
                       ("ver", {"format": "ddpm-ref-checkpoint", "version": FORMAT_VERSION + 1})):
        np.savez(tmp_path / f"{name}.npz", meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                 params=np.zeros(3, np.float32))
    _expect(tmp_path / "fmt.npz", "format is 'something-else'")
    _expect(tmp_path / "ver.npz", "newer")
    c = _ckpt()
    c.ema = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"cannot save checkpoint .*x.npz: entry 'ema' has shape \(3,\)"):
        save_checkpoint(tmp_path / "x.npz", c)
    assert not (tmp_path / "x.npz").exists()
    _expect(tmp_path / "missing.npz", "does not exist")
    _expect(tmp_path, "is a directory")


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from ddpm_ref.checkpoint import Checkpoint, save_checkpoint
    path, p = sys.argv[1], int(sys.argv[2])
    k = 1
    while True:
        x = np.full(p, float(k), np.float32)
        save_checkpoint(path, Checkpoint(params=x, ema=x, optimizer={"m": x, "v": x, "step": k},
                                         step=k, config={"k": k}))
        print(k, flush=True)
        k += 1
""")


def test_sigkill_during_write_keeps_a_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    p = 3_000_000   # 4 arrays x 12 MB: each save takes long enough to be killed inside it
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(p)], stdout=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()          # one complete checkpoint exists
        assert first.strip() == "1"
        # wait until the next write is in progress (its temp file exists), then kill it mid-write
        deadline = time.time() + 30
        while time.time() < deadline:
            if [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # it died inside a write: the half-written temp file is still there
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    c = load_checkpoint(path)               # the last complete checkpoint, whole and consistent
    k = c.step
    assert k >= 1 and c.config == {"k": k}
    np.testing.assert_array_equal(c.params, np.float32(k))
    np.testing.assert_array_equal(c.optimizer["v"], np.float32(k))
    # a later save keeps a temp file that may still be in use (fresh), and clears it once it is stale
    save_checkpoint(path, Checkpoint(params=np.zeros(2, np.float32), config={}))
    temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert temps
    old = time.time() - STALE_TEMP_SECONDS - 60
    for n in temps:
        os.utime(tmp_path / n, (old, old))
    save_checkpoint(path, Checkpoint(params=np.zeros(2, np.float32), config={}))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_atomic_write_failure_keeps_old(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_modes_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        for umask in (0o022, 0o077, 0o002):
            os.umask(umask)
            d = tmp_path / oct(umask)
            d.mkdir()
            open(d / "plain.bin", "wb").close()            # what a plain open() gives under this umask
            assert _mode(d / "plain.bin") == 0o666 & ~umask
            atomic_write(d / "new.bin", lambda f: f.write(b"x"))
            save_checkpoint(d / "new.npz", _ckpt(p=10))
            assert _mode(d / "new.bin") == _mode(d / "new.npz") == 0o666 & ~umask
            # replacing a file keeps its permission bits, whatever the umask says
            for name, write in (("old.bin", lambda p: atomic_write(p, lambda f: f.write(b"new"))),
                                ("old.npz", lambda p: save_checkpoint(p, _ckpt(p=10)))):
                (d / name).write_bytes(b"old")
                os.chmod(d / name, 0o640)
                write(d / name)
                assert _mode(d / name) == 0o640 and (d / name).read_bytes() != b"old"
            assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
    finally:
        os.umask(old)


def _crafted(path, **over):
    """A well-formed npz whose metadata has the given fields replaced (as a hand-made file would)."""
    meta = {"format": "ddpm-ref-checkpoint", "version": FORMAT_VERSION, "step": 0, "config": {}, "metrics": {},
            "optimizer_step": None, "has_ema": False, "sampler_scalars": None, "sampler_arrays": []}
    meta.update(over)
    arrays = {"params": np.zeros(4, np.float32), "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    if over.get("optimizer_step") is not None:
        arrays["optim.m"] = arrays["optim.v"] = np.zeros(4, np.float32)
    np.savez(path, **arrays)
    return path


def test_crafted_metadata_gives_checkpoint_errors(tmp_path):
    c = load_checkpoint(_crafted(tmp_path / "ok.npz", optimizer_step=3, sampler_scalars={"T": 8}))
    assert c.step == 0 and c.optimizer["step"] == 3 and c.sampler == {"T": 8} and c.metrics == {}
    cases = {
        "step_true": (dict(step=True), "step true is not a non-negative integer"),
        "step_negative": (dict(step=-1), "step -1 is not a non-negative integer"),
        "optimizer_step_list": (dict(optimizer_step=[1]), r"optimizer_step \[1\] is not a non-negative integer"),
        "optimizer_step_float": (dict(optimizer_step=2.5), "optimizer_step 2.5 is not a non-negative integer"),
        "metrics_list": (dict(metrics=[1, 2]), "metrics is an array, expected a JSON object"),
        "sampler_scalars_int": (dict(sampler_scalars=5), "sampler_scalars is a number, expected a JSON object"),
        "sampler_arrays_int": (dict(sampler_scalars={}, sampler_arrays=5),
                               "sampler_arrays 5 is not an array of names"),
        "sampler_arrays_nonstr": (dict(sampler_scalars={}, sampler_arrays=[1]),
                                  r"sampler_arrays \[1\] is not an array of names"),
        "has_ema_str": (dict(has_ema="yes"), 'has_ema "yes" is not true or false'),
        "version_true": (dict(version=True), "format version True is invalid"),
        "version_float": (dict(version=1.0), "format version 1.0 is invalid"),
        "config_list": (dict(config=[1]), "config is an array, expected a JSON object"),
    }
    for name, (over, match) in cases.items():
        msg = _expect(_crafted(tmp_path / f"{name}.npz", **over), match)
        assert "not a usable ddpm-ref checkpoint" in msg
    # a huge crafted value is cut short: the message stays one short line
    msg = _expect(_crafted(tmp_path / "long.npz", step=list(range(10000))), "step \\[0, 1, 2")
    assert len(msg) < len(str(tmp_path)) + 200


def test_zip_crc_is_what_catches_bitrot(tmp_path):
    # sanity: our checkpoint is a zip whose members carry CRCs (the corruption test relies on it)
    save_checkpoint(tmp_path / "c.npz", _ckpt(p=10))
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert z.testzip() is None
        assert {i.filename for i in z.infolist()} >= {"meta.npy", "params.npy", "optim.m.npy"}


def _good(p=6):
    return Checkpoint(params=np.ones(p, np.float32), config={"a": 1}, step=5)


@pytest.mark.parametrize("change,match", [
    (dict(params=np.array([1, np.nan, 0, 0, 0, 0], np.float32)), "params contain NaN or inf"),
    (dict(params=np.ones(6)), "entry 'params' is float64"),
    (dict(ema=np.full(6, np.inf, np.float32)), "ema contains NaN or inf"),
    (dict(config=None), "config is null, expected a JSON object"),
    (dict(config=[1, 2]), "config is an array, expected a JSON object"),
    (dict(metrics=[1]), "metrics is an array, expected a JSON object"),
    (dict(step=3.9), "step 3.9 is not a non-negative integer"),
    (dict(step=True), "step true is not a non-negative integer"),
    (dict(step="7"), 'step "7" is not a non-negative integer'),
    (dict(step=float("inf")), "step Infinity is not a non-negative integer"),
    (dict(step=float("nan")), "step NaN is not a non-negative integer"),
    (dict(step=-1), "step -1 is not a non-negative integer"),
    (dict(optimizer={"m": np.zeros(6, np.float32), "v": np.zeros(6, np.float32), "step": -1}),
     "optimizer_step -1 is not a non-negative integer"),
    (dict(optimizer={"m": np.zeros(6, np.float32), "v": np.zeros(6, np.float32), "step": 2.5}),
     "optimizer_step 2.5 is not a non-negative integer"),
    (dict(optimizer={"m": np.zeros(6, np.float32), "v": -np.ones(6, np.float32), "step": 2}),
     "optimizer state 'v' must be finite and >= 0"),
    (dict(optimizer={"m": np.zeros(6, np.float32), "step": 2}), r"optimizer state is missing \['v'\]"),
    (dict(sampler={"hist": np.array([{"x": 1}], dtype=object)}), "entry 'sampler.hist' holds Python objects"),
    (dict(sampler={1: 2}), "sampler state must be a dict with string keys"),
    (dict(metrics={"x": object()}), "must be JSON-serialisable"),
])
def test_save_refuses_what_load_would_refuse_and_keeps_the_old_file(tmp_path, change, match):
    import dataclasses

    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _good())
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=match) as e:
        save_checkpoint(path, dataclasses.replace(_good(), **change))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before and load_checkpoint(path).step == 5     # the good file, untouched
    assert os.listdir(tmp_path) == ["ckpt.npz"]                               # no temp file either


def test_save_accepts_numpy_scalars_and_a_directory_path_is_refused(tmp_path):
    c = Checkpoint(params=np.ones(3, np.float32), config={}, step=np.int64(4),
                   optimizer={"m": np.zeros(3, np.float32), "v": np.zeros(3, np.float32), "step": np.int64(4)},
                   sampler={"T": np.int64(10), "count": np.asarray(3)}, metrics=None)
    d = load_checkpoint(save_checkpoint(tmp_path / "c.npz", c))
    assert d.step == d.optimizer["step"] == 4 and d.sampler["T"] == 10 and d.metrics == {}
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="out: it is a directory"):
        save_checkpoint(tmp_path / "out", c)
    assert sorted(os.listdir(tmp_path)) == ["c.npz", "out"]


def test_deeply_nested_metadata_is_a_checkpoint_error(tmp_path):
    meta = ('{"format": "ddpm-ref-checkpoint", "config": ' + "[" * 100000 + "]" * 100000 + "}").encode()
    np.savez(tmp_path / "deep.npz", meta=np.frombuffer(meta, np.uint8), params=np.zeros(3, np.float32))
    _expect(tmp_path / "deep.npz", "unreadable metadata .*nested too deeply")
    deep = []
    for _ in range(100000):
        deep = [deep]
    with pytest.raises(CheckpointError, match="nested too deeply"):
        save_checkpoint(tmp_path / "d2.npz", Checkpoint(params=np.ones(2, np.float32), config={"x": deep}))
    assert os.listdir(tmp_path) == ["deep.npz"]


def test_cleanup_removes_only_stale_temps_of_this_very_file(tmp_path):
    old = time.time() - STALE_TEMP_SECONDS - 60
    names = {".ckpt.abc123_x.tmp": old,          # this file's, stale: removed
             ".ckpt.fresh999.tmp": None,         # this file's, in use by another writer: kept
             ".ckpt.npz.old12345.tmp": old,      # the temp of ckpt.npz (another file): kept
             ".ckpt.1.old12345.tmp": old,        # the temp of ckpt.1: kept
             "ckpt.abc.tmp": old}                # not a temp name: kept
    for n, t in names.items():
        (tmp_path / n).write_bytes(b"x")
        if t is not None:
            os.utime(tmp_path / n, (t, t))
    save_checkpoint(tmp_path / "ckpt", _good())
    assert sorted(os.listdir(tmp_path)) == sorted(set(names) - {".ckpt.abc123_x.tmp"} | {"ckpt"})


@pytest.mark.parametrize("name_a,name_b", [("ckpt.npz", "ckpt.npz"), ("ckpt.npz", "ckpt")])
def test_concurrent_writers_do_not_remove_each_others_temp_files(tmp_path, monkeypatch, name_a, name_b):
    # Writer A is inside its write (its temp file exists) while writer B saves: B must leave A's temp alone.
    import threading

    real_savez, inside, release = np.savez, threading.Event(), threading.Event()

    def savez(f, **arrays):
        if threading.current_thread().name == "A":
            inside.set()
            assert release.wait(10)
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    result = {}

    def a():
        try:
            save_checkpoint(tmp_path / name_a, Checkpoint(params=np.full(4, 1, np.float32), config={"who": "A"}))
            result["A"] = "ok"
        except Exception as e:   # noqa: BLE001  (reported by the assertion below)
            result["A"] = repr(e)

    t = threading.Thread(target=a, name="A")
    t.start()
    try:
        assert inside.wait(10)
        save_checkpoint(tmp_path / name_b, Checkpoint(params=np.full(4, 2, np.float32), config={"who": "B"}))
    finally:
        release.set()
        t.join(10)
    assert result == {"A": "ok"}
    assert load_checkpoint(tmp_path / name_a).config == {"who": "A"}       # A finished last
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
