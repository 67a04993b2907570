"""crossent.cpu.softmax_minus_onehot against torch.autograd, and the fast path against core.

The gradient oracle is torch: for per-row factors s, the gradient of sum_i s_i * CE_i (torch's
F.cross_entropy with reduction="none") is s_i * (softmax(x_i) - onehot(y_i)).
"""

from __future__ import annotations

import numpy as np
import pytest

import crossent as ce
from crossent import cpu

pytest.importorskip("numba")
torch = pytest.importorskip("torch")


def torch_grad(x: np.ndarray, y: np.ndarray, scale: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    rows = torch.nn.functional.cross_entropy(t, torch.from_numpy(y), reduction="none")
    (rows * torch.from_numpy(scale)).sum().backward()
    return t.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (252, 507), (33, 1029)])
def test_gradient_equals_torch_autograd(path, dtype, shape):
    rng = np.random.default_rng(shape[1])
    n, c = shape
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    y = rng.integers(0, c, n)
    scale = rng.uniform(0.1, 2.0, n)
    out = np.empty_like(x)
    lse, nll = cpu.softmax_minus_onehot(x, y, scale, out)
    want = torch_grad(x, y, scale)
    assert out.dtype == dtype
    if dtype == np.float64:
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-15)
    else:
        # float32 output: the rounding of the float64 truth, give or take an ulp.
        np.testing.assert_allclose(out, want, rtol=2.5e-7, atol=1e-30)
    lse_ref, nll_ref = cpu.lse_and_nll(x, y)
    np.testing.assert_array_equal(lse, lse_ref)
    np.testing.assert_array_equal(nll, nll_ref)


def test_scalar_scale_in_place_and_ignored_rows(path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 17))
    x[3, 4] = np.nan  # an ignored row (scale 0) gets zeros even with NaN logits
    x[5, ::3] = -np.inf  # masked classes get a zero gradient
    y = rng.integers(0, 17, 40)
    y[5] = 1
    scale = np.full(40, 1 / 40)
    scale[3] = 0.0
    want = torch_grad(np.where(np.isnan(x), 0.0, x), y, scale)
    inplace = x.copy()
    cpu.softmax_minus_onehot(inplace, y, scale, inplace)
    np.testing.assert_allclose(inplace, want, rtol=1e-12, atol=1e-15)
    assert np.all(inplace[3] == 0.0) and np.all(inplace[5, ::3] == 0.0)
    no_nan = np.where(np.isnan(x), 0.0, x)
    g = np.empty_like(x)
    cpu.softmax_minus_onehot(no_nan, y, 0.25, g)
    np.testing.assert_allclose(g, torch_grad(no_nan, y, np.full(40, 0.25)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("out", "scale", "error", "match"),
    [
        (np.empty((4, 3), np.float32), 1.0, ValueError, "out must be a C-contiguous float64"),
        (np.empty((4, 4)), 1.0, ValueError, r"of shape \(4, 3\)"),
        (np.empty((3, 4)).T, 1.0, ValueError, "non-contiguous"),
        ([[0.0] * 3] * 4, 1.0, TypeError, "out must be a numpy.ndarray, got list"),
        (np.empty((4, 3)), np.ones(5), ValueError, r"scale must be a scalar or have shape \(4,\)"),
    ],
)
def test_gradient_bad_input_is_named(out, scale, error, match):
    with pytest.raises(error, match=match):
        cpu.softmax_minus_onehot(np.zeros((4, 3)), np.zeros(4, np.int64), scale, out)


def test_gradient_rejects_partial_overlap_and_read_only():
    x = np.zeros((4, 3))
    big = np.zeros((5, 3))
    with pytest.raises(ValueError, match="out must be logits itself or not overlap it"):
        cpu.softmax_minus_onehot(big[:4], np.zeros(4, np.int64), 1.0, big[1:])
    ro = np.empty((4, 3))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        cpu.softmax_minus_onehot(x, np.zeros(4, np.int64), 1.0, ro)


# ---- the public API: fast path and Array-API path agree ---------------------------------------


def _core_both_ways(monkeypatch, *args, **kwargs):
    monkeypatch.setattr(cpu, "ENABLED", True)
    fast = ce.softmax_cross_entropy(*args, **kwargs)
    monkeypatch.setattr(cpu, "ENABLED", False)
    slow = ce.softmax_cross_entropy(*args, **kwargs)
    return np.asarray(fast), np.asarray(slow)


def test_public_function_takes_the_fast_path(monkeypatch):
    calls = []
    original = cpu._lse_pick_nll  # behind both lse_and_pick and lse_and_nll

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(cpu, "ENABLED", True)
    monkeypatch.setattr(cpu, "_lse_pick_nll", spy)
    ce.softmax_cross_entropy(np.zeros((6, 5), np.float32), np.zeros(6, np.int64))
    assert calls == [(6, 5)]
    monkeypatch.setattr(cpu, "ENABLED", False)
    ce.softmax_cross_entropy(np.zeros((6, 5), np.float32), np.zeros(6, np.int64))
    assert calls == [(6, 5)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_function_same_with_and_without_fast_path(monkeypatch, dtype, reduction):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((252, 507)) * 8).astype(dtype)
    x[0, 1::2] = -np.inf
    x[1, 7] = 1e4
    y = rng.integers(0, 507, 252)
    fast, slow = _core_both_ways(monkeypatch, x, y, reduction=reduction)
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    # The Array-API path sums float32 exponentials in float32; the kernel sums in float64.
    rtol = 1e-13 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(fast, slow, rtol=rtol)


@pytest.mark.parametrize("kwargs", [
    {"ignore_index": 3},
    {"sample_weight": "rows"},
    {"base": 2},
    {"axis": 1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
])
def test_public_function_options_agree(monkeypatch, kwargs):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((37, 11, 3)) * 4
    if kwargs.get("axis") != 1:
        x = x.reshape(37 * 3, 11)
    y = rng.integers(0, 11, x.shape[0] if x.ndim == 2 else (37, 3))
    if kwargs.get("sample_weight") == "rows":
        kwargs = {"sample_weight": rng.uniform(0, 2, y.shape)}
    fast, slow = _core_both_ways(monkeypatch, x, y, **kwargs)
    np.testing.assert_allclose(fast, slow, rtol=1e-13)


def test_public_function_nonfinite_rows_agree(monkeypatch):
    x = np.zeros((5, 4))
    x[0] = -np.inf  # label on -inf: +inf
    x[1, 2] = np.nan
    x[2, 3] = np.inf  # label elsewhere: +inf; on it: NaN
    x[3, 3] = np.inf
    x[4, 1:] = -np.inf
    y = np.array([0, 0, 0, 3, 0])
    with np.errstate(all="ignore"):  # both paths compute inf - inf or log(0) here
        fast, slow = _core_both_ways(monkeypatch, x, y, reduction="none")
    # Row 2 holds +inf: NaN on both paths, as F.cross_entropy (the Array-API path gave +inf
    # before 3ca9375).
    assert np.isnan(fast[2]) and fast[4] == 0.0 and np.isnan(fast[[1, 3]]).all()
    np.testing.assert_array_equal(fast, slow)
