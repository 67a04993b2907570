"""cet.binary_cross_entropy_with_logits and cet.kl_div against PyTorch, plus their deviations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet

TOL = dict(rtol=1e-10, atol=1e-12)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(13,), (5, 7), (2, 3, 11)])
@pytest.mark.parametrize("weighted,pos_weighted", [(False, False), (True, False), (False, True), (True, True)])
def test_bce_with_logits_equals_pytorch(reduction, shape, weighted, pos_weighted):
    gen = torch.Generator().manual_seed(0)
    x = (4 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    t = torch.rand(shape, generator=gen, dtype=torch.float64)
    t.view(-1)[::3] = 1.0
    t.view(-1)[1::3] = 0.0
    weight = torch.rand(shape[-1:], generator=gen, dtype=torch.float64) if weighted else None
    pos_weight = torch.rand(shape[-1:], generator=gen, dtype=torch.float64) * 3 if pos_weighted else None
    kw = dict(weight=weight, reduction=reduction, pos_weight=pos_weight)
    ours = cet.binary_cross_entropy_with_logits(x, t, **kw)
    theirs = F.binary_cross_entropy_with_logits(x, t, **kw)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, x), _grad(theirs, x), **TOL)


def test_bce_gradcheck_and_legacy_args():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    pw = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: cet.binary_cross_entropy_with_logits(x, t, pos_weight=pw), (x,)
    )
    with pytest.warns(UserWarning, match="deprecated"):
        ours = cet.binary_cross_entropy_with_logits(x, t, None, False)
    with pytest.warns(UserWarning, match="deprecated"):
        theirs = F.binary_cross_entropy_with_logits(x, t, None, False)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_bce_deviations():
    """PyTorch gives NaN at x=-inf, t=0 and x=+inf, t=1 and for an empty mean; we give 0."""
    x = torch.tensor([-math.inf, math.inf, -math.inf, math.inf], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    theirs = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    assert torch.isnan(theirs[:2]).all()
    xg = x.clone().requires_grad_()
    ours = cet.binary_cross_entropy_with_logits(xg, t, reduction="none")
    assert ours.tolist() == [0.0, 0.0, math.inf, math.inf]
    g = _grad(ours[:2], xg)
    assert torch.equal(g, torch.zeros_like(g))
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    assert torch.isnan(F.binary_cross_entropy_with_logits(empty, empty.detach()))
    loss = cet.binary_cross_entropy_with_logits(empty, empty.detach())
    assert loss.item() == 0.0
    assert _grad(loss, empty).numel() == 0


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_equals_pytorch(reduction, log_target):
    gen = torch.Generator().manual_seed(2)
    x = torch.log_softmax(torch.randn(6, 9, generator=gen, dtype=torch.float64), 1)
    x.requires_grad_()
    p = torch.softmax(torch.randn(6, 9, generator=gen, dtype=torch.float64), 1)
    t = p.log() if log_target else p
    if reduction == "mean":
        with pytest.warns(UserWarning, match="batchmean"):
            ours = cet.kl_div(x, t, reduction=reduction, log_target=log_target)
        with pytest.warns(UserWarning, match="batchmean"):
            theirs = F.kl_div(x, t, reduction=reduction, log_target=log_target)
    else:
        ours = cet.kl_div(x, t, reduction=reduction, log_target=log_target)
        theirs = F.kl_div(x, t, reduction=reduction, log_target=log_target)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, x), _grad(theirs, x), **TOL)


def test_kl_div_is_the_kl_divergence_and_nonnegative():
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(5, 4, generator=gen, dtype=torch.float64), 1)
    q = torch.softmax(torch.randn(5, 4, generator=gen, dtype=torch.float64), 1)
    kl = cet.kl_div(q.log(), p, reduction="none").sum(1)
    direct = (p * (p.log() - q.log())).sum(1)
    torch.testing.assert_close(kl, direct, **TOL)
    assert (kl >= 0).all()


def test_kl_div_deviations():
    """Zero target mass at log q = -inf: PyTorch NaN, ours 0 (and zero gradient); p > 0 there: inf."""
    x = torch.tensor([[-math.inf, 0.0], [-math.inf, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    assert torch.isnan(F.kl_div(x, t, reduction="none")[0, 0])
    xg = x.clone().requires_grad_()
    ours = cet.kl_div(xg, t, reduction="none")
    assert ours[0].tolist() == [0.0, 0.0]
    assert ours[1, 0].item() == math.inf
    g = _grad(ours[0], xg)
    assert g[0, 0] == 0.0 and g[0, 1] == -1.0  # d/dx of -t x; zero where t = 0

    log_t = torch.tensor([[-math.inf, 0.0]], dtype=torch.float64)
    assert torch.isnan(F.kl_div(x[:1], log_t, reduction="none", log_target=True)[0, 0])
    assert cet.kl_div(x[:1], log_t, reduction="none", log_target=True).tolist() == [[0.0, 0.0]]
    empty = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    assert torch.isnan(F.kl_div(empty, empty.detach(), reduction="batchmean"))
    with pytest.warns(UserWarning, match="batchmean"):
        assert cet.kl_div(empty, empty.detach(), reduction="mean").item() == 0.0
    assert cet.kl_div(empty, empty.detach(), reduction="batchmean").item() == 0.0


def test_kl_div_target_gradient_at_zero_mass_deviation():
    """d/dt of t (log t - x) at t = 0 (a one-sided -inf): PyTorch NaN, ours 0, as the term itself
    is 0 there (0 log 0 = 0); the other entries equal PyTorch's log t + 1 - x."""
    x = torch.log_softmax(torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.0, -1.0]], dtype=torch.float64), dim=1)
    t = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], dtype=torch.float64)
    theirs, ours = t.clone().requires_grad_(), t.clone().requires_grad_()
    F.kl_div(x, theirs, reduction="sum").backward()
    cet.kl_div(x, ours, reduction="sum").backward()
    assert torch.isnan(theirs.grad[0, 0]) and ours.grad[0, 0].item() == 0.0
    want = torch.log(t) + 1 - x
    torch.testing.assert_close(ours.grad[t > 0], want[t > 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(theirs.grad[t > 0], ours.grad[t > 0], rtol=1e-12, atol=0)


def test_kl_div_nan_input_under_zero_target_propagates():
    """A NaN log Q under a zero target mass is NaN, as in PyTorch (it was masked to 0 with the
    zero-mass terms), with or without log_target; -inf and +inf there stay 0."""
    x = torch.tensor([[math.nan, -1.0], [-math.inf, math.inf]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    for log_target in (False, True):
        target = t.log() if log_target else t
        want = F.kl_div(x, target, reduction="none", log_target=log_target)
        ours = cet.kl_div(x, target, reduction="none", log_target=log_target)
        assert torch.isnan(want[0, 0]) and torch.isnan(ours[0, 0])
        assert ours[0, 1] == want[0, 1] and ours[1].tolist() == [0.0, 0.0]
        assert torch.isnan(cet.kl_div(x, target, reduction="sum", log_target=log_target))


def test_bad_input():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="target must have the input's shape"):
        cet.binary_cross_entropy_with_logits(x, torch.zeros(3))
    with pytest.raises(ValueError, match="pos_weight must broadcast"):
        cet.binary_cross_entropy_with_logits(x, x, pos_weight=torch.ones(5))
    with pytest.raises(ValueError, match="target must not contain NaN"):
        cet.binary_cross_entropy_with_logits(x, torch.full((3, 2), math.nan))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cet.kl_div(x, x, reduction="avg")
    with pytest.raises(ValueError, match="target must not contain NaN"):
        cet.kl_div(x, torch.full((3, 2), math.nan))
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        cet.kl_div(torch.zeros(3, dtype=torch.long), torch.zeros(3))
