"""Tests for ddpm_ref/image.py: PNG encode/decode, grids and strips, APNG structure, GIF, plots."""
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_ref import image as I
from ddpm_ref.data import from_uint8


# ---------------------------------------------------------------------------------------------
# PNG

@settings(max_examples=15)
@given(h=st.integers(1, 9), w=st.integers(1, 9), c=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 99))
def test_png_round_trip_is_exact(tmp_path_factory, h, w, c, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    img = img[:, :, 0] if c == 1 else img
    path = tmp_path_factory.mktemp("png") / "a.png"
    I.write_png(path, img)
    back = I.read_png(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, img)       # PNG is lossless: exact


def test_png_structure_and_crc(tmp_path):
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    data = I.encode_png(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = I.png_chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (w, h, depth, ctype, comp, filt, inter) == (4, 3, 8, 0, 0, 0, 0)
    # scanlines: filter byte 0 then the raw row
    raw = zlib.decompress(chunks[1][1])
    assert raw == b"".join(b"\0" + bytes(row) for row in img)
    assert struct.unpack(">IIBBBBB", I.png_chunks(I.encode_png(np.zeros((2, 2, 3), np.uint8)))[0][1])[3] == 2
    bad = bytearray(data)
    bad[45] ^= 0xFF                                 # flip a data byte inside IDAT (it starts at 41)
    (tmp_path / "bad.png").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="bad.png: CRC mismatch"):
        I.read_png(tmp_path / "bad.png")
    (tmp_path / "cut.png").write_bytes(data[:-12])  # IEND missing
    with pytest.raises(ValueError, match="cut.png: no IEND"):
        I.read_png(tmp_path / "cut.png")


def test_png_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        I.encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        I.encode_png(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(ValueError, match="height and width"):
        I.encode_png(np.zeros((0, 2), np.uint8))


def test_png_agrees_with_pillow_both_ways(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    r = np.random.default_rng(0)
    rgb = r.integers(0, 256, (11, 13, 3), dtype=np.uint8)
    I.write_png(tmp_path / "ours.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ours.png")), rgb)
    # Pillow writes with adaptive filters (Sub, Up, Average, Paeth): our decoder must undo them all.
    smooth = (np.add.outer(np.arange(20), np.arange(30)) * 3 % 256).astype(np.uint8)
    for name, img in (("noise.png", rgb), ("smooth.png", smooth),
                      ("rgba.png", r.integers(0, 256, (7, 9, 4), dtype=np.uint8))):
        Image.fromarray(img).save(tmp_path / name, optimize=True)
        np.testing.assert_array_equal(I.read_png(tmp_path / name), img)


# ---------------------------------------------------------------------------------------------
# Grids, strips, upscaling

def test_upscale_nearest():
    img = np.array([[1, 2], [3, 4]], np.uint8)
    np.testing.assert_array_equal(I.upscale(img, 2), [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    assert I.upscale(np.zeros((2, 3, 3), np.uint8), 4).shape == (8, 12, 3)
    with pytest.raises(ValueError, match="factor"):
        I.upscale(img, 0)


@pytest.mark.parametrize("n,nrow,pad,scale", [(1, None, 1, 1), (10, None, 2, 3), (7, 3, 0, 1), (5, 8, 1, 2)])
def test_grid_shape_and_placement(n, nrow, pad, scale):
    h, w = 3, 5
    u = np.arange(n * h * w, dtype=np.int64).reshape(n, 1, h, w) % 250 + 1   # no zeros: padding is 0
    grid = I.make_grid(u.astype(np.uint8), nrow=nrow, padding=pad, scale=scale)
    cols = min(n, int(np.ceil(np.sqrt(n))) if nrow is None else nrow)
    rows = -(-n // cols)
    assert grid.shape == (rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad)
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        np.testing.assert_array_equal(grid[y0:y0 + h * scale, x0:x0 + w * scale],
                                      I.upscale(u[i, 0].astype(np.uint8), scale))
    assert (grid == 0).sum() == grid.size - n * h * w * scale * scale   # the rest is padding


def test_grid_scales_float_data_and_rgb():
    u = np.random.default_rng(1).integers(0, 256, (4, 3, 2, 2), dtype=np.uint8)
    grid = I.make_grid(from_uint8(u), nrow=2, padding=1, pad_value=255)
    assert grid.shape == (7, 7, 3)
    np.testing.assert_array_equal(grid[1:3, 4:6], u[1].transpose(1, 2, 0))   # to_uint8 undid the scaling
    assert (grid[0] == 255).all()
    strip = I.make_strip(from_uint8(u[:, :1]), padding=0)
    assert strip.shape == (2, 8)
    with pytest.raises(ValueError, match="shape"):
        I.make_grid(np.zeros((2, 5, 4, 4), np.float32))


# ---------------------------------------------------------------------------------------------
# Animations

def _frames(n=5, h=6, w=7, c=3):
    return np.random.default_rng(n).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_apng_structure_frames_and_sequence_numbers(tmp_path):
    frames = _frames()
    path = I.write_apng(tmp_path / "a.png", frames, delay_ms=[10, 20, 30, 40, 500], loop=2)
    chunks = I.png_chunks(open(path, "rb").read())
    kinds = [k for k, _ in chunks]
    assert kinds[:3] == [b"IHDR", b"acTL", b"fcTL"] and kinds[-1] == b"IEND"
    assert kinds.count(b"fcTL") == 5 and kinds.count(b"IDAT") == 1 and kinds.count(b"fdAT") == 4
    assert struct.unpack(">II", chunks[1][1]) == (5, 2)                  # num_frames, num_plays
    seqs, delays, decoded = [], [], []
    for kind, body in chunks:
        if kind == b"fcTL":
            seq, w, h, x0, y0, dn, dd, dispose, blend = struct.unpack(">IIIIIHHBB", body)
            assert (w, h, x0, y0, dd) == (7, 6, 0, 0, 1000)
            seqs.append(seq)
            delays.append(dn)
        elif kind == b"fdAT":
            seqs.append(struct.unpack(">I", body[:4])[0])
            decoded.append(zlib.decompress(body[4:]))
        elif kind == b"IDAT":
            decoded.append(zlib.decompress(body))
    assert seqs == list(range(9))                                      # 0..2F-2, no gaps
    assert delays == [10, 20, 30, 40, 500]
    for f, raw in zip(frames, decoded):                                 # filter byte 0 + raw rows
        assert raw == b"".join(b"\0" + bytes(row) for row in f.reshape(6, -1))
    np.testing.assert_array_equal(I.read_png(path), frames[0])         # the default image


def test_apng_and_gif_read_back_by_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    frames = _frames(4, 5, 6, 1)[..., 0]                               # grey (F, H, W)
    I.write_animation(tmp_path / "a.apng", frames, delay_ms=50)
    with Image.open(tmp_path / "a.apng") as im:
        assert im.n_frames == 4
        for i in range(4):
            im.seek(i)
            np.testing.assert_array_equal(np.asarray(im.convert("L")), frames[i])
    I.write_animation(tmp_path / "a.gif", [f for f in frames], delay_ms=50)
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 4 and im.size == (6, 5)
        im.seek(3)
        # GIF palettes are 8-bit: grey levels survive exactly
        np.testing.assert_array_equal(np.asarray(im.convert("L")), frames[3])


def test_animation_errors():
    with pytest.raises(ValueError, match="at least one frame"):
        I.encode_apng([])
    with pytest.raises(ValueError, match="one shape"):
        I.encode_apng([np.zeros((2, 2), np.uint8), np.zeros((3, 2), np.uint8)])
    with pytest.raises(ValueError, match="one entry per frame"):
        I.encode_apng(_frames(3), delay_ms=[1, 2])
    with pytest.raises(ValueError, match=".png, .apng or .gif"):
        I.write_animation("x.mp4", _frames(2))


# ---------------------------------------------------------------------------------------------
# Plots

def test_plot_constant_and_rising_lines_land_where_expected():
    line = (31, 119, 180)
    img = I.plot_curves(np.full(50, 3.0), width=200, height=120, colours=[line])
    assert img.shape == (120, 200, 3) and img.dtype == np.uint8
    ys, xs = np.nonzero((img == line).all(-1))
    assert np.unique(ys).size == 1                                     # one horizontal row
    assert xs.max() - xs.min() > 100                                   # spanning the plot area
    img = I.plot_curves([np.arange(10.0)], width=200, height=120, colours=[line])
    ys, xs = np.nonzero((img == line).all(-1))
    # rising data: the line climbs (smaller row index) from left to right
    assert np.corrcoef(xs, ys)[0, 1] < -0.99


def test_plot_log_scale_nan_breaks_and_errors(tmp_path):
    line = (8, 48, 107)
    y = 10.0 ** np.linspace(0, -3, 40)
    img = I.plot_curves([y], log_y=True, colours=[line])
    ys, xs = np.nonzero((img == line).all(-1))
    # a power law is a straight line on log axes: pixel rows are linear in columns
    assert abs(np.corrcoef(xs, ys)[0, 1]) > 0.999
    y_gap = np.arange(30.0)
    y_gap[10:20] = np.nan
    img = I.plot_curves([y_gap], colours=[line], width=300, height=200)
    xs = np.unique(np.nonzero((img == line).all(-1))[1])
    assert np.diff(xs).max() > 50                                      # a gap where the NaNs are
    with pytest.raises(ValueError, match="y > 0"):
        I.plot_curves([np.array([1.0, 0.0])], log_y=True)
    with pytest.raises(ValueError, match="no glyph"):
        I.draw_text(np.zeros((10, 10, 3), np.uint8), "loss", 0, 0)
    p = I.write_loss_curve(tmp_path / "loss.png", 1.0 / np.arange(1, 200), smooth=10, width=320, height=200)
    assert I.read_png(p).shape == (200, 320, 3)


def test_draw_text_digit_glyph():
    canvas = np.zeros((5, 3, 3), np.uint8)
    I.draw_text(canvas, "1", 0, 0, (255, 255, 255))
    np.testing.assert_array_equal(canvas[..., 0] > 0, [[0, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0], [1, 1, 1]])


# ---------------------------------------------------------------------------------------------
# Atomic writes, degenerate input

def test_failed_rewrite_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import os
    path = I.write_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "a.png.tmp").mkdir()           # a fixed temp name would collide with this
    I.write_png(path, np.full((3, 3), 7, np.uint8))
    np.testing.assert_array_equal(I.read_png(path), np.full((3, 3), 7, np.uint8))
    before = (tmp_path / "a.png").read_bytes()

    def fail(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", fail)      # the write fails before the rename
    with pytest.raises(OSError, match="No space"):
        I.write_apng(path, _frames(3))
    monkeypatch.undo()
    assert (tmp_path / "a.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.png.tmp"]


def test_failed_gif_rewrite_keeps_the_previous_gif(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    path = I.write_gif(tmp_path / "a.gif", _frames(2, c=1)[..., 0])
    before = (tmp_path / "a.gif").read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"GIF89a half a file")
        raise OSError(27, "File too large")
    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="File too large"):
        I.write_gif(path, _frames(4, c=1)[..., 0])
    monkeypatch.undo()
    assert (tmp_path / "a.gif").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.gif"]
    with pytest.raises(ValueError, match=r"loop must be an integer in \[0, 65535\].*got 70000"):
        I.write_gif(tmp_path / "b.gif", _frames(2, c=1)[..., 0], loop=70000)


def test_degenerate_images_frames_and_loops_are_refused():
    for frames in (np.zeros((2, 3, 0), np.uint8), np.zeros((2, 0, 3, 3), np.uint8)):
        with pytest.raises(ValueError, match="height and width must be in"):
            I.encode_apng(frames)
    for loop in (2**31, -1, 2.0):
        with pytest.raises(ValueError, match=r"loop must be an integer in \[0, 2147483647\]"):
            I.encode_apng(_frames(2), loop=loop)
    assert struct.unpack(">II", I.png_chunks(I.encode_apng(_frames(2), loop=2**31 - 1))[1][1]) == (2, 2**31 - 1)
    with pytest.raises(ValueError, match="delays"):
        I.encode_apng(_frames(2), delay_ms=float("nan"))
    for empty in ([], np.zeros(0)):
        with pytest.raises(ValueError, match="series must be"):
            I.plot_curves(empty)
    with pytest.raises(ValueError, match="x holds no finite values"):
        I.plot_curves([1.0, 2.0], x=[np.nan, np.nan])


@pytest.mark.parametrize("w, h", [(0, 3), (3, 0)])
def test_read_png_refuses_zero_width_or_height(tmp_path, w, h):
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    data = (I.PNG_SIGNATURE + I._chunk(b"IHDR", ihdr) + I._chunk(b"IDAT", zlib.compress(b"\0" * h))
            + I._chunk(b"IEND", b""))
    (tmp_path / "z.png").write_bytes(data)
    with pytest.raises(ValueError, match=f"z.png: IHDR says {w}x{h} pixels"):
        I.read_png(tmp_path / "z.png")


def test_loss_curve_smoothing_breaks_where_no_loss_is_finite(tmp_path):
    """A moving-average window with no finite loss is NaN (a gap), not 0: log_y still works."""
    losses = np.r_[np.linspace(1.0, 0.1, 50), np.full(20, np.nan), np.linspace(0.1, 0.05, 20)]
    p = I.write_loss_curve(tmp_path / "loss.png", losses, smooth=10, width=320, height=200)
    img = I.read_png(p)
    dark = np.unique(np.nonzero((img == (8, 48, 107)).all(-1))[1])    # the smoothed line's columns
    assert np.diff(dark).max() > 15                                    # steps 60..69: a gap
    img = I.read_png(I.write_loss_curve(tmp_path / "lin.png", losses, smooth=10, log_y=False,
                                        width=320, height=200))
    rows = np.nonzero((img == (8, 48, 107)).all(-1))[0]
    raw_rows = np.nonzero((img == (166, 206, 227)).all(-1))[0]
    assert rows.max() <= raw_rows.max() + 1                            # no fake drop to 0
