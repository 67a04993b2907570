"""The CPU passes of impl="auto" leave ``.grad`` (and the logits) with torch's own, resizable
storage, as ``F.cross_entropy`` does (review cpu 4: the gradient was numpy-owned memory)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet
from crossent.torch import _cpu_fast


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-2}, {"softcap": 5.0},
                                     {"inplace_backward": True}, {"probs": True}])
@pytest.mark.parametrize("rows", [7])
def test_grad_storage_is_resizable_like_f(cpu_route, options, rows):
    options = dict(options)
    probs = options.pop("probs", False)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1000, generator=g, requires_grad=True)
    t = torch.randint(0, 1000, (rows,), generator=g)
    if probs:
        t = torch.softmax(torch.randn(rows, 1000, generator=g), dim=1)
    if options.get("inplace_backward"):
        x0 = x.detach().clone()
        leaf = x.detach().clone().requires_grad_(True)
        x = leaf * 1.0  # inplace_backward writes into the logits: a non-leaf, kept by nobody else
        x.retain_grad()
    else:
        x0 = x.detach().clone()
    cet.cross_entropy(x, t, **options).backward()
    assert x.grad.untyped_storage().resizable()
    if not options.get("inplace_backward"):
        assert x.untyped_storage().resizable()  # the logits too (Tensor.numpy() would pin them)
    # The values are F's (the z-loss and softcap options composed by hand).
    ref = x0.double().requires_grad_(True)
    z = ref if "softcap" not in options else options["softcap"] * torch.tanh(ref / options["softcap"])
    want = F.cross_entropy(z, t.double() if probs else t, label_smoothing=options.get("label_smoothing", 0.0))
    if "z_loss" in options:
        want = want + options["z_loss"] * (torch.logsumexp(z, dim=1) ** 2).mean()
    want.backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-9)
    grad = x.grad
    grad.untyped_storage().resize_(0)  # frees the memory in place (as FSDP-style code does); raised before
    assert grad.untyped_storage().nbytes() == 0
    grad.resize_(rows, 2000)  # and grows it again
    assert grad.numel() == rows * 2000


def test_large_grad_with_huge_page_advice_is_correct_and_resizable(cpu_route):
    """1100 x 1000 float32 (4.4 MB): a buffer the huge-page advice (madvise) applies to."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1100, 1000, generator=g, requires_grad=True)
    t = torch.randint(0, 1000, (1100,), generator=g)
    cet.cross_entropy(x, t).backward()
    ref = x.detach().double().requires_grad_(True)
    F.cross_entropy(ref, t).backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-10)
    storage = x.grad.untyped_storage()
    assert storage.resizable() and x.untyped_storage().resizable()
    storage.resize_(0)
    assert storage.nbytes() == 0


def test_gradient_buffer_is_a_plain_torch_tensor():
    for shape, dtype in [((3, 5), torch.float32), ((2048, 1024), torch.float32), ((700, 1000), torch.float64)]:
        x = torch.empty(shape, dtype=dtype)
        buf = _cpu_fast._gradient_buffer(x)
        assert buf.shape == x.shape and buf.dtype == dtype and buf.is_contiguous()
        assert buf.untyped_storage().resizable()
        buf.fill_(1.5)  # the advised memory is ordinary memory
        assert float(buf.sum()) == 1.5 * x.numel()


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(softcap=5.0)], ids=repr)
def test_negative_bit_views_are_read_as_their_values(options):
    """Review (diff) 1: the numpy views read raw memory, which holds -t for a negative-bit view
    (t.numpy() refused those). Probability targets, logits and class weights built that way gave
    -1.2391 for F's 1.6409 (targets, smoothing); now their values are read."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    p = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    t = torch.complex(0 * p, -p).conj().imag  # equal to p, with the negative bit
    assert t.is_neg() and torch.equal(t, p)
    w = torch._neg_view(-torch.arange(1.0, 6.0, dtype=torch.float64))
    assert w.is_neg()
    xn = torch._neg_view(-x)
    assert xn.is_neg()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for logits, target, weight in ((x, t, None), (xn, y, None), (x, y, w), (xn, t, w)):
        want = F.cross_entropy(logits.clone(), target.clone(), weight=None if weight is None else weight.clone(),
                               **{k: v for k, v in options.items() if k != "softcap"}) if "softcap" not in options \
            else F.cross_entropy(5.0 * torch.tanh(logits.clone() / 5.0), target.clone(),
                                 weight=None if weight is None else weight.clone())
        got = cet.cross_entropy(logits, target, weight=weight, **options)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradient_buffer_on_the_logits_device_whatever_the_default():
    """Review (diff) 2: the buffer went to torch's default device (meta: 'data is NULL'; cuda: a
    GPU pointer handed to the CPU kernels). Under a meta default the CPU logits still get a CPU
    gradient equal to F's."""
    x = torch.randn(300, 1000, dtype=torch.float64)
    y = torch.randint(0, 1000, (300,))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.device("meta"):
        loss = cet.cross_entropy(xr, y)
        loss.backward()
    F.cross_entropy(xf, y).backward()
    assert xr.grad.device.type == "cpu"
    torch.testing.assert_close(xr.grad, xf.grad, rtol=1e-12, atol=1e-15)
