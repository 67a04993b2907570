"""``ignore_index`` outside the int64 range in crossent.triton (and crossent.torch impl="triton"):
a ValueError naming ignore_index, the accepted range (int64, as PyTorch takes) and the value; it
was a bare OverflowError from the target comparison, and 2**63 .. 2**64 - 1 reached the kernels
as uint64 and matched no target. The ends of the range ignore their rows, against float64
F.cross_entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BAD = [2**70, 2**63, INT64_MIN - 1, np.uint64(2**64 - 1)]


def _message(value):
    return (rf"^ignore_index must be an int in the int64 range \[-2\*\*63, 2\*\*63 - 1\], as "
            rf"PyTorch takes, got {int(value)}$")


def _case(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    h = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (9,), generator=gen)
    return x.to(device), h.to(device), w.to(device), y.to(device)


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_out_of_int64_range_is_a_value_error(device, value):
    from crossent.triton import cross_entropy, linear_cross_entropy

    x, h, w, y = _case(device)
    with pytest.raises(ValueError, match=_message(value)):
        cross_entropy(x.float(), y, ignore_index=value)
    with pytest.raises(ValueError, match=_message(value)):
        linear_cross_entropy(h.float(), w.float(), y, ignore_index=value)


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_crossent_torch_impl_triton_refuses_it_too(interpreter, value):
    import crossent.torch as cet

    x, h, w, y = _case(interpreter)
    with pytest.raises(ValueError, match=_message(value)):
        cet.cross_entropy(x.float(), y, ignore_index=value, impl="triton")
    with pytest.raises(ValueError, match=_message(value)):
        cet.linear_cross_entropy(h.float(), w.float(), y, ignore_index=value, impl="triton")


@pytest.mark.parametrize("value", [INT64_MIN, INT64_MAX], ids=repr)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_the_ends_of_the_int64_range_ignore_their_rows(ref, device, value, reduction):
    from crossent.triton import cross_entropy, linear_cross_entropy

    x, h, w, y = _case(device, 1)
    y[[1, 4, 5]] = value
    opts = dict(ignore_index=value, reduction=reduction, label_smoothing=0.1)
    want = ref(x, y, **opts)
    torch.testing.assert_close(cross_entropy(x.float(), y, **opts).double(), want, rtol=1e-5, atol=1e-6)
    want = ref(h @ w.T, y, **opts)
    got = linear_cross_entropy(h.float(), w.float(), y, **opts)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
