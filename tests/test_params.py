"""Tests for ddpm_ref/params.py: the flat parameter buffer and its named views (pure bookkeeping, so
every comparison here is exact)."""
import numpy as np
import pytest

from ddpm_ref.params import ParamLayout


def test_offsets_sizes_and_order():
    layout = ParamLayout([("a.weight", (2, 3)), ("a.bias", (2,)), ("b", ()), ("c", (4, 1, 1))])
    assert layout.size == 6 + 2 + 1 + 4
    assert layout.offsets == {"a.weight": 0, "a.bias": 6, "b": 8, "c": 9}
    assert layout.names == ["a.weight", "a.bias", "b", "c"]
    assert layout.index("b") == 2 and len(layout) == 4 and "c" in layout
    assert list(layout) == [("a.weight", (2, 3)), ("a.bias", (2,)), ("b", ()), ("c", (4, 1, 1))]


def test_named_views_write_through_and_tile_the_buffer():
    layout = ParamLayout([("w", (3, 4)), ("b", (3,)), ("g", (5,))])
    flat = np.arange(layout.size, dtype=np.float32)
    views = layout.named(flat)
    assert views["w"].shape == (3, 4) and views["b"].shape == (3,)
    # the views are windows on the flat buffer, not copies
    assert all(np.shares_memory(v, flat) for v in views.values())
    np.testing.assert_array_equal(views["b"], [12, 13, 14])
    views["g"][...] = -1
    np.testing.assert_array_equal(flat[15:], -1)
    # concatenating the views in order gives the buffer back exactly
    np.testing.assert_array_equal(np.concatenate([v.ravel() for v in views.values()]), flat)


def test_flatten_round_trip_and_dtype():
    layout = ParamLayout([("w", (2, 2)), ("b", (2,))])
    tensors = {"b": np.array([5.0, 6.0]), "w": np.array([[1.0, 2.0], [3.0, 4.0]])}
    flat = layout.flatten(tensors)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, [1, 2, 3, 4, 5, 6])
    assert layout.zeros(np.float64).dtype == np.float64 and layout.zeros().shape == (6,)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="duplicate parameter name 'w'"):
        ParamLayout([("w", (1,)), ("w", (2,))])
    with pytest.raises(ValueError, match="negative dimension"):
        ParamLayout([("w", (-1,))])
    layout = ParamLayout([("w", (2, 2))])
    with pytest.raises(ValueError, match=r"shape \(4,\), got \(5,\)"):
        layout.named(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="floating"):
        layout.named(np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"w: expected shape \(2, 2\), got \(4,\)"):
        layout.flatten({"w": np.zeros(4)})
    with pytest.raises(ValueError, match="missing"):
        layout.flatten({})


def test_shapes_must_be_tuples_of_non_negative_integers():
    # shapes used to go through int(): (2.7,) -> (2,), "23" -> (2, 3), (True, 3) -> (1, 3)
    for shape, needle in (((2.7,), r"holds 2\.7 \(float\)"), ("23", r"got '23' \(str\)"),
                          ((True, 3), r"holds True \(bool\)"), ((np.True_, 3), r"\(bool\)"),
                          (5, r"got 5 \(int\)"), (None, "got None"), (((2,), 3), r"holds \(2,\)"),
                          ((np.float64(2.0),), r"\(float64\)")):
        with pytest.raises(ValueError, match=f"parameter 'w'.*{needle}"):
            ParamLayout([("w", shape)])
    with pytest.raises(ValueError, match=r"parameter 'w' has a negative dimension: shape \(2, -3\)"):
        ParamLayout([("w", (2, -3))])
    with pytest.raises(ValueError, match="pairs"):
        ParamLayout([5])
    # what the models pass: tuples of Python ints; also lists (JSON) and NumPy integers
    layout = ParamLayout([("a", [2, 3]), ("b", (np.int64(4), np.int32(1))), ("c", ()), ("d", (0,))])
    assert layout.shapes == {"a": (2, 3), "b": (4, 1), "c": (), "d": (0,)} and layout.size == 11
    assert all(type(d) is int for s in layout.shapes.values() for d in s)
