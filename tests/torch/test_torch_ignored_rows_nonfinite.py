"""An ignored row contributes 0 whatever its inputs (DESIGN.md, Semantics), gradients included.

Two ways a non-finite value sits on an ignored row in practice:

- the upstream gradient: ``reduction="none"`` followed by a per-sequence normalisation
  ``loss / seq_len`` gives NaN or inf on padded sequences of length 0 (and a non-finite scalar
  upstream gradient for "mean"/"sum");
- the hidden state of ``linear_cross_entropy``: a fully masked attention row in the padding.

Every path must then give the gradient that ``F.cross_entropy`` gives (0 on the ignored rows)
and, for the linear version, a weight and bias gradient equal to that of the problem without
the ignored rows. "chunked-all-rows" is the path accelerator tensors take (every row processed),
selected on the CPU by the module's switch; "chunked-cpu" gathers the non-ignored rows first.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet
import crossent.torch._chunked as chunked

PATHS = ["chunked-cpu", "chunked-all-rows", "reference"]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=PATHS)
def impl(request, monkeypatch):
    """The ``impl=`` argument, with the chunked row switch and small blocks set for the path."""
    if request.param == "reference":
        return "reference"
    monkeypatch.setattr(chunked, "DEFAULT_BLOCK_ELEMENTS", 24)  # several row blocks
    monkeypatch.setattr(chunked, "COMPACT_IGNORED_ROWS_ON_CPU", request.param == "chunked-cpu")
    return "chunked"


def _problem(rows=7, classes=5, features=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=gen, dtype=torch.float64)
    w = torch.randn(classes, features, generator=gen, dtype=torch.float64)
    b = torch.randn(classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[[1, 4]] = -100
    return x, w, b, target


def _upstream(reduction, ignored, bad, kept):
    """The upstream gradient: ``bad`` on the ignored rows and ``kept`` elsewhere ("none"), or the
    scalar ``bad`` ("mean"/"sum")."""
    if reduction == "none":
        return torch.where(ignored, bad, kept).to(torch.float64)
    return torch.tensor(bad, dtype=torch.float64)


def _grads(loss_fn, tensors, upstream):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss_fn(*leaves).backward(upstream)
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_nonfinite_upstream_gradient_on_ignored_rows_gives_their_gradient_0(impl, reduction, bad, label_smoothing):
    x, w, _, target = _problem()
    logits = x @ w.T
    ignored = target == -100
    upstream = _upstream(reduction, ignored, bad, 1.5)  # "mean"/"sum": NaN/inf on every kept row too
    options = dict(reduction=reduction, label_smoothing=label_smoothing)
    (expected,) = _grads(lambda z: F.cross_entropy(z, target, **options), [logits], upstream)
    (actual,) = _grads(lambda z: cet.cross_entropy(z, target, **options, impl=impl), [logits], upstream)
    assert torch.equal(actual[ignored], torch.zeros_like(actual[ignored]))
    assert torch.equal(expected[ignored], torch.zeros_like(expected[ignored]))
    if reduction == "none":
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    else:
        # The whole loss is non-finite: so is every other row's gradient (whether inf or NaN
        # where inf - inf meets depends on the formula; F.cross_entropy mixes both).
        assert not torch.isfinite(actual[~ignored]).any()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_linear_nonfinite_upstream_gradient_on_ignored_rows(impl, reduction, bad):
    x, w, b, target = _problem()
    ignored = target == -100
    upstream = _upstream(reduction, ignored, bad, 0.5)
    options = dict(reduction=reduction, label_smoothing=0.1)

    def oracle(x_, w_, b_):
        return F.cross_entropy(F.linear(x_, w_, b_), target, **options)

    def ours(x_, w_, b_):
        return cet.linear_cross_entropy(x_, w_, target, linear_bias=b_, **options, impl=impl)

    expected = _grads(oracle, [x, w, b], upstream)
    actual = _grads(ours, [x, w, b], upstream)
    assert torch.equal(actual[0][ignored], torch.zeros_like(actual[0][ignored]))
    assert torch.equal(expected[0][ignored], torch.zeros_like(expected[0][ignored]))
    if reduction == "none":
        for name, a, e in zip(("input", "weight", "bias"), actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name)
    else:
        assert not torch.isfinite(actual[0][~ignored]).any()
        assert not torch.isfinite(actual[1]).any() and not torch.isfinite(actual[2]).any()


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_z_loss_coefficient_is_0_on_ignored_rows_too(impl, reduction):
    """The z-loss share of the gradient (the second row coefficient) under a NaN upstream."""
    x, w, _, target = _problem()
    ignored = target == -100
    upstream = _upstream(reduction, ignored, NAN, 1.0)
    options = dict(reduction=reduction, z_loss=0.3, softcap=2.5)
    (actual,) = _grads(lambda z: cet.cross_entropy(z, target, **options, impl=impl), [x @ w.T], upstream)
    assert torch.equal(actual[ignored], torch.zeros_like(actual[ignored]))
    if reduction == "none":
        (expected,) = _grads(
            lambda z: cet.cross_entropy(z, target[~ignored], **options, impl="reference"),
            [x[~ignored] @ w.T],
            torch.ones(int((~ignored).sum()), dtype=torch.float64),
        )
        torch.testing.assert_close(actual[~ignored], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2}, {"z_loss": 0.1, "softcap": 3.0}], ids=str)
def test_linear_nonfinite_input_row_that_is_ignored_leaves_every_gradient_finite(impl, reduction, bad, options):
    """A NaN/inf hidden state on an ignored row: loss and gradients equal those of the problem
    without that row (input gradient 0 there) on every path, dW and db included."""
    x, w, b, target = _problem(rows=9, classes=6, features=4, seed=1)
    x[1, 0] = bad  # row 1 is ignored; so is row 4, whose whole row is non-finite
    x[4] = bad
    keep = target != -100
    n_keep = int(keep.sum())
    gen = torch.Generator().manual_seed(2)
    upstream = torch.rand(x.shape[0], generator=gen, dtype=torch.float64) + 0.5
    upstream_keep = upstream[keep] if reduction == "none" else torch.ones((), dtype=torch.float64)
    if reduction != "none":
        upstream = torch.ones((), dtype=torch.float64)

    def ours(x_, w_, b_):
        return cet.linear_cross_entropy(x_, w_, target, linear_bias=b_, reduction=reduction, **options, impl=impl)

    def oracle(x_, w_, b_):  # the kept rows only: plain PyTorch where it has the options
        if not options.get("z_loss"):
            return F.cross_entropy(F.linear(x_, w_, b_), target[keep], reduction=reduction, **options)
        return cet.linear_cross_entropy(
            x_, w_, target[keep], linear_bias=b_, reduction=reduction, **options, impl="reference"
        )

    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = ours(*leaves)
    loss.backward(upstream)
    kept = [t.clone().requires_grad_() for t in (x[keep], w, b)]
    expected = oracle(*kept)
    expected.backward(upstream_keep)
    if reduction == "none":
        assert torch.equal(loss.detach()[~keep], torch.zeros(x.shape[0] - n_keep, dtype=torch.float64))
        torch.testing.assert_close(loss.detach()[keep], expected.detach(), rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    dx, dw, db = (leaf.grad for leaf in leaves)
    assert torch.equal(dx[~keep], torch.zeros_like(dx[~keep]))
    torch.testing.assert_close(dx[keep], kept[0].grad, rtol=1e-10, atol=1e-12, msg="input")
    torch.testing.assert_close(dw, kept[1].grad, rtol=1e-10, atol=1e-12, msg="weight")
    torch.testing.assert_close(db, kept[2].grad, rtol=1e-10, atol=1e-12, msg="bias")


def test_linear_nonfinite_input_row_that_is_ignored_float32_paths_agree(impl):
    """float32 (the low-precision matmul helpers of the chunked path) without a bias."""
    x, w, _, target = (t.float() if t.is_floating_point() else t for t in _problem(seed=3))
    x[4] = NAN
    keep = target != -100
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    cet.linear_cross_entropy(*leaves, target, impl=impl).backward()
    kept = [t.clone().requires_grad_() for t in (x[keep], w)]
    F.cross_entropy(kept[0] @ kept[1].T, target[keep]).backward()
    assert torch.isfinite(leaves[0].grad).all() and torch.isfinite(leaves[1].grad).all()
    torch.testing.assert_close(leaves[1].grad, kept[1].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaves[0].grad[keep], kept[0].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_linear_all_rows_ignored_nonfinite_scalar_upstream_gives_zero_gradients(impl, reduction, bad):
    """Every row ignored and a NaN/inf scalar upstream gradient: every gradient exactly 0, dW
    and db included (they sum over no row), as F.cross_entropy's composition gives."""
    x, w, b, target = _problem()
    target = torch.full_like(target, -100)
    dx, dw, db = _grads(lambda x_, w_, b_: cet.linear_cross_entropy(x_, w_, target, linear_bias=b_, impl=impl,
                                                                    reduction=reduction),
                        (x, w, b), torch.tensor(bad, dtype=torch.float64))
    for g in (dx, dw, db):
        assert torch.equal(g, torch.zeros_like(g))
