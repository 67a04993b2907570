"""Result dtypes of crossent.torch's softmax losses against torch.nn.functional (the oracle).

With probability targets PyTorch promotes the dtypes of input, target and class weight (float32
logits with float64 targets give a float64 loss); crossent.torch does the same on every
implementation that takes probability targets, with input counted as at least float32 (DESIGN.md:
float16 logits against float16 targets give float32, PyTorch float16). The gradient of ``input``
keeps ``input``'s dtype, as in PyTorch. The CPU fast path reads float64 targets in place: no
full-size copy of them is made (checked on the arrays the kernels receive).

With class indices PyTorch refuses a class weight whose dtype differs from input's (RuntimeError
"expected scalar type ..."); crossent.torch takes it and casts it to the accumulation dtype, a
deliberate deviation pinned below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet
from crossent import cpu
from crossent.cpu import _blocked

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
IMPLS = ["auto", "chunked", "reference"]
REDUCTIONS = ["none", "mean", "sum"]
# (input, target, class weight or None)
COMBOS = [
    (F32, F64, None), (F32, F64, F32), (F32, F64, F64), (F32, F32, F64), (F32, F16, None),
    (F64, F32, None), (F64, F32, F32), (F16, F32, None), (F16, F32, F32), (BF16, F32, None),
    (BF16, F16, None), (BF16, F32, F64), (F32, F32, None), (F64, F64, None),
]


def _inputs(xd, td, wd, shape=(13, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=gen, dtype=F64)).to(xd)
    t = torch.softmax(torch.randn(shape, generator=gen, dtype=F64), 1).to(td)
    w = None if wd is None else (torch.rand(shape[1], generator=gen, dtype=F64) + 0.2).to(wd)
    return x, t, w


def _tolerance(*dtypes):
    """The precision of the least precise input (values are computed from the same rounded
    inputs by both sides; what differs is the accumulation order and precision)."""
    if BF16 in dtypes:
        return dict(rtol=2e-2, atol=2e-2)
    if F16 in dtypes:
        return dict(rtol=5e-3, atol=5e-3)
    if F32 in dtypes:
        return dict(rtol=2e-5, atol=2e-6)
    return dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("xd,td,wd", COMBOS)
def test_probability_targets_promote_as_pytorch(impl, reduction, eps, xd, td, wd):
    x, t, w = _inputs(xd, td, wd)
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    xo = x.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    ours = cet.cross_entropy(xo, t, impl=impl, **kw)
    theirs = F.cross_entropy(xt, t, **kw)
    assert ours.dtype == theirs.dtype == torch.promote_types(torch.promote_types(xd, td), wd or xd)
    assert ours.shape == theirs.shape
    tol = _tolerance(xd, td, *(() if wd is None else (wd,)))
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **tol)
    g = torch.rand(ours.shape, dtype=ours.dtype, generator=torch.Generator().manual_seed(1))
    (gx_ours,) = torch.autograd.grad(ours, xo, g)
    (gx_theirs,) = torch.autograd.grad(theirs, xt, g.to(theirs.dtype))
    assert gx_ours.dtype == xd == gx_theirs.dtype
    # The gradient's entries are far smaller than the loss (about 1e-3 for "mean" over 13 rows):
    # atol is taken relative to the reference's largest entry, so that a zero or halved gradient
    # cannot pass on the absolute floor alone.
    scale = float(gx_theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(gx_ours, gx_theirs, rtol=tol["rtol"], atol=tol["atol"] * scale)


def test_float16_against_float16_targets_is_float32_unlike_pytorch():
    """The documented low-precision deviation: PyTorch keeps float16, crossent gives float32
    (accumulated in float32, so closer to the float64 truth than PyTorch's float16 result)."""
    x, t, _ = _inputs(F16, F16, None)
    truth = F.cross_entropy(x.double(), t.double())
    theirs = F.cross_entropy(x, t)
    assert theirs.dtype == F16
    for impl in IMPLS:
        ours = cet.cross_entropy(x, t, impl=impl)
        assert ours.dtype == F32
        assert abs(ours.double() - truth) <= abs(theirs.double() - truth) + 1e-6


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("wd", [None, F64])
def test_linear_cross_entropy_promotes_as_pytorch(reduction, wd):
    """PyTorch 2.13's F.linear_cross_entropy promotes the same way."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(11, 6, generator=gen)
    lw = torch.randn(9, 6, generator=gen)
    t = torch.softmax(torch.randn(11, 9, generator=gen, dtype=F64), 1)
    w = None if wd is None else torch.rand(9, generator=gen, dtype=wd) + 0.2
    for impl in ("auto", "chunked", "reference"):
        ho, lo = h.clone().requires_grad_(), lw.clone().requires_grad_()
        ht, lt = h.clone().requires_grad_(), lw.clone().requires_grad_()
        ours = cet.linear_cross_entropy(ho, lo, t, weight=w, reduction=reduction, label_smoothing=0.1, impl=impl)
        theirs = F.linear_cross_entropy(ht, lt, t, weight=w, reduction=reduction, label_smoothing=0.1)
        assert ours.dtype == theirs.dtype == F64
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
        g = torch.ones_like(ours)
        ours_grads = torch.autograd.grad(ours, (ho, lo), g)
        theirs_grads = torch.autograd.grad(theirs, (ht, lt), g)
        for a, b in zip(ours_grads, theirs_grads, strict=True):
            assert a.dtype == b.dtype == F32
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.fixture
def target_arrays(monkeypatch):
    """The target arrays the CPU soft-target passes receive (numba kernels and blocked pass)."""
    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapped(x_np, t_np, *args, **kwargs):
            seen.append((name, t_np))
            return real(x_np, t_np, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    for name in ("soft_cross_entropy", "softmax_minus_targets"):
        spy(cpu, name)
    spy(_blocked, "soft_targets")
    return seen


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": "f64"}, {"z_loss": 1e-3}])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("grad", [False, True])
def test_cpu_fast_path_reads_float64_targets_in_place(target_arrays, options, reduction, grad):
    """impl="auto" on float32 CPU logits with float64 targets: the pass reads the caller's
    targets (no float32 copy of them), and the loss is float64 as PyTorch's."""
    x, t, w = _inputs(F32, F64, F64 if options.get("weight") else None, shape=(37, 11), seed=3)
    kw = {**options, "weight": w}
    xo = x.clone().requires_grad_(grad)
    ours = cet.cross_entropy(xo, t, reduction=reduction, **kw)
    assert target_arrays, "the CPU soft-target pass did not run"
    for _, t_np in target_arrays:
        assert t_np.dtype == np.float64 and np.shares_memory(t_np, t.numpy())
    z = kw.pop("z_loss", 0.0)
    x.requires_grad_(grad)
    # PyTorch has no z-loss: added as written in DESIGN.md, z * lse^2 per row.
    theirs = F.cross_entropy(x, t, reduction="none", **kw) + z * torch.logsumexp(x.double(), 1) ** 2
    theirs = {"none": theirs, "sum": theirs.sum(), "mean": theirs.mean()}[reduction]
    assert ours.dtype == theirs.dtype == F64
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
    if grad:
        g = torch.ones_like(ours)
        (a,) = torch.autograd.grad(ours, xo, g)
        (b,) = torch.autograd.grad(theirs, x, g)
        assert a.dtype == F32
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("xd,wd", [(F32, F64), (F64, F32), (F16, F32), (BF16, F32)])
def test_class_indices_take_a_weight_of_another_dtype_unlike_pytorch(impl, xd, wd):
    """Deliberate deviation: PyTorch raises for class indices with a class weight of another
    dtype; crossent casts the weight to the accumulation dtype and returns that dtype (float32
    for float32/bf16/fp16 input, float64 for float64), the value of PyTorch's with the weight
    cast to the input's dtype."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(17, 5, generator=gen, dtype=F64).to(xd)
    y = torch.randint(0, 5, (17,), generator=gen)
    w = (torch.rand(5, generator=gen, dtype=F64) + 0.2).to(wd)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        F.cross_entropy(x, y, weight=w)
    ours = cet.cross_entropy(x, y, weight=w, impl=impl)
    assert ours.dtype == (F64 if xd == F64 else F32)
    oracle = F.cross_entropy(x.double(), y, weight=w.double())
    torch.testing.assert_close(ours.double(), oracle, **_tolerance(xd, wd))
