"""Image output without Pillow: PNG, image grids and strips, APNG animations, and line plots.

What it is: everything ``ddpm sample``, ``ddpm forward`` and ``ddpm demo`` need to write results a
person can look at, in NumPy and the standard library (``zlib``, ``struct``):

* :func:`write_png` / :func:`encode_png`: 8-bit grey, grey+alpha, RGB or RGBA PNG (PNG spec,
  ISO/IEC 15948: signature, IHDR, IDAT with zlib-compressed scanlines each led by a filter byte, IEND;
  every chunk carries a CRC-32). :func:`read_png` decodes non-interlaced 8-bit PNGs with all five
  scanline filters (enough for what we write and what most tools write), for tests and round trips.
* :func:`make_grid` (N images -> one image, torchvision-style ``nrow`` and ``padding``),
  :func:`make_strip` (one row), :func:`upscale` (nearest neighbour, so 8x8 digits are visible).
* :func:`write_apng`: an animated PNG (APNG: ``acTL``, then per frame ``fcTL`` + ``IDAT``/``fdAT``),
  pure zlib; :func:`write_gif` through Pillow (the ``cli`` extra); :func:`write_animation` picks one
  from the file extension.
* :func:`plot_curves` / :func:`write_loss_curve`: a line plot (axes, grid, tick labels in a built-in
  3x5 pixel font, optional log-scale y, optional moving average) rendered into a NumPy raster and
  written as PNG, so no matplotlib is needed.

What it is not: a general image library. Images are uint8 ``(H, W)`` (grey), ``(H, W, 3)`` (RGB) or
``(H, W, 4)`` (RGBA); model arrays (N, C, H, W) in [-1, 1] are turned into those by :func:`make_grid`,
which undoes the data scaling with :func:`ddpm_ref.data.to_uint8`.
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np

__all__ = [
    "encode_png", "write_png", "read_png", "png_chunks", "upscale", "to_hwc_uint8", "make_grid",
    "make_strip", "encode_apng", "write_apng", "write_gif", "write_animation", "plot_curves",
    "write_loss_curve", "draw_text",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}        # channels -> PNG colour type
_CHANNELS = {v: k for k, v in _COLOUR_TYPES.items()}


# ---------------------------------------------------------------------------------------------
# PNG

def _chunk(kind: bytes, data: bytes) -> bytes:
    """length (4, big-endian) + type (4) + data + CRC-32 of type and data (PNG spec section 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _check_image(img, name: str = "image") -> np.ndarray:
    """uint8 (H, W, C) with C in 1..4 from (H, W) or (H, W, C)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (use ddpm_ref.data.to_uint8 on [-1, 1] data), got dtype {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in _COLOUR_TYPES:
        raise ValueError(f"{name} must have shape (H, W) or (H, W, C) with C in 1..4, got {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1 or img.shape[0] >= 2**31 or img.shape[1] >= 2**31:
        raise ValueError(f"{name} height and width must be in [1, 2**31), got {img.shape[:2]}")
    return img


def _ihdr(h: int, w: int, c: int) -> bytes:
    # width, height, bit depth 8, colour type, compression 0, filter method 0, no interlace
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, _COLOUR_TYPES[c], 0, 0, 0))


def _scanlines(img: np.ndarray, level: int) -> bytes:
    """zlib stream of the image's scanlines, each led by filter byte 0 ("None")."""
    h, w, c = img.shape
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)                   # (H, 1 + W*C)
    rows[:, 1:] = img.reshape(h, w * c)
    return zlib.compress(rows.tobytes(), level)


def encode_png(img, level: int = 6) -> bytes:
    """The bytes of a PNG file holding ``img`` (uint8 (H, W) grey or (H, W, C), C = 1, 2, 3, 4)."""
    img = _check_image(img)
    h, w, c = img.shape
    return (PNG_SIGNATURE + _ihdr(h, w, c) + _chunk(b"IDAT", _scanlines(img, level))
            + _chunk(b"IEND", b""))


def _write_atomic(path, write) -> str:
    """Create or replace ``path`` through ``write(fileobj)``: a uniquely named temporary file in the
    same folder, then os.replace (:func:`ddpm_ref.checkpoint.atomic_write`). A reader never sees a
    half-written file, a failed write leaves the previous file intact and no temporary file behind,
    and concurrent writers do not collide on the temporary name."""
    from .checkpoint import atomic_write

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)
    return path


def _write_bytes(path, data: bytes) -> str:
    return _write_atomic(path, lambda f: f.write(data))


def write_png(path, img, level: int = 6) -> str:
    """Write ``img`` (uint8 (H, W) or (H, W, C)) as a PNG file; returns the path."""
    return _write_bytes(path, encode_png(img, level))


def png_chunks(data: bytes, path="PNG data"):
    """[(type bytes, data bytes), ...] of a PNG/APNG byte string; checks the signature and every CRC."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path}: not a PNG file (signature {data[:8]!r})")
    pos, out = 8, []
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated chunk header at byte {pos}")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ValueError(f"{path}: chunk {kind!r} at byte {pos} is truncated")
        body = data[pos + 8:end]
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if crc != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ValueError(f"{path}: CRC mismatch in chunk {kind!r} at byte {pos}")
        out.append((kind, body))
        pos = end + 4
        if kind == b"IEND":
            break
    if not out or out[-1][0] != b"IEND":
        raise ValueError(f"{path}: no IEND chunk (truncated file)")
    return out


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: bytes, h: int, w: int, c: int, path) -> np.ndarray:
    """Undo the PNG scanline filters (None, Sub, Up, Average, Paeth; PNG spec section 9)."""
    stride = w * c
    if len(raw) != h * (stride + 1):
        raise ValueError(f"{path}: image data holds {len(raw)} bytes, expected {h * (stride + 1)}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 2:
            cur = (line.astype(np.uint16) + prev).astype(np.uint8)
        elif ftype in (1, 3, 4):
            cur = line.astype(np.int64)
            up = prev.astype(np.int64)
            for i in range(stride):                  # sequential: each byte needs its left neighbour
                left = int(cur[i - c]) if i >= c else 0
                if ftype == 1:
                    pred = left
                elif ftype == 3:
                    pred = (left + int(up[i])) // 2
                else:
                    pred = _paeth(left, int(up[i]), int(up[i - c]) if i >= c else 0)
                cur[i] = (int(cur[i]) + pred) & 0xFF
            cur = cur.astype(np.uint8)
        else:
            raise ValueError(f"{path}: unknown scanline filter type {ftype} in row {y}")
        out[y] = cur
        prev = cur
    return out.reshape(h, w, c)


def read_png(path) -> np.ndarray:
    """Decode a non-interlaced 8-bit PNG (grey, grey+alpha, RGB, RGBA): uint8 (H, W) or (H, W, C).

    For an APNG this is the default image (the first frame). Anything else raises ValueError.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror or e})") from None
    chunks = png_chunks(data, path)
    if chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise ValueError(f"{path}: the first chunk must be a 13-byte IHDR")
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if not (1 <= w < 2**31 and 1 <= h < 2**31):
        raise ValueError(f"{path}: IHDR says {w}x{h} pixels; the PNG spec requires width and height "
                         "in [1, 2**31)")
    if depth != 8 or ctype not in _CHANNELS or comp != 0 or filt != 0 or interlace != 0:
        raise ValueError(f"{path}: unsupported PNG (bit depth {depth}, colour type {ctype}, interlace "
                         f"{interlace}); read_png handles 8-bit non-interlaced grey/RGB(A)")
    idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
    try:
        raw = zlib.decompress(idat)
    except zlib.error as e:
        raise ValueError(f"{path}: corrupt image data ({e})") from None
    img = _unfilter(raw, h, w, _CHANNELS[ctype], path)
    return img[:, :, 0] if img.shape[2] == 1 else img


# ---------------------------------------------------------------------------------------------
# Grids and strips

def upscale(img, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (H, W) or (H, W, C) by an integer factor >= 1."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"upscale factor must be an integer >= 1, got {factor}")
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"upscale expects (H, W) or (H, W, C), got shape {img.shape}")
    return img if factor == 1 else np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def to_hwc_uint8(images) -> np.ndarray:
    """(N, C, H, W) or (N, H, W) model data (float in [-1, 1], or uint8) -> uint8 (N, H, W, C)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4) or images.shape[0] < 1:
        raise ValueError(f"images must have shape (N, C, H, W) with C in {{1, 3, 4}} or (N, H, W), "
                         f"N >= 1, got {images.shape}")
    if images.dtype != np.uint8:
        from .data import to_uint8
        images = to_uint8(images)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def make_grid(images, nrow=None, padding: int = 1, pad_value: int = 0, scale: int = 1) -> np.ndarray:
    """Tile N images into one: uint8 (H', W') for grey input, (H', W', C) otherwise.

    images: (N, C, H, W) or (N, H, W), float in [-1, 1] (scaled back with ``to_uint8``) or uint8.
    nrow: images per row (default ceil(sqrt(N))); rows = ceil(N / nrow). Each image is upscaled by
    ``scale`` (nearest) and separated by ``padding`` pixels of ``pad_value`` (also around the edge):
    ``H' = rows * (H * scale + padding) + padding``, ``W' = nrow * (W * scale + padding) + padding``.
    """
    imgs = to_hwc_uint8(images)                                       # (N, H, W, C)
    n, h, w, c = imgs.shape
    nrow = int(np.ceil(np.sqrt(n))) if nrow is None else int(nrow)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    padding, scale, pad_value = int(padding), int(scale), int(pad_value)
    if padding < 0 or scale < 1 or not 0 <= pad_value <= 255:
        raise ValueError(f"need padding >= 0, scale >= 1, pad_value in 0..255; got {padding}, {scale}, {pad_value}")
    nrow = min(nrow, n)
    rows = -(-n // nrow)
    hs, ws = h * scale, w * scale
    grid = np.full((rows * (hs + padding) + padding, nrow * (ws + padding) + padding, c), pad_value,
                   dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = padding + r * (hs + padding), padding + q * (ws + padding)
        grid[y0:y0 + hs, x0:x0 + ws] = upscale(imgs[i], scale)
    return grid[:, :, 0] if c == 1 else grid


def make_strip(images, padding: int = 1, pad_value: int = 0, scale: int = 1) -> np.ndarray:
    """All images in one row (``make_grid`` with ``nrow = N``): e.g. one image noised at increasing t."""
    n = np.asarray(images).shape[0]
    return make_grid(images, nrow=n, padding=padding, pad_value=pad_value, scale=scale)


# ---------------------------------------------------------------------------------------------
# Animations

def _frames(frames) -> np.ndarray:
    """uint8 (F, H, W, C) from a sequence of equal-shaped (H, W) / (H, W, C) uint8 images."""
    if isinstance(frames, np.ndarray):
        arr = frames
        if arr.ndim == 3:
            arr = arr[..., None]
    else:
        frames = [_check_image(f, f"frame {i}") for i, f in enumerate(frames)]
        if not frames:
            raise ValueError("an animation needs at least one frame, got none")
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise ValueError(f"all frames must have one shape, got {sorted(shapes)}")
        arr = np.stack(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] < 1 or arr.shape[3] not in _COLOUR_TYPES:
        raise ValueError(f"frames must be uint8 (F, H, W) or (F, H, W, C) with F >= 1, C in 1..4; got "
                         f"{arr.dtype} {arr.shape}")
    if not (1 <= arr.shape[1] < 2**31 and 1 <= arr.shape[2] < 2**31) or arr.shape[0] >= 2**31:
        raise ValueError(f"frame height and width must be in [1, 2**31) (and fewer than 2**31 frames), "
                         f"got {arr.shape[0]} frames of {arr.shape[1]}x{arr.shape[2]}")
    return arr


def _delays(delay_ms, f: int) -> list:
    try:
        d = np.asarray(delay_ms, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"delay_ms must be a number or one number per frame, got {delay_ms!r}") from None
    d = np.broadcast_to(d, (f,)) if d.ndim == 0 else d
    if d.shape != (f,):
        raise ValueError(f"delay_ms must be a number or have one entry per frame ({f}), got shape {d.shape}")
    if not np.all(np.isfinite(d)) or np.any(d < 0) or np.any(d > 65535):
        raise ValueError(f"frame delays must lie in [0, 65535] ms, got range [{d.min()}, {d.max()}]")
    return [int(round(float(v))) for v in d]


def _loop(loop, most: int, what: str) -> int:
    if isinstance(loop, (bool, np.bool_)) or not isinstance(loop, (int, np.integer)) or not 0 <= loop <= most:
        raise ValueError(f"loop must be an integer in [0, {most}] (0 = forever) for {what}, got {loop!r}")
    return int(loop)


def encode_apng(frames, delay_ms=100, loop: int = 0, level: int = 6) -> bytes:
    """The bytes of an animated PNG (APNG 1.0): ``acTL``, then ``fcTL`` + ``IDAT`` for frame 0 and
    ``fcTL`` + ``fdAT`` for the others, all full-size, sequence numbers 0, 1, 2, ... across fcTL/fdAT.

    frames: uint8 (F, H, W[, C]) or a list of equal-shaped images. delay_ms: a number or one per
    frame. loop: number of plays, 0 = forever, at most 2**31 - 1 (the APNG spec's unsigned int).
    Viewers without APNG support show frame 0.
    """
    arr = _frames(frames)
    f, h, w, c = arr.shape
    delays = _delays(delay_ms, f)
    loop = _loop(loop, 2**31 - 1, "an APNG (acTL num_plays is a PNG four-byte unsigned integer)")
    parts = [PNG_SIGNATURE, _ihdr(h, w, c), _chunk(b"acTL", struct.pack(">II", f, int(loop)))]
    seq = 0
    for i in range(f):
        # fcTL: sequence, width, height, x and y offsets, delay numerator/denominator (ms / 1000),
        # dispose_op 0 (none), blend_op 0 (source: replace the region).
        parts.append(_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, h, 0, 0, delays[i], 1000, 0, 0)))
        seq += 1
        data = _scanlines(arr[i], level)
        if i == 0:
            parts.append(_chunk(b"IDAT", data))
        else:
            parts.append(_chunk(b"fdAT", struct.pack(">I", seq) + data))
            seq += 1
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def write_apng(path, frames, delay_ms=100, loop: int = 0, level: int = 6) -> str:
    """Write an animated PNG (see :func:`encode_apng`); returns the path."""
    return _write_bytes(path, encode_apng(frames, delay_ms, loop, level))


def write_gif(path, frames, delay_ms=100, loop: int = 0) -> str:
    """Write an animated GIF through Pillow (``pip install 'ddpm-ref[cli]'``); returns the path.

    Written atomically (a temporary file in the same folder, then a rename). loop: 0 = forever,
    at most 65535."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("writing a GIF needs Pillow: pip install 'ddpm-ref[cli]' "
                          "(or write an APNG: a .png path)") from None
    arr = _frames(frames)
    if arr.shape[3] not in (1, 3):
        raise ValueError(f"GIF frames must be grey or RGB, got {arr.shape[3]} channels")
    delays = _delays(delay_ms, arr.shape[0])
    loop = _loop(loop, 65535, "a GIF (the NETSCAPE2.0 loop count is 16 bits)")
    if arr.shape[1] > 65535 or arr.shape[2] > 65535:
        raise ValueError(f"GIF frames are at most 65535x65535 pixels, got {arr.shape[1]}x{arr.shape[2]}")
    pics = [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arr]
    # Pillow writes into a temporary file beside the destination, renamed over it only when complete:
    # a failed rewrite leaves the previous GIF intact.
    return _write_atomic(path, lambda f: pics[0].save(
        f, format="GIF", save_all=True, append_images=pics[1:], duration=delays, loop=loop,
        optimize=False, disposal=1))


def write_animation(path, frames, delay_ms=100, loop: int = 0) -> str:
    """APNG for ``.png``/``.apng`` paths (no dependency), GIF for ``.gif`` (Pillow)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in (".png", ".apng"):
        return write_apng(path, frames, delay_ms, loop)
    if ext == ".gif":
        return write_gif(path, frames, delay_ms, loop)
    raise ValueError(f"animation path must end in .png, .apng or .gif, got {os.fspath(path)!r}")


# ---------------------------------------------------------------------------------------------
# Plots: a 3x5 pixel font and a line plot rendered into a raster

_FONT = {  # 3 columns x 5 rows, '#' = ink
    "0": "###|#.#|#.#|#.#|###", "1": ".#.|##.|.#.|.#.|###", "2": "###|..#|###|#..|###",
    "3": "###|..#|.##|..#|###", "4": "#.#|#.#|###|..#|..#", "5": "###|#..|###|..#|###",
    "6": "###|#..|###|#.#|###", "7": "###|..#|.#.|.#.|.#.", "8": "###|#.#|###|#.#|###",
    "9": "###|#.#|###|..#|###", ".": "...|...|...|...|.#.", "-": "...|...|###|...|...",
    "+": "...|.#.|###|.#.|...", "e": "...|###|#.#|##.|.##", " ": "...|...|...|...|...",
}
_GLYPHS = {ch: np.array([[p == "#" for p in row] for row in g.split("|")]) for ch, g in _FONT.items()}


def draw_text(canvas: np.ndarray, text: str, x: int, y: int, colour=(0, 0, 0), scale: int = 1) -> None:
    """Draw ``text`` (digits, '.', '-', '+', 'e', ' ') into an (H, W, 3) canvas, top-left at (x, y).

    Glyphs are 3x5 pixels with one pixel between characters, times ``scale``; clipped at the edges.
    """
    h, w = canvas.shape[:2]
    for i, ch in enumerate(text):
        if ch not in _GLYPHS:
            raise ValueError(f"draw_text has no glyph for {ch!r}; it draws {''.join(sorted(_GLYPHS))!r}")
        g = upscale(_GLYPHS[ch].astype(np.uint8), scale).astype(bool)
        gy, gx = np.nonzero(g)
        px, py = x + i * 4 * scale + gx, y + gy
        ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        canvas[py[ok], px[ok]] = colour


def _nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """Round tick values (steps 1, 2, 5 x 10^k) covering [lo, hi], about n of them."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** np.floor(np.log10(raw))
    step = mag * min((m for m in (1, 2, 5, 10) if m * mag >= raw), default=10)
    start = np.ceil(lo / step - 1e-9) * step
    ticks = np.arange(start, hi + step * 1e-9, step)
    return ticks[(ticks >= lo - 1e-12 * abs(step)) & (ticks <= hi + 1e-12 * abs(step))]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) < 1e6 and abs(v - round(v)) < 1e-9 * max(1.0, abs(v)):
        return str(int(round(v)))                                  # 1500, not 1.5e3
    s = f"{v:.3g}"
    if "e" in s:
        mant, ex = s.split("e")
        s = f"{mant}e{int(ex)}"
    return s


def _draw_polyline(canvas, xs, ys, colour) -> None:
    """Connect consecutive points (pixel coordinates, floats) with 1-pixel lines, vectorised."""
    h, w = canvas.shape[:2]
    if len(xs) == 1:
        xs, ys = np.repeat(xs, 2), np.repeat(ys, 2)
    x0, y0, x1, y1 = xs[:-1], ys[:-1], xs[1:], ys[1:]
    steps = np.ceil(np.maximum(np.abs(x1 - x0), np.abs(y1 - y0))).astype(np.int64) + 1   # per segment
    seg = np.repeat(np.arange(len(x0)), steps)
    start = np.cumsum(steps) - steps
    frac = (np.arange(steps.sum()) - start[seg]) / np.maximum(steps[seg] - 1, 1)
    px = np.rint(x0[seg] + frac * (x1[seg] - x0[seg])).astype(np.int64)
    py = np.rint(y0[seg] + frac * (y1[seg] - y0[seg])).astype(np.int64)
    ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    canvas[py[ok], px[ok]] = colour


_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def plot_curves(series, x=None, width: int = 640, height: int = 400, log_y: bool = False,
                colours=None, font_scale: int = 2) -> np.ndarray:
    """Line plot of one or more curves as a uint8 (height, width, 3) RGB raster.

    series: a 1-D array or a list of 1-D arrays (same length as ``x``; ``x`` defaults to 0, 1, ...).
    The axes span all finite values; tick labels use a 3x5 pixel font. log_y: plot log10(y) with
    ticks at powers of ten (and 2 and 5 times them when the data span under three decades; all y
    must then be > 0). Non-finite values are skipped (the line breaks). font_scale: tick-label size.
    """
    if width < 80 or height < 60:
        raise ValueError(f"plot needs width >= 80 and height >= 60, got {width}x{height}")
    try:
        if len(series) == 0:
            raise ValueError("empty")
        ys = [np.asarray(series, dtype=np.float64)] if np.ndim(series[0]) == 0 else \
            [np.asarray(s, dtype=np.float64) for s in series]
    except (ValueError, TypeError, IndexError, KeyError):
        raise ValueError("series must be a non-empty 1-D array of numbers or a non-empty list of them, "
                         f"got {str(series)[:80]}") from None
    n = ys[0].shape[0] if ys[0].ndim else 0
    if n == 0 or any(s.ndim != 1 or s.shape[0] != n for s in ys):
        raise ValueError(f"series must be non-empty 1-D arrays of one length, got {[s.shape for s in ys]}")
    try:
        xv = np.arange(n, dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"x must be {n} numbers, got {str(x)[:80]}") from None
    if xv.shape != (n,):
        raise ValueError(f"x must have shape ({n},), got {xv.shape}")
    if not np.any(np.isfinite(xv)):
        raise ValueError("x holds no finite values to plot against")
    if log_y:
        finite = [s[np.isfinite(s)] for s in ys]
        if any(np.any(f <= 0) for f in finite):
            raise ValueError("log_y needs every finite y > 0")
        ys = [np.where(np.isfinite(s) & (s > 0), np.log10(np.where(s > 0, s, 1.0)), np.nan) for s in ys]
    allv = np.concatenate([s[np.isfinite(s)] for s in ys])
    if allv.size == 0:
        raise ValueError("series holds no finite values to plot")
    ylo, yhi = float(allv.min()), float(allv.max())
    if yhi - ylo < 1e-12:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    pad = 0.05 * (yhi - ylo)
    ylo, yhi = ylo - pad, yhi + pad
    xlo, xhi = float(xv[np.isfinite(xv)].min()), float(xv[np.isfinite(xv)].max())
    if xhi - xlo < 1e-12:
        xlo, xhi = xlo - 0.5, xhi + 0.5

    fs = int(font_scale)
    if fs < 1:
        raise ValueError(f"font_scale must be >= 1, got {font_scale}")
    if log_y:
        yt = np.arange(np.ceil(ylo - 1e-9), np.floor(yhi + 1e-9) + 1)
        if yhi - ylo < 3:                                              # few decades: 1, 2, 5 x 10^k
            yt = np.log10(np.outer([1.0, 2.0, 5.0], 10.0 ** np.arange(np.floor(ylo), np.ceil(yhi) + 1)).ravel())
            yt = np.sort(yt[(yt >= ylo) & (yt <= yhi)])
        labels = [_fmt(float(f"{10 ** v:.3g}")) for v in yt]
    else:
        yt = _nice_ticks(ylo, yhi)
        labels = [_fmt(v) for v in yt]
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    label_w = max((4 * len(lab) - 1) * fs for lab in labels) if labels else 0
    left, right, top, bottom = label_w + 10, 6 * fs + 4, 4 * fs, 5 * fs + 10   # margins in pixels
    pw, ph = width - left - right, height - top - bottom
    if pw < 20 or ph < 20:
        raise ValueError(f"plot of {width}x{height} leaves no room for the axes; make it larger")

    def to_px(xd, yd):
        return (left + (xd - xlo) / (xhi - xlo) * (pw - 1),
                top + (yhi - yd) / (yhi - ylo) * (ph - 1))

    grid_c, axis_c, text_c = (225, 225, 225), (0, 0, 0), (60, 60, 60)
    for v, lab in zip(yt, labels):
        _, py = to_px(xlo, v)
        r = int(round(py))
        if top <= r < top + ph:
            canvas[r, left:left + pw] = grid_c
            canvas[r, left - 3:left] = axis_c
            draw_text(canvas, lab, left - 5 - (4 * len(lab) - 1) * fs, r - 2 * fs, text_c, fs)
    for v in _nice_ticks(xlo, xhi, 6):
        px, _ = to_px(v, ylo)
        c = int(round(px))
        if left <= c < left + pw:
            canvas[top:top + ph, c] = np.minimum(canvas[top:top + ph, c], grid_c)
            canvas[top + ph:top + ph + 3, c] = axis_c
            lab = _fmt(v)
            draw_text(canvas, lab, c - (4 * len(lab) - 1) * fs // 2, top + ph + 5, text_c, fs)
    canvas[top:top + ph, left - 1] = axis_c                           # y axis
    canvas[top + ph, left - 1:left + pw] = axis_c                     # x axis

    colours = colours or _PALETTE
    for i, s in enumerate(ys):
        ok = np.isfinite(s) & np.isfinite(xv)
        # Break the line at non-finite values: draw each finite run separately.
        breaks = np.flatnonzero(np.diff(ok.astype(np.int8)) != 0) + 1
        for run in np.split(np.arange(n), breaks):
            if run.size and ok[run[0]]:
                px, py = to_px(xv[run], s[run])
                _draw_polyline(canvas, px, py, colours[i % len(colours)])
    return canvas


def write_loss_curve(path, losses, steps=None, log_y: bool = True, smooth: int = 0,
                     width: int = 640, height: int = 400, font_scale: int = 2) -> str:
    """Plot a training loss curve to a PNG: raw losses, plus a moving average of ``smooth`` steps
    (drawn over them, darker) when ``smooth > 1``. Returns the path."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.size == 0:
        raise ValueError(f"losses must be a non-empty 1-D array, got shape {losses.shape}")
    series, colours = [losses], [(31, 119, 180)]
    if smooth > 1 and losses.size >= smooth:
        # Trailing moving average; the first smooth-1 entries average what exists so far.
        c = np.cumsum(np.where(np.isfinite(losses), losses, 0.0))
        k = np.cumsum(np.isfinite(losses).astype(np.float64))
        lo = np.concatenate([np.zeros(smooth), c[:-smooth]])[: losses.size]
        lk = np.concatenate([np.zeros(smooth), k[:-smooth]])[: losses.size]
        count = k - lk                                # finite losses in each window
        # A window without a finite loss has no average: NaN, so the line breaks there (0.0 would
        # draw a fake drop and break log_y).
        avg = np.where(count > 0, (c - lo) / np.maximum(count, 1), np.nan)
        series, colours = [losses, avg], [(166, 206, 227), (8, 48, 107)]
    img = plot_curves(series, x=steps, width=width, height=height, log_y=log_y, colours=colours,
                      font_scale=font_scale)
    return write_png(path, img)
