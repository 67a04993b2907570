"""cet.kl_div and cet.binary_cross_entropy_with_logits as drop-ins for torch.nn.functional
(PyTorch 2.13 is the oracle): kl_div broadcasts input and target as F.kl_div does."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet

TOL = dict(rtol=1e-10, atol=1e-12)


def _theirs_kl(*args, **kwargs):
    """F.kl_div without its 'mean' warning (tested on its own below)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(*args, **kwargs)


def _ours_kl(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cet.kl_div(*args, **kwargs)


# (input shape, target shape): the target broadcast up to the input, the input up to the target
# (the result shape grows), both, and a 0-d input.
BROADCASTS = [
    ((3, 4), (4,)),
    ((3, 4), (1, 4)),
    ((4,), (3, 4)),
    ((5, 1, 4), (2, 4)),
    ((3, 1), (1, 4)),
    ((), (3,)),
]


def test_kl_div_broadcast_target_example_from_the_report():
    gen = torch.Generator().manual_seed(0)
    x = torch.log_softmax(torch.randn(3, 4, generator=gen), 1)
    t = torch.softmax(torch.randn(4, generator=gen), 0)
    ours = cet.kl_div(x, t, reduction="sum")
    torch.testing.assert_close(ours, F.kl_div(x, t, reduction="sum"))
    torch.testing.assert_close(ours, cet.kl_div(x, t.expand(3, 4), reduction="sum"))


@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_broadcasts_as_pytorch(shapes, reduction, log_target):
    in_shape, t_shape = shapes
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(in_shape, generator=gen, dtype=torch.float64).sub(1).requires_grad_()
    p = torch.rand(t_shape, generator=gen, dtype=torch.float64).add(0.05)
    t = (p.log() if log_target else p).requires_grad_()
    kw = dict(reduction=reduction, log_target=log_target)
    ours = _ours_kl(x, t, **kw)
    theirs = _theirs_kl(x, t, **kw)
    assert ours.shape == theirs.shape == (torch.broadcast_shapes(in_shape, t_shape) if reduction == "none" else ())
    torch.testing.assert_close(ours, theirs, **TOL)
    gx, gt = torch.autograd.grad(ours.sum(), (x, t))
    hx, ht = torch.autograd.grad(theirs.sum(), (x, t))
    assert gx.shape == x.shape and gt.shape == t.shape
    torch.testing.assert_close(gx, hx, **TOL)
    torch.testing.assert_close(gt, ht, **TOL)


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_broadcast_zero_target_mass(log_target):
    """A zero target mass broadcast over a column: 0 there (crossent's documented 0 log 0 = 0;
    PyTorch NaN at log q = -inf only), equal to PyTorch elsewhere, input gradient included."""
    x = torch.tensor([[-1.0, -0.5, -2.0], [-3.0, -0.1, -1.5]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64)
    t = p.log() if log_target else p
    ours = cet.kl_div(x, t, reduction="none", log_target=log_target)
    theirs = F.kl_div(x, t, reduction="none", log_target=log_target)
    assert ours[:, 0].tolist() == [0.0, 0.0]
    torch.testing.assert_close(ours[:, 1:], theirs[:, 1:], **TOL)  # log_target: PyTorch NaN at [:, 0]
    gx = torch.autograd.grad(ours.sum(), x)[0]
    torch.testing.assert_close(gx[:, 1:], torch.autograd.grad(theirs.sum(), x)[0][:, 1:], **TOL)
    torch.testing.assert_close(gx, -p.expand(2, 3), **TOL)


def test_kl_div_broadcast_gradient_is_the_expanded_one_summed():
    """Independent of PyTorch's kl_div: the gradient of a broadcast call equals that of the
    explicitly expanded input, summed over the broadcast dimension, and passes gradcheck."""
    gen = torch.Generator().manual_seed(2)
    x = torch.log_softmax(torch.randn(5, generator=gen, dtype=torch.float64), 0).requires_grad_()
    t = torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), 1)
    (g,) = torch.autograd.grad(cet.kl_div(x, t, reduction="sum"), x)
    xe = x.detach().expand(3, 5).clone().requires_grad_()
    (ge,) = torch.autograd.grad(cet.kl_div(xe, t, reduction="sum"), xe)
    torch.testing.assert_close(g, ge.sum(0), **TOL)
    torch.testing.assert_close(g, -t.sum(0), **TOL)  # d/dx of sum t (log t - x)
    assert torch.autograd.gradcheck(lambda x: cet.kl_div(x, t, reduction="batchmean"), (x,))


def test_kl_div_broadcast_warns_nothing_and_refuses_incompatible_shapes():
    x = torch.zeros(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cet.kl_div(x, torch.full((4,), 0.25), reduction="sum")
        F.kl_div(x, torch.full((4,), 0.25), reduction="sum")  # the oracle warns nothing either
    with pytest.raises(RuntimeError, match="must match"):
        F.kl_div(x, torch.zeros(2, 4), reduction="sum")
    with pytest.raises(ValueError, match=r"target must broadcast with the input's shape \(3, 4\).*got \(2, 4\)"):
        cet.kl_div(x, torch.zeros(2, 4), reduction="sum")
