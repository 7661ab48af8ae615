"""Tests for ddpm_ref/safetensors.py: the NumPy-only reader and writer against the reference
`safetensors` package (test-only), in both directions, and against corrupt and truncated files.

Every comparison here is exact (tolerance 0): the format stores raw bits and both sides copy them.
"""
import json

import numpy as np
import pytest

from ddpm_ref import safetensors as st

ref = pytest.importorskip("safetensors.numpy", reason="the reference `safetensors` package "
                          "(setup.py extra `test`) is the oracle for these tests")


def _arrays(seed=0):
    """One array of every NumPy dtype safetensors knows, odd shapes included (scalar, empty)."""
    g = np.random.default_rng(seed)
    return {
        "f64": g.standard_normal((3, 5)),
        "f32": g.standard_normal((2, 3, 4)).astype(np.float32),
        "f16": g.standard_normal((7,)).astype(np.float16),
        "i64": g.integers(-2**62, 2**62, (4,)),
        "i32": g.integers(-2**31, 2**31, (2, 2), dtype=np.int32),
        "i16": g.integers(-2**15, 2**15, (3,), dtype=np.int16),
        "i8": g.integers(-128, 128, (5,), dtype=np.int8),
        "u64": g.integers(0, 2**63, (2,), dtype=np.uint64),
        "u32": g.integers(0, 2**32, (3,), dtype=np.uint32),
        "u16": g.integers(0, 2**16, (1,), dtype=np.uint16),
        "u8": g.integers(0, 256, (9,), dtype=np.uint8),
        "bool": g.integers(0, 2, (2, 3)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_ours_read_by_reference(tmp_path):
    arrays = _arrays()
    path = tmp_path / "ours.safetensors"
    st.save_file(arrays, path, metadata={"format": "np", "note": "ünïcode"})
    back = ref.load_file(str(path))
    assert set(back) == set(arrays)
    for k in arrays:
        _same(back[k], arrays[k])
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "np", "note": "ünïcode"}
    # bytes API too
    back = ref.load(st.save(arrays))
    for k in arrays:
        _same(back[k], arrays[k])


@pytest.mark.parametrize("mmap_mode", [False, True])
def test_reference_read_by_ours(tmp_path, mmap_mode):
    arrays = _arrays(1)
    path = tmp_path / "ref.safetensors"
    ref.save_file(arrays, str(path), metadata={"a": "b"})
    back = st.load_file(path, mmap_mode=mmap_mode)
    assert set(back) == set(arrays)
    for k in arrays:
        _same(back[k], arrays[k])
    assert back["f32"].flags.writeable is (not mmap_mode)
    assert st.read_metadata(path) == {"a": "b"}
    assert st.read_header(path)["f32"]["shape"] == [2, 3, 4]
    for k, v in st.load(ref.save(arrays)).items():
        _same(v, arrays[k])


def test_big_endian_input_written_little_endian(tmp_path):
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    b = np.arange(4, dtype=">i8")[::-1]                      # non-contiguous and big-endian
    back = ref.load(st.save({"a": a, "b": b}))
    _same(back["a"], a.astype("<f4"))
    _same(back["b"], b.astype("<i8"))


def test_bf16_against_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="torch (setup.py extra `test`) provides the "
                                "bfloat16 oracle")
    from safetensors.torch import save_file as torch_save, load_file as torch_load
    g = np.random.default_rng(2)
    x = np.concatenate([g.standard_normal(200).astype(np.float32) * 10.0 ** g.integers(-30, 30, 200),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8,
                                  3.0e38, 1e-40], np.float32)])
    path = tmp_path / "bf16.safetensors"
    torch_save({"w": torch.from_numpy(x).to(torch.bfloat16)}, str(path))
    ours = st.load_file(path)["w"]
    expected = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    _same(ours, expected)                      # widening BF16 -> F32 is exact
    assert st.load_file(path, raw_float=True)["w"].dtype == np.uint16
    # our rounding float32 -> BF16 equals torch's (round to nearest even), bit for bit
    st.save_file({"w": x}, path, bf16=True)
    _same(torch_load(str(path))["w"].to(torch.float32).numpy(), expected)
    nan = st.load(st.save({"n": np.array([np.nan], np.float32)}, bf16=True))["n"]
    assert np.isnan(nan).all()


def test_float8_against_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="torch provides the float8 oracle")
    from safetensors.torch import save_file as torch_save
    bits = np.arange(256, dtype=np.uint8)
    path = tmp_path / "f8.safetensors"
    t = torch.from_numpy(bits)
    torch_save({"e4": t.clone().view(torch.float8_e4m3fn), "e5": t.clone().view(torch.float8_e5m2)},
               str(path))
    ours = st.load_file(path)
    for name, dt in [("e4", torch.float8_e4m3fn), ("e5", torch.float8_e5m2)]:
        expected = t.view(dt).to(torch.float32).numpy()
        np.testing.assert_array_equal(ours[name], expected)   # NaNs compare equal positionally


def _good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    st.save_file({"a": np.arange(4, dtype=np.float32), "b": np.arange(2, dtype=np.int64)}, path)
    return path, path.read_bytes()


def _with_header(header, data, pad=True):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw[:5], "too short"),
    (lambda raw: raw[:-3], "data_offsets"),                                   # truncated data
    (lambda raw: (10 ** 9).to_bytes(8, "little") + raw[8:], "exceeds"),
    (lambda raw: (len(raw)).to_bytes(8, "little") + raw[8:], "runs past the end"),
    (lambda raw: raw + b"\0\0\0\0", "trailing bytes"),
    (lambda raw: _with_header([1, 2], b""), "JSON object"),
    (lambda raw: _with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                              bytes(12)), "overlaps"),
    (lambda raw: _with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                              bytes(8)), "hole"),
    (lambda raw: _with_header({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}},
                              bytes(4)), "unknown dtype 'F33'"),
    (lambda raw: _with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                              bytes(8)), "needs 12"),
    (lambda raw: _with_header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                              bytes(4)), "non-negative"),
    (lambda raw: _with_header({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "lacks"),
    (lambda raw: _with_header({"__metadata__": {"k": 1}}, b""), "__metadata__"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "starting with"),
    (lambda raw: raw[:8] + b"{\xff" + raw[10:], "UTF-8"),
    (lambda raw: raw[:8] + b"{x" + raw[10:], "not valid JSON"),
])
def test_corrupt_files_refused_naming_the_file(tmp_path, mutate, message):
    path, raw = _good_file(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mutate(raw))
    for mmap_mode in (False, True):
        with pytest.raises(st.SafetensorsError, match=message) as info:
            st.load_file(bad, mmap_mode=mmap_mode)
        assert str(bad) in str(info.value)
    # the reference reader refuses the same files (it is the standard we hold ours to)
    with pytest.raises(Exception):
        ref.load_file(str(bad))


def test_empty_file_and_writer_errors(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for mmap_mode in (False, True):
        with pytest.raises(st.SafetensorsError, match="0 bytes|too short"):
            st.load_file(empty, mmap_mode=mmap_mode)
    with pytest.raises(ValueError, match="complex128"):
        st.save({"c": np.zeros(2, np.complex128)})
    with pytest.raises(ValueError, match="__metadata__"):
        st.save({"__metadata__": np.zeros(2)})
    with pytest.raises(ValueError, match="metadata"):
        st.save({"a": np.zeros(2)}, metadata={"k": 3})
    # nothing half-written is left behind by a failed save
    with pytest.raises(ValueError):
        st.save_file({"c": np.zeros(2, np.complex64)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.glob("x.safetensors*"))


def test_zero_d_low_precision_floats_load_as_writable_arrays(tmp_path):
    """A shape [] BF16 / F8 tensor is a 0-d float32 ndarray like every other dtype, not a scalar."""
    data = _with_header({"bf": {"dtype": "BF16", "shape": [], "data_offsets": [0, 2]},
                         "e4": {"dtype": "F8_E4M3", "shape": [], "data_offsets": [2, 3]},
                         "e5": {"dtype": "F8_E5M2", "shape": [], "data_offsets": [3, 4]}},
                        b"\xc0\x3f" + b"\x40" + b"\x40")             # 1.5, 2.0, 2.0
    path = tmp_path / "s.safetensors"
    path.write_bytes(data)
    for out in (st.load(data), st.load_file(path), st.load_file(path, mmap_mode=True)):
        for name, value in (("bf", 1.5), ("e4", 2.0), ("e5", 2.0)):
            a = out[name]
            assert isinstance(a, np.ndarray) and a.shape == () and a.dtype == np.float32, name
            assert a == value
            a[...] = 3.0                                              # writable
    assert isinstance(st.bf16_to_float32(np.uint16(0x3FC0)), np.ndarray)


def test_bf16_bits_are_written_little_endian():
    bits = st.float32_to_bf16(np.array([1.0, -2.0], np.float32))
    assert bits.dtype.str == "<u2"
    raw = st.save({"x": np.array([1.0, -2.0], ">f4")}, bf16=True)
    assert raw.endswith(b"\x80\x3f\x00\xc0")                          # 0x3F80, 0xC000 little-endian


def test_missing_file_or_folder_raises_safetensors_error_naming_it(tmp_path):
    for path in (tmp_path / "missing.safetensors", tmp_path):
        for read in (st.load_file, lambda p: st.load_file(p, mmap_mode=True), st.read_header,
                     st.read_metadata):
            with pytest.raises(st.SafetensorsError, match="cannot read the file") as info:
                read(path)
            assert str(path) in str(info.value)
