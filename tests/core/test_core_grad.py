"""Closed-form gradients (``*_and_grad``) against torch.autograd in float64 and against central
finite differences of crossent's own loss."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce

RTOL = 1e-10
ATOL = 1e-13


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


def torch_softmax_ce(
    x, targets, *, weight=None, ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"
):
    """The loss written with torch ops, class axis last, for torch.autograd to differentiate:
    F.cross_entropy on the capped logits plus z_loss * logsumexp^2 per non-ignored row."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    t = targets
    if t.dtype.is_floating_point:
        t = t.movedim(-1, 1) if t.ndim > 1 else t
    loss = F.cross_entropy(
        x.movedim(-1, 1) if x.ndim > 1 else x,
        t,
        weight=weight,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    if z_loss:
        lse = torch.logsumexp(x, dim=-1)
        if targets.dtype.is_floating_point or ignore_index is None:
            valid = torch.ones_like(lse, dtype=torch.bool)
        else:
            valid = targets != ignore_index
        z_rows = torch.where(valid, z_loss * lse**2, torch.zeros_like(lse))
        loss = loss + {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / valid.sum()}[reduction]
    return loss


CASES = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": -100},
    "smooth": {"label_smoothing": 0.2},
    "weight+smooth+ignore": {"weight": True, "label_smoothing": 0.1, "ignore_index": -100},
    "z_loss": {"z_loss": 1e-2, "ignore_index": -100},
    "softcap": {"softcap": 4.0},
    "everything": {"weight": True, "label_smoothing": 0.3, "ignore_index": -100, "z_loss": 3e-3, "softcap": 6.0},
    "soft": {"soft": True},
    "soft+weight+smooth": {"soft": True, "weight": True, "label_smoothing": 0.25},
    "soft+z+softcap": {"soft": True, "z_loss": 1e-2, "softcap": 5.0},
}


def make_case(name, shape=(8, 5)):
    rng = rng_for("grad", name, shape)
    options = dict(CASES[name])
    c = shape[-1]
    logits = rng.normal(scale=3.0, size=shape)
    if options.pop("soft", False):
        targets = rng.random(shape)
        targets /= targets.sum(-1, keepdims=True)
    else:
        targets = rng.integers(0, c, size=shape[:-1])
        if "ignore_index" in options:
            targets.reshape(-1)[[1, -1]] = -100
    weight = rng.uniform(0.2, 3.0, size=c) if options.pop("weight", False) else None
    return logits, targets, weight, options


def torch_grad(logits, targets, weight, options, reduction):
    x = torch.from_numpy(logits.copy()).requires_grad_(True)
    loss = torch_softmax_ce(
        x,
        torch.from_numpy(targets),
        weight=None if weight is None else torch.from_numpy(weight),
        reduction=reduction,
        **options,
    )
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach().numpy(), g.numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(CASES))
def test_softmax_grad_matches_torch_autograd(xp, asxp, tonp, name, reduction):
    logits, targets, weight, options = make_case(name)
    expected_loss, expected_grad = torch_grad(logits, targets, weight, options, reduction)
    loss, grad = ce.softmax_cross_entropy_and_grad(
        asxp(logits),
        asxp(targets),
        weight=None if weight is None else asxp(weight),
        reduction=reduction,
        **options,
    )
    close(tonp(loss), expected_loss)
    assert tuple(grad.shape) == logits.shape
    close(tonp(grad), expected_grad)


def test_softmax_grad_with_axis_1_matches_torch(xp, asxp, tonp):
    rng = rng_for("grad-axis")
    logits = rng.normal(size=(3, 5, 4, 2))
    labels = rng.integers(0, 5, size=(3, 4, 2))
    labels[1, 2, 0] = -100
    weight = rng.uniform(0.5, 2.0, size=5)
    x = torch.from_numpy(logits.copy()).requires_grad_(True)
    loss = F.cross_entropy(x, torch.from_numpy(labels), weight=torch.from_numpy(weight), label_smoothing=0.1)
    (g,) = torch.autograd.grad(loss, x)
    got_loss, got_grad = ce.softmax_cross_entropy_and_grad(
        asxp(logits),
        asxp(labels),
        axis=1,
        weight=asxp(weight),
        ignore_index=-100,
        label_smoothing=0.1,
    )
    close(tonp(got_loss), loss.detach().numpy())
    close(tonp(got_grad), g.numpy())


def test_softmax_and_grad_loss_equals_softmax_cross_entropy(xp, asxp, tonp):
    logits, targets, weight, options = make_case("everything")
    for reduction in ["mean", "sum", "none"]:
        loss, _ = ce.softmax_cross_entropy_and_grad(
            asxp(logits), asxp(targets), weight=asxp(weight), reduction=reduction, **options
        )
        alone = ce.softmax_cross_entropy(
            asxp(logits), asxp(targets), weight=asxp(weight), reduction=reduction, **options
        )
        close(tonp(loss), tonp(alone))


def central_differences(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = h
        g[idx] = (f(x + step) - f(x - step)) / (2 * h)
    return g


@pytest.mark.parametrize("name", ["weight+smooth+ignore", "everything", "soft+z+softcap"])
def test_softmax_grad_matches_finite_differences(name):
    logits, targets, weight, options = make_case(name, shape=(4, 5))

    def loss(x):
        return float(ce.softmax_cross_entropy(x, targets, weight=weight, **options))

    _, grad = ce.softmax_cross_entropy_and_grad(logits, targets, weight=weight, **options)
    close(grad, central_differences(loss, logits), rtol=1e-6, atol=1e-9)


def torch_bce_grad(x, y, w, pw, eps, reduction):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(
        xt,
        torch.from_numpy(y * (1 - eps) + eps / 2),
        weight=None if w is None else torch.from_numpy(w),
        pos_weight=None if pw is None else torch.from_numpy(pw),
        reduction=reduction,
    )
    (g,) = torch.autograd.grad(loss.sum(), xt)
    return loss.detach().numpy(), g.numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["plain", "weight", "pos_weight", "all"])
def test_bce_with_logits_grad_matches_torch_autograd(xp, asxp, tonp, name, reduction):
    rng = rng_for("bce-grad", name)
    x = rng.normal(scale=4.0, size=(8, 5))
    x[0, :3] = [30.0, -30.0, 0.0]
    y = rng.uniform(size=(8, 5))
    w = rng.uniform(0.1, 2.0, size=(8, 1)) if name in ("weight", "all") else None
    pw = rng.uniform(0.5, 3.0, size=5) if name in ("pos_weight", "all") else None
    eps = 0.1 if name == "all" else 0.0
    expected_loss, expected_grad = torch_bce_grad(x, y, w, pw, eps, reduction)
    loss, grad = ce.binary_cross_entropy_with_logits_and_grad(
        asxp(x),
        asxp(y),
        weight=None if w is None else asxp(w),
        pos_weight=None if pw is None else asxp(pw),
        label_smoothing=eps,
        reduction=reduction,
    )
    close(tonp(loss), expected_loss)
    close(tonp(grad), expected_grad)


def test_bce_with_logits_grad_matches_finite_differences():
    rng = rng_for("bce-fd")
    x = rng.normal(scale=2.0, size=(3, 4))
    y = rng.uniform(size=(3, 4))
    w = rng.uniform(0.5, 2.0, size=(3, 4))
    pw = rng.uniform(0.5, 3.0, size=4)
    kwargs = {"weight": w, "pos_weight": pw, "label_smoothing": 0.05}

    def loss(z):
        return float(ce.binary_cross_entropy_with_logits(z, y, **kwargs))

    _, grad = ce.binary_cross_entropy_with_logits_and_grad(x, y, **kwargs)
    close(grad, central_differences(loss, x), rtol=1e-6, atol=1e-9)


def test_torch_autograd_through_core_equals_closed_form(asxp, xp, tonp):
    """On torch tensors the core functions stay differentiable; their autograd gradient equals
    the closed form (the same check with jax.grad on jax arrays)."""
    logits, targets, weight, options = make_case("everything")
    _, closed = ce.softmax_cross_entropy_and_grad(logits, targets, weight=weight, **options)
    name = xp.__name__
    if name == "torch":
        x = torch.from_numpy(logits.copy()).requires_grad_(True)
        loss = ce.softmax_cross_entropy(x, torch.from_numpy(targets), weight=torch.from_numpy(weight), **options)
        (g,) = torch.autograd.grad(loss, x)
        close(g.numpy(), closed)
    elif name.startswith("jax"):
        import jax

        t, w = asxp(targets), asxp(weight)
        g = jax.grad(lambda z: ce.softmax_cross_entropy(z, t, weight=w, **options))(asxp(logits))
        close(np.asarray(g), closed)
    else:
        pytest.skip(f"{name} has no autograd")


@pytest.mark.parametrize("name", ["everything", "soft+z+softcap"])
def test_reduction_none_gradient_is_that_of_the_sum(xp, asxp, tonp, name):
    logits, targets, weight, options = make_case(name)
    kwargs = {"weight": asxp(weight) if weight is not None else None, **options}
    rows, g_none = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(targets), reduction="none", **kwargs)
    total, g_sum = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(targets), reduction="sum", **kwargs)
    close(tonp(rows).sum(), tonp(total))
    close(tonp(g_none), tonp(g_sum))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["plain", "weight+smooth+ignore", "everything", "soft+z+softcap"])
def test_closed_form_with_sample_weight_equals_autograd_of_the_loss(name, reduction):
    """With per-row sample weights (which PyTorch lacks), the closed-form gradient equals
    torch.autograd's gradient of crossent's own loss on torch tensors, and finite differences."""
    logits, targets, weight, options = make_case(name)
    sw = rng_for("sw", name).uniform(0.0, 2.0, size=logits.shape[0])
    sw[2] = 0.0
    x = torch.from_numpy(logits.copy()).requires_grad_(True)
    kwargs = dict(options, reduction=reduction)
    loss = ce.softmax_cross_entropy(
        x,
        torch.from_numpy(targets),
        weight=None if weight is None else torch.from_numpy(weight),
        sample_weight=torch.from_numpy(sw),
        **kwargs,
    )
    (g,) = torch.autograd.grad(loss.sum(), x)
    closed_loss, closed = ce.softmax_cross_entropy_and_grad(logits, targets, weight=weight, sample_weight=sw, **kwargs)
    close(closed_loss, loss.detach().numpy())
    close(closed, g.numpy())
    if reduction == "mean":

        def f(z):
            return float(ce.softmax_cross_entropy(z, targets, weight=weight, sample_weight=sw, **kwargs))

        close(closed, central_differences(f, logits), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("soft", [False, True])
def test_masked_smoothed_weighted_grad_matches_finite_differences(soft):
    """-inf masks with label smoothing (eps / K over the finite classes) and class weights: the
    closed form equals central differences (0 on the masked classes)."""
    rng = rng_for("fd-masked", soft)
    logits = rng.normal(size=(4, 6))
    labels = np.array([0, 3, 5, 2])
    logits[0, [1, 4]] = -np.inf
    logits[2, :3] = -np.inf
    if soft:
        t = rng.random((4, 6))
        t[~np.isfinite(logits)] = 0.0
        targets = t / t.sum(-1, keepdims=True)
    else:
        targets = labels
    weight = rng.uniform(0.3, 2.0, size=6)
    kwargs = {"weight": weight, "label_smoothing": 0.2, "z_loss": 1e-3}

    def f(z):
        return float(ce.softmax_cross_entropy(z, targets, **kwargs))

    _, grad = ce.softmax_cross_entropy_and_grad(logits, targets, **kwargs)
    finite = np.isfinite(logits)
    assert np.all(grad[~finite] == 0.0)
    close(grad[finite], central_differences(f, logits)[finite], rtol=1e-6, atol=1e-9)
