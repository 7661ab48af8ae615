"""The safetensors file format, read and written with NumPy and the standard library alone.

What it is: a reader and writer for the format Hugging Face models ship their weights in
(https://github.com/huggingface/safetensors). A file is

    [8 bytes]  N, the header length, unsigned 64-bit little-endian
    [N bytes]  a UTF-8 JSON object: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]},
               ..., "__metadata__": {"key": "value", ...}}  (optional metadata: strings only),
               padded with spaces
    [rest]     the byte buffer; tensor "name" is bytes [b, e) of it, C order, little-endian.

What it is not: a pickle reader. Nothing here executes code from a file: the header is parsed as
JSON and the data are reinterpreted as numbers, nothing else (unlike pickle-based checkpoints,
which can execute code when they are loaded). Pickle-based ``.bin``/``.pt`` files are read only through torch,
in ``ddpm_ref.interop``.

Validation (every failure raises ``SafetensorsError``, a ValueError, naming the file and the entry;
so does a missing or unreadable file, or a folder, given to a reader):
the header length fits in the file; the header is a JSON object; each entry has a known dtype, a
shape of non-negative integers and offsets with ``0 <= b <= e <= len(buffer)`` and
``e - b == prod(shape) * itemsize``; no two entries overlap and, as the reference Rust reader
demands, the entries cover the buffer exactly (no holes, no trailing bytes).

dtypes: F64, F32, F16, BF16, F8_E5M2, F8_E4M3 (the "fn" variant: no infinities), I64, I32, I16, I8,
U64, U32, U16, U8, BOOL. NumPy has no bfloat16 or 8-bit floats, so by default those are widened to
float32 exactly (BF16: the 16 bits become the high half of a float32, ``uint16 << 16``); pass
``raw_float=True`` to get their raw bit patterns (uint16 / uint8) instead. Writing takes any NumPy
array of a native dtype; ``bf16=True`` stores float arrays as BF16 (round to nearest even).
"""
import json
import math
import mmap
import os

import numpy as np

__all__ = [
    "SafetensorsError", "DTYPES", "load_file", "load", "save_file", "save", "read_header",
    "read_metadata", "bf16_to_float32", "float32_to_bf16",
]

# safetensors dtype name -> (NumPy dtype of the stored bits, item size in bytes)
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "F8_E5M2": np.dtype("u1"), "F8_E4M3": np.dtype("u1"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAME_OF = {np.dtype(v).newbyteorder("<") if v.itemsize > 1 else np.dtype(v): k
            for k, v in DTYPES.items() if k not in ("BF16", "F8_E5M2", "F8_E4M3")}

# The reference implementation refuses headers above 100 MB; so do we (a corrupt length field
# would otherwise make us allocate whatever the first 8 bytes say).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(ValueError):
    """A malformed, truncated or unsupported safetensors file (the message names the file)."""


def bf16_to_float32(bits):
    """BF16 bit patterns (uint16) -> float32, exactly: a bfloat16 is the top half of a float32."""
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32)     # a new array, even for shape ()
    wide <<= 16                                                      # in place: a 0-d result stays an array
    return wide.view(np.float32)


def float32_to_bf16(x):
    """float32 -> BF16 bit patterns (little-endian uint16), rounding to nearest, ties to even (as torch does).

    NaN stays NaN (quiet bit forced so the rounding carry cannot turn it into infinity).
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16                    # nearest even
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    out = np.where(nan, (u >> 16) | 0x40, rounded)
    return out.astype("<u2")                  # little-endian, as the file stores it, on any host


def _f8_e5m2_to_float32(bits):
    """F8_E5M2 is the top byte of an IEEE float16: widen through float16, exactly."""
    wide = np.asarray(bits, np.uint8).astype(np.uint16)
    wide <<= 8                                                       # in place: 0-d stays an array
    return wide.view(np.float16).astype(np.float32)


def _f8_e4m3_table():
    """All 256 F8_E4M3 ("fn": bias 7, no infinities, S.1111.111 = NaN) values as float32."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exponent = (b >> 3) & 0xF
    mantissa = b & 0x7
    value = np.where(exponent == 0, mantissa / 8.0 * 2.0 ** -6,
                     (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7.0))
    value = sign * value
    value[(b & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


_F8_E4M3 = _f8_e4m3_table()


def _fail(source, message):
    raise SafetensorsError(f"{source}: {message}")


def _open(path):
    """open(path, "rb"), a missing/unreadable file or a folder raising SafetensorsError naming it."""
    try:
        return open(path, "rb")
    except OSError as e:
        _fail(path, f"cannot read the file ({e.strerror or e})")


def _parse_header(buffer, source):
    """Validate the length field and the JSON header; return (entries, metadata, data_start)."""
    size = len(buffer)
    if size < 8:
        _fail(source, f"file is {size} bytes, too short for the 8-byte header length "
                      "(truncated or not a safetensors file)")
    n = int.from_bytes(bytes(buffer[:8]), "little")
    if n > MAX_HEADER_BYTES:
        _fail(source, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                      "(corrupt length field or not a safetensors file)")
    if 8 + n > size:
        _fail(source, f"header length {n} runs past the end of the {size}-byte file (truncated)")
    raw = bytes(buffer[8:8 + n])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(source, f"header is not valid UTF-8 ({e})")
    if not text.startswith("{"):
        _fail(source, f"header must be a JSON object starting with '{{', got {text[:20]!r}")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(source, f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        _fail(source, f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            _fail(source, "__metadata__ must map strings to strings, got "
                          f"{json.dumps(metadata)[:80]}")
    data_start = 8 + n
    data_len = size - data_start
    entries = {}
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            _fail(source, f"{where}: entry must be an object, got {info!r}")
        missing = {"dtype", "shape", "data_offsets"} - set(info)
        if missing:
            _fail(source, f"{where}: entry lacks {sorted(missing)}")
        dtype = info["dtype"]
        if dtype not in DTYPES:
            _fail(source, f"{where}: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            _fail(source, f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            _fail(source, f"{where}: data_offsets must be two integers [begin, end], "
                          f"got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            _fail(source, f"{where}: data_offsets {offsets} are not 0 <= begin <= end")
        if end > data_len:
            _fail(source, f"{where}: data_offsets {offsets} run past the {data_len}-byte data "
                          "buffer (truncated file)")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            _fail(source, f"{where}: data_offsets {offsets} hold {end - begin} bytes but "
                          f"{dtype} {shape} needs {expected}")
        entries[name] = (dtype, tuple(shape), begin, end)
    # No overlaps, no holes: sorted by begin, each entry starts where the last one ended.
    position, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < position:
            _fail(source, f"tensor {name!r} (bytes {begin}..{end}) overlaps tensor {previous!r} "
                          f"(which ends at {position})")
        if begin > position:
            _fail(source, f"bytes {position}..{begin} of the data buffer belong to no tensor "
                          f"(hole before {name!r})")
        position, previous = end, name
    if position != data_len:
        _fail(source, f"data buffer is {data_len} bytes but the tensors cover {position} "
                      "(trailing bytes or missing entries)")
    return entries, metadata or {}, data_start


def _decode(buffer, entries, data_start, raw_float, copy):
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        stored = DTYPES[dtype]
        count = (end - begin) // stored.itemsize
        a = np.frombuffer(buffer, dtype=stored, count=count, offset=data_start + begin)
        a = a.reshape(shape)
        if not raw_float and dtype == "BF16":
            a = bf16_to_float32(a)
        elif not raw_float and dtype == "F8_E5M2":
            a = _f8_e5m2_to_float32(a)
        elif not raw_float and dtype == "F8_E4M3":
            a = _F8_E4M3[a.reshape(-1)].reshape(shape)        # (indexing by a 0-d array gives a scalar)
        elif not a.dtype.isnative:                         # big-endian host: swap once
            a = a.astype(a.dtype.newbyteorder("="))
        elif copy:
            a = a.copy()
        out[name] = a
    return out


def load(data, source="<bytes>", raw_float=False):
    """Parse safetensors bytes -> dict name -> ndarray (copies, writable), in header order."""
    entries, _, start = _parse_header(memoryview(data), source)
    return _decode(data, entries, start, raw_float, copy=True)


def load_file(path, mmap_mode=False, raw_float=False):
    """Read a .safetensors file -> dict name -> ndarray.

    mmap_mode False (default): the file is read once into memory and the arrays are writable
    copies. mmap_mode True: the file is memory-mapped read-only and the arrays are read-only views
    of it (no copy; the mapping lives as long as the arrays do). BF16 / F8 become float32 unless
    ``raw_float`` (fresh writable arrays, 0-d ones included). A missing or unreadable path, or a
    folder, raises SafetensorsError naming it, as a malformed file does.
    """
    path = os.fspath(path)
    if mmap_mode:
        buffer = _map(path)
        try:
            entries, _, start = _parse_header(buffer, path)
        except SafetensorsError:
            buffer.close()
            raise
        return _decode(buffer, entries, start, raw_float, copy=False)
    with _open(path) as f:
        try:
            buffer = bytearray(f.read())
        except OSError as e:
            _fail(path, f"cannot read the file ({e.strerror or e})")
    entries, _, start = _parse_header(buffer, path)
    return _decode(buffer, entries, start, raw_float, copy=False)


def _map(path):
    """A read-only memory map of the whole file (SafetensorsError naming it when that fails)."""
    with _open(path) as f:
        if os.fstat(f.fileno()).st_size == 0:
            _fail(path, "file is 0 bytes, too short for the 8-byte header length")
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            _fail(path, f"cannot memory-map the file ({e})")


def _parse_file(path):
    """(entries, metadata) of a file's header, read through a memory map (the data is not read)."""
    path = os.fspath(path)
    buffer = _map(path)
    try:
        entries, metadata, _ = _parse_header(buffer, path)
    finally:
        buffer.close()
    return entries, metadata


def read_header(path):
    """The validated header of a file: dict name -> {"dtype", "shape", "data_offsets"} (no data)."""
    entries, _ = _parse_file(path)
    return {k: {"dtype": d, "shape": list(s), "data_offsets": [b, e]}
            for k, (d, s, b, e) in entries.items()}


def read_metadata(path):
    """The ``__metadata__`` dict (strings to strings) of a file, {} when it has none."""
    return _parse_file(path)[1]


def _encode(tensors, metadata, bf16):
    """(header bytes padded to a multiple of 8, list of data chunks)."""
    if not isinstance(tensors, dict):
        raise ValueError(f"tensors must be a dict name -> array, got {type(tensors).__name__}")
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"metadata must map strings to strings, got {metadata!r}")
    prepared = []
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name must be a string other than '__metadata__', got {name!r}")
        a = np.asarray(value)
        if bf16 and a.dtype.kind == "f":
            bits, kind = float32_to_bf16(a.astype(np.float32)), "BF16"
        else:
            native = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
            if native not in _NAME_OF:
                raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent; "
                                 f"expected one of {sorted(str(d) for d in _NAME_OF)}")
            bits, kind = a.astype(native, copy=False), _NAME_OF[native]
        prepared.append((name, kind, a.shape, np.ascontiguousarray(bits)))
    # Largest items first keeps every tensor aligned to its item size (the header is padded to 8).
    prepared.sort(key=lambda p: -p[3].dtype.itemsize)
    header, chunks, position = {}, [], 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, kind, shape, bits in prepared:
        header[name] = {"dtype": kind, "shape": [int(d) for d in shape],
                        "data_offsets": [position, position + bits.nbytes]}
        position += bits.nbytes
        chunks.append(bits.tobytes())
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text)) % 8)
    return len(text).to_bytes(8, "little") + text, chunks


def save(tensors, metadata=None, bf16=False):
    """dict name -> array (+ optional str->str metadata) -> safetensors bytes."""
    head, chunks = _encode(tensors, metadata, bf16)
    return head + b"".join(chunks)


def save_file(tensors, path, metadata=None, bf16=False):
    """Write dict name -> array to ``path`` atomically (a temporary file, then a rename)."""
    head, chunks = _encode(tensors, metadata, bf16)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
