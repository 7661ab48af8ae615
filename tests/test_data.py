"""Tests for ddpm_ref/data: the embedded digits and their split, the toys, the scaling, every loader.

Every loader is exercised on small files this test writes (tmp_path); bad inputs (truncated, corrupt,
empty, NaN, wrong shape) must give one ValueError whose message names the file.
"""
import gzip
import os
import struct

import numpy as np
import pytest

from ddpm_ref import rng
from ddpm_ref.data import (DIGITS_LEVELS, TOYS, from_uint8, load_dataset, read_idx, to_uint8,
                           toy_data)
from ddpm_ref.data import digits as digits_mod
from ddpm_ref.image import write_png


# ---------------------------------------------------------------------------------------------
# Scaling

def test_uint8_round_trip_is_exact_for_all_256_values():
    u = np.arange(256, dtype=np.uint8)
    x = from_uint8(u)
    assert x.dtype == np.float32
    assert x[0] == -1.0 and x[255] == 1.0          # exact: 0/127.5 - 1 and 255/127.5 - 1
    # float32 rounding of u / 127.5 - 1 is < 1e-7, far inside the +-0.5/127.5 rounding window.
    np.testing.assert_array_equal(to_uint8(x), u)


def test_to_uint8_clips_and_rejects_nan():
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, 5.0, 0.0])), [0, 255, 128])  # 127.5 rounds up
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="0..255"):
        from_uint8(np.array([300]))


# ---------------------------------------------------------------------------------------------
# Digits

def test_digits_split_sizes_classes_and_values():
    tr, te, al = load_dataset("digits"), load_dataset("digits", "test"), load_dataset("digits", "all")
    assert (len(tr), len(te), len(al)) == (1497, 300, 1797)
    assert tr.x.shape == (1497, 1, 8, 8) and tr.x.dtype == np.float32
    assert tr.num_classes == te.num_classes == 10 and tr.name == "digits"
    np.testing.assert_array_equal(np.bincount(te.y, minlength=10), np.full(10, 30))  # stratified
    assert tr.x.min() == -1.0 and tr.x.max() == 1.0
    # exactly the 17 levels, mapped 0..16 -> floor(v * 255 / 16 + 0.5)
    np.testing.assert_array_equal(DIGITS_LEVELS[[0, 1, 8, 15, 16]], [0, 16, 128, 239, 255])
    np.testing.assert_array_equal(np.unique(tr.uint8()), DIGITS_LEVELS)
    np.testing.assert_array_equal(tr.levels, DIGITS_LEVELS)
    # train and test partition the full set (compare image+label rows as a multiset)
    rows = lambda d: sorted(map(bytes, np.concatenate([d.uint8().reshape(len(d), -1),
                                                        d.y[:, None].astype(np.uint8)], 1)))
    assert rows(al) == sorted(rows(tr) + rows(te))


def test_digits_stored_split_matches_the_rng_recipe_and_file_is_sound():
    levels, labels, test_index = digits_mod.load_digits_raw()
    assert levels.dtype == np.uint8 and levels.max() == 16 and levels.min() == 0
    np.testing.assert_array_equal(np.bincount(labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    np.testing.assert_array_equal(test_index, digits_mod.digits_split_index(labels))
    text = open(digits_mod.LICENSE_PATH, encoding="utf-8").read()
    for needle in ("CC BY 4.0", "Alpaydin", "Kaynak", "UCI"):
        assert needle in text


def test_digits_matches_scikit_learn_copy_when_installed():
    # Read scikit-learn's file directly (importing sklearn costs seconds): 64 pixels + label per row.
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn is not installed (it is not a dependency)")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)            # (1797, 65)
    levels, labels, _ = digits_mod.load_digits_raw()
    np.testing.assert_array_equal(levels.reshape(1797, 64), table[:, :64])
    np.testing.assert_array_equal(labels, table[:, 64])


def test_digits_n_truncates_and_bad_split_is_rejected():
    assert len(load_dataset("digits", n=10)) == 10
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation")


# ---------------------------------------------------------------------------------------------
# Toys

# Per-axis standard deviations stated in toys.py; with 20,000 points the standard error of a
# standard deviation is about sigma / sqrt(2 n) = 0.005, so 0.03 is six standard errors plus the
# rounding of the stated values.
TOY_STD = {"swiss_roll": (0.98, 1.03), "moons": (1.0, 0.58), "8gaussians": (1.005, 1.005),
           "checkerboard": (1.0, 1.0), "rings": (0.97, 0.97)}


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_scale_determinism_and_index_addressing(name):
    x = toy_data(name, 20000, seed=3)
    assert x.shape == (20000, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_allclose(x.std(0), TOY_STD[name], atol=0.03)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.03)     # 6 standard errors of a mean
    np.testing.assert_array_equal(x, toy_data(name, 20000, seed=3))
    # point i depends on its index only, not on how many points are drawn
    np.testing.assert_array_equal(toy_data(name, 50, seed=3), x[:50])
    np.testing.assert_array_equal(toy_data(name, 20, seed=3, index_offset=30), x[30:50])
    assert not np.array_equal(toy_data(name, 50, seed=4), x[:50])
    assert not np.array_equal(toy_data(name, 50, seed=3, step=1), x[:50])


def test_toy_shapes_follow_their_definitions():
    s = np.sqrt(3.0) / 2.0
    cb = toy_data("checkerboard", 5000) / s + 2.0            # back to unit cells on [0, 4]^2
    i, j = np.floor(cb[:, 0]), np.floor(cb[:, 1])
    assert np.all((i + j) % 2 == 0)                          # only the "black" cells
    g = toy_data("8gaussians", 5000).astype(np.float64)
    ang = np.arange(8) * np.pi / 4
    centres = np.sqrt(2) * np.stack([np.cos(ang), np.sin(ang)], 1)
    d = np.sqrt(((g[:, None] - centres[None]) ** 2).sum(-1)).min(1)
    assert d.max() < 0.6                                     # 0.6 = 6 std of the 0.1 noise (2-D tail)
    r = np.sqrt((toy_data("rings", 5000).astype(np.float64) ** 2).sum(1))
    k = np.rint(r / 0.5)
    assert set(np.unique(k)) == {1, 2, 3, 4}
    assert np.abs(r - 0.5 * k).max() < 0.25                  # 5 std of the 0.05 noise


def test_toy_load_dataset_splits_and_errors():
    tr, te = load_dataset("moons"), load_dataset("moons", "test")
    assert tr.x.shape == (1_000_000, 2) and te.x.shape == (5000, 2) and tr.y is None and tr.num_classes == 0
    assert not tr.is_image and tr.levels is None
    assert not np.array_equal(tr.x[:5000], te.x)             # test is a different rng step
    te2 = load_dataset("moons", "test", seed=1)              # the second held-out draw
    assert not np.array_equal(te.x, te2.x)
    assert load_dataset("rings", n=7).x.shape == (7, 2)
    with pytest.raises(ValueError, match="'all'"):
        load_dataset("moons", "all")
    with pytest.raises(ValueError, match="unknown toy"):
        toy_data("spiral", 5)
    with pytest.raises(ValueError, match="built-in"):
        load_dataset("no_such_data_set")


# ---------------------------------------------------------------------------------------------
# IDX

def _idx_bytes(arr, code=0x08, dtype=">u1"):
    arr = np.asarray(arr)
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(dtype).tobytes()


def _mnist_pair(folder, prefix, n, gz, seed):
    r = np.random.default_rng(seed)
    x = r.integers(0, 256, (n, 5, 4), dtype=np.uint8)
    y = r.integers(0, 10, n).astype(np.uint8)
    ext = ".gz" if gz else ""
    op = gzip.open if gz else open
    with op(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), "wb") as f:
        f.write(_idx_bytes(x))
    with op(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), "wb") as f:
        f.write(_idx_bytes(y))
    return x, y


@pytest.mark.parametrize("gz", [False, True])
def test_idx_file_with_sibling_labels(tmp_path, gz):
    x, y = _mnist_pair(tmp_path, "train", 20, gz, 0)
    path = str(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    np.testing.assert_array_equal(read_idx(path), x)
    d = load_dataset(path, split="all")
    assert d.x.shape == (20, 1, 5, 4)
    np.testing.assert_array_equal(d.uint8()[:, 0], x)
    np.testing.assert_array_equal(d.y, y)
    assert d.num_classes == int(y.max()) + 1
    # held-out split: floor(20 * 0.1) = 2 test images, disjoint from train, both in file order
    tr, te = load_dataset(path), load_dataset(path, "test")
    assert (len(tr), len(te)) == (18, 2)
    perm = rng.permutation(0, rng.Stream.DATA, 20, step=2000)
    np.testing.assert_array_equal(te.uint8()[:, 0], x[np.sort(perm[:2])])


def test_idx_other_types_and_mnist_folder(tmp_path):
    v = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 23.0 * 2 - 1      # already in [-1, 1]
    p = tmp_path / "floats.idx"
    p.write_bytes(_idx_bytes(v, 0x0D, ">f4"))
    np.testing.assert_array_equal(read_idx(str(p)), v)                       # big-endian decoded exactly
    np.testing.assert_array_equal(load_dataset(str(p), "all").x[:, 0], v)
    p16 = tmp_path / "short.idx"
    p16.write_bytes(_idx_bytes(np.array([[-300, 2], [7, 30000]]), 0x0B, ">i2"))
    np.testing.assert_array_equal(read_idx(str(p16)), [[-300, 2], [7, 30000]])
    xtr, ytr = _mnist_pair(tmp_path, "train", 12, True, 1)
    xte, yte = _mnist_pair(tmp_path, "t10k", 5, False, 2)
    tr, te, al = (load_dataset(str(tmp_path), s) for s in ("train", "test", "all"))
    np.testing.assert_array_equal(tr.uint8()[:, 0], xtr)
    np.testing.assert_array_equal(te.y, yte)
    assert len(al) == 17


def test_idx_bad_files_name_the_file(tmp_path):
    x = np.zeros((3, 4, 4), np.uint8)
    good = _idx_bytes(x)
    cases = {
        "trunc-idx3": good[:-5],                                  # data cut short
        "trail-idx3": good + b"\0",                               # trailing bytes
        "magic-idx3": b"\1\2\x08\3" + good[4:],                    # bad magic
        "header-idx3": good[:9],                                  # header cut inside the dims
        "empty-idx3": b"",
        "gz-idx3.gz": gzip.compress(good)[:-8],                   # truncated gzip stream
        "nan-idx3": _idx_bytes(np.array([[[np.nan]]], np.float32), 0x0D, ">f4"),
        "zero-idx3": _idx_bytes(np.zeros((0, 4, 4), np.uint8)),
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError) as e:
            load_dataset(str(p), "all")
        assert str(p) in str(e.value), (name, str(e.value))
    # labels that do not match the images
    (tmp_path / "train-images-idx3-ubyte").write_bytes(good)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(ValueError, match="labels-idx1-ubyte: labels have shape"):
        load_dataset(str(tmp_path / "train-images-idx3-ubyte"))
    with pytest.raises(ValueError, match="labels\\?"):
        load_dataset(str(tmp_path / "train-labels-idx1-ubyte"))


# ---------------------------------------------------------------------------------------------
# .npy / .npz

def test_npy_layouts_and_value_ranges(tmp_path):
    r = np.random.default_rng(0)
    u = r.integers(0, 256, (10, 3, 6, 5), dtype=np.uint8)             # (N, C, H, W)
    for name, arr in (("nchw.npy", u), ("nhwc.npy", u.transpose(0, 2, 3, 1))):
        np.save(tmp_path / name, arr)
        d = load_dataset(str(tmp_path / name), "all")
        assert d.x.shape == (10, 3, 6, 5) and d.is_image
        np.testing.assert_array_equal(d.uint8(), u)
    np.save(tmp_path / "grey.npy", u[:, 0])                           # (N, H, W)
    assert load_dataset(str(tmp_path / "grey.npy"), "all").x.shape == (10, 1, 6, 5)
    f01 = u[:, :1].astype(np.float32) / 255.0                          # floats in [0, 1]
    np.save(tmp_path / "f01.npy", f01)
    with pytest.raises(ValueError, match="f01.npy: float images with every value in \\[0, 1\\].*ambiguous"):
        load_dataset(str(tmp_path / "f01.npy"), "all")
    d = load_dataset(str(tmp_path / "f01.npy"), "all", value_range=(-1, 1))  # the user says so
    np.testing.assert_array_equal(d.x, f01)
    with pytest.raises(ValueError, match="value_range"):
        load_dataset(str(tmp_path / "f01.npy"), "all", value_range=(0.5, 1.0))  # values below 0.5
    d = load_dataset(str(tmp_path / "f01.npy"), "all", value_range=(0, 1))
    # 2 v - 1 in float32: within 2 ulp of the 8-bit scaling, so to_uint8 recovers u exactly
    np.testing.assert_array_equal(d.uint8(), u[:, :1])
    np.save(tmp_path / "f255.npy", u[:, :1].astype(np.float64) * 2)   # floats in [0, 510]
    with pytest.raises(ValueError, match=str(tmp_path / "f255.npy")):
        load_dataset(str(tmp_path / "f255.npy"), "all")                 # not in [-1, 1]
    vec = r.normal(size=(30, 2)).astype(np.float32) * 5                 # vectors: used as they are
    np.save(tmp_path / "vec.npy", vec)
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "vec.npy"), "all").x, vec)


def test_npz_keys_labels_and_splits(tmp_path):
    r = np.random.default_rng(1)
    xtr, xte = r.integers(0, 256, (8, 4, 4), dtype=np.uint8), r.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "split.npz", x_train=xtr, y_train=np.arange(8) % 3, x_test=xte, y_test=[0, 1, 2])
    te = load_dataset(str(tmp_path / "split.npz"), "test")
    np.testing.assert_array_equal(te.uint8()[:, 0], xte)
    np.testing.assert_array_equal(te.y, [0, 1, 2])
    assert len(load_dataset(str(tmp_path / "split.npz"), "all")) == 11
    np.savez_compressed(tmp_path / "plain.npz", images=xtr, labels=np.arange(8) % 4)
    d = load_dataset(str(tmp_path / "plain.npz"), "all")
    assert d.num_classes == 4 and d.y.dtype == np.int64
    np.savez(tmp_path / "odd.npz", foo=xtr, bar=xte)
    with pytest.raises(ValueError, match="odd.npz: no data array"):
        load_dataset(str(tmp_path / "odd.npz"))
    np.savez(tmp_path / "badlab.npz", x=xtr, y=np.arange(5))
    with pytest.raises(ValueError, match="badlab.npz: labels have shape"):
        load_dataset(str(tmp_path / "badlab.npz"))


def test_array_files_bad_inputs_name_the_file(tmp_path):
    good = np.zeros((4, 4, 4), np.uint8)
    np.save(tmp_path / "ok.npy", good)
    raw = (tmp_path / "ok.npy").read_bytes()
    nan = np.zeros((4, 1, 4, 4), np.float32)
    nan[2, 0, 1, 3] = np.nan
    cases = {
        "trunc.npy": raw[:-10],
        "garbage.npz": b"PK\x03\x04 not really a zip file",
        "garbage.npy": b"hello",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4), np.uint8))
    np.save(tmp_path / "shape5.npy", np.zeros((2, 2, 2, 2, 2), np.uint8))
    np.save(tmp_path / "chan.npy", np.zeros((2, 5, 4, 7), np.uint8))   # no axis of size 1 or 3
    np.save(tmp_path / "neg.npy", -np.ones((2, 4, 4), np.int16))
    for name in list(cases) + ["obj.npy", "nan.npy", "empty.npy", "shape5.npy", "chan.npy", "neg.npy"]:
        p = str(tmp_path / name)
        with pytest.raises(ValueError) as e:
            load_dataset(p, "all")
        assert str(e.value).startswith(p + ":"), str(e.value)
    with pytest.raises(ValueError, match=r"index \(2, 0, 1, 3\)"):       # where the NaN is
        load_dataset(str(tmp_path / "nan.npy"), "all")
    with pytest.raises(ValueError, match="'test' split is empty"):      # floor(4 * 0.1) = 0
        load_dataset(str(tmp_path / "ok.npy"), "test")
    with pytest.raises(ValueError, match="unknown data format"):
        (tmp_path / "data.csv").write_text("1,2,3")
        load_dataset(str(tmp_path / "data.csv"))


# ---------------------------------------------------------------------------------------------
# Folders of images

def test_image_folder_unlabelled_classes_and_splits(tmp_path):
    r = np.random.default_rng(2)
    imgs = r.integers(0, 256, (6, 5, 7), dtype=np.uint8)
    flat = tmp_path / "flat"
    for i, im in enumerate(imgs):
        write_png(flat / f"{i:02d}.png", im)
    d = load_dataset(str(flat), "all")
    assert d.x.shape == (6, 1, 5, 7) and d.y is None and d.num_classes == 0
    np.testing.assert_array_equal(d.uint8()[:, 0], imgs)                # PNG is lossless
    # class sub-folders, RGB, with train/ and test/
    rgb = r.integers(0, 256, (4, 5, 7, 3), dtype=np.uint8)
    for split, idx in (("train", [0, 1, 2]), ("test", [3])):
        for i in idx:
            write_png(tmp_path / "cls" / split / ("cat" if i % 2 else "dog") / f"{i}.png", rgb[i])
    (tmp_path / "cls" / "test" / "dog").mkdir(parents=True, exist_ok=True)
    write_png(tmp_path / "cls" / "test" / "dog" / "9.png", rgb[0])
    tr = load_dataset(str(tmp_path / "cls"), "train")
    assert tr.x.shape == (3, 3, 5, 7) and tr.num_classes == 2
    np.testing.assert_array_equal(tr.y, [0, 1, 1])                      # cat = 0 (sorted), dog = 1
    np.testing.assert_array_equal(tr.uint8()[0].transpose(1, 2, 0), rgb[1])   # cat/1.png first
    te = load_dataset(str(tmp_path / "cls"), "test")
    np.testing.assert_array_equal(te.y, [0, 1])
    assert len(load_dataset(str(tmp_path / "cls"), "all")) == 5


def test_image_folder_reads_jpeg_and_rejects_bad_images(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    grey = np.full((6, 6), 200, np.uint8)
    (tmp_path / "j").mkdir()
    Image.fromarray(grey).save(tmp_path / "j" / "a.jpg", quality=95)
    Image.fromarray(grey).save(tmp_path / "j" / "b.jpeg", quality=95)
    d = load_dataset(str(tmp_path / "j"), "all")
    # JPEG is lossy, but a flat grey block survives within 2 levels at quality 95
    assert d.x.shape == (2, 1, 6, 6) and np.abs(d.uint8().astype(int) - 200).max() <= 2
    write_png(tmp_path / "sizes" / "a.png", grey)
    write_png(tmp_path / "sizes" / "b.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(ValueError, match=r"b\.png: image size 6x5 differs"):
        load_dataset(str(tmp_path / "sizes"), "all")
    write_png(tmp_path / "corrupt" / "a.png", grey)
    (tmp_path / "corrupt" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with pytest.raises(ValueError, match=r"b\.png: cannot read the image"):
        load_dataset(str(tmp_path / "corrupt"), "all")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none: no .png"):
        load_dataset(str(tmp_path / "none"), "all")
    with pytest.raises(ValueError, match="single image"):
        load_dataset(str(tmp_path / "sizes" / "a.png"))
