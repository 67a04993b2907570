"""impl="triton" through crossent.torch against impl="reference" (Triton's CPU interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

import crossent.torch as cet

pytestmark = [
    pytest.mark.triton,
    # NumPy inside Triton's interpreter warns on IEEE events the kernels rely on (inf - inf).
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs TRITON_INTERPRET=1 set before triton is imported (make test sets it)",
    ),
]
pytest.importorskip("triton")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_triton_equals_reference(reduction):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 2, generator=gen)  # (N, C, d1): the wrapper moves classes last
    y = torch.randint(0, 37, (3, 2), generator=gen)
    y[0, 1] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    xt = x.clone().requires_grad_()
    got = cet.cross_entropy(xt, y, impl="triton", **kw)
    xr = x.clone().requires_grad_()
    want = cet.cross_entropy(xr, y, impl="reference", **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_triton_equals_reference():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 8, generator=gen)
    w = torch.randn(29, 8, generator=gen)
    y = torch.randint(0, 29, (2, 3), generator=gen)
    y[1, 0] = -100
    inputs_t = [t.clone().requires_grad_() for t in (h, w)]
    inputs_r = [t.clone().requires_grad_() for t in (h, w)]
    got = cet.linear_cross_entropy(*inputs_t, y, impl="triton", z_loss=1e-2)
    want = cet.linear_cross_entropy(*inputs_r, y, impl="reference", z_loss=1e-2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    for a, b in zip(inputs_t, inputs_r, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
