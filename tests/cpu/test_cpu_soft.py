"""crossent.cpu's soft-target kernels (soft_cross_entropy, softmax_minus_targets) against torch,
and crossent.softmax_cross_entropy with probability targets with and without them.

Oracles: torch.nn.functional.cross_entropy with probability targets (reduction="none") in float64
for the loss, torch.autograd for the gradient, and crossent's own Array-API path (written with
no kernel) for the conventions on rows whose maximum is not finite.
"""

from __future__ import annotations

import numpy as np
import pytest

import crossent as ce
from crossent import cpu

pytest.importorskip("numba")
torch = pytest.importorskip("torch")


def distributions(rng, shape, dtype):
    s = rng.standard_normal(shape)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(dtype)


def torch_loss_and_grad(x, t, scale):
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    rows = torch.nn.functional.cross_entropy(xt, torch.from_numpy(t.astype(np.float64)), reduction="none")
    (rows * torch.from_numpy(scale)).sum().backward()
    return rows.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (252, 507), (33, 1029)])
def test_loss_and_gradient_equal_torch(path, dtype, shape):
    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    t = distributions(rng, shape, dtype)
    scale = rng.uniform(0.1, 2.0, shape[0])
    want_loss, want_grad = torch_loss_and_grad(x, t, scale)
    lse, loss = cpu.soft_cross_entropy(x, t)
    out = np.empty_like(x)
    lse_g, loss_g = cpu.softmax_minus_targets(x, t, scale, out)
    assert loss.dtype == out.dtype == dtype
    np.testing.assert_array_equal(lse, lse_g)
    np.testing.assert_array_equal(loss, loss_g)
    if dtype == np.float64:
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
        np.testing.assert_allclose(out, want_grad, rtol=1e-10, atol=1e-15)
    else:
        # float32 inputs, float64 arithmetic, one rounding of the result
        np.testing.assert_allclose(loss, want_loss, rtol=2.5e-7)
        np.testing.assert_allclose(out, want_grad, rtol=2e-6, atol=1e-8)
    np.testing.assert_allclose(lse, torch.logsumexp(torch.from_numpy(x.astype(np.float64)), 1).numpy(),
                               rtol=1e-12 if dtype == np.float64 else 2.5e-7)


def test_targets_taken_as_given_in_place_and_zero_scale(path):
    """No renormalization (targets summing to 2 double the loss), the gradient written into the
    logits' own memory, and exact zeros for a row of scale 0 even with NaN logits."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 9))
    t = distributions(rng, (20, 9), np.float64)
    _, once = cpu.soft_cross_entropy(x, t)
    _, twice = cpu.soft_cross_entropy(x, 2 * t)
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-14)
    want = np.empty_like(x)
    scale = np.linspace(0.0, 1.0, 20)
    cpu.softmax_minus_targets(x, t, scale, want)
    x[0, 2] = np.nan  # scale[0] == 0
    y = x.copy()
    cpu.softmax_minus_targets(y, t, scale, y)
    np.testing.assert_array_equal(y[1:], want[1:])
    assert (y[0] == 0.0).all()


def nonfinite_rows(dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 6)) * 3).astype(dtype)
    t = distributions(rng, (8, 6), dtype)
    x[0, :3] = -np.inf  # masked classes with zero target: 0 log 0 = 0
    t[0, :3] = 0.0
    t[0] /= t[0].sum()
    x[1] = -np.inf  # all masked, zero targets: 0
    t[1] = 0.0
    x[2] = -np.inf  # all masked, a positive target: NaN
    x[3, 4] = np.inf  # a +inf logit
    x[4, 1] = np.nan  # NaN anywhere: NaN
    x[5, 2] = -np.inf  # a positive target on a masked class: +inf
    return x, t


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_rows_follow_the_array_api_path(monkeypatch, dtype):
    x, t = nonfinite_rows(dtype)
    sw = np.linspace(0.5, 1.5, 8)
    with np.errstate(all="ignore"):  # the Array-API path computes inf - inf and log(0) here
        monkeypatch.setattr(cpu, "ENABLED", True)
        fast = ce.softmax_cross_entropy(x, t, reduction="none")
        fast_loss, fast_grad = ce.softmax_cross_entropy_and_grad(x, t, reduction="none", sample_weight=sw)
        monkeypatch.setattr(cpu, "ENABLED", False)
        slow = ce.softmax_cross_entropy(x, t, reduction="none")
        slow_loss, slow_grad = ce.softmax_cross_entropy_and_grad(x, t, reduction="none", sample_weight=sw)
    assert fast[1] == 0.0 and np.isnan(fast[[2, 4]]).all() and np.isposinf(fast[5])
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(fast, slow, rtol=rtol, equal_nan=True)
    np.testing.assert_allclose(fast_loss, slow_loss, rtol=rtol, equal_nan=True)
    # The +inf row (3): NaN across its gradient, as F.cross_entropy gives (the Array-API path has
    # finite entries there, NaN at the +inf logit).
    assert np.isnan(fast_grad[3]).all()
    other = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_allclose(fast_grad[other], slow_grad[other], rtol=rtol, atol=1e-7, equal_nan=True)


def test_public_function_takes_the_fast_path(monkeypatch):
    calls = []
    for name in ("soft_cross_entropy", "softmax_minus_targets"):
        original = getattr(cpu, name)

        def spy(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(cpu, name, spy)
    x = np.zeros((6, 5), np.float32)
    t = np.full((6, 5), 0.2, np.float32)
    monkeypatch.setattr(cpu, "ENABLED", True)
    ce.softmax_cross_entropy(x, t)
    ce.softmax_cross_entropy_and_grad(x, t)
    ce.softmax_cross_entropy(x, t, label_smoothing=0.1)  # not for the kernels: Array-API path
    assert calls == ["soft_cross_entropy", "softmax_minus_targets"]
    monkeypatch.setattr(cpu, "ENABLED", False)
    ce.softmax_cross_entropy(x, t)
    assert calls == ["soft_cross_entropy", "softmax_minus_targets"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kwargs", [{}, {"sample_weight": "rows"}, {"base": 2}, {"softcap": 5.0}, {"z_loss": 1e-3}])
def test_public_function_same_with_and_without_kernels(monkeypatch, dtype, reduction, kwargs):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((252, 507)) * 8).astype(dtype)
    x[0, 1::2] = -np.inf
    x[1, 7] = 1e4
    t = distributions(rng, (252, 507), dtype)
    t[0, 1::2] = 0.0
    if kwargs.get("sample_weight") == "rows":
        kwargs = {"sample_weight": rng.uniform(0, 2, 252)}
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(cpu, "ENABLED", enabled)
        loss = ce.softmax_cross_entropy(x, t, reduction=reduction, **kwargs)
        loss_g, grad = ce.softmax_cross_entropy_and_grad(x, t, reduction=reduction, **kwargs)
        results.append((np.asarray(loss), np.asarray(loss_g), grad))
    (a, a_g, ga), (b, b_g, gb) = results
    # The Array-API path sums float32 exponentials in float32; the kernels sum in float64.
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(a, b, rtol=rtol)
    np.testing.assert_allclose(a_g, b_g, rtol=rtol)
    assert ga.dtype == gb.dtype == dtype
    np.testing.assert_allclose(ga, gb, rtol=rtol, atol=1e-9 if dtype == np.float64 else 1e-6 * float(np.abs(gb).max()))


def test_serial_and_parallel_kernels_agree_bitwise(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((600, 301)).astype(np.float32)  # above the parallel threshold
    t = distributions(rng, x.shape, np.float32)
    parallel = cpu.soft_cross_entropy(x, t)
    g_par = np.empty_like(x)
    cpu.softmax_minus_targets(x, t, 0.5, g_par)
    monkeypatch.setattr(cpu, "_PARALLEL_MIN_ELEMENTS", 1 << 40)
    serial = cpu.soft_cross_entropy(x, t)
    g_ser = np.empty_like(x)
    cpu.softmax_minus_targets(x, t, 0.5, g_ser)
    for u, v in zip(parallel + (g_par,), serial + (g_ser,), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(("targets", "error", "match"), [
    (np.zeros((3, 4), np.int64), TypeError, "targets must be floating-point"),
    (np.zeros((3, 5)), ValueError, r"targets must have the shape of logits \(3, 4\)"),
    ([[0.0] * 4] * 3, TypeError, "targets must be a numpy.ndarray"),
])  # fmt: skip
def test_bad_targets_are_named(targets, error, match):
    with pytest.raises(error, match=match):
        cpu.soft_cross_entropy(np.zeros((3, 4)), targets)
    with pytest.raises(error, match=match):
        cpu.softmax_minus_targets(np.zeros((3, 4)), targets, 1.0, np.zeros((3, 4)))


@pytest.mark.parametrize(("out", "scale", "error", "match"), [
    (np.zeros((3, 4), np.float32), 1.0, ValueError, "out must be a C-contiguous float64 array of shape"),
    (np.zeros((4, 3)).T, 1.0, ValueError, "got a non-contiguous"),
    ("out", 1.0, TypeError, "out must be a numpy.ndarray"),
    (None, np.ones(2), ValueError, r"scale must be a scalar or have shape \(3,\)"),
])  # fmt: skip
def test_bad_out_and_scale_are_named(out, scale, error, match):
    x = np.zeros((3, 4))
    t = np.full((3, 4), 0.25)
    with pytest.raises(error, match=match):
        cpu.softmax_minus_targets(x, t, scale, np.zeros((3, 4)) if out is None else out)


def test_out_overlapping_logits_or_read_only_is_refused():
    x = np.zeros((3, 4))
    t = np.full((3, 4), 0.25)
    buf = np.zeros(16)
    with pytest.raises(ValueError, match="partial overlap"):
        cpu.softmax_minus_targets(buf[:12].reshape(3, 4), t, 1.0, buf[4:].reshape(3, 4))
    ro = np.zeros((3, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        cpu.softmax_minus_targets(x, t, 1.0, ro)
