"""``ignore_index`` outside the int64 range: PyTorch refuses it (ValueError "Overflow when
unpacking long long"), and so does crossent.torch on every implementation and for both losses,
with a ValueError naming ignore_index, the accepted range and the value (it raised a bare
OverflowError from the target comparison, or for 2**63 .. 2**64 - 1 matched no target silently).
The range's own ends work, against PyTorch as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BAD = [2**70, 2**63, INT64_MIN - 1, -(2**80), np.uint64(2**64 - 1)]
IMPLS = ["auto", "chunked", "reference"]


def _message(value):
    return (rf"^ignore_index must be an int in the int64 range \[-2\*\*63, 2\*\*63 - 1\], as "
            rf"PyTorch takes, got {int(value)}$")


def _case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    h = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (9,), generator=gen)
    return x, h, w, y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", BAD, ids=repr)
@pytest.mark.parametrize("soft", [False, True])
def test_out_of_int64_range_is_a_value_error_as_in_pytorch(impl, value, soft):
    x, h, w, y = _case()
    target = torch.softmax(x, 1) if soft else y
    with pytest.raises(ValueError, match="Overflow"):
        F.cross_entropy(x, target, ignore_index=value)
    with pytest.raises(ValueError, match=_message(value)):
        cet.cross_entropy(x, target, ignore_index=value, impl=impl)
    with pytest.raises(ValueError, match=_message(value)):
        cet.CrossEntropyLoss(ignore_index=value, impl=impl)(x, target)
    # (PyTorch's linear_cross_entropy refuses any ignore_index with probability targets first.)
    with pytest.raises(RuntimeError if soft else ValueError, match="probabilities" if soft else "Overflow"):
        F.linear_cross_entropy(h, w, target, ignore_index=value)
    with pytest.raises(ValueError, match=_message(value)):
        cet.linear_cross_entropy(h, w, target, ignore_index=value, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [INT64_MIN, INT64_MAX, np.int64(INT64_MIN), torch.tensor(INT64_MAX)], ids=repr)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_the_ends_of_the_int64_range_ignore_their_rows_as_pytorch(impl, value, reduction):
    x, h, w, y = _case(1)
    y = y.clone()
    y[[1, 4, 5]] = int(value)
    kw = dict(ignore_index=value, reduction=reduction, label_smoothing=0.1)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = cet.cross_entropy(xo, y, impl=impl, **kw), F.cross_entropy(xt, y, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    g = torch.ones_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0],
                               rtol=1e-10, atol=1e-12)
    ours = cet.linear_cross_entropy(h, w, y, impl=impl, **kw)
    theirs = F.linear_cross_entropy(h, w, y, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
