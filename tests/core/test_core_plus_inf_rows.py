"""A kept row holding a +inf logit has no finite softmax: its loss and its gradient row are NaN,
as F.cross_entropy gives (float64 oracle), on the Array-API path of every backend and on
crossent.torch's "chunked" and "reference" paths. The Array-API path and "chunked" replaced a
+inf row maximum by 0 and gave +inf and a gradient of -1 at the label (the CPU kernels were
aligned in 2fb712f). Ignored rows stay 0 whatever their logits (DESIGN.md)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce
import crossent.cpu as cpu

INF = np.inf
# Rows 0, 2, 5 hold +inf (off the label, on it, twice); row 4 holds +inf and is ignored.
X = np.array([
    [0.0, INF, 1.0, -0.5],
    [0.5, 0.2, 0.1, -1.0],
    [INF, 0.0, 0.0, 2.0],
    [1.0, 2.0, 3.0, 0.25],
    [INF, 1.0, 2.0, 3.0],
    [-0.3, 0.7, INF, INF],
])
Y = np.array([0, 1, 0, 3, -100, 1])
INF_ROWS, KEPT_FINITE = [0, 2, 5], [1, 3]
OPTIONS = [dict(), dict(z_loss=0.1), dict(label_smoothing=0.2), dict(label_smoothing=0.2, z_loss=0.1),
           dict(weight=np.array([1.0, 0.5, 0.0, 2.0]))]


def _oracle(y, *, weight=None, label_smoothing=0.0, z_loss=0.0, soft=False):
    """float64 F.cross_entropy (plus z lse^2 on the kept rows) per row, and its gradient."""
    x = torch.tensor(X, requires_grad=True)
    w = None if weight is None else torch.tensor(weight)
    target = torch.tensor(y)
    loss = F.cross_entropy(x, target, weight=w, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        kept = torch.ones(len(X), dtype=torch.bool) if soft else target != -100
        loss = loss + torch.where(kept, z_loss * torch.logsumexp(x, dim=1) ** 2, 0.0)
    loss.sum().backward()
    grad = x.grad.numpy().copy()
    if not soft:
        grad[Y == -100] = 0.0  # F: NaN (0 times a NaN softmax); crossent: an ignored row is 0
    return loss.detach().numpy(), grad


def _check(loss, grad, want_loss, want_grad, rows):
    assert np.isnan(want_loss[rows]).all() and np.isnan(want_grad[rows]).all()  # the oracle's NaN rows
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(want_loss))
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(want_grad))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12, equal_nan=True)


def _quiet(xp):
    """NumPy-backed namespaces warn "invalid value" where inf - inf makes the NaN (as NumPy does
    for any NaN it creates); the other backends do not warn."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    if xp.__name__ in ("numpy", "array_api_strict"):
        warnings.simplefilter("ignore", RuntimeWarning)
    return ctx


@pytest.mark.parametrize("options", OPTIONS, ids=repr)
def test_array_api_path_plus_inf_rows_are_nan(xp, asxp, tonp, monkeypatch, options):
    monkeypatch.setattr(cpu, "ENABLED", False)  # numpy too takes the Array-API path
    kw = {k: (asxp(v) if k == "weight" else v) for k, v in options.items()}
    ctx = _quiet(xp)
    try:
        loss, grad = ce.softmax_cross_entropy_and_grad(asxp(X), asxp(Y), ignore_index=-100, reduction="sum", **kw)
        rows = ce.softmax_cross_entropy(asxp(X), asxp(Y), ignore_index=-100, reduction="none", **kw)
    finally:
        ctx.__exit__(None, None, None)
    want_loss, want_grad = _oracle(Y, **options)
    _check(tonp(rows), tonp(grad), want_loss, want_grad, INF_ROWS)
    assert np.isnan(tonp(loss))
    if xp.__name__ == "torch":  # torch.autograd through the same path
        x = torch.tensor(X, requires_grad=True)
        w = None if "weight" not in options else torch.tensor(options["weight"])
        kw = {k: v for k, v in options.items() if k != "weight"}
        ce.softmax_cross_entropy(x, torch.tensor(Y), weight=w, ignore_index=-100, reduction="sum", **kw).backward()
        _check(want_loss, x.grad.numpy(), want_loss, want_grad, INF_ROWS)


def test_array_api_path_soft_targets_plus_inf_rows_are_nan(xp, asxp, tonp, monkeypatch):
    monkeypatch.setattr(cpu, "ENABLED", False)
    t = np.random.default_rng(0).dirichlet(np.ones(4), size=len(X))
    t[1] = 0.0  # an all-zero target row without +inf: 0
    t[5] = 0.0  # with +inf: NaN, as F (review diff 3: cet's chunked/reference masked it to 0)
    ctx = _quiet(xp)
    try:
        rows = ce.softmax_cross_entropy(asxp(X), asxp(t), reduction="none", z_loss=0.1)
        _, grad = ce.softmax_cross_entropy_and_grad(asxp(X), asxp(t), reduction="sum", z_loss=0.1)
    finally:
        ctx.__exit__(None, None, None)
    want_loss, want_grad = _oracle(t, z_loss=0.1, soft=True)
    _check(tonp(rows), tonp(grad), want_loss, want_grad, INF_ROWS + [4])


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize("options", OPTIONS, ids=repr)
def test_torch_chunked_and_reference_plus_inf_rows_are_nan(impl, options):
    import crossent.torch as cet

    x = torch.tensor(X, requires_grad=True)
    w = None if "weight" not in options else torch.tensor(options["weight"])
    kw = {k: v for k, v in options.items() if k != "weight"}
    loss = cet.cross_entropy(x, torch.tensor(Y), weight=w, reduction="none", impl=impl, **kw)
    loss.sum().backward()
    want_loss, want_grad = _oracle(Y, **options)
    _check(loss.detach().numpy(), x.grad.numpy(), want_loss, want_grad, INF_ROWS)
    np.testing.assert_array_equal(x.grad.numpy()[4], 0.0)  # the ignored row


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("weighted", [False, True])
def test_torch_soft_targets_plus_inf_rows_are_nan_zero_targets_too(impl, weighted):
    """Review (diff) 3: a zero target on a +inf logit was masked like one on a -inf logit, so a
    row of +-inf logits with zero (or zero-weighted) targets had loss 0 on chunked/reference."""
    import crossent.torch as cet

    t = np.random.default_rng(1).dirichlet(np.ones(4), size=len(X))
    t[5] = 0.0
    t[0] = [1.0, 0.0, 0.0, 0.0]
    w = np.array([0.0, 1.0, 1.0, 1.0]) if weighted else None  # row 0's only mass weighs 0
    x = torch.tensor(X, requires_grad=True)
    loss = cet.cross_entropy(x, torch.tensor(t), weight=None if w is None else torch.tensor(w),
                             reduction="none", impl=impl)
    loss.sum().backward()
    xf = torch.tensor(X, requires_grad=True)
    want = F.cross_entropy(xf, torch.tensor(t), weight=None if w is None else torch.tensor(w), reduction="none")
    want.sum().backward()
    _check(loss.detach().numpy(), x.grad.numpy(), want.detach().numpy(), xf.grad.numpy(), INF_ROWS + [4])


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.2), dict(label_smoothing=1.0), dict(z_loss=0.1)],
                         ids=repr)
def test_autograd_of_a_kept_all_minus_inf_row_is_nan(backend, options):
    """Review (diff): jax.grad (and torch.autograd) of the core loss gave a finite row (0, or -1
    at the label) for a kept row of all -inf logits, where F.cross_entropy and the closed form
    (softmax_cross_entropy_and_grad) give a NaN row. Autograd's row now holds NaN (at the label:
    the where that keeps log(0) from warning cuts the path through log s, so the other entries
    stay 0); the closed form's row is all NaN, as F's."""
    x = np.array([[-INF, -INF, -INF], [0.5, 0.2, 0.1], [-INF, -INF, -INF]])
    y = np.array([1, 0, -100])
    xt = torch.tensor(x, requires_grad=True)
    want = F.cross_entropy(xt, torch.tensor(y), reduction="sum",
                           **{k: v for k, v in options.items() if k != "z_loss"})
    if "z_loss" in options:
        want = want + options["z_loss"] * torch.logsumexp(xt[:2], dim=1).square().sum()
    want.backward()
    assert np.isnan(xt.grad.numpy()[0]).all() and not np.isnan(xt.grad.numpy()[1]).any()
    _, closed = ce.softmax_cross_entropy_and_grad(x, y, ignore_index=-100, reduction="sum", **options)
    if backend == "torch":
        xc = torch.tensor(x, requires_grad=True)
        ce.softmax_cross_entropy(xc, torch.tensor(y), ignore_index=-100, reduction="sum", **options).backward()
        grad = xc.grad.numpy()
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        jnp = jax.numpy
        grad = np.asarray(jax.jit(jax.grad(lambda a: ce.softmax_cross_entropy(
            a, jnp.asarray(y), ignore_index=-100, reduction="sum", **options)))(jnp.asarray(x)))
    assert np.isnan(closed[0]).all()
    # label_smoothing=1 drops the nll, the one path autograd has into such a row: its loss is NaN
    # (times NaN) but its autograd gradient stays 0 (a known limit; the closed form is NaN).
    assert np.isnan(grad[0, y[0]]) if options.get("label_smoothing") != 1.0 else (grad[0] == 0).all()
    for g in (grad, closed):
        np.testing.assert_allclose(g[1], xt.grad.numpy()[1], rtol=1e-12)
        np.testing.assert_array_equal(g[2], 0.0)  # ignored


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_autograd_of_an_all_minus_inf_soft_row(backend):
    """Soft targets: an all -inf row with target mass is NaN, its gradient NaN where the target
    is positive (F: the whole row); with zero targets it is 0 with a zero gradient (0 log 0 = 0,
    DESIGN.md; F: NaN). jax.grad and torch.autograd gave -t there before."""
    x = np.array([[-INF, -INF, -INF], [0.5, 0.2, 0.1], [-INF, -INF, -INF]])
    t = np.array([[0.2, 0.8, 0.0], [0.1, 0.6, 0.3], [0.0, 0.0, 0.0]])
    if backend == "torch":
        xc = torch.tensor(x, requires_grad=True)
        rows = ce.softmax_cross_entropy(xc, torch.tensor(t), reduction="none")
        rows.sum().backward()
        rows, grad = rows.detach().numpy(), xc.grad.numpy()
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        jnp = jax.numpy
        rows = np.asarray(ce.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(t), reduction="none"))
        grad = np.asarray(jax.grad(lambda a: ce.softmax_cross_entropy(a, jnp.asarray(t), reduction="sum"))(
            jnp.asarray(x)))
    xt = torch.tensor(x, requires_grad=True)
    want = F.cross_entropy(xt, torch.tensor(t), reduction="none")
    want.sum().backward()
    assert np.isnan(rows[0]) and np.isnan(xt.grad.numpy()[0]).all()
    np.testing.assert_array_equal(np.isnan(grad[0]), t[0] > 0)
    np.testing.assert_allclose(rows[1], want.detach().numpy()[1], rtol=1e-12)
    np.testing.assert_allclose(grad[1], xt.grad.numpy()[1], rtol=1e-12)
    assert rows[2] == 0.0
    np.testing.assert_array_equal(grad[2], 0.0)
