"""Numerical stability: huge logits, -inf masks, float32 with a wide spread, and float16 /
bfloat16 inputs accumulated in float32. The truth is always a float64 computation on the very
same (already rounded) input values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_expit, logsumexp

import crossent as ce


def truth_rows(logits, labels):
    """-log softmax(x)[y] per row in float64 by a stable log-sum-exp."""
    x = np.asarray(logits, dtype=np.float64)
    return logsumexp(x, axis=-1) - np.take_along_axis(x, labels[:, None], -1)[:, 0]


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def naive_float32_rows(logits, labels):
    """The textbook stable computation carried out in float32 arithmetic throughout:
    log sum exp(x - m) - (x_y - m), m the row maximum."""
    x = np.asarray(logits, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        shifted = x - np.where(np.isfinite(m), m, np.float32(0))
        log_s = np.log(np.sum(np.exp(shifted), axis=-1, dtype=np.float32))
    return (log_s - np.take_along_axis(shifted, labels[:, None], -1)[:, 0]).astype(np.float64)


def assert_as_accurate_as_float32_allows(rows, logits, labels):
    """Per row, crossent's error against the float64 truth is at most the naive float32
    computation's error plus a float32 tolerance of 4 eps (|loss| + 1) (STYLE.md item 8)."""
    truth = truth_rows(logits, labels)
    naive = naive_float32_rows(logits, labels)
    err = np.abs(np.asarray(rows, dtype=np.float64) - truth)
    allowed = np.abs(naive - truth) + 4 * np.finfo(np.float32).eps * (np.abs(truth) + 1)
    worst = int(np.argmax(err - allowed))
    assert np.all(err <= allowed), (worst, rows[worst], naive[worst], truth[worst])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_logits_of_plus_minus_1e4(xp, asxp, tonp, dtype):
    logits = np.array(
        [
            [1e4, -1e4, 0.0, 5.0],
            [1e4, -1e4, 0.0, 5.0],
            [-1e4, -1e4, -1e4, -1e4 + 1.0],
            [1e4, 1e4, -1e4, 0.0],
            [1e4, 1e4 - 0.5, -1e4, 0.0],
        ],
        dtype=dtype,
    )
    labels = np.array([0, 1, 2, 3, 1])
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels), reduction="sum")
    rows = tonp(ce.softmax_cross_entropy(asxp(logits), asxp(labels), reduction="none"))
    truth = truth_rows(logits, labels)
    assert np.all(np.isfinite(rows)) and np.all(np.isfinite(tonp(grad)))
    if dtype == np.float64:
        np.testing.assert_allclose(rows, truth, rtol=1e-12, atol=1e-300)
    else:
        assert_as_accurate_as_float32_allows(rows, logits, labels)
    np.testing.assert_allclose(float(tonp(loss)), truth.sum(), rtol=1e-12 if dtype == np.float64 else 2e-7)
    x64 = logits.astype(np.float64)
    softmax = np.exp(x64 - logsumexp(x64, axis=-1, keepdims=True))
    np.testing.assert_allclose(tonp(grad), softmax - np.eye(4)[labels], atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_minus_inf_on_non_target_classes(xp, asxp, tonp, dtype):
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=5.0, size=(6, 9)).astype(dtype)
    labels = rng.integers(0, 9, size=6)
    mask = rng.random((6, 9)) < 0.5
    mask[np.arange(6), labels] = False
    logits[mask] = -np.inf
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels), reduction="none")
    if dtype == np.float64:
        np.testing.assert_allclose(tonp(loss), truth_rows(logits, labels), rtol=1e-12)
    else:
        assert_as_accurate_as_float32_allows(tonp(loss), logits, labels)
    g = tonp(grad)
    assert np.all(np.isfinite(g))
    assert np.all(g[mask] == 0.0)


def test_float32_wide_spread_is_as_accurate_as_float32_allows(xp, asxp, tonp):
    """Odd shape, logits spread over +-300 plus a few huge ones: crossent's float32 loss is as
    accurate as float32 arithmetic allows, per row, and its mean within 1e-6 of the truth."""
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((253, 1009)) * 100).astype(np.float32)
    logits[::17, 5] = 3e4
    logits[3::19, 7] = -3e4
    labels = rng.integers(0, 1009, size=253)
    labels[::17][:4] = 5  # rows whose target is the (huge) maximum: loss near 0
    got = tonp(ce.softmax_cross_entropy(asxp(logits), asxp(labels), reduction="none"))
    assert got.dtype == np.float32
    assert_as_accurate_as_float32_allows(got, logits, labels)
    mean = tonp(ce.softmax_cross_entropy(asxp(logits), asxp(labels)))
    assert mean.dtype == np.float32
    assert rel_err(mean, truth_rows(logits, labels).mean()) <= 1e-6


def test_float64_stays_float64(xp, asxp, tonp):
    logits = np.array([[0.1, 0.2], [0.3, -0.1]])
    got = tonp(ce.softmax_cross_entropy(asxp(logits), asxp(np.array([0, 1]))))
    assert got.dtype == np.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_torch_inputs_accumulate_in_float32(dtype):
    """Half-precision inputs give float32 losses as accurate as float32 arithmetic on the same
    values; PyTorch's own half-precision loss is shown to be worse."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(scale=8.0, size=(129, 3001))).to(dtype)
    labels = torch.from_numpy(rng.integers(0, 3001, size=129))
    x64 = x.double().numpy()
    truth = truth_rows(x64, labels.numpy())
    rows = ce.softmax_cross_entropy(x, labels, reduction="none")
    mean = ce.softmax_cross_entropy(x, labels)
    assert rows.dtype == torch.float32 and mean.dtype == torch.float32
    assert_as_accurate_as_float32_allows(rows.numpy(), x64, labels.numpy())
    naive_half = F.cross_entropy(x, labels, reduction="none").double().numpy()
    assert rel_err(rows.numpy(), truth) < rel_err(naive_half, truth)
    assert rel_err(mean.numpy(), truth.mean()) <= 1e-6
    loss, grad = ce.softmax_cross_entropy_and_grad(x, labels)
    assert loss.dtype == torch.float32
    assert torch.isfinite(grad).all()
    t64 = torch.from_numpy(x64).requires_grad_(True)
    (g64,) = torch.autograd.grad(F.cross_entropy(t64, labels), t64)
    probs = torch.softmax(x.float(), -1).to(dtype)
    for value in (
        ce.log_loss(probs, labels),
        ce.entropy(probs),
        ce.binary_cross_entropy_with_logits(x[:, :5], (x[:, :5] > 0).to(dtype)),
        ce.binary_cross_entropy(probs[:, :5], (x[:, :5] > 0).to(dtype)),
    ):
        assert value.dtype == torch.float32
    # The gradient comes back in the input's dtype: within rounding to that dtype.
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(grad.double().numpy(), g64.numpy(), rtol=eps, atol=1e-7)


def test_half_precision_numpy_inputs_accumulate_in_float32():
    rng = np.random.default_rng(6)
    x = rng.normal(scale=8.0, size=(65, 2001)).astype(np.float16)
    labels = rng.integers(0, 2001, size=65)
    rows = ce.softmax_cross_entropy(x, labels, reduction="none")
    assert rows.dtype == np.float32
    assert_as_accurate_as_float32_allows(rows, x, labels)
    p = np.full((4, 8), 0.125, dtype=np.float16)
    assert np.asarray(ce.log_loss(p, np.arange(4))).dtype == np.float32
    assert np.asarray(ce.entropy(p)).dtype == np.float32
    bce = ce.binary_cross_entropy_with_logits(x[:, :7], (x[:, :7] > 0).astype(np.float16))
    assert np.asarray(bce).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_binary_cross_entropy_with_huge_logits(xp, asxp, tonp, dtype):
    x = np.array([1e4, -1e4, 800.0, -800.0, 60.0, -60.0, 0.0], dtype=dtype)
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.3, 0.7, 0.5], dtype=dtype)
    loss, grad = ce.binary_cross_entropy_with_logits_and_grad(asxp(x), asxp(y), reduction="sum")
    rows = tonp(ce.binary_cross_entropy_with_logits(asxp(x), asxp(y), reduction="none"))
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    truth = -(y64 * log_expit(x64) + (1 - y64) * log_expit(-x64))
    rtol = 1e-12 if dtype == np.float64 else 2e-7
    np.testing.assert_allclose(rows, truth, rtol=rtol)
    np.testing.assert_allclose(float(tonp(loss)), truth.sum(), rtol=rtol)
    assert np.all(np.isfinite(tonp(grad)))


def test_z_loss_and_softcap_with_huge_logits_stay_finite(xp, asxp, tonp):
    logits = np.array([[1e4, -1e4, 3.0], [1e30, -1e30, 0.0]])
    labels = np.array([1, 2])
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels), softcap=30.0, z_loss=1e-4)
    assert np.isfinite(float(tonp(loss)))
    assert np.all(np.isfinite(tonp(grad)))
    capped = 30.0 * np.tanh(logits / 30.0)
    lse = logsumexp(capped, axis=-1)
    expected = np.mean(truth_rows(capped, labels) + 1e-4 * lse**2)
    np.testing.assert_allclose(float(tonp(loss)), expected, rtol=1e-12)


def test_log_loss_zero_probability_on_true_class_is_clipped_not_inf(xp, asxp, tonp):
    p = np.array([[0.0, 1.0], [0.5, 0.5]])
    got = tonp(ce.log_loss(asxp(p), asxp(np.array([0, 1])), reduction="none"))
    np.testing.assert_allclose(got, [-np.log(np.finfo(np.float64).eps), np.log(2)], rtol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
def test_numpy_fast_path_keeps_float32_accuracy(monkeypatch, fast):
    """The compiled CPU path (crossent.cpu, numba) and the Array-API path give the same accurate
    float32 losses, also on rows where the loss is tiny next to |logsumexp| and on ignored rows
    holding NaN or -inf."""
    cpu = pytest.importorskip("crossent.cpu")
    monkeypatch.setattr(cpu, "ENABLED", fast)
    rng = np.random.default_rng(12)
    logits = (rng.standard_normal((64, 37)) * 3).astype(np.float32)
    logits[::3] += np.float32(1e4)
    logits[1::5] -= np.float32(3e4)
    labels = rng.integers(0, 37, size=64)
    labels[::7] = np.argmax(logits[::7], axis=-1)  # confident rows: loss near 0
    rows = ce.softmax_cross_entropy(logits, labels, reduction="none")
    assert_as_accurate_as_float32_allows(rows, logits, labels)
    masked = logits.copy()
    masked[2] = np.nan
    masked[4] = -np.inf
    ignored = labels.copy()
    ignored[[2, 4]] = -100
    got = ce.softmax_cross_entropy(masked, ignored, ignore_index=-100, reduction="none")
    assert got[2] == 0.0 and got[4] == 0.0
    keep = ignored != -100
    np.testing.assert_array_equal(got[keep], rows[keep])


def test_numpy_gradient_fast_path_equals_array_api_path():
    """The compiled one-pass gradient (crossent.cpu.softmax_minus_onehot) behind
    softmax_cross_entropy_and_grad gives the Array-API path's loss and gradient, with class and
    sample weights, ignored rows (one holding NaN logits), every reduction and base 2."""
    import crossent.cpu as cpu

    if not cpu.available():
        pytest.skip("numba is not installed: there is no compiled path to compare")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(211, 37))
    y = rng.integers(0, 37, 211)
    y[::7] = -100
    x[3] = np.nan
    y[3] = -100
    w = rng.uniform(0.1, 2.0, 37)
    sw = rng.uniform(0.0, 2.0, 211)
    for reduction in ("mean", "sum", "none"):
        for kwargs in ({}, {"weight": w}, {"weight": w, "sample_weight": sw}, {"base": 2}):
            try:
                cpu.ENABLED = True
                fast = ce.softmax_cross_entropy_and_grad(x, y, ignore_index=-100, reduction=reduction, **kwargs)
                cpu.ENABLED = False
                slow = ce.softmax_cross_entropy_and_grad(x, y, ignore_index=-100, reduction=reduction, **kwargs)
            finally:
                cpu.ENABLED = True
            np.testing.assert_allclose(fast[0], slow[0], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(fast[1], slow[1], rtol=1e-12, atol=1e-15)
