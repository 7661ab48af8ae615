"""Loading data sets: the embedded digits, the 2-D toys, and user files, all into one :class:`Dataset`.

What it is: the single place where data are scaled to the model's range and checked. What it is
not: a data pipeline (no augmentation, no streaming: the data sets this package trains on fit in
memory; random flips live in the training loop).

Scaling (DDPM section 3.3; done once, here, and undone on output by :func:`to_uint8`)
----------------------------------------------------------------------------------
Images are 8-bit integers ``u`` in 0..255 mapped to ``x = u / 127.5 - 1`` in [-1, 1], float32,
layout (N, C, H, W). :func:`to_uint8` inverts it exactly: ``u = clip(round((x + 1) * 127.5), 0, 255)``.
2-D toy data and user arrays of shape (N, D) are vectors, not images: they are used as they are.

Sources understood by :func:`load_dataset`
------------------------------------------
* ``"digits"``: the embedded UCI 8x8 digits (:mod:`ddpm_ref.data.digits`), fixed split 1,497 / 300.
* the toys ``"swiss_roll"``, ``"moons"``, ``"8gaussians"``, ``"checkerboard"``, ``"rings"``
  (:mod:`ddpm_ref.data.toys`): "train" is rng step 0 (default 1,000,000 points), "test" step 1 (default
  5,000); a second independent held-out draw of the same size is ``seed + 1``.
* an MNIST-format IDX file (raw or ``.gz``; the header is parsed here): an images file of shape
  (N, H, W) or (N, H, W, C), with labels read from the sibling ``*-labels-idx1-ubyte[.gz]`` file when
  present; or a directory holding ``train-images-idx3-ubyte[.gz]`` / ``t10k-images-idx3-ubyte[.gz]``
  (and label files), whose names give the split. The dotted spelling ``train-images.idx3-ubyte`` /
  ``train-labels.idx1-ubyte`` is understood too. With ``split="all"`` both parts must hold images of
  one shape.
* a folder of PNG/JPEG images (needs Pillow, the ``cli`` extra). Images directly in the folder are
  unlabelled; images in sub-folders take the sorted sub-folder names as classes 0, 1, ...; sub-folders
  named ``train`` and ``test`` give the split. All images must have one size; they are read as grey
  (all grey) or RGB; 16-bit grey PNGs are rescaled to 8 bits as ``round(v / 257)`` (exact for the
  65,536 / 256 values ``257 u`` a 16-bit copy of an 8-bit image holds). Hidden files and folders
  (names starting with ``.``, such as macOS ``._x.png`` or ``.thumbs/``) are skipped.
* ``.npy`` (one array) or ``.npz`` (keys ``x``/``images`` [+ ``y``/``labels``], or
  ``x_train``/``x_test`` [+ ``y_train``/``y_test``]), loaded with ``allow_pickle=False``. Integer
  images must hold 0..255; float images are taken to be in [-1, 1] already unless ``value_range=(lo,
  hi)`` says otherwise (then ``x = 2 (v - lo) / (hi - lo) - 1``). Images may be (N, H, W), (N, C, H,
  W) or (N, H, W, C) with C in {1, 3}; (N, D) arrays are vectors. Float images whose values all lie
  in [0, 1] are refused without ``value_range`` (they are usually [0, 1] images, and reading them as
  [-1, 1] would silently train on washed-out data). ``value_range`` must be two finite numbers.

Labels are integers in 0..``MAX_CLASSES`` - 1 (100,000); ``num_classes`` is ``max(label) + 1`` over the
whole source (both parts of a source with its own train/test split), so it is the same for every split,
or 0 when the split read is unlabelled.

Split of a source without one: ``split="all"`` is everything; "train" / "test" hold out a fraction
``test_fraction`` (default 0.1, rounded down) chosen as the first entries of
``rng.permutation(seed, Stream.DATA, N, step=USER_SPLIT_STEP)``; both keep file order. ``n`` (at most
n examples, or the number of toy points) must be an integer >= 1.

Errors: any bad source (missing, unreadable, truncated, wrong shape, NaN or infinity, empty) raises
one ``ValueError`` whose message starts with the file's path.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import rng
from . import digits as _digits
from . import toys as _toys

__all__ = [
    "Dataset", "load_dataset", "to_uint8", "from_uint8", "read_idx", "load_image_folder",
    "load_array_file", "IMAGE_EXTENSIONS", "USER_SPLIT_STEP", "TOY_DEFAULT_N", "MAX_CLASSES",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
USER_SPLIT_STEP = 2000                   # rng step for the held-out split of user files
# Toy training sets are large because the toys' evaluation can tell: a model that learned a training
# set of N points exactly would score 1 + n / (2 N) of the energy floor at n evaluation samples
# (metrics.energy_ratio), 1.25 with the former N = 10,000 and n = 5,000, above the 1.2 bar by itself.
# At N = 10^6 that term is 0.0025. Drawing them costs about 0.3 s.
TOY_DEFAULT_N = {"train": 1_000_000, "test": 5_000}
_SPLITS = ("train", "test", "all")
# The largest number of classes a labelled source may have (labels 0..MAX_CLASSES-1). A bound is needed
# because num_classes = max(label) + 1 sizes the class embedding: a stray label of 2**40 would ask for
# a table of 2**40 rows. 100,000 is far above any image-classification set (ImageNet-21k: 21,841).
MAX_CLASSES = 100_000


# ---------------------------------------------------------------------------------------------
# Scaling

def from_uint8(u: np.ndarray) -> np.ndarray:
    """8-bit integers 0..255 -> float32 ``u / 127.5 - 1`` in [-1, 1] (DDPM section 3.3)."""
    u = np.asarray(u)
    if u.dtype.kind not in "iu":
        raise ValueError(f"from_uint8 expects integer values 0..255, got dtype {u.dtype}")
    if u.size and (u.min() < 0 or u.max() > 255):
        raise ValueError(f"from_uint8 expects values in 0..255, got range [{u.min()}, {u.max()}]")
    return (u.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 ``clip(round((x + 1) * 127.5), 0, 255)``; exact inverse of from_uint8.

    Values outside [-1, 1] (a sampler without clipping) are clipped; NaN or infinity is an error.
    uint8 input is already the output and is returned as it is; any other non-floating dtype (int64,
    uint16, bool, ...) is an error: whether its values are 8-bit levels or [-1, 1] numbers cannot be told.
    """
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind != "f":
        raise ValueError(f"to_uint8 expects a floating array in [-1, 1] (or uint8, returned as it is), "
                         f"got dtype {x.dtype}; for 8-bit values use np.asarray(x, np.uint8)")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"to_uint8: {int(bad.sum())} of {x.size} values are NaN or infinite")
    return np.clip(np.floor((x + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The data set record

@dataclass
class Dataset:
    """A data set in memory.

    x: float32 (N, C, H, W) in [-1, 1] for images, or (N, D) for vectors.
    y: int64 (N,) class labels in 0..num_classes-1, or None.
    num_classes: number of classes (0 when unlabelled).
    name: short name ("digits", "moons", a file name). split: "train", "test" or "all".
    source: the file or folder read (None for built-in data).
    levels: for images, the sorted uint8 values that can occur (17 for digits, 256 in general); None
      for vectors. Bits/dim are always counted over the 256 bins of 8-bit data.
    """

    x: np.ndarray
    y: Optional[np.ndarray]
    num_classes: int
    name: str
    split: str = "train"
    source: Optional[str] = None
    levels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    @property
    def shape(self) -> tuple:
        """The shape of one example: (C, H, W) or (D,)."""
        return tuple(self.x.shape[1:])

    def uint8(self) -> np.ndarray:
        """The images as uint8 (N, C, H, W) 0..255 (undoing the scaling); images only."""
        if not self.is_image:
            raise ValueError(f"data set {self.name!r} holds vectors of shape {self.shape}, not images")
        return to_uint8(self.x)


# ---------------------------------------------------------------------------------------------
# Helpers

def _fail(path, msg: str):
    raise ValueError(f"{path}: {msg}") from None


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic; errors name the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        _fail(path, f"cannot read the file ({e.strerror or e})")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            _fail(path, f"corrupt or truncated gzip data ({type(e).__name__}: {e})")
    return raw


def _finite(arr: np.ndarray, path) -> None:
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), arr.shape)
            _fail(path, f"{int(bad.sum())} values are NaN or infinite (first at index {tuple(int(i) for i in first)})")


def _check_value_range(value_range):
    """(lo, hi) as floats: two finite numbers with hi > lo; errors name the value."""
    try:
        lo, hi = value_range
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be a pair of numbers (lo, hi), got {value_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and np.isfinite(hi - lo)):
        raise ValueError(f"value_range must hold finite numbers (lo, hi), got {value_range!r}")
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")
    return lo, hi


def _to_model_array(arr: np.ndarray, path, value_range=None) -> np.ndarray:
    """Check and scale raw data: images -> float32 (N, C, H, W) in [-1, 1]; (N, D) -> float32 as is."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iuf":
        _fail(path, f"expected numeric data, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[0] == 0:
        _fail(path, f"the data set is empty (shape {arr.shape})")
    if arr.size == 0:
        _fail(path, f"the data set has empty examples (shape {arr.shape})")
    _finite(arr, path)
    if arr.ndim == 2:                                               # (N, D) vectors
        if value_range is not None:
            _fail(path, "value_range applies to images, not to (N, D) vectors")
        return arr.astype(np.float32)
    if arr.ndim == 3:                                               # (N, H, W) grey
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[1] in (1, 3):                                  # (N, C, H, W)
            pass
        elif arr.shape[3] in (1, 3):                                # (N, H, W, C)
            arr = arr.transpose(0, 3, 1, 2)
        else:
            _fail(path, f"cannot tell the channel axis of shape {arr.shape}: expected (N, C, H, W) "
                        "or (N, H, W, C) with C in {1, 3}")
    else:
        _fail(path, f"expected (N, D) vectors or images (N, H, W), (N, C, H, W), (N, H, W, C); "
                    f"got shape {arr.shape}")
    if value_range is not None:
        lo, hi = _check_value_range(value_range)
        v = arr.astype(np.float64)
        if v.min() < lo - 1e-6 * (hi - lo) or v.max() > hi + 1e-6 * (hi - lo):
            _fail(path, f"values span [{v.min()}, {v.max()}], outside value_range {value_range!r}")
        x = np.clip(2.0 * (v - lo) / (hi - lo) - 1.0, -1.0, 1.0)
        return np.ascontiguousarray(x, dtype=np.float32)
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() > 255:
            _fail(path, f"integer images must hold 0..255, got range [{arr.min()}, {arr.max()}]")
        return np.ascontiguousarray(from_uint8(arr))
    if arr.min() < -1.0 - 1e-6 or arr.max() > 1.0 + 1e-6:
        _fail(path, f"float images are taken to be in [-1, 1], got range [{arr.min()}, {arr.max()}]; "
                    "pass value_range=(lo, hi) to rescale (ddpm train --value-range LO HI)")
    if arr.min() >= 0.0:
        # The classic pitfall: [0, 1] images read as [-1, 1] train on a washed-out data set.
        _fail(path, f"float images with every value in [0, 1] (range [{arr.min()}, {arr.max()}]) are "
                    "ambiguous: pass value_range=(0, 1) if they are [0, 1] images, or (-1, 1) "
                    "(ddpm train --value-range 0 1)")
    return np.ascontiguousarray(np.clip(arr, -1.0, 1.0), dtype=np.float32)


def _check_labels(y, n: int, path) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        _fail(path, f"labels must be integers, got dtype {y.dtype}")
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.shape != (n,):
        _fail(path, f"labels have shape {y.shape}, expected ({n},) to match the images")
    if n and int(y.min()) < 0:
        _fail(path, f"labels must be >= 0, got minimum {y.min()}")
    if n and int(y.max()) >= MAX_CLASSES:              # Python ints: no uint64 -> int64 wrap-around
        _fail(path, f"labels must be < MAX_CLASSES = {MAX_CLASSES} (num_classes is the largest label "
                    f"+ 1), got maximum {y.max()}")
    return y.astype(np.int64)


def _num_classes(*label_arrays) -> int:
    """max + 1 over every (checked) label array given, ignoring None and empty ones; 0 if none."""
    tops = [int(y.max()) for y in label_arrays if y is not None and y.size]
    return max(tops) + 1 if tops else 0


def _holdout(n: int, split: str, seed: int, test_fraction: float) -> np.ndarray:
    """Indices (sorted) of ``split`` for a source with no split of its own (module docstring)."""
    if split == "all":
        return np.arange(n)
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction!r}")
    n_test = int(np.floor(n * float(test_fraction)))
    perm = rng.permutation(seed, rng.Stream.DATA, n, step=USER_SPLIT_STEP)
    is_test = np.zeros(n, dtype=bool)
    is_test[perm[:n_test]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST format)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST format, raw or gzip) into a native-endian array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions d, then d big-endian uint32 sizes; the data follow, big-
    endian, C order. The file must hold exactly that many bytes.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        _fail(path, f"too short for an IDX header ({len(raw)} bytes)")
    z0, z1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if z0 != 0 or z1 != 0 or code not in _IDX_DTYPES:
        _fail(path, f"not an IDX file (magic bytes {raw[:4].hex()}; expected 0000 then a type code in "
                    f"{{{', '.join(hex(c) for c in _IDX_DTYPES)}}})")
    if ndim == 0:
        _fail(path, "IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        _fail(path, f"truncated IDX header: {len(raw)} bytes, need {header}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(dims)                              # Python int: no overflow for huge headers
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        _fail(path, f"IDX file {what}: {len(raw)} bytes, the header {tuple(dims)} of {dtype} "
                    f"needs {expected} bytes")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _idx_label_path(images_path: str) -> Optional[str]:
    """The labels file beside an images file: ``*images-idx3*`` -> ``*labels-idx1*[.gz]`` (also with
    the dotted spelling ``images.idx3`` -> ``labels.idx1``, the one the MNIST mirrors often use)."""
    base = os.path.basename(images_path)
    folder = os.path.dirname(images_path)
    for sep in ("-", "."):
        if f"images{sep}idx3" not in base:
            continue
        for lsep in (sep, "." if sep == "-" else "-"):          # the same spelling first
            stem = base.replace(f"images{sep}idx3", f"labels{lsep}idx1")
            stem = stem[:-3] if stem.endswith(".gz") else stem
            for cand in (stem, stem + ".gz"):
                p = os.path.join(folder, cand)
                if os.path.isfile(p):
                    return p
    return None


def _is_idx(path: str) -> bool:
    base = os.path.basename(path).lower()
    if "idx" in base or base.endswith(".gz"):        # only IDX files are read gzipped
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True                                  # read_idx then names the unreadable file
    return len(head) == 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_DTYPES


def _load_idx_pair(images_path: str, labels_path: Optional[str]):
    x = read_idx(images_path)
    y = None
    if labels_path is not None:
        y = read_idx(labels_path)
        if y.ndim != 1:
            _fail(labels_path, f"an IDX labels file must be 1-D, got shape {y.shape}")
        y = _check_labels(y, x.shape[0], labels_path)
    return x, y


def _find_mnist_files(folder: str, prefix: str):
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"):
        for cand in (name, name + ".gz"):
            p = os.path.join(folder, cand)
            if os.path.isfile(p):
                return p, _idx_label_path(p)
    return None, None


# ---------------------------------------------------------------------------------------------
# Folders of images (Pillow)

def _list_images(folder: str):
    """Image files directly in ``folder``, sorted; hidden names (starting with ".") are skipped."""
    return sorted(f for f in os.listdir(folder)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, f)))


def _list_class_dirs(folder: str):
    """Sub-folders of ``folder`` that hold images, sorted; hidden ones (".thumbs") are skipped."""
    return sorted(d for d in os.listdir(folder)
                  if not d.startswith(".") and os.path.isdir(os.path.join(folder, d))
                  and _list_images(os.path.join(folder, d)))


def _read_images(paths, folder):
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading a folder of PNG/JPEG images needs Pillow: pip install 'ddpm-ref[cli]' "
                          "(or save the images as .npy / IDX)") from None
    grey_modes = {"1", "L", "LA", "I", "F"}
    pics, modes = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                modes.append(im.mode)
                pics.append(im.copy())
        except Exception as e:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError)
            _fail(p, f"cannot read the image ({type(e).__name__}: {e})")
    if not pics:
        _fail(folder, f"no {'/'.join(IMAGE_EXTENSIONS)} images found")
    mode = "L" if all(m in grey_modes or m.startswith("I;16") for m in modes) else "RGB"
    size = pics[0].size
    arrs = []
    for p, im in zip(paths, pics):
        if im.size != size:
            _fail(p, f"image size {im.size[0]}x{im.size[1]} differs from {size[0]}x{size[1]} "
                     f"(the first image, {os.path.basename(paths[0])})")
        if im.mode == "I" or im.mode.startswith("I;16"):
            # 16-bit grey (Pillow reads a 16-bit PNG as "I;16" or "I"): 0..65535 -> round(v / 257),
            # exact for v = 257 u, the 16-bit copy of the 8-bit value u.
            a = np.asarray(im).astype(np.int64)
            if a.size and (a.min() < 0 or a.max() > 65535):
                _fail(p, f"16-bit image values must lie in 0..65535, got range [{a.min()}, {a.max()}]")
            im = Image.fromarray(((2 * a + 257) // 514).astype(np.uint8))     # floor(v / 257 + 1/2)
        elif im.mode == "F":
            _fail(p, "floating-point images (mode 'F') are not supported; save 8- or 16-bit images")
        arrs.append(np.asarray(im.convert(mode), dtype=np.uint8))
    x = np.stack(arrs)                                              # (N, H, W) or (N, H, W, 3)
    return x if x.ndim == 4 else x[..., None]


def load_image_folder(folder: str):
    """(uint8 (N, H, W, C), labels int64 (N,) or None, class names) from a folder of images.

    Unlabelled when the images sit in the folder itself; otherwise each sub-folder is a class (sorted
    names -> 0, 1, ...). Needs Pillow (``pip install 'ddpm-ref[cli]'``).
    """
    direct = _list_images(folder)
    classes = _list_class_dirs(folder)
    if direct and classes:
        _fail(folder, f"holds both images and class sub-folders {classes}; use one or the other")
    if direct:
        return _read_images([os.path.join(folder, f) for f in direct], folder), None, []
    if not classes:
        _fail(folder, f"no {'/'.join(IMAGE_EXTENSIONS)} images found (directly or in sub-folders)")
    paths, labels = [], []
    for c, d in enumerate(classes):
        for f in _list_images(os.path.join(folder, d)):
            paths.append(os.path.join(folder, d, f))
            labels.append(c)
    return _read_images(paths, folder), np.asarray(labels, dtype=np.int64), classes


# ---------------------------------------------------------------------------------------------
# .npy / .npz

def load_array_file(path: str) -> dict:
    """The arrays of a .npy (key "x") or .npz file, loaded with ``allow_pickle=False``."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"x": loaded}
        with loaded as f:
            return {k: np.asarray(f[k]) for k in f.files}
    except FileNotFoundError:
        _fail(path, "no such file")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, struct.error,
            NotImplementedError) as e:
        _fail(path, f"cannot read the array file ({type(e).__name__}: {e})")


def _pick(arrays: dict, names, path, what: str, required=True):
    for k in names:
        if k in arrays:
            return arrays[k]
    if required:
        _fail(path, f"no {what} array: expected one of the keys {list(names)}, found {sorted(arrays)}")
    return None


# ---------------------------------------------------------------------------------------------
# load_dataset

def _check_same_shape(parts, path) -> None:
    """The (name, array) parts that split="all" concatenates must agree in example shape and kind."""
    (n0, a0), rest = parts[0], parts[1:]
    for name, a in rest:
        if a0.ndim == 0 or a.ndim == 0 or a.shape[1:] != a0.shape[1:]:
            _fail(path, f"cannot join the parts for split='all': {name} has shape {a.shape}, {n0} has "
                        f"{a0.shape} (they must differ in the first axis only)")
        if (a.dtype.kind == "f") != (a0.dtype.kind == "f"):
            _fail(path, f"cannot join the parts for split='all': {name} has dtype {a.dtype}, {n0} has "
                        f"{a0.dtype} (both integer 0..255 or both float)")


def _read_idx_labels(labels_path: str) -> np.ndarray:
    """A checked 1-D IDX labels file on its own (for num_classes over the whole source)."""
    y = read_idx(labels_path)
    if y.ndim != 1:
        _fail(labels_path, f"an IDX labels file must be 1-D, got shape {y.shape}")
    return _check_labels(y, y.shape[0], labels_path)


def _finish(x, y, name, split, source, path, value_range, n, keep=None, levels=None,
            num_classes=None) -> Dataset:
    """Validate and scale the whole source, then take the split ``keep`` and the first ``n``."""
    xm = _to_model_array(x, path, value_range)                    # checks shape, NaN, range, empty
    if y is not None:
        y = _check_labels(y, xm.shape[0], path)
    if y is None:
        num_classes = 0                                           # unlabelled split
    elif num_classes is None:
        num_classes = _num_classes(y)
    if keep is not None:
        xm = xm[keep]
        y = None if y is None else y[keep]
    if n is not None:
        xm = xm[:n]
        y = None if y is None else y[:n]
    if xm.shape[0] == 0:
        _fail(path, f"the {split!r} split is empty (the source holds {len(x)} examples); "
                    "use split='all' or a larger test_fraction")
    if levels is None and xm.ndim == 4:
        levels = np.arange(256, dtype=np.uint8)
    return Dataset(x=np.ascontiguousarray(xm), y=y, num_classes=int(num_classes), name=name, split=split,
                   source=source, levels=levels)


def load_dataset(name_or_path: str, split: str = "train", seed: int = 0, n: Optional[int] = None,
                 test_fraction: float = 0.1, value_range=None) -> Dataset:
    """Load a named data set or a user file/folder (see the module docstring) as a :class:`Dataset`.

    split: "train", "test" or "all" (not for toys). seed: the toy draw, or the held-out split of a
    user file; the digits split is fixed. n: number of toy points (default 1,000,000 train, 5,000 test);
    for other sources at most n examples (the first n of the split). value_range: see module docstring.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    seed = rng.check_seed(seed)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1 (a number of examples), got {n!r}")
        n = int(n)
    if value_range is not None:
        _check_value_range(value_range)
    name = str(name_or_path)

    if name == "digits":
        u8, y = _digits.digits_uint8(split)
        return _finish(u8, y, "digits", split, None, _digits.DIGITS_PATH, None, n,
                       levels=_digits.DIGITS_LEVELS.copy(), num_classes=10)

    if name in _toys.TOYS:
        if split == "all":
            raise ValueError(f"toy data {name!r} has splits 'train' and 'test' only, got 'all'")
        count = TOY_DEFAULT_N[split] if n is None else int(n)
        pts = _toys.toy_data(name, count, seed=seed, step=0 if split == "train" else 1)
        return Dataset(x=pts, y=None, num_classes=0, name=name, split=split, source=None, levels=None)

    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise ValueError(f"{name}: no such file or folder, and not a built-in data set "
                         f"(built-in: 'digits', {', '.join(repr(t) for t in _toys.TOYS)})")
    label = os.path.basename(os.path.normpath(path))

    if os.path.isdir(path):
        # MNIST-style folder of IDX files?
        tr_img, tr_lab = _find_mnist_files(path, "train")
        te_img, te_lab = _find_mnist_files(path, "t10k")
        if tr_img or te_img:
            if split == "all":
                pairs = [(p, l) for p, l in ((tr_img, tr_lab), (te_img, te_lab)) if p]
                parts = [_load_idx_pair(p, l) for p, l in pairs]
                _check_same_shape([(os.path.basename(p), part[0]) for (p, _), part in zip(pairs, parts)], path)
                x = np.concatenate([p[0] for p in parts])
                ys = [p[1] for p in parts]
                y = None if any(v is None for v in ys) else np.concatenate(ys)
                num_classes = _num_classes(*ys)
            else:
                img, lab = (tr_img, tr_lab) if split == "train" else (te_img, te_lab)
                if img is None:
                    _fail(path, f"no {'train' if split == 'train' else 't10k'}-images-idx3-ubyte[.gz] "
                                f"for split {split!r}")
                x, y = _load_idx_pair(img, lab)
                # num_classes over the whole source: read the other part's labels too (not its images)
                other = te_lab if split == "train" else tr_lab
                num_classes = _num_classes(y, None if other is None or y is None else _read_idx_labels(other))
            return _finish(x, y, label, split, path, path, value_range, n, num_classes=num_classes)
        # Folder of images, with train/ and test/ sub-folders or not.
        sub = {d: os.path.join(path, d) for d in ("train", "test") if os.path.isdir(os.path.join(path, d))}
        if len(sub) == 2:
            if split == "all":
                xa, ya, ca = load_image_folder(sub["train"])
                xb, yb, cb = load_image_folder(sub["test"])
                if ca != cb:
                    _fail(path, f"train classes {ca} differ from test classes {cb}")
                if xa.shape[1:] != xb.shape[1:]:
                    _fail(sub["test"], f"image shape {xb.shape[1:]} differs from train {xa.shape[1:]}")
                x = np.concatenate([xa, xb])
                y = None if ya is None or yb is None else np.concatenate([ya, yb])
                classes = ca
            else:
                x, y, classes = load_image_folder(sub[split])
                other = _list_class_dirs(sub["test" if split == "train" else "train"])
                if other != classes:
                    _fail(path, f"{split} classes {classes} differ from the other split's {other}")
            return _finish(x, y, label, split, path, path, value_range, n,
                           num_classes=len(classes) if classes else 0)
        x, y, classes = load_image_folder(path)
        keep = _holdout(x.shape[0], split, seed, test_fraction)
        return _finish(x, y, label, split, path, path, value_range, n, keep=keep,
                       num_classes=len(classes) if classes else 0)

    lower = path.lower()
    if lower.endswith((".npy", ".npz")):
        arrays = load_array_file(path)
        if "x_train" in arrays or "x_test" in arrays:
            xs, ys = {}, {}
            for part in ("train", "test"):
                if f"x_{part}" in arrays:
                    xs[part] = np.asarray(arrays[f"x_{part}"])
                    if f"y_{part}" in arrays:
                        n_part = xs[part].shape[0] if xs[part].ndim else 0
                        ys[part] = _check_labels(arrays[f"y_{part}"], n_part, f"{path} (y_{part})")
            num_classes = _num_classes(*ys.values())             # the same for every split
            if split == "all":
                xtr = _pick(arrays, ["x_train"], path, "x_train")
                xte = _pick(arrays, ["x_test"], path, "x_test")
                _check_same_shape([("x_train", np.asarray(xtr)), ("x_test", np.asarray(xte))], path)
                x = np.concatenate([xtr, xte])
                y = None if len(ys) < 2 else np.concatenate([ys["train"], ys["test"]])
            else:
                x = _pick(arrays, [f"x_{split}"], path, f"x_{split}")
                y = ys.get(split)
            return _finish(x, y, label, split, path, path, value_range, n, num_classes=num_classes)
        x = _pick(arrays, ["x", "images", "arr_0"] if len(arrays) > 1 or "arr_0" not in arrays
                  else ["arr_0"], path, "data")
        y = _pick(arrays, ["y", "labels"], path, "labels", required=False)
        if np.asarray(x).ndim == 0 or np.asarray(x).shape[0] == 0:
            _fail(path, f"the data set is empty (shape {np.asarray(x).shape})")
        keep = _holdout(np.asarray(x).shape[0], split, seed, test_fraction)
        return _finish(x, y, label, split, path, path, value_range, n, keep=keep)

    if lower.endswith(IMAGE_EXTENSIONS):
        _fail(path, "a single image is not a data set; pass the folder that holds the images")

    if _is_idx(path):
        x, y = _load_idx_pair(path, _idx_label_path(path))
        if x.ndim == 1:
            _fail(path, f"this IDX file holds a 1-D array of {x.shape[0]} values (labels?), not images")
        keep = _holdout(x.shape[0], split, seed, test_fraction)
        return _finish(x, y, label, split, path, path, value_range, n, keep=keep)

    _fail(path, "unknown data format: expected a folder of images or IDX files, an IDX file "
                "(MNIST format, raw or .gz), or a .npy / .npz array file")

