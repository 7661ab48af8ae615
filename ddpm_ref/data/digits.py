"""The embedded default data set: the UCI 8x8 handwritten digits (1,797 images, 10 classes).

What it is: the "Optical Recognition of Handwritten Digits" set (Alpaydin & Kaynak 1998, UCI ML
repository, CC BY 4.0; the copy that scikit-learn ships as ``load_digits``), stored in this package as
``digits.npz`` (a few kB, compressed) so that ddpm-ref trains on real images with no download and no
extra dependency. Licence and attribution: ``DIGITS_LICENSE.txt`` beside this file.

What it is not: MNIST. Each image is 8x8 with 17 grey levels (the count of "on" pixels in a 4x4 block
of a 32x32 bitmap, 0..16).

Scaling (done once, here; undone by :func:`ddpm_ref.data.to_uint8`)
------------------------------------------------------------------
1. level ``v`` in 0..16 -> 8-bit value ``u = floor(v * 255 / 16 + 0.5)`` (round half up), so 0 -> 0,
   8 -> 128, 16 -> 255. The 17 values that occur are :data:`DIGITS_LEVELS`.
2. 8-bit value ``u`` -> model input ``x = u / 127.5 - 1`` in [-1, 1] (DDPM section 3.3: integers
   0..255 scaled linearly to [-1, 1]; the decoder L_0 then uses 256 bins of width 2/255).

So the data live on 256 bins like any 8-bit image (bits/dim are comparable with the DDPM bound), of
which only 17 are ever occupied; :data:`DIGITS_LEVELS` keeps that structure knowable.

Split (fixed, stratified, documented)
-------------------------------------
300 test images, 30 of each digit; the other 1,497 train. For digit ``c`` (its images in file order,
``n_c`` of them) the test images are the first 30 positions of ``rng.permutation(0, Stream.DATA, n_c,
step=SPLIT_STEP + c)``. The indices are stored in ``digits.npz`` (``test_index``) so the split can
never drift; a test recomputes them from :mod:`ddpm_ref.rng`. Both splits keep file order.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib

import numpy as np

from .. import rng

__all__ = [
    "DIGITS_LEVELS", "DIGITS_PATH", "LICENSE_PATH", "N_TEST", "N_TEST_PER_CLASS", "SPLIT_STEP",
    "load_digits_raw", "digits_split_index", "digits_uint8", "build_digits_npz",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS_PATH = os.path.join(_HERE, "digits.npz")
LICENSE_PATH = os.path.join(_HERE, "DIGITS_LICENSE.txt")

N_TEST_PER_CLASS = 30
N_TEST = 10 * N_TEST_PER_CLASS           # 300 test, 1,497 train
SPLIT_STEP = 1000                        # rng step offset for the split permutations (one per class)

# The 17 occupied 8-bit values: floor(v * 255 / 16 + 0.5) for v = 0..16.
DIGITS_LEVELS = np.floor(np.arange(17) * 255.0 / 16.0 + 0.5).astype(np.uint8)  # (17,)


def levels_to_uint8(v: np.ndarray) -> np.ndarray:
    """Map digit levels 0..16 to 8-bit values (step 1 of the scaling in the module docstring)."""
    v = np.asarray(v)
    if v.size and (v.min() < 0 or v.max() > 16):
        raise ValueError(f"digit levels must lie in 0..16, got range [{v.min()}, {v.max()}]")
    return DIGITS_LEVELS[v.astype(np.int64)]


def digits_split_index(labels: np.ndarray) -> np.ndarray:
    """Sorted int64 indices of the 300 test images, recomputed from the counter RNG (see docstring)."""
    labels = np.asarray(labels)
    test = []
    for c in range(10):
        members = np.flatnonzero(labels == c)                     # file order
        if members.size < N_TEST_PER_CLASS:
            raise ValueError(f"digit {c} has {members.size} images, need at least {N_TEST_PER_CLASS}")
        perm = rng.permutation(0, rng.Stream.DATA, members.size, step=SPLIT_STEP + c)
        test.append(members[perm[:N_TEST_PER_CLASS]])
    return np.sort(np.concatenate(test)).astype(np.int64)


def load_digits_raw(path: str = DIGITS_PATH):
    """(levels uint8 (1797, 8, 8) in 0..16, labels int64 (1797,), test_index int64 (300,)) from the npz.

    Any fault of the file (unreadable, corrupt zip or deflate data, missing keys, wrong shapes, dtypes or
    values) is one ValueError whose message starts with ``path``.
    """
    def bad(msg):
        raise ValueError(f"{path}: {msg}; reinstall ddpm-ref") from None

    try:
        with np.load(path, allow_pickle=False) as f:
            levels = np.asarray(f["images"])
            labels = np.asarray(f["labels"])
            test_index = np.asarray(f["test_index"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, struct.error,
            NotImplementedError) as e:
        bad(f"cannot read the embedded digits file ({type(e).__name__}: {e})")
    if levels.shape != (1797, 8, 8) or labels.shape != (1797,) or test_index.shape != (N_TEST,):
        bad(f"unexpected shapes images {levels.shape}, labels {labels.shape}, test_index "
            f"{test_index.shape}; expected (1797, 8, 8), (1797,), ({N_TEST},)")
    for what, a in (("images", levels), ("labels", labels), ("test_index", test_index)):
        if a.dtype.kind not in "iu":
            bad(f"{what} must be integers, got dtype {a.dtype}")
    if int(levels.min()) < 0 or int(levels.max()) > 16:
        bad(f"images must hold levels 0..16, got range [{levels.min()}, {levels.max()}]")
    if int(labels.min()) < 0 or int(labels.max()) > 9:
        bad(f"labels must lie in 0..9, got range [{labels.min()}, {labels.max()}]")
    if int(test_index.min()) < 0 or int(test_index.max()) >= labels.shape[0]:
        bad(f"test_index must lie in 0..{labels.shape[0] - 1}, got range "
            f"[{test_index.min()}, {test_index.max()}]")
    if np.unique(test_index).size != N_TEST:
        bad(f"test_index holds {N_TEST - np.unique(test_index).size} repeated entries")
    return levels.astype(np.uint8), labels.astype(np.int64), test_index.astype(np.int64)


def digits_uint8(split: str = "train", path: str = DIGITS_PATH):
    """(images uint8 (N, 1, 8, 8) with values in DIGITS_LEVELS, labels int64 (N,)) for a split.

    split: "train" (1,497), "test" (300) or "all" (1,797, file order).
    """
    levels, labels, test_index = load_digits_raw(path)
    is_test = np.zeros(labels.shape[0], dtype=bool)
    is_test[test_index] = True
    if split == "train":
        keep = ~is_test
    elif split == "test":
        keep = is_test
    elif split == "all":
        keep = np.ones_like(is_test)
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    u8 = levels_to_uint8(levels[keep])[:, None]                 # (N, 1, 8, 8)
    return u8, labels[keep]


def build_digits_npz(path: str = DIGITS_PATH) -> str:
    """Maintainers only: rebuild ``digits.npz`` from scikit-learn's copy (``pip install scikit-learn``).

    Stores ``images`` uint8 (1797, 8, 8) levels 0..16, ``labels`` uint8 (1797,), ``test_index``
    int16 (300,). scikit-learn is not a dependency of ddpm-ref; the shipped file is what is used.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("rebuilding digits.npz needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = d.images.astype(np.uint8)                          # (1797, 8, 8), exact: values 0..16
    if not np.array_equal(images, d.images):
        raise ValueError("scikit-learn digits are not integers 0..16")
    labels = d.target.astype(np.uint8)                          # (1797,)
    test_index = digits_split_index(labels).astype(np.int16)    # (300,)
    np.savez_compressed(path, images=images, labels=labels, test_index=test_index)
    return path
