"""Tests for ddpm_ref/rng.py: the Philox4x32-10 noise contract.

Known answers (Random123 / REFERENCE.md), the documented counter layout (random_bits against the
bare bijection), the uint32 -> float mappings against naive float64 evaluations, the statistics of
uniforms and normals (moments and a Kolmogorov-Smirnov statistic computed here), independence from
batch size and order, disjoint streams, and the ValueErrors.
"""
import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_ref import rng
from ddpm_ref.rng import Stream

KNOWN_ANSWERS = [
    # (counter, key) -> output, from REFERENCE.md (the Random123 known-answer tests)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def documented_counters(index, step, sub, n_words):
    """The counters of the module docstring: (element // 4, index, step, sub), one per block."""
    n_blocks = (n_words + 3) // 4
    index = np.asarray(index, dtype=np.uint32)
    c = np.zeros((index.shape[0], n_blocks, 4), dtype=np.uint32)
    c[..., 0] = np.arange(n_blocks, dtype=np.uint32)[None, :]
    c[..., 1] = index[:, None]
    c[..., 2] = np.broadcast_to(np.asarray(step, dtype=np.uint32), index.shape)[:, None]
    c[..., 3] = np.broadcast_to(np.asarray(sub, dtype=np.uint32), index.shape)[:, None]
    return c


def naive_normal(words):
    """Box-Muller written out directly in float64 (np.log, np.cos, np.sin), rounded once to float32."""
    u = ((words.astype(np.uint64) >> np.uint64(8)) | np.uint64(1)).astype(np.float64) * 2.0 ** -24
    u0, u1 = u[..., 0::2], u[..., 1::2]
    r = np.sqrt(-2.0 * np.log(u0))
    z = np.empty(u.shape, dtype=np.float64)
    z[..., 0::2] = r * np.cos(2.0 * np.pi * u1)
    z[..., 1::2] = r * np.sin(2.0 * np.pi * u1)
    return z.astype(np.float32)


def ks_statistic(sample, cdf):
    """Kolmogorov-Smirnov statistic sup |F_n(x) - F(x)| of a 1-D sample against a vectorised cdf."""
    x = np.sort(np.asarray(sample, dtype=np.float64))
    n = x.shape[0]
    f = cdf(x)
    i = np.arange(1, n + 1, dtype=np.float64)
    return max(float(np.max(i / n - f)), float(np.max(f - (i - 1) / n)))


def ks_critical(n, alpha):
    """Asymptotic KS critical value: P(sqrt(n) D > c) ~ 2 exp(-2 c^2), so c = sqrt(-ln(alpha/2) / 2)."""
    return math.sqrt(-math.log(alpha / 2.0) / 2.0) / math.sqrt(n)


_ERF = np.frompyfunc(math.erf, 1, 1)


def normal_cdf(x):
    return 0.5 * (1.0 + _ERF(x / math.sqrt(2.0)).astype(np.float64))


# --------------------------------------------------------------------------------------------
# The bijection


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    out = rng.philox4x32(np.array(counter, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert out.dtype == np.uint32 and out.shape == (4,)
    assert [int(v) for v in out] == list(expected)          # exact: the GPU must match bit for bit


def test_known_answers_vectorised_with_per_counter_keys():
    counters = np.array([c for c, _, _ in KNOWN_ANSWERS], dtype=np.uint32).reshape(3, 1, 4)
    keys = np.array([k for _, k, _ in KNOWN_ANSWERS], dtype=np.uint32).reshape(3, 1, 2)
    expected = np.array([e for _, _, e in KNOWN_ANSWERS], dtype=np.uint32).reshape(3, 1, 4)
    np.testing.assert_array_equal(rng.philox4x32(counters, keys), expected)
    # A (2,) key broadcasts against a batch of counters: row 0 of the first answer, repeated.
    out = rng.philox4x32(np.zeros((5, 4), dtype=np.uint32), np.zeros(2, dtype=np.uint32))
    np.testing.assert_array_equal(out, np.tile(np.array(KNOWN_ANSWERS[0][2], dtype=np.uint32), (5, 1)))


def test_philox_is_a_bijection_on_a_slice():
    # Distinct counters give distinct outputs (a bijection); 4096 counters differing in one word.
    c = np.zeros((4096, 4), dtype=np.uint32)
    c[:, 2] = np.arange(4096)
    out = rng.philox4x32(c, np.array([7, 9], dtype=np.uint32))
    assert np.unique(out, axis=0).shape[0] == 4096


# --------------------------------------------------------------------------------------------
# The addressing (counter layout) and the float mappings


@pytest.mark.parametrize("shape,n", [((3, 32, 32), 5), ((5,), 3), ((), 4), ((7, 3), 2), ((70001,), 2)])
def test_random_bits_is_philox_on_documented_counters(shape, n):
    # (70001,) has more blocks than one slice of the implementation and is not a multiple of 4.
    index = np.arange(n) * 37 + 3
    step = np.arange(n) + 11
    words = rng.random_bits(1234, Stream.TRAIN_NOISE, index, step, shape, sub=5)
    size = int(np.prod(shape, dtype=np.int64))
    assert words.shape == (n,) + shape and words.dtype == np.uint32
    expected = rng.philox4x32(documented_counters(index, step, 5, size),
                              np.array([1234, Stream.TRAIN_NOISE], dtype=np.uint32))
    np.testing.assert_array_equal(words.reshape(n, size), expected.reshape(n, -1)[:, :size])


@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), stream=st.integers(0, 2**32 - 1),
       index=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6),
       step=st.integers(0, 2**32 - 1), sub=st.integers(0, 2**32 - 1), size=st.integers(0, 23))
def test_random_bits_layout_property(seed, stream, index, step, sub, size):
    words = rng.random_bits(seed, stream, index, step, (size,), sub)
    expected = rng.philox4x32(documented_counters(index, step, sub, size),
                              np.array([seed, stream], dtype=np.uint32))
    np.testing.assert_array_equal(words, expected.reshape(len(index), -1)[:, :size])


def test_uniform_mapping_and_open_interval():
    words = np.array([0, 1, 255, 256, 0x7FFFFFFF, 0xFFFFFF00, 0xFFFFFFFF], dtype=np.uint32)
    u = rng.bits_to_uniform(words)
    # ((w >> 8) | 1) * 2**-24, exact in float32: 0 -> 2**-24, 0xFFFFFFFF -> 1 - 2**-24.
    expected = np.array([1, 1, 1, 1, 0x7FFFFF, 0xFFFFFF, 0xFFFFFF], dtype=np.float64) * 2.0 ** -24
    np.testing.assert_array_equal(u.astype(np.float64), expected)
    assert u.dtype == np.float32 and u.min() > 0.0 and u.max() < 1.0
    draws = rng.uniform(5, Stream.DATA, np.arange(64), 0, (1000,))
    assert draws.dtype == np.float32 and draws.min() > 0.0 and draws.max() < 1.0
    np.testing.assert_array_equal(draws, rng.bits_to_uniform(rng.random_bits(5, Stream.DATA, np.arange(64), 0, (1000,))))


def test_normal_is_float64_box_muller_of_the_words():
    index = np.arange(64)
    z = rng.normal(3, Stream.SAMPLE_STEP, index, 999, (3, 32, 32))
    words = rng.random_bits(3, Stream.SAMPLE_STEP, index, 999, (3, 32, 32))
    assert z.dtype == np.float32 and z.shape == (64, 3, 32, 32)
    np.testing.assert_array_equal(rng.bits_to_normal(words.reshape(64, -1)).reshape(z.shape), z)
    naive = naive_normal(words.reshape(64, -1)).reshape(z.shape)
    # The table-driven cos/sin agree with direct float64 cos/sin to ~1e-15, so after the single
    # rounding to float32 the values are identical except at (vanishingly rare) rounding ties,
    # which can differ by one float32 ulp. This is the definition the GPU kernels reproduce.
    diff = np.abs(z.astype(np.float64) - naive.astype(np.float64))
    assert np.all(diff <= np.spacing(np.abs(naive)).astype(np.float64))
    assert np.count_nonzero(diff) <= 2
    # Odd element counts: the tail of the last block is dropped, not shifted.
    z7 = rng.normal(3, Stream.SAMPLE_STEP, [4], 0, (7,))
    z8 = rng.normal(3, Stream.SAMPLE_STEP, [4], 0, (8,))
    np.testing.assert_array_equal(z7[0], z8[0, :7])


def test_randint_and_permutation():
    index = np.arange(20000)
    k = rng.randint(1, Stream.TIMESTEP, index, 1000)
    assert k.dtype == np.int64 and k.min() >= 0 and k.max() <= 999
    words = rng.random_bits(1, Stream.TIMESTEP, index, 0, (1,))[:, 0].astype(np.uint64)
    np.testing.assert_array_equal(k, ((words * np.uint64(1000)) >> np.uint64(32)).astype(np.int64))
    # Each of 1000 values has expected count 20; the chi-square statistic (999 degrees of freedom,
    # mean 999, sd 44.7) stays below mean + 5 sd.
    counts = np.bincount(k, minlength=1000)
    chi2 = float(np.sum((counts - 20.0) ** 2 / 20.0))
    assert chi2 < 999 + 5 * math.sqrt(2 * 999)
    p = rng.permutation(2, Stream.DATA_ORDER, 1000, step=3)
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, rng.permutation(2, Stream.DATA_ORDER, 1000, step=3))
    assert not np.array_equal(p, rng.permutation(2, Stream.DATA_ORDER, 1000, step=4))


# --------------------------------------------------------------------------------------------
# Statistics. All draws are deterministic (fixed seeds), so a bound either always holds or always
# fails; the bounds are the usual 5-sigma / alpha = 1e-4 levels, stated for what a fresh stream
# would do.

N_STAT = 200_000


def test_uniform_moments_and_ks():
    u = rng.uniform(11, Stream.EVAL, np.arange(200), 0, (1000,)).ravel().astype(np.float64)
    n = u.shape[0]
    assert n == N_STAT
    # Mean 1/2 with sd sqrt(1/12 / n); variance 1/12 with sd sqrt((1/80 - 1/144) / n); 5 sd each.
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / n)
    d = ks_statistic(u, lambda x: x)
    assert d < ks_critical(n, alpha=1e-4)            # 2.23 / sqrt(n) = 0.0050
    # Each of the four word positions of a block is uniform too (mean within 5 sd).
    per_word = u.reshape(200, 250, 4)
    for w in range(4):
        assert abs(per_word[..., w].mean() - 0.5) < 5 * math.sqrt(1 / 12 / (n / 4))


def test_normal_moments_and_ks():
    z = rng.normal(12, Stream.EVAL, np.arange(200), 0, (1000,)).astype(np.float64)
    x = z.ravel()
    n = x.shape[0]
    # Standard errors of the sample moments of N(0, 1): mean 1/sqrt(n), variance sqrt(2/n),
    # skewness sqrt(6/n), kurtosis sqrt(24/n). Bounds: 5 standard errors.
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1.0) < 5 * math.sqrt(2 / n)
    xc = (x - x.mean()) / x.std()
    assert abs(np.mean(xc ** 3)) < 5 * math.sqrt(6 / n)
    assert abs(np.mean(xc ** 4) - 3.0) < 5 * math.sqrt(24 / n)
    d = ks_statistic(x, normal_cdf)
    assert d < ks_critical(n, alpha=1e-4)
    # The two members of a Box-Muller pair are uncorrelated, and so are neighbouring pairs:
    # sample correlation of independent normals has sd 1/sqrt(m).
    blocks = z.reshape(-1, 4)
    m = blocks.shape[0]
    for a, b in ((0, 1), (2, 3), (0, 2), (1, 3)):
        assert abs(np.corrcoef(blocks[:, a], blocks[:, b])[0, 1]) < 5 / math.sqrt(m)
    # Every position in a block has unit variance (5 sd of the variance estimate).
    for w in range(4):
        assert abs(blocks[:, w].var() - 1.0) < 5 * math.sqrt(2 / m)


def test_ks_against_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    z = rng.normal(13, Stream.EVAL, np.arange(50), 0, (1000,)).ravel().astype(np.float64)
    # Our KS statistic against scipy's, same data: equal to rounding.
    assert abs(ks_statistic(z, normal_cdf) - stats.kstest(z, "norm").statistic) < 1e-12
    assert stats.kstest(z, "norm").pvalue > 1e-4


# --------------------------------------------------------------------------------------------
# The contract: noise depends on the address, not on the batch


def test_batch_size_and_order_independence():
    shape = (3, 5, 5)
    full = rng.normal(42, Stream.SAMPLE_STEP, np.arange(8), 17, shape)
    part = rng.normal(42, Stream.SAMPLE_STEP, [5, 2], 17, shape)
    np.testing.assert_array_equal(part[0], full[5])        # exact: same counters, same words
    np.testing.assert_array_equal(part[1], full[2])
    bits_full = rng.random_bits(42, Stream.DROPOUT, np.arange(8), 3, (9,), sub=2)
    bits_part = rng.random_bits(42, Stream.DROPOUT, [7, 0], 3, (9,), sub=2)
    np.testing.assert_array_equal(bits_part, bits_full[[7, 0]])
    # Per-sample steps: row i equals the draw made for that sample alone at its own step.
    steps = np.array([9, 0, 999, 4])
    mixed = rng.normal(42, Stream.SAMPLE_STEP, [3, 1, 6, 2], steps, shape)
    for row, (i, t) in enumerate(zip([3, 1, 6, 2], steps)):
        np.testing.assert_array_equal(mixed[row], rng.normal(42, Stream.SAMPLE_STEP, [i], int(t), shape)[0])
    # Large batches are worked in slices internally; the slicing must not show.
    big = rng.normal(42, Stream.SAMPLE_STEP, np.arange(300), 17, (3, 8, 8))
    np.testing.assert_array_equal(big[[5, 2, 299]], rng.normal(42, Stream.SAMPLE_STEP, [5, 2, 299], 17, (3, 8, 8)))


def test_threads_draw_the_same_numbers():
    # The scratch arrays are per thread: concurrent draws equal serial ones.
    expected = [rng.normal(1, Stream.EVAL, np.arange(40), s, (3, 16, 16)) for s in range(4)]
    results = [None] * 4

    def work(s):
        for _ in range(3):
            results[s] = rng.normal(1, Stream.EVAL, np.arange(40), s, (3, 16, 16))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(4):
        np.testing.assert_array_equal(results[s], expected[s])


def test_distinct_addresses_never_share_words():
    index = np.arange(16)
    base = dict(seed=7, stream=Stream.TRAIN_NOISE, step=3, sub=0)
    variants = [base] + [dict(base, seed=8), dict(base, stream=Stream.SAMPLE_STEP), dict(base, step=4),
                         dict(base, sub=1), dict(base, stream=Stream.DROPOUT, sub=1)]
    rows = np.concatenate([rng.random_bits(v["seed"], v["stream"], index, v["step"], (64,), v["sub"])
                           for v in variants])                                   # (96, 64)
    # No two rows (sample x address) are equal, not even in one 4-word block: with 32-bit words a
    # chance equality of a whole block has probability ~ 2**-128 per pair.
    blocks = rows.reshape(-1, 4)
    assert np.unique(blocks, axis=0).shape[0] == blocks.shape[0]
    # Single words collide only by chance: 6144 words, expected pairs 6144**2 / 2 / 2**32 ~ 0.004.
    assert np.unique(rows).shape[0] >= rows.size - 2
    # And the normals of different streams are uncorrelated (sd 1/sqrt(16 * 64)).
    a = rng.normal(7, Stream.SAMPLE_INIT, index, 0, (64,)).ravel()
    b = rng.normal(7, Stream.SAMPLE_STEP, index, 0, (64,)).ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "1", None])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        rng.normal(seed, Stream.EVAL, [0], 0, (2,))


@pytest.mark.parametrize("kwargs,match", [
    (dict(stream=-1), "stream"),
    (dict(stream=2**32), "stream"),
    (dict(stream=1.0), "stream"),
    (dict(index=[-1]), "index"),
    (dict(index=[2**32]), "index"),
    (dict(index=[0.5]), "index"),
    (dict(index=[[0, 1]]), "index"),
    (dict(step=-3), "step"),
    (dict(step=[1, 2, 3]), "step"),
    (dict(sub=[1, 2, 3]), "sub"),
    (dict(shape=(2, -1)), "shape"),
    (dict(shape=(2.5,)), "shape"),
    (dict(shape="ab"), "shape"),
])
def test_bad_address(kwargs, match):
    args = dict(seed=0, stream=Stream.EVAL, index=[0, 1], step=0, shape=(4,), sub=0)
    args.update(kwargs)
    for fn in (rng.random_bits, rng.uniform, rng.normal):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def test_bad_philox_and_conversion_input():
    with pytest.raises(ValueError, match="counter"):
        rng.philox4x32(np.zeros((2, 3), np.uint32), np.zeros(2, np.uint32))
    with pytest.raises(ValueError, match="key"):
        rng.philox4x32(np.zeros((2, 4), np.uint32), np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match="broadcast"):
        rng.philox4x32(np.zeros((2, 4), np.uint32), np.zeros((3, 2), np.uint32))
    with pytest.raises(ValueError, match="rounds"):
        rng.philox4x32(np.zeros(4, np.uint32), np.zeros(2, np.uint32), rounds=0)
    with pytest.raises(ValueError, match="counter"):
        rng.philox4x32(np.full(4, -1), np.zeros(2, np.uint32))
    with pytest.raises(ValueError, match="even"):
        rng.bits_to_normal(np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match="uint32"):
        rng.bits_to_normal(np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="high"):
        rng.randint(0, Stream.TIMESTEP, [0], 0)
    with pytest.raises(ValueError, match="n must"):
        rng.permutation(0, Stream.DATA_ORDER, -1)


@pytest.mark.parametrize("value", [2.7, True, np.bool_(True), "5", np.float64(1000.9), 3.0, float("nan"), None])
def test_randint_and_permutation_take_only_integers(value):
    # No int() truncation, no bools or numeric strings: a named ValueError, as for seed and stream.
    with pytest.raises(ValueError, match=r"high must be an integer in \[1, 2\*\*32\], got "):
        rng.randint(0, Stream.TIMESTEP, np.arange(3), value)
    with pytest.raises(ValueError, match=r"n must be an integer in \[0, 2\*\*32\], got "):
        rng.permutation(0, Stream.DATA_ORDER, value)
    # NumPy integers are integers.
    np.testing.assert_array_equal(rng.randint(0, Stream.TIMESTEP, np.arange(3), np.int32(7)),
                                  rng.randint(0, Stream.TIMESTEP, np.arange(3), 7))
    np.testing.assert_array_equal(rng.permutation(0, Stream.DATA_ORDER, np.uint8(9)),
                                  rng.permutation(0, Stream.DATA_ORDER, 9))


@pytest.mark.parametrize("n", [2**32 + 1, 2**40])
def test_permutation_checks_n_before_allocating(n):
    # The indices are counter word c1, so n <= 2**32; the check comes before np.arange(n) (which
    # would be 32 GiB or 8 TiB): a ValueError at once, not a MemoryError.
    with pytest.raises(ValueError, match=rf"n must be an integer in \[0, 2\*\*32\], got {n}"):
        rng.permutation(0, Stream.DATA_ORDER, n)


@pytest.mark.parametrize("shape", [(2**34 + 1,), (2**63,), (2**64,), (20, (2**62 + 1) // 5),
                                   (2**32 + 1, 2**32 - 1), (2**32 + 1, 2**32 + 1), (2**17, 2**17 + 1)])
def test_shape_size_guard_uses_exact_element_counts(shape):
    # The element count is a Python int: int64 products of these wrap (to negative, 4, -1, 2**33 + 1),
    # which slipped past the guard into raw numpy errors or a 32 GiB allocation.
    for fn in (rng.random_bits, rng.uniform, rng.normal):
        with pytest.raises(ValueError, match=r"has more than 2\*\*34 elements per sample"):
            fn(0, Stream.EVAL, [0], 0, shape)


def test_shape_size_guard_boundary_is_2_to_the_34():
    # Elements 0 .. 2**34 - 1 use blocks c0 = 0 .. 2**32 - 1: exactly 2**34 elements fit (checked on
    # _prepare, which allocates nothing), and the last block is Philox at counter c0 = 2**32 - 1.
    assert rng._prepare(0, 1, [0], 0, 0, (2**34,))[-1] == 2**34
    assert rng._prepare(0, 1, [0], 0, 0, (2**17, 2**17))[-1] == 2**34
    with pytest.raises(ValueError, match=r"more than 2\*\*34"):
        rng._prepare(0, 1, [0], 0, 0, (2**34 + 1,))
    index, step, sub = np.array([5], np.uint32), np.asarray(7, np.uint32), np.asarray(2, np.uint32)
    c02, c13 = rng._block_lanes(rng._scratch(), 3, 4, index, step, sub, 0, 1, 2**32 - 2, 2**32)
    words = np.stack([c02[0, 0], c13[0, 0], c02[1, 0], c13[1, 0]], axis=-1)      # (2 blocks, 4)
    counters = np.array([[2**32 - 2, 5, 7, 2], [2**32 - 1, 5, 7, 2]], dtype=np.uint32)
    np.testing.assert_array_equal(words, rng.philox4x32(counters, np.array([3, 4], np.uint32)))


@pytest.mark.parametrize("dtype", [np.float16, np.int32, bool, np.uint32, None, "junk", np.complex64])
def test_bits_to_uniform_takes_only_float32_or_float64(dtype):
    # float16 turned every word into inf (2**24 - 1 overflows it) and integer dtypes into 0.
    with pytest.raises(ValueError, match=r"dtype must be float32 or float64, got "):
        rng.bits_to_uniform(np.arange(4, dtype=np.uint32), dtype)


def test_bits_to_uniform_float64_holds_the_same_values():
    words = rng.random_bits(0, Stream.EVAL, [0, 1], 0, (64,))
    u32, u64 = rng.bits_to_uniform(words), rng.bits_to_uniform(words, "float64")
    assert u64.dtype == np.float64 and rng.bits_to_uniform(words, np.float32).dtype == np.float32
    np.testing.assert_array_equal(u32.astype(np.float64), u64)      # both exact


def test_speed_benchmark_runs_at_toy_size(capsys):
    # Keeps benchmarks/rng_speed.py working; no time is asserted (machines differ and are shared).
    import pathlib
    import runpy

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "rng_speed.py"
    medians = runpy.run_path(str(script), run_name="rng_speed")["main"](["--runs", "2", "--shape", "2", "3", "5"])
    assert set(medians) == {"ddpm_ref.rng.normal", "ddpm_ref.rng.random_bits", "numpy Generator.standard_normal"}
    assert all(ms > 0.0 for ms in medians.values())
    assert "(2, 3, 5)" in capsys.readouterr().out
