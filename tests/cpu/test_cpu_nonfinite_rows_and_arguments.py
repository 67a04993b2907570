"""crossent.cpu on NaN rows, kept rows of factor 0, aliased outputs and bad arguments.

Oracles: torch.nn.functional.cross_entropy in float64 (NaN in the logits propagates; a class
weight of 0 on a row whose softmax is NaN gives a NaN gradient, 0 * NaN), DESIGN.md's conventions
(a zero target on a -inf logit contributes 0), and the out-of-place call for the aliased ones.
Each test runs the compiled kernels and the numpy fallback (``path``).
"""

from __future__ import annotations

import numpy as np
import pytest

import crossent as ce
from crossent import cpu

pytest.importorskip("numba")
torch = pytest.importorskip("torch")
F = torch.nn.functional

NAN, NINF = np.nan, -np.inf


def torch_rows_and_grad(x, target, scale, weight=None):
    """F.cross_entropy's per-row losses (float64) and the gradient of sum_i scale_i loss_i."""
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    tt = torch.from_numpy(target.astype(np.float64) if target.dtype.kind == "f" else target.astype(np.int64))
    wt = None if weight is None else torch.from_numpy(weight.astype(np.float64))
    rows = F.cross_entropy(xt, tt, weight=wt, reduction="none")
    (rows * torch.from_numpy(np.asarray(scale, dtype=np.float64))).sum().backward()
    return rows.detach().numpy(), xt.grad.numpy()


def assert_same(got, want, rtol):
    """Equal NaN pattern, and close elsewhere."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=rtol, atol=1e-7)


# ---- D1: NaN logits under zero targets ------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_logits_under_zero_targets_give_nan_as_in_torch(path, dtype):
    """A NaN logit keeps its NaN under a zero target (DESIGN: NaN in logits propagates); only an
    infinite logit under a zero target is masked (0 log 0 = 0)."""
    x = np.array([
        [NAN, NAN, NAN],        # all NaN, zero targets: NaN (was 0)
        [NAN, NINF, NINF],      # NaN among masked classes, zero targets: NaN (was 0)
        [NINF, NINF, NINF],     # all -inf, zero targets: 0 (masked)
        [0.3, NINF, -0.2],      # a masked class under a zero target: finite
        [0.3, NAN, -0.2],       # NaN beside finite logits
    ], dtype=dtype)
    t = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.6, 0.0, 0.4], [0.6, 0.0, 0.4]],
                 dtype=dtype)
    want, _ = torch_rows_and_grad(x, t, np.ones(5))
    want[2] = 0.0  # DESIGN: zero targets on -inf logits contribute 0 (PyTorch: 0 * -inf = NaN)
    want[3] = torch_rows_and_grad(x[3:4, [0, 2]], t[3:4, [0, 2]], [1.0])[0][0]
    _, ce_rows = cpu.soft_cross_entropy(x, t)
    _, ce_grad = cpu.softmax_minus_targets(x, t, 1.0, np.empty_like(x))
    assert_same(ce_rows, want, rtol=1e-6)
    np.testing.assert_array_equal(ce_rows, ce_grad)


@pytest.mark.parametrize("kwargs", [{}, {"weight": np.array([1.0, 2.0])}, {"label_smoothing": 0.1}])
def test_core_nan_row_under_zero_targets_is_nan(kwargs):
    """The reviewer's reproducer through crossent.softmax_cross_entropy (numba route for the plain
    loss; the other options take the blocked pass): [nan, 0.674], as F.cross_entropy."""
    x = np.array([[NAN, NAN], [0.3, -0.2]])
    t = np.array([[0.0, 0.0], [0.6, 0.4]])
    got = ce.softmax_cross_entropy(x, t, reduction="none", **kwargs)
    w = kwargs.get("weight")
    want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="none",
                           weight=None if w is None else torch.from_numpy(w),
                           label_smoothing=kwargs.get("label_smoothing", 0.0)).numpy()
    assert np.isnan(got[0]) and np.isnan(want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)


# ---- D2: kept rows of factor 0 ----------------------------------------------------------------


def _weighted_rows(dtype):
    x = np.array([[NINF, NINF, NINF], [NAN, 0.5, 0.1], [0.1, 0.2, 0.3], [NINF, 1.0, 2.0]], dtype=dtype)
    labels = np.array([0, 2, 1, 1])
    weight = np.array([0.0, 1.0, 1.0])
    return x, labels, weight


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kept_row_of_factor_zero_gets_torch_nan_gradient(path, dtype):
    """Class weight 0 on the label of an all -inf row and sample factor 0 on a NaN row: with
    ``keep`` those rows are kept, and their gradient is 0 * NaN = NaN, as F.cross_entropy's
    (was exact zeros); finite rows of factor 0 still get zeros."""
    x, labels, weight = _weighted_rows(dtype)
    scale = weight[labels] * np.array([1.0, 0.0, 1.0, 0.0])  # row 1: sample weight 0
    _, want = torch_rows_and_grad(x, labels, np.array([1.0, 0.0, 1.0, 0.0]), weight)
    out = np.empty_like(x)
    cpu.softmax_minus_onehot(x, labels, scale, out, keep=np.ones(4, dtype=bool))
    assert np.isnan(out[:2]).all() and np.isnan(want[:2]).all()
    assert_same(out, want, rtol=2e-6)
    np.testing.assert_array_equal(out[3], 0.0)


def test_default_and_ignored_rows_stay_exact_zeros(path):
    """Without ``keep`` a row of factor 0 is an ignored row (exact zeros whatever its logits), and
    so is a row whose ``keep`` is False even when its factor is not 0."""
    x, labels, _ = _weighted_rows(np.float64)
    scale = np.array([0.0, 0.0, 1.0, 1.0])
    out = np.full_like(x, 7.0)
    cpu.softmax_minus_onehot(x, labels, scale, out)
    np.testing.assert_array_equal(out[:2], 0.0)
    keep = np.array([False, False, True, False])
    out_keep = np.full_like(x, 7.0)
    cpu.softmax_minus_onehot(x, labels, np.ones(4), out_keep, keep=keep)
    np.testing.assert_array_equal(out_keep[[0, 1, 3]], 0.0)
    np.testing.assert_array_equal(out_keep[2], out[2])
    t = np.full(x.shape, 1.0 / 3.0)
    out_t = np.full_like(x, 7.0)
    cpu.softmax_minus_targets(x, t, scale, out_t)
    np.testing.assert_array_equal(out_t[:2], 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_targets_kept_row_of_factor_zero_gets_nan_gradient(path, dtype):
    x = np.array([[NINF, NINF, NINF], [NAN, 0.5, 0.1], [0.1, 0.2, 0.3]], dtype=dtype)
    t = np.array([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]], dtype=dtype)
    scale = np.array([0.0, 0.0, 0.0])
    _, want = torch_rows_and_grad(x, t, scale)
    out = np.empty_like(x)
    cpu.softmax_minus_targets(x, t, scale, out, keep=np.ones(3, dtype=bool))
    assert np.isnan(out[:2]).all()
    assert_same(out, want, rtol=2e-6)
    np.testing.assert_array_equal(out[2], 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smoothing_kernel_kept_row_of_factor_zero_gets_nan_gradient(dtype):
    """The smoothing kernel (numba only): a kept all -inf or NaN row of factor 0 gets NaN, an
    ignored one exact zeros."""
    if not cpu.available():
        pytest.skip("numba kernels switched off")
    x, labels, weight = _weighted_rows(dtype)
    out = np.full_like(x, 7.0)
    cpu._smoothed_rows(x, labels, weight, 0.1, np.zeros(4), out, np.ones(4, dtype=bool))
    assert np.isnan(out[:2]).all()
    np.testing.assert_array_equal(out[2], 0.0)
    out_ignored = np.full_like(x, 7.0)
    cpu._smoothed_rows(x, labels, weight, 0.1, np.zeros(4), out_ignored, np.zeros(4, dtype=bool))
    np.testing.assert_array_equal(out_ignored, 0.0)


def test_keep_is_checked(path):
    x, labels, _ = _weighted_rows(np.float64)
    with pytest.raises(TypeError, match="keep must be None or a numpy bool array"):
        cpu.softmax_minus_onehot(x, labels, 1.0, np.empty_like(x), keep=[True] * 4)
    with pytest.raises(ValueError, match=r"keep must have shape \(4,\)"):
        cpu.softmax_minus_onehot(x, labels, 1.0, np.empty_like(x), keep=np.ones(3, dtype=bool))


# ---- D4, D5: aliased out ------------------------------------------------------------------------


def _soft_case(dtype=np.float32, n=300, c=300):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c)).astype(dtype)
    t = rng.dirichlet(np.ones(c), n).astype(dtype)
    return x, t


def test_out_overlapping_targets_is_refused(path):
    """A shifted overlap of out and the targets would race between rows (wrong results before):
    refused, naming out and targets."""
    x, t = _soft_case()
    buf = np.empty((x.shape[0] + 1, x.shape[1]), dtype=x.dtype)
    buf[1:] = t
    with pytest.raises(ValueError, match="out must be targets itself .* got a partial overlap"):
        cpu.softmax_minus_targets(x, buf[1:], 1.0, buf[:-1])


def test_out_may_be_the_targets_memory(path):
    """out is targets, or a view of exactly its memory: each entry's target is read before its
    gradient is written, so the result equals the out-of-place one."""
    x, t = _soft_case()
    want = np.empty_like(x)
    want_stats = cpu.softmax_minus_targets(x, t, 0.5, want)
    for alias in (lambda a: a, lambda a: a[:]):
        tt = t.copy()
        stats = cpu.softmax_minus_targets(x, tt, 0.5, alias(tt))
        np.testing.assert_array_equal(tt, want)
        np.testing.assert_array_equal(stats[1], want_stats[1])


def test_out_as_exact_view_of_logits_is_in_place(path):
    """out = logits[:] (same pointer, shape and strides) is in place, as out=logits (was refused
    as a partial overlap); a shifted overlap is still refused."""
    x, t = _soft_case(np.float64, 50, 40)
    labels = np.arange(50) % 40
    want = np.empty_like(x)
    cpu.softmax_minus_onehot(x, labels, 1.0, want)
    xc = x.copy()
    cpu.softmax_minus_onehot(xc, labels, 1.0, xc[:])
    np.testing.assert_array_equal(xc, want)
    want_t = np.empty_like(x)
    cpu.softmax_minus_targets(x, t, 1.0, want_t)
    xc = x.copy()
    cpu.softmax_minus_targets(xc, t, 1.0, xc.reshape(-1).reshape(x.shape))
    np.testing.assert_array_equal(xc, want_t)
    buf = np.zeros((51, 40))
    buf[1:] = x
    with pytest.raises(ValueError, match="out must be logits itself .* got a partial overlap"):
        cpu.softmax_minus_onehot(buf[1:], labels, 1.0, buf[:-1])


# ---- D6: scale named in its errors ---------------------------------------------------------------


@pytest.mark.parametrize("scale", ["a", None, [1.0, "b"], object(), np.array(["x"] * 3)])
def test_bad_scale_names_scale(path, scale):
    x = np.zeros((3, 2))
    labels = np.zeros(3, dtype=np.int64)
    with pytest.raises(TypeError, match="scale must be a real number or an array of real numbers"):
        cpu.softmax_minus_onehot(x, labels, scale, np.empty_like(x))
    with pytest.raises(TypeError, match="scale must be"):
        cpu.softmax_minus_targets(x, np.zeros((3, 2)), scale, np.empty_like(x))


# ---- D7: no classes -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_classes_fallback_returns_what_the_kernels_return(monkeypatch, dtype):
    """C = 0, N > 0: lse = log 0 = -inf and an empty sum ce = 0 on both paths (the numpy fallback
    raised numpy's zero-size reduction error)."""
    x = np.empty((3, 0), dtype=dtype)
    t = np.empty((3, 0), dtype=dtype)
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(cpu, "ENABLED", enabled)
        results[enabled] = (cpu.soft_cross_entropy(x, t), cpu.softmax_minus_targets(x, t, 1.0, np.empty_like(x)))
    for loss_only, with_grad in results.values():
        for lse, ce_rows in (loss_only, with_grad):
            assert lse.dtype == ce_rows.dtype == dtype
            np.testing.assert_array_equal(lse, np.full(3, -np.inf))
            np.testing.assert_array_equal(ce_rows, np.zeros(3))
