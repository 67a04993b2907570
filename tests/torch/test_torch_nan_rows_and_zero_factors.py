"""NaN logits under zero probability targets, kept rows of weight 0 with a NaN softmax, and
unvalidated out-of-range class indices, on every CPU path of ``crossent.torch.cross_entropy``.

Oracle: ``F.cross_entropy`` in float64. NaN in the logits propagates to the loss (DESIGN.md), also
under a zero target (0 * NaN); only a zero target on a -inf logit is masked (0 log 0 = 0). A row
of weight 0 whose softmax is NaN (all -inf, or a NaN logit) gets a NaN gradient (0 * NaN).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet

NAN, NINF = math.nan, -math.inf
IMPLS = ["auto", "chunked", "reference"]


def _same(got: torch.Tensor, want: torch.Tensor, **tol) -> None:
    """Equal NaN pattern, close elsewhere."""
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    torch.testing.assert_close(got[~torch.isnan(got)], want[~torch.isnan(want)], **tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2}, {"weight": [1.0, 2.0, 0.5]}])
@pytest.mark.parametrize("rows", [4, 400])  # 400 x 3 x ... : and a size past the fused-softmax switch
def test_nan_logits_under_zero_targets_give_nan(impl, dtype, options, rows):
    """An all-NaN row, and a NaN among -inf logits, under all-zero targets: NaN, as in
    F.cross_entropy (was 0 on every CPU path). A zero target on a -inf logit still adds 0."""
    classes = 3 if rows == 4 else 200
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, classes, generator=gen, dtype=torch.float64)
    t = torch.softmax(torch.randn(rows, classes, generator=gen, dtype=torch.float64), dim=1)
    x[0] = NAN
    t[0] = 0.0
    x[1] = NINF
    x[1, 1] = NAN
    t[1] = 0.0
    x[2, 0] = NINF  # masked class under a zero target: finite loss
    t[2, 0] = 0.0
    weight = options.get("weight")
    weight = None if weight is None else torch.tensor(weight + [1.0] * (classes - 3), dtype=dtype)
    eps = options.get("label_smoothing", 0.0)
    xg = x.to(dtype).requires_grad_()
    ours = cet.cross_entropy(xg, t.to(dtype), weight=weight, label_smoothing=eps, reduction="none", impl=impl)
    want = F.cross_entropy(x, t, weight=None if weight is None else weight.double(), label_smoothing=eps,
                           reduction="none")
    assert torch.isnan(ours[:2]).all() and torch.isnan(want[:2]).all()
    if eps == 0.0:  # with smoothing the -inf class gets mass in PyTorch (inf): compare the rest only
        cols = [c for c in range(classes) if c != 0]
        sub = F.cross_entropy(x[2:3, cols], t[2:3, cols], weight=None if weight is None else weight.double()[cols],
                              reduction="none")
        torch.testing.assert_close(ours[2].double(), sub[0], rtol=2e-6, atol=2e-6)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    torch.testing.assert_close(ours[3:].double(), want[3:], **tol)
    total = cet.cross_entropy(xg, t.to(dtype), weight=weight, label_smoothing=eps, impl=impl)
    assert torch.isnan(total)
    total.backward()
    assert torch.isnan(xg.grad[:2]).all()


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kept_row_of_weight_zero_with_nan_softmax_matches_chunked_and_torch(reduction, eps, inplace_backward,
                                                                            dtype):
    """Class weight 0 on the label of an all -inf row and of a NaN row: impl="auto" (the CPU
    kernels) gives their gradient as NaN, as impl="chunked" and F.cross_entropy do (was exact
    zeros); an ignored NaN row keeps exact zeros."""
    x = torch.tensor([[NINF, NINF, NINF], [NAN, 0.5, 0.1], [0.1, 0.2, 0.3], [NAN, NAN, NAN], [0.4, -1.0, 2.0]],
                     dtype=torch.float64)
    target = torch.tensor([0, 0, 1, -100, 2])
    weight = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    grads = {}
    for impl in ("auto", "chunked"):
        xg = x.to(dtype).clone().requires_grad_()
        leaf = xg * 1.0 if inplace_backward else xg  # inplace_backward writes into a non-leaf
        loss = cet.cross_entropy(leaf, target, weight=weight.to(dtype), label_smoothing=eps, reduction=reduction,
                                 impl=impl, inplace_backward=inplace_backward)
        loss.sum().backward()
        grads[impl] = xg.grad
    xt = x.clone().requires_grad_()
    F.cross_entropy(xt, target, weight=weight, label_smoothing=eps, reduction=reduction).sum().backward()
    assert torch.isnan(grads["auto"][:2]).all()
    assert torch.isnan(xt.grad[:2]).all()
    assert torch.equal(grads["auto"][3], torch.zeros(3, dtype=dtype))
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    _same(grads["auto"], grads["chunked"], **tol)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mean_of_zero_weights_with_an_all_minus_inf_row(eps):
    """Every class weight 0 ("mean" denominator 0: loss 0): the all -inf row's gradient is
    0 * NaN, as on the chunked path (the kernels used to write zeros)."""
    x = torch.tensor([[NINF, NINF, NINF], [0.1, 0.2, 0.3]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    grads = {}
    for impl in ("auto", "chunked"):
        xg = x.clone().requires_grad_()
        loss = cet.cross_entropy(xg, target, weight=torch.zeros(3, dtype=torch.float64), label_smoothing=eps,
                                 impl=impl)
        assert loss.item() == 0.0
        loss.backward()
        grads[impl] = xg.grad
    _same(grads["auto"], grads["chunked"])
    assert torch.isnan(grads["auto"][0]).all()


@pytest.mark.parametrize("options", [{}, {"weight": True}, {"label_smoothing": 0.1}, {"z_loss": 1e-3},
                                     {"softcap": 5.0}])
@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("bad", [5, -3])
def test_unvalidated_out_of_range_class_names_target(monkeypatch, options, numba, bad):
    """validate=False skips the check in the torch layer; the CPU passes then raise a ValueError
    naming ``target`` (was crossent.cpu's ``labels``, or an IndexError)."""
    from crossent import cpu

    if not numba:
        monkeypatch.setattr(cpu, "_numba_importable", False)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, -100, 4, bad])
    kwargs = dict(options)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.ones(5, dtype=torch.float64)
    match = rf"target must hold class indices in \[0, 5\).*got {bad}"
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=match):
            cet.cross_entropy(x, target, validate=False, **kwargs)
