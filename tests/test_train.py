"""Tests for ddpm_ref/train.py: data order, exact resume, gradients of the objectives, NaN stop,
run directories, progress and metrics, and a fixed-seed run against recorded losses."""
import json
import sys

import numpy as np
import pytest

from ddpm_ref import rng
from ddpm_ref.checkpoint import load_checkpoint
from ddpm_ref.data import Dataset, load_dataset
from ddpm_ref.train import (CHECKPOINT_NAME, METRICS_NAME, NonFiniteLossError, RunDirError, TrainConfig,
                            Trainer, batch_indices, read_metrics, train)


# ------------------------------------------------------------------------------------ data order

def test_batch_indices_cover_each_epoch_once():
    n, b = 10, 4
    seq = np.concatenate([batch_indices(3, n, b, s) for s in range(5)])   # 20 positions = 2 epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    np.testing.assert_array_equal(seq[:10], rng.permutation(3, rng.Stream.DATA_ORDER, n, step=0))
    np.testing.assert_array_equal(seq[10:], rng.permutation(3, rng.Stream.DATA_ORDER, n, step=1))
    cache = {}
    for s in range(5):   # the permutation cache changes nothing
        np.testing.assert_array_equal(batch_indices(3, n, b, s, cache), seq[4 * s:4 * s + 4])
    assert not np.array_equal(batch_indices(4, n, b, 0), seq[:4])   # another seed, another order
    with pytest.raises(ValueError, match="empty"):
        batch_indices(0, 0, 4, 0)


def test_config_validation():
    with pytest.raises(ValueError, match="prediction"):
        TrainConfig(prediction="eps")
    with pytest.raises(ValueError, match="hybrid"):
        TrainConfig(loss="hybrid")                     # needs learned_range
    with pytest.raises(ValueError, match="learned_range"):
        TrainConfig(variance="learned_range")          # needs the hybrid loss
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"lr": 1e-3, "lrr": 1})
    c = TrainConfig(lr=3e-4)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad in ([1, 0], [0, 0], [0, float("inf")], [0], "01", [True, 2]):
        with pytest.raises(ValueError, match="value_range"):
            TrainConfig(value_range=bad)
    c = TrainConfig(value_range=(0, 255))                  # JSON-able, as the checkpoint stores it
    assert c.value_range == [0.0, 255.0]
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    old = c.to_dict()
    del old["value_range"]                                  # a checkpoint from before the field
    assert TrainConfig.from_dict(old).value_range is None


# ------------------------------------------------------------------------------------ exact resume

def _digits(n):
    return load_dataset("digits", split="train", n=n)


def _moons(n):
    return load_dataset("moons", split="train", n=n)


def _digits_flat(n):
    """Digits as 64-D vectors in [-1, 1]: data for the MLP that the hybrid loss's decoder accepts."""
    d = _digits(n)
    return Dataset(x=d.x.reshape(len(d), -1).copy(), y=None, num_classes=0, name="digits-flat")


RESUME_CASES = {
    # U-Net with dropout, attention, class conditioning + label drop, flips, min-SNR, v-prediction,
    # the loss-aware sampler (history 1, T 8: warm after a few steps) and batches straddling epochs.
    "unet": (lambda: _digits(20), dict(model="unet", preset="tiny", T=8, prediction="v", weighting="min_snr",
                                       timestep_sampler="loss_aware", loss_aware_history=1, class_cond=True,
                                       p_uncond=0.3, hflip=True, batch=6, warmup=2, grad_clip=1.0,
                                       ema_decay=0.9, lr=1e-2)),
    # MLP with the hybrid loss (learned-range variance) and weight decay.
    "mlp_hybrid": (lambda: _digits_flat(50), dict(model="mlp", preset="tiny", T=8, loss="hybrid",
                                            variance="learned_range", batch=16, weight_decay=0.01,
                                            ema_decay=0.99, lr=1e-2, model_overrides={"dropout": 0.1})),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_bit_identical(tmp_path, case):
    make_data, kw = RESUME_CASES[case]
    ds = make_data()
    cfg = TrainConfig(steps=6, checkpoint_every=2, log_every=1, seed=5, **kw)
    a, b = tmp_path / "straight", tmp_path / "resumed"
    train(cfg, a, progress=False, dataset=ds)
    tr_b = train(cfg, b, progress=False, dataset=ds, stop_at=3)        # stops (and checkpoints) at 3
    assert tr_b.step == 3 and load_checkpoint(b / CHECKPOINT_NAME).step == 3
    tr_b2 = train(None, b, resume=True, progress=False, dataset=ds)   # a fresh process would do this
    assert tr_b2.step == 6
    ca, cb = load_checkpoint(a / CHECKPOINT_NAME), load_checkpoint(b / CHECKPOINT_NAME)
    assert ca.step == cb.step == 6
    # bit-identical: same float32 operations on the same inputs in the same order
    np.testing.assert_array_equal(ca.params, cb.params)
    np.testing.assert_array_equal(ca.ema, cb.ema)
    np.testing.assert_array_equal(ca.optimizer["m"], cb.optimizer["m"])
    np.testing.assert_array_equal(ca.optimizer["v"], cb.optimizer["v"])
    assert ca.optimizer["step"] == cb.optimizer["step"] == 6
    assert sorted(ca.sampler) == sorted(cb.sampler)
    for k in ca.sampler:
        np.testing.assert_array_equal(np.asarray(ca.sampler[k]), np.asarray(cb.sampler[k]))
    la = [(r["step"], r["loss"]) for r in read_metrics(a / METRICS_NAME)]
    lb = [(r["step"], r["loss"]) for r in read_metrics(b / METRICS_NAME)]
    assert la == lb and [s for s, _ in la] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(l) for _, l in la)
    assert not np.array_equal(ca.params, ca.ema)   # the EMA is a separate, lagging copy
    if kw.get("timestep_sampler") == "loss_aware":   # importance sampling was active before step 3
        assert np.all(np.asarray(ca.sampler["loss_counts"]) == 1)


def test_metrics_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    ds = _moons(40)
    cfg = TrainConfig(model="mlp", preset="tiny", T=10, steps=4, batch=8, checkpoint_every=2, log_every=1)
    train(cfg, tmp_path, progress=False, dataset=ds, stop_at=2)
    with open(tmp_path / METRICS_NAME, "a") as f:        # a crashed run logged steps 3-4, no checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n")
        f.write('{"step": 5, "lo')                        # and died mid-line
    train(None, tmp_path, resume=True, progress=False, dataset=ds)
    recs = read_metrics(tmp_path / METRICS_NAME)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["loss"] != 9.0 for r in recs)


def test_toy_run_resumes_on_its_own_number_of_points(tmp_path):
    # Runs made before the toys' default training set grew (10,000 -> 1,000,000 points) resume on the
    # points they were trained on: the checkpoint's n_train picks the draw (the first n points of it).
    cfg = TrainConfig(data="moons", model="mlp", preset="tiny", T=10, steps=4, batch=8, checkpoint_every=2)
    train(cfg, tmp_path, progress=False, dataset=_moons(300), stop_at=2)
    tr = train(None, tmp_path, resume=True, progress=False)             # no dataset: loaded as saved
    assert tr.step == 4 and tr.x.shape == (300, 2)
    np.testing.assert_array_equal(tr.x, _moons(300).x)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).config["data"]["n_train"] == 300


# ------------------------------------------------------------------------------------ gradients

def _fd_check(tr, params64, direction, which="loss", step=0, h=1e-5):
    """Centred difference of the chosen scalar along ``direction`` vs the analytic gradient."""
    loss, grad, info = tr.loss_and_grad(params64, step)
    fp = tr.loss_and_grad(params64 + h * direction, step)
    fm = tr.loss_and_grad(params64 - h * direction, step)
    pick = (lambda r: r[0]) if which == "loss" else (lambda r: r[2][which])
    num = (pick(fp) - pick(fm)) / (2 * h)
    ana = float(grad @ direction)
    return num, ana


@pytest.mark.parametrize("prediction,weighting,sampler", [("epsilon", "uniform", "uniform"),
                                                          ("v", "min_snr", "uniform"),
                                                          ("sample", "min_snr", "loss_aware")])
def test_simple_loss_gradient_matches_finite_differences(prediction, weighting, sampler):
    ds = _moons(32)
    cfg = TrainConfig(model="mlp", preset="tiny", T=50, prediction=prediction, weighting=weighting,
                      timestep_sampler=sampler, loss_aware_history=1, batch=8,
                      model_overrides={"dropout": 0.2}, seed=1)
    tr = Trainer(cfg, ds)
    g = np.random.default_rng(0)
    p64 = tr.params.astype(np.float64) + 0.3 * g.standard_normal(tr.params.size)   # leave the zero init
    if sampler == "loss_aware":   # warm the sampler so the importance weights are not all 1
        t_all = np.arange(cfg.T)
        tr.sampler.update(t_all, (t_all + 1.0) / 10.0)
        assert not np.allclose(tr.sampler.sample(cfg.seed, np.arange(8), 3)[1], 1.0)
    u = g.standard_normal(tr.params.size)
    num, ana = _fd_check(tr, p64, u, step=3)
    # float64 centred differences, h = 1e-5: truncation ~ h^2 |f'''| and rounding ~ 1e-16 / h; the
    # loss is O(1), so 1e-6 relative is loose for a correct gradient and tight for a wrong term.
    assert num == pytest.approx(ana, rel=1e-6, abs=1e-9)


def test_hybrid_gradient_reaches_the_variance_only_through_vb():
    ds = _digits_flat(32)
    cfg = TrainConfig(model="mlp", preset="tiny", T=20, loss="hybrid", variance="learned_range", batch=8,
                      seed=2)
    tr = Trainer(cfg, ds)
    g = np.random.default_rng(1)
    p64 = tr.params.astype(np.float64) + 0.3 * g.standard_normal(tr.params.size)
    d = tr.model.config.dim
    # directions that move only the variance outputs (rows d..2d of the output layer): the mean is
    # unchanged, so the VB term's stop-gradient is irrelevant and the total loss is differentiable
    u_var = np.zeros(tr.params.size)
    nv = tr.model.named(u_var)
    nv["output.weight"][d:] = g.standard_normal(nv["output.weight"][d:].shape)
    nv["output.bias"][d:] = g.standard_normal(d)
    num, ana = _fd_check(tr, p64, u_var, step=1)
    assert ana != 0.0
    assert num == pytest.approx(ana, rel=1e-6, abs=1e-9)   # see the tolerance note above
    # the mean outputs (rows 0..d) get the L_simple gradient alone: compare with d mse / d theta
    u_mean = np.zeros(tr.params.size)
    nm = tr.model.named(u_mean)
    nm["output.weight"][:d] = g.standard_normal(nm["output.weight"][:d].shape)
    num, ana = _fd_check(tr, p64, u_mean, which="mse", step=1)
    assert num == pytest.approx(ana, rel=1e-6, abs=1e-9)


def test_hybrid_needs_data_in_unit_range():
    with pytest.raises(ValueError, match="256 bins"):
        Trainer(TrainConfig(model="mlp", preset="tiny", T=10, loss="hybrid", variance="learned_range"), _moons(20))


# ------------------------------------------------------------------------------------ NaN stop

def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    ds = _moons(40)
    x = ds.x.copy()
    bad = 17
    x[bad] = np.nan
    nan_ds = Dataset(x=x, y=None, num_classes=0, name="moons-with-nan")
    cfg = TrainConfig(model="mlp", preset="tiny", T=10, steps=20, batch=8, checkpoint_every=1, seed=0)
    first_bad = next(s for s in range(20) if bad in batch_indices(cfg.seed, 40, 8, s))   # 0-based
    assert first_bad >= 1   # the seed is chosen so that at least one good step comes first
    with pytest.raises(NonFiniteLossError, match=f"at step {first_bad + 1} ") as e:
        train(cfg, tmp_path, progress=False, dataset=nan_ds)
    assert str(tmp_path / CHECKPOINT_NAME) in str(e.value)
    c = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert c.step == first_bad                          # the last good state, not a NaN one
    assert np.all(np.isfinite(c.params)) and np.all(np.isfinite(c.ema))


# ------------------------------------------------------------------------------------ run dirs

def test_run_dir_rules(tmp_path):
    ds = _moons(20)
    cfg = TrainConfig(model="mlp", preset="tiny", T=10, steps=2, batch=8)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        train(cfg, tmp_path, progress=False, dataset=ds)
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(cfg, tmp_path, resume=True, progress=False, dataset=ds)
    train(cfg, tmp_path, force=True, progress=False, dataset=ds)
    assert (tmp_path / "notes.txt").read_text() == "mine"    # --force replaces the run, not the user's files
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).step == 2
    tr = train(None, tmp_path, resume=True, steps=3, progress=False, dataset=ds)   # raise the total
    assert tr.step == 3
    cfgj = json.loads((tmp_path / "config.json").read_text())
    assert cfgj["train"]["steps"] == 3 and cfgj["model"]["kind"] == "mlp" and len(cfgj["schedule"]["betas"]) == 10


def _run_files(run_dir):
    return {n: (run_dir / n).read_bytes() for n in (CHECKPOINT_NAME, METRICS_NAME, "config.json")}


def test_force_that_cannot_start_keeps_the_old_run(tmp_path):
    cfg = TrainConfig(data="moons", model="mlp", preset="tiny", T=10, steps=2, batch=8, log_every=1)
    train(cfg, tmp_path, progress=False, dataset=_moons(20))
    before = _run_files(tmp_path)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).step == 2 and before[METRICS_NAME].count(b"\n") == 2
    # a typo in the data set's name: load_dataset fails
    typo = TrainConfig(data="moons_typo", model="mlp", preset="tiny", T=10, steps=4, batch=8)
    with pytest.raises(ValueError, match="moons_typo.*not a built-in data set"):
        train(typo, tmp_path, force=True, progress=False)
    assert _run_files(tmp_path) == before
    # a model that cannot take the data: building the Trainer fails
    mismatch = TrainConfig(data="digits", model="mlp", preset="tiny", T=10, steps=4, batch=8)
    with pytest.raises(ValueError, match="MLP needs vectors"):
        train(mismatch, tmp_path, force=True, progress=False, dataset=_digits(20))
    assert _run_files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)   # no stray files either
    # a fresh run that cannot start does not create its directory
    with pytest.raises(ValueError, match="MLP needs vectors"):
        train(mismatch, tmp_path / "new", progress=False, dataset=_digits(20))
    assert not (tmp_path / "new").exists()
    # and a --force run that can start does replace the old one
    train(TrainConfig(data="moons", model="mlp", preset="tiny", T=10, steps=3, batch=8), tmp_path, force=True,
          progress=False, dataset=_moons(20))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).step == 3
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_NAME)] == [3]   # log_every 10: the last step
    # arguments that used to fail only after the old run was deleted: refused with it intact
    before = _run_files(tmp_path)
    ok = dict(data="moons", model="mlp", preset="tiny", T=10, steps=3, batch=8)
    for kwargs, match in ((dict(stop_at="x"), "stop_at"), (dict(stop_at=2.9), "stop_at"), (dict(stop_at=0), "stop_at"),
                          (dict(time_limit="5"), "time_limit"), (dict(time_limit=float("nan")), "time_limit"),
                          (dict(callback=42), "callback")):
        with pytest.raises(ValueError, match=match):
            train(TrainConfig(**ok), tmp_path, force=True, progress=False, dataset=_moons(20), **kwargs)
        assert _run_files(tmp_path) == before
    # NumPy numbers in a configuration are stored as JSON numbers (json.dumps used to fail on them)
    tr = train(TrainConfig(**{**ok, "batch": np.int64(8), "ema_decay": np.float32(0.5)}), tmp_path, force=True,
               progress=False, dataset=_moons(20))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["batch"] == 8 and tr.cfg.batch == 8


def test_config_fields_have_their_types():
    for kw, match in ((dict(class_cond="false"), "class_cond must be True or False"),
                      (dict(hflip="no"), "hflip"), (dict(ema_warmup=1), "ema_warmup"),
                      (dict(lr=True), "lr must be a finite number"), (dict(data=123), "data must be a string"),
                      (dict(grad_clip="1"), "grad_clip"), (dict(ema_decay="0.9"), "ema_decay"),
                      (dict(p_uncond=None), "p_uncond"), (dict(beta1="0.9"), "beta1"),
                      (dict(beta2=1.0), "beta2"), (dict(min_snr_gamma=-1.0), "min_snr_gamma"),
                      (dict(weight_decay=-0.1), "weight_decay")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)


def test_stopped_runs_log_and_save_as_the_uninterrupted_run(tmp_path):
    ds = _moons(40)
    cfg = dict(model="mlp", preset="tiny", T=10, steps=7, batch=8, checkpoint_every=4, log_every=2)
    train(TrainConfig(**cfg), tmp_path / "a", progress=False, dataset=ds)
    train(TrainConfig(**cfg), tmp_path / "b", progress=False, dataset=ds, stop_at=3)
    train(None, tmp_path / "b", resume=True, progress=False, dataset=ds, stop_at=5)
    train(None, tmp_path / "b", resume=True, progress=False, dataset=ds)
    ra, rb = (read_metrics(tmp_path / d / METRICS_NAME) for d in "ab")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [2, 4, 6, 7]   # stops add no records
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    # the Python API: from_checkpoint + fit continues the file at the checkpoint's step, dropping
    # records past it and a torn last line (fit used to append after them)
    train(TrainConfig(**cfg), tmp_path / "c", progress=False, dataset=ds, stop_at=6)   # checkpoint at 6
    with open(tmp_path / "c" / METRICS_NAME, "a") as f:
        f.write(json.dumps({"step": 7, "loss": 9.0}) + "\n" + '{"step": 8, "lo')
    tr = Trainer.from_checkpoint(str(tmp_path / "c" / CHECKPOINT_NAME), ds)
    tr.fit(tmp_path / "c", progress=False)
    rc = read_metrics(tmp_path / "c" / METRICS_NAME)
    assert [(r["step"], r["loss"]) for r in rc] == [(r["step"], r["loss"]) for r in ra]
    # a callback that raises at a checkpoint step loses nothing: the checkpoint is written first
    def boom(rec):
        if rec["step"] == 4:
            raise RuntimeError("callback failed")
    with pytest.raises(RuntimeError, match="callback failed"):
        train(TrainConfig(**cfg), tmp_path / "d", progress=False, dataset=ds, callback=boom)
    assert load_checkpoint(tmp_path / "d" / CHECKPOINT_NAME).step == 4
    # a configuration given with resume must be the saved one (only the total may change)
    with pytest.raises(ValueError, match="differs from the one given in lr"):
        train(TrainConfig(**{**cfg, "lr": 0.5}), tmp_path / "d", resume=True, progress=False, dataset=ds)
    tr = train(TrainConfig(**{**cfg, "steps": 8}), tmp_path / "d", resume=True, progress=False, dataset=ds)
    assert tr.step == 8


def test_resume_cannot_lower_the_total(tmp_path):
    ds = _moons(20)
    cfg = TrainConfig(model="mlp", preset="tiny", T=10, steps=4, batch=8, log_every=1)
    train(cfg, tmp_path, progress=False, dataset=ds)
    before = _run_files(tmp_path)
    with pytest.raises(ValueError, match=r"steps=2 is below the checkpoint's step 4: a resumed run can only "
                                         r"continue to a later step"):
        train(None, tmp_path, resume=True, steps=2, progress=False, dataset=ds)
    assert _run_files(tmp_path) == before                  # config.json still says steps 4
    assert json.loads(before["config.json"])["train"]["steps"] == 4
    with pytest.raises(ValueError, match="steps=3 is below the checkpoint's step 4"):
        Trainer.from_checkpoint(str(tmp_path / CHECKPOINT_NAME), ds, steps=3)
    for bad in (2.5, True, 0, "6"):                        # not truncated or coerced
        with pytest.raises(ValueError, match=r"steps must be a positive integer, got " + repr(bad).replace(".", r"\.")):
            train(None, tmp_path, resume=True, steps=bad, progress=False, dataset=ds)
    assert _run_files(tmp_path) == before
    # the same total: nothing left to train, the checkpoint stays as it was
    tr = train(None, tmp_path, resume=True, steps=4, progress=False, dataset=ds)
    assert tr.step == 4
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before[CHECKPOINT_NAME]
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_NAME)] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4


def test_plain_progress_line_without_tqdm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)      # import tqdm -> ImportError
    cfg = TrainConfig(model="mlp", preset="tiny", T=10, steps=3, batch=8, log_every=1)
    train(cfg, tmp_path, progress=True, dataset=_moons(20))
    err = capsys.readouterr().err
    assert "step 3/3" in err and "steps/s" in err and "loss" in err
    recs = read_metrics(tmp_path / METRICS_NAME)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert set(recs[0]) >= {"step", "loss", "mse", "grad_norm", "lr", "steps_per_s", "elapsed"}
    # warmup 100: lr grows linearly from lr/100 (optim.warmup_lr)
    assert recs[0]["lr"] == pytest.approx(cfg.lr / 100, rel=1e-12)


# ------------------------------------------------------------------------------------ recorded run

# Losses of the first 5 steps of two fixed-seed runs, recorded on the reference machine. Everything
# random comes from the counter RNG, so only float32 rounding can move them: BLAS builds sum GEMMs in
# different orders (~1e-7 relative per op, amplified a little by 5 steps of lr 1e-2), hence rtol 1e-4.
RECORDED = {
    "mlp": (lambda: _moons(256), dict(model="mlp", preset="tiny", T=100, batch=32),
            [1.011155464746013, 1.2009020404931503, 1.2864629614968575, 0.9875350100910134, 0.6688921396168549]),
    "unet": (lambda: _digits(64), dict(model="unet", preset="tiny", T=100, batch=8, hflip=True),
             [1.1325830497523228, 1.0047535342704306, 0.974567423792826, 0.7196920299904424, 0.7412929119619132]),
}


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_fixed_seed_run_reproduces_recorded_losses(case):
    make_data, kw, expected = RECORDED[case]
    tr = Trainer(TrainConfig(seed=7, lr=1e-2, warmup=0, **kw), make_data())
    losses = [tr.train_step()["loss"] for _ in range(5)]
    np.testing.assert_allclose(losses, expected, rtol=1e-4)


def test_resume_refuses_checkpoints_that_cannot_reproduce_the_run(tmp_path):
    import dataclasses

    from ddpm_ref.checkpoint import CheckpointError, save_checkpoint

    ds = _moons(40)
    cfg = TrainConfig(model="mlp", preset="tiny", T=10, steps=4, batch=8, checkpoint_every=2,
                      timestep_sampler="loss_aware", loss_aware_history=1)
    train(cfg, tmp_path, progress=False, dataset=ds, stop_at=2)
    good = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert good.sampler is not None
    for change, match in ((dict(sampler=None), "no timestep-sampler state"),
                          (dict(metrics={**good.metrics, "loss_ema": "x"}), "loss_ema"),
                          (dict(metrics={**good.metrics, "elapsed": [1]}), "elapsed")):
        bad = tmp_path / "bad.npz"
        save_checkpoint(bad, dataclasses.replace(good, **change))
        with pytest.raises(CheckpointError, match=match):
            Trainer.from_checkpoint(str(bad), ds)
