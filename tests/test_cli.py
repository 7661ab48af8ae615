"""Tests for ddpm_ref/cli.py: the ``ddpm`` command end to end at toy size, and its error contract
(usage errors: one line, exit code 2; unusable files and refused actions: one line, exit code 1)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ddpm_ref.checkpoint import load_checkpoint
from ddpm_ref.cli import main
from ddpm_ref.image import read_png


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _usage_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, err


@pytest.mark.parametrize("cmd", ["train", "sample", "forward", "eval", "demo"])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: ddpm {cmd}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["bogus"], ["train"], ["train", "--out", "x", "--steps", "0"],
                                  ["sample", "--ckpt", "c.npz", "-n", "-3"], ["sample"],
                                  ["eval", "--ckpt", "c", "--bpd-timesteps", "1"],
                                  ["sample", "--ckpt", "c", "--sampler", "euler"],
                                  ["sample", "--ckpt", "c", "--from-diffusers", "d"]])
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    code, err = _usage_error(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and "error:" in err


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny U-Net trained 3 steps on the digits (T = 20), shared by the image tests."""
    d = tmp_path_factory.mktemp("img") / "run"
    rc = main(["train", "--data", "digits", "--preset", "tiny", "--steps", "3", "--batch", "8", "--T", "20",
               "--out", str(d), "--quiet", "--checkpoint-every", "2", "--log-every", "1", "--class-cond"])
    assert rc == 0
    return d


def test_train_writes_run_and_refuses_nonempty_out(image_run, capsys):
    d = image_run
    c = load_checkpoint(d / "checkpoint.npz")
    assert c.step == 3 and c.config["train"]["preset"] == "tiny" and c.config["model"]["kind"] == "unet"
    assert c.config["model"]["config"]["num_classes"] == 10
    rc, out, err = _run(capsys, "train", "--data", "digits", "--preset", "tiny", "--steps", "3", "--out", d,
                        "--quiet")
    assert rc == 1 and "not empty" in err and err.count("\n") == 1
    assert load_checkpoint(d / "checkpoint.npz").step == 3            # untouched


def test_resume_continues(tmp_path, capsys):
    d = tmp_path / "r"
    assert _run(capsys, "train", "--data", "moons", "--preset", "tiny", "--steps", "2", "--batch", "8",
                "--T", "10", "--out", d, "--quiet")[0] == 0
    rc, out, err = _run(capsys, "train", "--out", d, "--resume", "--steps", "4", "--quiet")
    assert rc == 0 and "step 4/4" in out
    assert load_checkpoint(d / "checkpoint.npz").step == 4


def test_sample_images_with_animation(image_run, tmp_path, capsys):
    prefix = tmp_path / "s"
    rc, out, err = _run(capsys, "sample", "--ckpt", image_run, "-n", "6", "--sampler", "ddim", "--steps", "5",
                        "--seed", "3", "--label", "7", "--guidance", "1.5", "--animate", "strip", "--out", prefix)
    assert rc == 0, err
    x = np.load(f"{prefix}.npy")
    assert x.shape == (6, 1, 8, 8) and x.dtype == np.float32
    assert np.all(np.abs(x) <= 1.0)                                  # clipped x0 -> data range
    grid = read_png(f"{prefix}.png")
    # make_grid: 3 per row (ceil sqrt 6), scale 4, padding 1: 2 * (32 + 1) + 1 by 3 * (32 + 1) + 1
    assert grid.shape[:2] == (67, 100)
    strip = read_png(f"{prefix}_reverse.png")
    assert strip.shape[0] == 6 * 33 + 1                               # one row per sample
    # the same seed gives the same samples (counter-based noise), a different batch size too: the
    # noise is bit-identical, the network's GEMMs may round differently with the batch's shape
    # (BLAS picks edge kernels by matrix size; seen: 1 float32 ulp in 1 of 384 values), so the
    # samples agree to float32 rounding through 5 steps, far below any real difference (~1e-1).
    rc = main(["sample", "--ckpt", str(image_run), "-n", "6", "--sampler", "ddim", "--steps", "5", "--seed", "3",
               "--label", "7", "--guidance", "1.5", "--batch", "4", "--out", str(tmp_path / "s2")])
    assert rc == 0
    np.testing.assert_allclose(np.load(tmp_path / "s2.npy"), x, rtol=0, atol=1e-5)
    rc, out, err = _run(capsys, "sample", "--ckpt", image_run, "-n", "4", "--steps", "4", "--animate", "apng",
                        "--out", tmp_path / "a")
    assert rc == 0 and read_png(tmp_path / "a_reverse_anim.png").ndim >= 2
    rc, out, err = _run(capsys, "sample", "--ckpt", image_run, "-n", "2", "--label", "10")
    assert rc == 1 and "--label" in err


def test_eval_images(image_run, tmp_path, capsys):
    js = tmp_path / "e.json"
    rc, out, err = _run(capsys, "eval", "--ckpt", image_run / "checkpoint.npz", "-n", "30", "--steps", "4",
                        "--bpd-n", "6", "--bpd-timesteps", "4", "--json", js)
    assert rc == 0, err
    r = json.loads(js.read_text())
    assert r["bpd_n"] == 6 and np.isfinite(r["bpd"]) and r["bpd"] > 0
    for k in ("precision", "recall", "ceiling_precision", "ceiling_recall", "near_copy_share"):
        assert 0.0 <= r[k] <= 1.0
    # the train-vs-test ceiling of the digits is high (metrics.py measures ~0.9); an untrained model is not
    assert r["ceiling_precision"] > 0.8 and r["precision"] < r["ceiling_precision"]
    assert 1.0 < r["histogram_bpd"] < 8.0 and 1.0 < r["gaussian_bpd"] < 8.0
    assert "bits/dim" in out and "precision" in out


def test_toy_train_sample_eval(tmp_path, capsys):
    d = tmp_path / "toy"
    rc, out, err = _run(capsys, "train", "--data", "moons", "--preset", "tiny", "--steps", "3", "--batch", "16",
                        "--T", "20", "--out", d, "--quiet")
    assert rc == 0, err
    assert load_checkpoint(d / "checkpoint.npz").config["model"]["kind"] == "mlp"
    rc, out, err = _run(capsys, "sample", "--ckpt", d, "-n", "50", "--animate", "strip", "--out", d / "s")
    assert rc == 0, err
    xs = np.load(d / "s.npy")
    assert xs.shape == (50, 2)
    # toys are standardised, not bounded: x0 predictions are not clipped to [-1, 1] (--clip auto)
    assert np.abs(xs).max() > 1.0
    assert read_png(d / "s.png").shape[:2] == (256, 256)
    js = d / "e.json"
    rc, out, err = _run(capsys, "eval", "--ckpt", d, "-n", "200", "--steps", "5", "--json", js)
    assert rc == 0, err
    r = json.loads(js.read_text())
    assert r["energy_distance"] > 0 and r["energy_floor"] > 0
    # 3 training steps are far from the data: much worse than two held-out draws
    assert r["ratio_to_floor"] > 1.2 and "energy distance" in out
    assert "+-" in out and "single sets" in out
    # expected figures from 4 sample sets (the default) of -n points and 4 held-out sets, recomputed
    # here from the definition: set j is samples j*n..(j+1)*n-1 of one 4n-sample run with --seed;
    # the held-out sets are the toy's test draws with the seeds after the data seed (0)
    from ddpm_ref import metrics
    from ddpm_ref.data import load_dataset

    def held_out(k):
        return load_dataset("moons", split="test", seed=k, n=200).x

    assert r["sets"] == 4 and r["n_total"] == 800
    rc, out, err = _run(capsys, "sample", "--ckpt", d, "-n", "800", "--sampler", "ddim", "--steps", "5",
                        "--out", d / "s800")
    assert rc == 0, err
    x = np.load(d / "s800.npy")
    est = metrics.energy_ratio([x[j * 200:(j + 1) * 200] for j in range(4)], [held_out(1 + j) for j in range(4)])
    assert r["energy_distance"] == est.distance and r["energy_floor"] == est.floor
    assert r["ratio_to_floor"] == est.ratio and r["ratio_stderr"] == est.ratio_stderr > 0
    # single sets for scale: ED(set j, r_j) beside ED(s_j, r_j), s_j the held-out draws after those
    assert r["single_set_distances"][2] == metrics.energy_distance(x[400:600], held_out(3))
    assert r["single_set_floors"][3] == metrics.energy_distance(held_out(8), held_out(4))
    code, err = _usage_error(capsys, "eval", "--ckpt", d, "--sets", "1")
    assert code == 2 and "--sets" in err and "'1'" in err
    rc, out, err = _run(capsys, "eval", "--ckpt", d, "-n", "1")
    assert rc == 1 and "-n 1" in err and "at least 2 samples" in err and "sampling" not in err


def test_forward_strip(tmp_path, capsys):
    out_png = tmp_path / "f.png"
    rc, out, err = _run(capsys, "forward", "--data", "digits", "--frames", "5", "--out", out_png)
    assert rc == 0, err
    img = read_png(out_png)
    assert img.shape[:2] == (8 * 8 + 2, 5 * (64 + 1) + 1)             # make_strip, scale 8, padding 1
    assert "t = 0" in out
    rc, out, err = _run(capsys, "forward", "--data", "moons", "--out", out_png)
    assert rc == 1 and "images" in err


def test_bad_files_one_line_exit_1(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00" * 100)
    for argv in (["sample", "--ckpt", junk], ["eval", "--ckpt", junk], ["sample", "--ckpt", tmp_path / "none.npz"],
                 ["train", "--data", tmp_path / "nodata.npy", "--out", tmp_path / "o", "--quiet"]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 1, argv
        assert err.count("\n") == 1 and "Traceback" not in err
    assert str(junk) in _run(capsys, "sample", "--ckpt", junk)[2]


def test_nan_stop_exit_1(tmp_path, capsys):
    # an absurd learning rate drives the weights to overflow within a few steps
    rc, out, err = _run(capsys, "train", "--data", "moons", "--preset", "tiny", "--lr", "1e30", "--warmup", "0",
                        "--steps", "10", "--batch", "8", "--T", "10", "--out", tmp_path / "n", "--quiet",
                        "--checkpoint-every", "1")
    assert rc == 1 and "at step" in err and err.count("\n") == 1
    c = load_checkpoint(tmp_path / "n" / "checkpoint.npz")          # the last good state remains
    assert np.all(np.isfinite(c.params)) and f"at step {c.step + 1} " in err


def test_demo_tiny(tmp_path, capsys):
    d = tmp_path / "demo"
    rc, out, err = _run(capsys, "demo", "--out", d, "--steps", "2", "--batch", "8", "--samples", "4",
                        "--sample-steps", "3", "--quiet")
    assert rc == 0, err
    for name in ("samples.png", "samples.npy", "samples_reverse.png", "loss.png", "checkpoint.npz"):
        assert (d / name).exists(), name
        assert str(d / name) in out or name == "checkpoint.npz" or name == "samples.npy"
    pytest.importorskip("PIL")
    assert (d / "samples_reverse.gif").read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    rc, out, err = _run(capsys, "demo", "--out", d, "--steps", "2")  # never overwrite silently
    assert rc == 1 and "--force" in err


def test_demo_without_pillow_writes_an_apng(tmp_path, capsys, monkeypatch):
    # The README's main command installs numpy alone: the demo must not need the `cli` extra.
    monkeypatch.setitem(sys.modules, "PIL", None)          # `import PIL` now raises ImportError
    d = tmp_path / "demo"
    rc, out, err = _run(capsys, "demo", "--out", d, "--steps", "2", "--batch", "8", "--samples", "4",
                        "--sample-steps", "3", "--quiet")
    assert rc == 0, err
    anim = d / "samples_reverse_anim.png"
    assert str(anim) in out and not (d / "samples_reverse.gif").exists()
    data = anim.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"acTL" in data   # an animated PNG


def test_gif_without_pillow_fails_before_sampling(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    rc, out, err = _run(capsys, "sample", "--ckpt", tmp_path / "missing.npz", "--animate", "gif")
    # the Pillow check comes first: the (missing) checkpoint is never opened
    assert rc == 1 and "Pillow" in err and "apng" in err and err.count("\n") == 1


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ddpm_ref", "forward", "--frames", "3", "--out",
                        str(tmp_path / "f.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "f.png")
    r = subprocess.run([sys.executable, "-m", "ddpm_ref", "sample"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def diffusers_pipeline(tmp_path_factory):
    """A tiny random diffusers UNet2DModel (diffusers' default downsample_padding=1, attention at 4x4)
    with a 50-step DDPMScheduler, saved as a DDPMPipeline folder."""
    torch = pytest.importorskip("torch", reason="torch (setup.py extra `test`) builds the diffusers model")
    diffusers = pytest.importorskip("diffusers", reason="diffusers (setup.py extra `test`) writes the folder")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                                 norm_num_groups=4)
    with torch.no_grad():                               # move every tensor off its init value
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = diffusers.DDPMScheduler(num_train_timesteps=50)
    d = tmp_path_factory.mktemp("diffusers") / "pipe"
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(d)
    return d


def test_sample_from_diffusers_equals_interop_and_samplers(diffusers_pipeline, tmp_path, capsys):
    from ddpm_ref import interop, samplers

    model, params, schedule, settings = interop.load_diffusers(diffusers_pipeline)
    assert model.config.downsample_padding == 1 and schedule.T == 50 and settings["sampler"] == "ddpm"
    prefix = tmp_path / "d"
    rc, out, err = _run(capsys, "sample", "--from-diffusers", diffusers_pipeline, "-n", "5", "--steps", "4",
                        "--seed", "2", "--out", prefix)
    assert rc == 0, err
    x = np.load(f"{prefix}.npy")
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
    # make_grid: 3 per row (ceil sqrt 5), scale 4, padding 1: 2 * (32 + 1) + 1 by 3 * (32 + 1) + 1
    assert read_png(f"{prefix}.png").shape[:2] == (67, 100)
    # exactly what the library computes when called directly: same code, same counter-based noise
    ref = samplers.sample(model.denoiser(params), schedule, n=5, seed=2, **{**settings, "num_steps": 4})
    np.testing.assert_array_equal(x, ref)
    assert np.all(np.abs(x) <= 1.0)                     # DDPMScheduler's clip_sample=True reached the sampler
    # --sampler/--eta/--steps override the pipeline's settings
    ddim = ("--sampler", "ddim", "--eta", "0.5", "--steps", "3", "--seed", "2")
    rc, out, err = _run(capsys, "sample", "--from-diffusers", diffusers_pipeline, "-n", "5", *ddim,
                        "--out", tmp_path / "e")
    assert rc == 0, err
    ref = samplers.sample(model.denoiser(params), schedule, n=5, seed=2,
                          **{**settings, "sampler": "ddim", "eta": 0.5, "num_steps": 3})
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), ref)
    assert np.max(np.abs(ref - x)) > 1e-2                            # the overrides took effect
    # chunks of 2 draw the same noise (index_offset); only float32 rounding differs, because BLAS
    # blocks a batch of 2 differently from one of 5 (measured 3.6e-7 after 3 steps): 1e-5 absolute
    rc, out, err = _run(capsys, "sample", "--from-diffusers", diffusers_pipeline, "-n", "5", *ddim,
                        "--batch", "2", "--out", tmp_path / "f")
    assert rc == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), ref, rtol=0, atol=1e-5)
    # a folder that is not a diffusers model: one line, exit 1
    rc, out, err = _run(capsys, "sample", "--from-diffusers", tmp_path, "-n", "2")
    assert rc == 1 and err.count("\n") == 1 and "config.json" in err


def test_sample_from_diffusers_default_names_follow_the_settings_used(diffusers_pipeline, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = ("sample", "--from-diffusers", diffusers_pipeline, "-n", "2", "--sampler", "ddim", "--steps", "3")
    for extra in ((), ("--spacing", "trailing"), ("--eta", "0.5")):
        assert _run(capsys, *quick, *extra)[0] == 0
    names = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert names == ["pipe_samples_ddim3_seed0.npy", "pipe_samples_ddim3_seed0_eta0.5.npy",
                     "pipe_samples_ddim3_seed0_trailing.npy"]


def test_device_gpu_without_cuda_is_one_clear_line(tmp_path):
    """--device gpu with the simulator off and no CuPy/driver: exit 1 and one line naming what is
    missing (a subprocess, so that this process's simulator setting does not apply)."""
    pytest.importorskip("numba_cuda")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here: the GPU backend may be usable")
    except ImportError:
        pass
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-m", "ddpm_ref", "train", "--data", "digits", "--preset", "tiny",
                        "--steps", "1", "--device", "gpu", "--out", str(tmp_path / "run"), "--quiet"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm train: error: the GPU backend is unavailable")
    assert "CuPy is not installed" in lines[0] and "pip install 'ddpm-ref[gpu]'" in lines[0]


# ---------------------------------------------------------------------------------------------
# Nothing a user made is lost; no option is silently ignored

def test_resume_refuses_options_it_would_ignore(tmp_path, capsys):
    d = tmp_path / "r"
    assert _run(capsys, "train", "--data", "moons", "--preset", "tiny", "--steps", "2", "--batch", "8",
                "--T", "10", "--out", d, "--quiet")[0] == 0
    before = (d / "checkpoint.npz").read_bytes()
    for extra in (["--lr", "0.1"], ["--batch=4"], ["--data", "rings", "--preset", "toy"], ["--check", "5"]):
        rc, out, err = _run(capsys, "train", "--out", d, "--resume", "--steps", "4", "--quiet", *extra)
        assert rc == 1 and "would be ignored" in err and err.count("\n") == 1, extra
    rc, out, err = _run(capsys, "train", "--out", d, "--resume", "--steps", "4", "--quiet", "--data", "rings")
    assert "--data" in err and "--steps" not in err.split("ignored")[0]
    rc, out, err = _run(capsys, "train", "--out", d, "--resume", "--quiet", "--data", tmp_path / "none.npy")
    assert rc == 1 and "--data would be ignored" in err                 # refused before reading the file
    rc, out, err = _run(capsys, "train", "--out", d, "--resume", "--steps", "4", "--quiet", "--lr", "0.1", "--ema", "0")
    assert "--ema, --lr would be ignored" in err
    assert (d / "checkpoint.npz").read_bytes() == before                # refused before any work
    rc, out, err = _run(capsys, "train", "--out", d, "--resume", "--steps", "3", "--minutes", "5", "--quiet")
    assert rc == 0 and "step 3/3" in out


def test_outputs_never_overwrite_a_run(image_run, tmp_path, capsys):
    ckpt = image_run / "checkpoint.npz"
    files = {p.name: p.read_bytes() for p in image_run.iterdir() if p.is_file()}
    for argv in (["forward", "--out", ckpt],
                 ["eval", "--ckpt", image_run, "-n", "8", "--no-bpd", "--steps", "2", "--json", ckpt],
                 ["eval", "--ckpt", image_run, "-n", "8", "--no-bpd", "--steps", "2",
                  "--json", image_run / "config.json"]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 1 and "refusing to overwrite" in err and err.count("\n") == 1, argv
        assert out == ""                                                 # refused before any work
    assert {p.name: p.read_bytes() for p in image_run.iterdir() if p.is_file()} == files
    # an output folder that does not exist, or a folder as an output file: refused up front
    rc, out, err = _run(capsys, "eval", "--ckpt", image_run, "-n", "8", "--json", tmp_path / "no" / "e.json")
    assert rc == 1 and "does not exist" in err and out == ""
    rc, out, err = _run(capsys, "forward", "--out", tmp_path)
    assert rc == 1 and "is a folder" in err


def test_sample_default_names_keep_every_run(image_run, tmp_path, capsys):
    quick = ("-n", "2", "--sampler", "ddim", "--steps", "2")
    runs = [(), ("--label", "3"), ("--label", "5", "--no-ema"), ("--eta", "0.5"), ("--spacing", "trailing"),
            ("--clip", "off"), ("--label", "3", "--guidance", "2")]
    before = set(os.listdir(image_run))
    for extra in runs:
        rc, out, err = _run(capsys, "sample", "--ckpt", image_run, *quick, *extra)
        assert rc == 0, err
    new = sorted(set(os.listdir(image_run)) - before)
    names = [n for n in new if n.endswith(".npy")]
    assert len(names) == len(runs), new                                # no run overwrote another
    assert "samples_ddim2_seed0_label5_raw.npy" in names and "samples_ddim2_seed0_label3_w2.npy" in names
    for n in new:
        os.unlink(image_run / n)
    # --out naming a folder (trailing separator, or an existing one) writes the default name inside it
    rc, out, err = _run(capsys, "sample", "--ckpt", image_run, *quick, "--out", str(tmp_path / "s") + os.sep)
    assert rc == 0 and sorted(os.listdir(tmp_path / "s")) == ["samples_ddim2_seed0.npy", "samples_ddim2_seed0.png"]
    rc, out, err = _run(capsys, "sample", "--ckpt", image_run, *quick, "--animate", "apng", "--frames", "1")
    assert rc == 1 and "--frames 1" in err


def test_eval_images_checks_n_before_bits_per_dim(image_run, capsys):
    rc, out, err = _run(capsys, "eval", "--ckpt", image_run, "-n", "3", "--steps", "2", "--bpd-n", "2")
    assert rc == 1 and "-n 3" in err and "at least 4 samples" in err
    assert "bits/dim" not in out                                        # nothing computed first


def test_data_file_of_points(tmp_path, capsys, monkeypatch):
    """A user .npy of 2-D points: the MLP by default, the path stored absolute, and 2-D eval's
    held-out sets taken from the file's own test split (disjoint from the training points)."""
    from ddpm_ref import metrics, rng
    from ddpm_ref.data import load_dataset

    pts = load_dataset("moons", split="train", n=400).x
    np.save(tmp_path / "pts.npy", pts)
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "train", "--data", "pts.npy", "--preset", "tiny", "--steps", "2", "--batch", "8",
                        "--T", "10", "--out", "run", "--quiet")
    assert rc == 0, err
    cfg = load_checkpoint(tmp_path / "run" / "checkpoint.npz").config
    assert cfg["model"]["kind"] == "mlp" and cfg["train"]["data"] == str(tmp_path / "pts.npy")
    monkeypatch.chdir(tmp_path / "run")                                  # resume and eval from elsewhere
    rc, out, err = _run(capsys, "train", "--out", ".", "--resume", "--steps", "3", "--quiet")
    assert rc == 0, err
    rc, out, err = _run(capsys, "eval", "--ckpt", ".", "-n", "10", "--sets", "2", "--steps", "3", "--json", "e.json")
    assert rc == 0, err
    r = json.loads((tmp_path / "run" / "e.json").read_text())
    test = load_dataset(str(tmp_path / "pts.npy"), split="test")       # 40 of the 400 points
    order = rng.permutation(0, rng.Stream.EVAL, len(test))
    refs = [test.x[order[j * 10:(j + 1) * 10]] for j in range(4)]
    train_rows = {tuple(p) for p in load_dataset(str(tmp_path / "pts.npy"), split="train").x}
    assert not any(tuple(p) in train_rows for ref in refs for p in ref)
    rc, out, err = _run(capsys, "sample", "--ckpt", ".", "-n", "20", "--sampler", "ddim", "--steps", "3",
                        "--out", "s")
    assert rc == 0, err
    x = np.load(tmp_path / "run" / "s.npy")
    est = metrics.energy_ratio([x[:10], x[10:]], refs[:2], n=10)
    assert r["energy_distance"] == est.distance and r["ratio_to_floor"] == est.ratio
    assert r["single_set_floors"][1] == metrics.energy_distance(refs[3], refs[1])
    rc, out, err = _run(capsys, "eval", "--ckpt", ".", "-n", "20", "--sets", "2", "--steps", "3")
    assert rc == 1 and "80 held-out points" in err and "has 40" in err


def test_options_that_would_be_ignored_are_refused(tmp_path, capsys):
    rc, out, err = _run(capsys, "train", "--data", "moons", "--p-uncond", "0.2", "--out", tmp_path / "p", "--quiet")
    assert rc == 1 and "--class-cond" in err and not (tmp_path / "p").exists()
    rc, out, err = _run(capsys, "sample", "--from-diffusers", tmp_path, "--no-ema")
    assert rc == 1 and "--no-ema" in err


@pytest.mark.parametrize("argv", [["train", "--out", "x", "--grad-clip", "-3"],
                                  ["train", "--out", "x", "--minutes", "-5"],
                                  ["demo", "--minutes", "0"]])
def test_negative_numbers_are_usage_errors(argv, capsys):
    code, err = _usage_error(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and argv[-1] in err


def test_value_range_for_float_images(tmp_path, capsys):
    """[0, 1] float images: refused without --value-range (ambiguous), trained with it; the range is
    stored in the run, so resume and eval read the file the same way."""
    from ddpm_ref.data import load_dataset

    u8 = load_dataset("digits", split="all")
    imgs = ((u8.x[:200] + 1.0) / 2.0).astype(np.float32)               # [0, 1] images
    np.save(tmp_path / "img01.npy", imgs)
    base = ("train", "--data", tmp_path / "img01.npy", "--preset", "tiny", "--steps", "2", "--batch", "8",
            "--T", "10", "--quiet")
    rc, out, err = _run(capsys, *base, "--out", tmp_path / "a")
    assert rc == 1 and "--value-range 0 1" in err and err.count("\n") == 1
    rc, out, err = _run(capsys, *base, "--out", tmp_path / "b", "--value-range", "0", "1")
    assert rc == 0, err
    c = load_checkpoint(tmp_path / "b" / "checkpoint.npz")
    assert c.config["train"]["value_range"] == [0.0, 1.0] and c.config["model"]["kind"] == "unet"
    assert _run(capsys, "train", "--out", tmp_path / "b", "--resume", "--steps", "3", "--quiet")[0] == 0
    rc, out, err = _run(capsys, "eval", "--ckpt", tmp_path / "b", "-n", "8", "--steps", "2", "--bpd-n", "2",
                        "--bpd-timesteps", "2")
    assert rc == 0 and "bits/dim" in out, err
    code, err = _usage_error(capsys, *base, "--out", tmp_path / "c", "--value-range", "1")
    assert code == 2
    rc, out, err = _run(capsys, *base, "--out", tmp_path / "c", "--value-range", "1", "0")
    assert rc == 1 and "LO < HI" in err
