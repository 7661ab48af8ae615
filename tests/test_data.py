"""Tests for ddpm_ref/data: the embedded digits and their split, the toys, the scaling, every loader.

Every loader is exercised on small files this test writes (tmp_path); bad inputs (truncated, corrupt,
empty, NaN, wrong shape) must give one ValueError whose message names the file.
"""
import gzip
import math
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


def test_to_uint8_refuses_integer_input_other_than_uint8():
    # int64 [0, 128, 255] used to be read as floats in [-1, 1] (-> [128, 255, 255]); uint16 was refused
    for dt in (np.int64, np.int8, np.uint16, np.bool_):
        with pytest.raises(ValueError, match=f"floating array.*got dtype {np.dtype(dt)}"):
            to_uint8(np.array([0, 1, 1], dtype=dt))
    u = np.array([0, 128, 255], np.uint8)
    np.testing.assert_array_equal(to_uint8(u), [0, 128, 255])          # uint8 is the output already
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, 0.0, 1.0], np.float16)), [0, 128, 255])


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


def test_digits_corrupt_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04garbage")                              # zip magic, then nonsense
    with pytest.raises(ValueError, match=f"^{bad}: cannot read.*BadZipFile"):
        digits_mod.digits_uint8("train", path=str(bad))
    levels, labels, test_index = digits_mod.load_digits_raw()
    good = tmp_path / "good.npz"
    np.savez_compressed(good, images=levels, labels=labels, test_index=test_index)
    raw = good.read_bytes()
    body = bytearray(raw)
    body[60:160] = bytes(100)                                            # zero a stretch of deflate data
    (tmp_path / "zeroed.npz").write_bytes(bytes(body))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'zeroed.npz'}: "):
        digits_mod.digits_uint8("train", path=str(tmp_path / "zeroed.npz"))
    cases = {"ti.npz": dict(test_index=np.full(300, 5000)),              # out of range: was an IndexError
             "neg.npz": dict(test_index=np.arange(300) - 1),
             "rep.npz": dict(test_index=np.zeros(300, np.int64)),
             "lab.npz": dict(labels=labels + 1)}                         # a label 10
    for name, change in cases.items():
        np.savez(tmp_path / name, **{"images": levels, "labels": labels, "test_index": test_index, **change})
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: "):
            digits_mod.digits_uint8("train", path=str(tmp_path / name))
    assert digits_mod.digits_uint8("test", path=str(good))[0].shape == (300, 1, 8, 8)


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


def test_n_must_be_a_positive_integer():
    # fractional n used to be truncated (n=2.5 -> 2 points)
    for bad in (2.5, 1.9, 3.0, True, "4", 0, -1):
        with pytest.raises(ValueError, match=f"n must be an integer >= 1.*got {bad!r}"):
            load_dataset("moons", n=bad)
        with pytest.raises(ValueError, match=f"n must be an integer >= 1.*got {bad!r}"):
            toy_data("moons", bad)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        load_dataset("digits", n=1.9)
    with pytest.raises(ValueError, match="index_offset must be an integer"):
        toy_data("moons", 3, index_offset=1.5)
    assert load_dataset("moons", n=np.int64(3)).x.shape == (3, 2)
    assert len(load_dataset("digits", "test", n=np.int32(7))) == 7


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


def test_idx_huge_header_is_truncated_not_an_overflow(tmp_path):
    # the element count used to be an int64 product: it wrapped (a raw reshape error, or "needs -17...")
    for name, dims in (("huge-idx3", (2**31,) * 3), ("huge4-idx3", (2**32 - 1,) * 4)):
        p = tmp_path / name
        header = bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
        p.write_bytes(header)
        need = len(header) + math.prod(dims)                                # exact, in Python ints
        with pytest.raises(ValueError, match=f"^{p}: IDX file truncated: {len(header)} bytes, "
                                             f".* needs {need} bytes$"):
            read_idx(str(p))


def test_mnist_dotted_names_find_their_labels(tmp_path):
    # train-images.idx3-ubyte was found, but train-labels.idx1-ubyte beside it was never read
    x = np.arange(4 * 9, dtype=np.uint8).reshape(4, 3, 3)
    (tmp_path / "train-images.idx3-ubyte").write_bytes(_idx_bytes(x))
    (tmp_path / "train-labels.idx1-ubyte").write_bytes(_idx_bytes(np.array([0, 1, 2, 1], np.uint8)))
    d = load_dataset(str(tmp_path))
    np.testing.assert_array_equal(d.y, [0, 1, 2, 1])
    assert d.num_classes == 3
    d = load_dataset(str(tmp_path / "train-images.idx3-ubyte"), "all")         # the file on its own
    np.testing.assert_array_equal(d.y, [0, 1, 2, 1])


def test_split_all_with_mismatched_parts_names_the_source(tmp_path):
    mn = tmp_path / "mnist"
    mn.mkdir()
    (mn / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((4, 3, 3), np.uint8)))
    (mn / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((2, 3, 3, 3), np.uint8)))
    with pytest.raises(ValueError, match=f"^{mn}: cannot join.*t10k-images-idx3-ubyte has shape \\(2, 3, 3, 3\\)"):
        load_dataset(str(mn), "all")
    assert len(load_dataset(str(mn), "train")) == 4                           # each part alone is fine
    p = tmp_path / "tt.npz"
    np.savez(p, x_train=np.zeros((4, 4, 4), np.uint8), x_test=np.zeros((2, 5, 5), np.uint8))
    with pytest.raises(ValueError, match=f"^{p}: cannot join.*x_test has shape \\(2, 5, 5\\)"):
        load_dataset(str(p), "all")
    np.savez(p, x_train=np.zeros((4, 4, 4), np.uint8), x_test=np.zeros((2, 4, 4), np.float32) - 0.5)
    with pytest.raises(ValueError, match=f"^{p}: cannot join.*dtype float32"):
        load_dataset(str(p), "all")


def test_num_classes_is_the_same_for_every_split(tmp_path):
    # it used to be max + 1 of the split read: train said 9, test 10
    p = tmp_path / "nc.npz"
    np.savez(p, x_train=np.zeros((10, 4, 4), np.uint8), y_train=np.arange(10) % 9,
             x_test=np.zeros((3, 4, 4), np.uint8), y_test=[9, 0, 1])
    assert [load_dataset(str(p), s).num_classes for s in ("train", "test", "all")] == [10, 10, 10]
    mn = tmp_path / "mnist"
    mn.mkdir()
    (mn / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((10, 3, 3), np.uint8)))
    (mn / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(10)))
    (mn / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((3, 3, 3), np.uint8)))
    (mn / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([0, 1, 2])))
    assert [load_dataset(str(mn), s).num_classes for s in ("train", "test", "all")] == [10, 10, 10]
    np.savez(p, x_train=np.zeros((4, 4, 4), np.uint8), y_train=[0, 1, 0, 1], x_test=np.zeros((2, 4, 4), np.uint8))
    assert load_dataset(str(p), "test").num_classes == 0                      # an unlabelled split
    assert load_dataset(str(p), "train").num_classes == 2


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


def test_labels_range_is_checked_before_the_int64_cast(tmp_path):
    from ddpm_ref.data.loaders import MAX_CLASSES
    x = np.zeros((3, 4, 4), np.uint8)
    p = tmp_path / "lab.npz"
    np.savez(p, x=x, y=np.array([0, 1, 2**63], np.uint64))                  # used to wrap to -2**63
    with pytest.raises(ValueError, match=f"^{p}: labels must be < MAX_CLASSES = 100000.*{2**63}"):
        load_dataset(str(p), "all")
    np.savez(p, x=x, y=np.array([0, 1, 2**40]))                             # num_classes 2**40
    with pytest.raises(ValueError, match=f"^{p}: labels must be < MAX_CLASSES"):
        load_dataset(str(p), "all")
    np.savez(p, x=x, y=np.array([0, 1, MAX_CLASSES - 1], np.uint64))        # the largest allowed
    d = load_dataset(str(p), "all")
    assert d.num_classes == MAX_CLASSES and d.y.dtype == np.int64 and d.y[2] == MAX_CLASSES - 1


def test_value_range_must_be_finite(tmp_path):
    p = tmp_path / "vr.npy"
    np.save(p, np.linspace(0, 1, 48).reshape(3, 4, 4))
    # (0, inf) used to map everything to -1; (-inf, 1) gave NaNs
    for vr in ((0, float("inf")), (-float("inf"), 1), (0, float("nan")), (-1e308, 1e308)):
        with pytest.raises(ValueError, match="value_range must hold finite numbers"):
            load_dataset(str(p), "all", value_range=vr)
    for vr in ((1, 0), (0,), "ab", None):
        if vr is not None:
            with pytest.raises(ValueError, match="value_range must"):
                load_dataset(str(p), "all", value_range=vr)
    np.testing.assert_allclose(load_dataset(str(p), "all", value_range=[0, 1]).x.ravel(),
                               np.linspace(-1, 1, 48), atol=1e-6)


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


def test_image_folder_rescales_16_bit_png(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    # values * 257 used to be clipped to 255: every non-zero pixel saturated
    u8 = np.array([[0, 64, 128], [192, 255, 10]], np.uint8)
    v16 = u8.astype(np.uint16) * 257
    v16[1, 2] = 10 * 257 + 128                                               # rounds to 10 (not 11)
    (tmp_path / "p").mkdir()
    Image.fromarray(v16).save(tmp_path / "p" / "a.png")
    assert Image.open(tmp_path / "p" / "a.png").mode.startswith("I")
    Image.fromarray(np.full((2, 3), 40000, np.uint16)).save(tmp_path / "p" / "b.png")
    d = load_dataset(str(tmp_path / "p"), "all")
    assert d.x.shape == (2, 1, 2, 3)
    np.testing.assert_array_equal(d.uint8()[0, 0], u8)
    np.testing.assert_array_equal(d.uint8()[1, 0], np.full((2, 3), 156))    # round(40000 / 257) = 156


def test_image_folder_skips_hidden_files_and_folders(tmp_path):
    r = np.random.default_rng(3)
    imgs = r.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    for i, c in enumerate(["a", "a", "b"]):
        write_png(tmp_path / "cls" / c / f"{i}.png", imgs[i])
    (tmp_path / "cls" / "a" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")   # a macOS resource fork
    write_png(tmp_path / "cls" / ".thumbs" / "t.png", np.zeros((2, 2), np.uint8))  # would be a 3rd class
    d = load_dataset(str(tmp_path / "cls"), "all")
    assert d.num_classes == 2 and len(d) == 3
    np.testing.assert_array_equal(d.y, [0, 0, 1])
    np.testing.assert_array_equal(d.uint8()[:, 0], imgs)
    write_png(tmp_path / "flat" / "x.png", imgs[0])
    (tmp_path / "flat" / "._x.png").write_bytes(b"junk")
    write_png(tmp_path / "flat" / ".hidden" / "y.png", imgs[1])              # not a class beside direct images
    assert len(load_dataset(str(tmp_path / "flat"), "all")) == 1
