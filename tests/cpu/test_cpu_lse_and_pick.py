"""crossent.cpu.lse_and_pick against scipy.special.logsumexp and a float64 NumPy reference.

Every test runs twice: through the numba kernels and through the blocked-numpy fallback
(``crossent.cpu.ENABLED = False``), so both paths are held to the same oracle.
"""

from __future__ import annotations

import concurrent.futures
import os
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from crossent import cpu

pytest.importorskip("numba")


def reference_lse(x: np.ndarray) -> np.ndarray:
    """float64 max + log(sum(exp(x - max))), the shift taken as 0 where the max is not finite."""
    x = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(x, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def assert_float32_rounding(got: np.ndarray, want64: np.ndarray) -> None:
    """got (float32) is the float32 rounding of want64, give or take one ulp."""
    assert got.dtype == np.float32
    want32 = want64.astype(np.float32)
    finite = np.isfinite(want32)
    np.testing.assert_array_equal(got[~finite], want32[~finite])
    ulp = np.spacing(np.abs(want32[finite]))
    assert np.all(np.abs(got[finite].astype(np.float64) - want64[finite]) <= 1.5 * ulp)


def random_logits(rng, n, c, dtype, spread=10.0):
    return (rng.standard_normal((n, c)) * spread).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (252, 507), (123, 1), (5, 1024), (2, 4099)])
def test_equals_scipy_logsumexp(path, dtype, shape):
    rng = np.random.default_rng(sum(shape))
    x = random_logits(rng, *shape, dtype)
    y = rng.integers(0, shape[1], shape[0])
    lse, picked = cpu.lse_and_pick(x, y)
    want = logsumexp(x.astype(np.float64), axis=1)
    assert lse.dtype == picked.dtype == dtype
    assert lse.shape == picked.shape == (shape[0],)
    np.testing.assert_array_equal(picked, x[np.arange(shape[0]), y])
    if dtype == np.float64:
        np.testing.assert_allclose(lse, want, rtol=1e-14, atol=0)
    else:
        assert_float32_rounding(lse, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masks_nan_inf_and_huge_spread(path, dtype):
    rng = np.random.default_rng(7)
    x = random_logits(rng, 12, 37, dtype)
    x[0, ::2] = -np.inf  # masked classes
    x[1, :] = -np.inf  # everything masked: log(0)
    x[2, 5] = np.nan  # NaN propagates
    x[3, :] = -np.inf
    x[3, 9] = np.nan  # NaN among -inf
    x[4, 3], x[4, 4] = 1e4, -1e4  # huge spread
    x[5, :] = 1e4  # all large: lse = 1e4 + log(37)
    x[6, :] = -1e4
    x[7, :-1] = -np.inf  # one finite class: lse is that logit
    x[8, 2] = np.inf  # +inf: lse +inf (shift 0, exp overflows)
    x[9, 2], x[9, 3] = np.inf, -np.inf
    x[10, 2], x[10, 3] = np.inf, np.nan
    x[11, :] = -3e4  # exp underflows for every entry without the shift
    y = np.arange(12) % 37
    lse, picked = cpu.lse_and_pick(x, y)
    want = reference_lse(x)
    assert np.isneginf(lse[1]) and np.isnan(lse[2]) and np.isnan(lse[3])
    assert np.isposinf(lse[8]) and np.isposinf(lse[9]) and np.isnan(lse[10])
    assert lse[7] == x[7, -1]
    np.testing.assert_array_equal(picked, x[np.arange(12), y])
    if dtype == np.float64:
        np.testing.assert_allclose(lse, want, rtol=1e-14, atol=0)
    else:
        assert_float32_rounding(lse, want)
    # scipy agrees wherever it is defined the same way (scipy gives +inf for rows with +inf too).
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(
            lse.astype(np.float64), logsumexp(x.astype(np.float64), axis=1), rtol=1e-7
        )


def test_float32_sum_is_accumulated_in_float64(path):
    # 64 terms exp(0) = 1 first, then 100000 terms exp(-17) = 4.1e-8 each: each of those is below
    # half an ulp of a float32 partial sum >= 1 and would be lost, 6.5e-5 in the lse in all.
    x = np.full((1, 64 + 100_000), -17.0, dtype=np.float32)
    x[0, :64] = 0.0
    lse, _ = cpu.lse_and_pick(x, np.array([0]))
    want = np.log(64.0 + 100_000 * np.exp(np.float64(np.float32(-17.0))))
    assert_float32_rounding(lse, np.array([want]))


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 300),
    st.floats(-1e3, 1e3),
    st.integers(0, 2**32 - 1),
)
def test_shifting_all_logits_shifts_lse(n, c, shift, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c))
    y = rng.integers(0, c, n)
    lse, picked = cpu.lse_and_pick(x, y)
    lse_s, picked_s = cpu.lse_and_pick(x + shift, y)
    np.testing.assert_allclose(lse_s - picked_s, lse - picked, atol=1e-12 * (1 + abs(shift)))


def test_empty_batch(path):
    lse, picked = cpu.lse_and_pick(np.zeros((0, 5), np.float32), np.zeros(0, np.int64))
    assert lse.shape == picked.shape == (0,) and lse.dtype == np.float32


def test_other_integer_label_dtypes(path):
    x = np.random.default_rng(0).standard_normal((9, 4))
    y = np.array([0, 1, 2, 3, 3, 2, 1, 0, 1])
    want = cpu.lse_and_pick(x, y)
    for dtype in (np.int32, np.uint8, np.int16):
        got = cpu.lse_and_pick(x, y.astype(dtype))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize(
    ("logits", "labels", "error", "match"),
    [
        (np.zeros((4, 6))[:, ::2], np.zeros(4, np.int64), ValueError, "logits must be C-contiguous"),
        (np.zeros((6, 4)).T, np.zeros(4, np.int64), ValueError, "logits must be C-contiguous"),
        (np.zeros((4, 3), np.float16), np.zeros(4, np.int64), TypeError, "float32 or float64, got float16"),
        (np.zeros((4, 3), np.int64), np.zeros(4, np.int64), TypeError, "logits must have dtype"),
        ([[0.0, 1.0]], np.zeros(1, np.int64), TypeError, "logits must be a numpy.ndarray, got list"),
        (np.zeros((2, 3, 4)), np.zeros(2, np.int64), ValueError, r"logits must be 2-D \(N, C\)"),
        (np.zeros((4, 3)), np.zeros(4), TypeError, "labels must have an integer dtype, got float64"),
        (np.zeros((4, 3)), np.zeros(5, np.int64), ValueError, r"labels must have shape \(4,\)"),
        (np.zeros((4, 3)), np.array([0, 1, 3, 0]), ValueError, r"labels must lie in \[0, 3\).*got 3"),
        (np.zeros((4, 3)), np.array([0, -100, 1, 0]), ValueError, "got -100"),
        (np.zeros((4, 3)), [0, 1, 2, 0], TypeError, "labels must be a numpy.ndarray, got list"),
    ],
)
def test_bad_input_is_named(path, logits, labels, error, match):
    with pytest.raises(error, match=match):
        cpu.lse_and_pick(logits, labels)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extra_memory_is_under_ten_percent_of_logits(path, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8000, 1000)).astype(dtype)
    y = rng.integers(0, 1000, 8000)
    cpu.lse_and_pick(x[:2], y[:2])  # compile outside the measurement
    tracemalloc.start()
    try:
        cpu.lse_and_pick(x, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 0.10 * x.nbytes, f"peak {peak} B for {x.nbytes} B of logits"


def test_available_follows_switches(monkeypatch):
    monkeypatch.setattr(cpu, "ENABLED", True)
    assert cpu.available()
    monkeypatch.setenv("CROSSENT_CPU_FAST", "0")
    assert not cpu.available()
    monkeypatch.delenv("CROSSENT_CPU_FAST")
    monkeypatch.setattr(cpu, "ENABLED", False)
    assert not cpu.available()


def test_serial_and_parallel_kernels_agree_bitwise(monkeypatch):
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        x = random_logits(rng, 301, 257, dtype)
        y = rng.integers(0, 257, 301)
        monkeypatch.setattr(cpu, "_PARALLEL_MIN_ELEMENTS", 0)
        parallel = cpu.lse_and_pick(x, y)
        monkeypatch.setattr(cpu, "_PARALLEL_MIN_ELEMENTS", x.size + 1)
        serial = cpu.lse_and_pick(x, y)
        np.testing.assert_array_equal(parallel[0], serial[0])
        np.testing.assert_array_equal(parallel[1], serial[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_works_in_a_process_forked_after_parallel_use(monkeypatch):
    # GNU OpenMP (numba's thread pool here) cannot be used in a forked child once the parent used
    # it: numba terminates such a child. The fast path must notice and run serially there.
    monkeypatch.setattr(cpu, "_PARALLEL_MIN_ELEMENTS", 0)
    rng = np.random.default_rng(9)
    x = random_logits(rng, 2000, 300, np.float32)
    y = rng.integers(0, 300, 2000)
    want, _ = cpu.lse_and_pick(x, y)
    assert cpu._parallel_pid == os.getpid()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded process" (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: compute, send the bytes, leave without running pytest's exit code
        code = 1
        try:
            lse, _ = cpu.lse_and_pick(x, y)
            os.write(write_end, lse.tobytes())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(np.frombuffer(b"".join(chunks), np.float32), want)


def test_concurrent_calls_from_threads(monkeypatch):
    monkeypatch.setattr(cpu, "_PARALLEL_MIN_ELEMENTS", 0)
    rng = np.random.default_rng(10)
    x = random_logits(rng, 3000, 200, np.float64)
    y = rng.integers(0, 200, 3000)
    want = cpu.lse_and_pick(x, y)[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: cpu.lse_and_pick(x, y)[0], range(8)))
    for got in results:
        np.testing.assert_array_equal(got, want)


def reference_nll(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log softmax(x)[y] in float64 via scipy: logsumexp(x - x_y) (exact shift by the label)."""
    x = x.astype(np.float64)
    return logsumexp(x - x[np.arange(x.shape[0]), y][:, None], axis=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nll_is_accurate_where_the_loss_is_tiny_next_to_lse(path, dtype):
    # Confident rows at logits near 1e4: the loss (1e-9 ... 1e-30) is far below ulp(lse).
    rng = np.random.default_rng(12)
    n, c = 64, 129
    x = (1e4 - rng.uniform(20, 70, (n, c))).astype(dtype)
    y = rng.integers(0, c, n)
    x[np.arange(n), y] = dtype(1e4)
    x[:8] = (rng.standard_normal((8, c)) * 3).astype(dtype)  # ordinary rows too
    x[8, 5] = x[8, y[8]]  # a tie at the maximum: log(2 + rest)
    lse, nll = cpu.lse_and_nll(x, y)
    want = reference_nll(x, y)
    assert nll.dtype == dtype
    np.testing.assert_allclose(nll, want, rtol=1e-14 if dtype == np.float64 else 2.5e-7, atol=0)
    lse2, picked = cpu.lse_and_pick(x, y)
    np.testing.assert_array_equal(lse, lse2)
    naive = lse.astype(np.float64) - picked
    if dtype == np.float32:  # what the rounding of lse costs without lse_and_nll
        assert np.max(np.abs(naive[9:] - want[9:]) / want[9:]) >= 0.99  # the whole loss lost


def test_nll_conventions_for_nonfinite_rows(path):
    x = np.zeros((4, 3))
    x[0, 0] = -np.inf  # label on a masked class: +inf
    x[1] = -np.inf  # nothing finite: -inf - (-inf) = NaN
    x[2, 2] = np.inf  # +inf elsewhere: lse +inf, nll NaN (F.cross_entropy's NaN)
    x[3, 1] = np.nan
    y = np.array([0, 0, 0, 1])
    with np.errstate(invalid="ignore"):
        lse, picked = cpu.lse_and_pick(x, y)
        want = lse - picked
    want[2] = np.nan
    _, nll = cpu.lse_and_nll(x, y)
    np.testing.assert_array_equal(nll, want)
    assert np.isposinf(nll[0]) and np.isnan(nll[1]) and np.isnan(nll[2]) and np.isnan(nll[3])
    assert np.isposinf(lse[2])
    torch = pytest.importorskip("torch")
    f_loss = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(y), reduction="none").numpy()
    np.testing.assert_array_equal(np.isnan(nll), np.isnan(f_loss))
