"""ignore_index with probability (soft) targets, against PyTorch 2.13 as the oracle.

F.cross_entropy (and nn.CrossEntropyLoss) raise for an ignore_index >= 0 with floating targets
and accept a negative one, which matches no class; F.linear_cross_entropy raises for any
ignore_index but its default None. crossent raised nothing and ignored the option; it now
raises a ValueError naming ignore_index where PyTorch raises, on every impl and in the modules,
and gives PyTorch's loss where PyTorch accepts (crossent's linear default -100 means None).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet

IMPLS = ["auto", "chunked", "reference", "triton"]
TOL = dict(rtol=1e-10, atol=1e-12)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _case(seed=0, spatial=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 5, 3) if spatial else (7, 5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    p = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), 1)
    h = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(7, 5, generator=gen, dtype=torch.float64), 1)
    return x, p, h, w, q


def _message(value):
    return rf"^ignore_index applies to class-index targets only, got ignore_index={int(value)} with probability targets"


CE_REFUSED = [0, 3, 4, 5, 2**40, INT64_MAX, np.int64(2), torch.tensor(1)]
CE_ACCEPTED = [-100, -1, -(2**40), INT64_MIN, np.int64(-5), torch.tensor(-3)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", CE_REFUSED, ids=repr)
@pytest.mark.parametrize("spatial", [False, True])
def test_cross_entropy_refuses_a_nonnegative_ignore_index_with_probabilities(impl, value, spatial):
    x, p, *_ = _case(spatial=spatial)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        F.cross_entropy(x, p, ignore_index=value)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        torch.nn.CrossEntropyLoss(ignore_index=value)(x, p)
    with pytest.raises(ValueError, match=_message(value)):
        cet.cross_entropy(x, p, ignore_index=value, impl=impl)
    with pytest.raises(ValueError, match=_message(value)):
        cet.CrossEntropyLoss(ignore_index=value, impl=impl)(x, p)
    with pytest.raises(ValueError, match=_message(value)):  # float32 and the legacy slot too
        cet.cross_entropy(x.float(), p.float(), None, None, value, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("value", CE_ACCEPTED, ids=repr)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cross_entropy_accepts_a_negative_ignore_index_with_probabilities_as_pytorch(impl, value, reduction):
    x, p, *_ = _case(1, spatial=True)
    kw = dict(ignore_index=value, reduction=reduction, label_smoothing=0.1)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = cet.cross_entropy(xo, p, impl=impl, **kw)
    theirs = F.cross_entropy(xt, p, **kw)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours, cet.cross_entropy(x, p, impl=impl, reduction=reduction, label_smoothing=0.1),
                               **TOL)  # it ignores nothing
    g = torch.ones_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0], **TOL)
    torch.testing.assert_close(cet.CrossEntropyLoss(ignore_index=value, impl=impl, reduction=reduction)(x, p),
                               torch.nn.CrossEntropyLoss(ignore_index=value, reduction=reduction)(x, p), **TOL)


LINEAR_REFUSED = [0, 3, -1, -5, -101, INT64_MAX, INT64_MIN, np.int64(2), torch.tensor(-1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", LINEAR_REFUSED, ids=repr)
def test_linear_cross_entropy_refuses_ignore_index_with_probabilities(impl, value):
    *_, h, w, q = _case(2)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified when target contains probabilities"):
        F.linear_cross_entropy(h, w, q, ignore_index=value)
    with pytest.raises(ValueError, match=_message(value)):
        cet.linear_cross_entropy(h, w, q, ignore_index=value, impl=impl)
    head = cet.LinearCrossEntropyLoss(6, 5, ignore_index=value, impl=impl, dtype=torch.float64)
    with pytest.raises(ValueError, match=_message(value)):
        head(h, q)


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("value", [None, -100, np.int64(-100)], ids=repr)
def test_linear_cross_entropy_default_ignore_index_with_probabilities_is_pytorchs_none(impl, value):
    *_, h, w, q = _case(3)
    ho, ht = h.clone().requires_grad_(), h.clone().requires_grad_()
    ours = cet.linear_cross_entropy(ho, w, q, ignore_index=value, impl=impl)
    theirs = F.linear_cross_entropy(ht, w, q)  # ignore_index=None, the only value PyTorch takes here
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, ho)[0], torch.autograd.grad(theirs, ht)[0], **TOL)
    head = cet.LinearCrossEntropyLoss(6, 5, ignore_index=value, impl=impl, dtype=torch.float64)
    ref = torch.nn.LinearCrossEntropyLoss(6, 5, dtype=torch.float64)
    with torch.no_grad():
        ref.linear.weight.copy_(head.linear.weight)
    torch.testing.assert_close(head(h, q), ref(h, q), **TOL)


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
def test_class_index_targets_still_take_any_ignore_index(impl):
    x, _, h, w, _ = _case(4)
    y = torch.tensor([0, 3, 3, 1, 4, 2, 3])
    for value in (3, 0, -1):
        torch.testing.assert_close(cet.cross_entropy(x, y, ignore_index=value, impl=impl),
                                   F.cross_entropy(x, y, ignore_index=value), **TOL)
        torch.testing.assert_close(cet.linear_cross_entropy(h, w, y, ignore_index=value, impl=impl),
                                   F.linear_cross_entropy(h, w, y, ignore_index=value), **TOL)
