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


# ---- result dtypes: PyTorch's promotion, input counted as at least float32 ----------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LOW = (torch.float16, torch.bfloat16)


def _expected_dtype(input_dtype, target_dtype):
    return torch.promote_types(torch.float32 if input_dtype in LOW else input_dtype, target_dtype)


def _kl_inputs(input_dtype, target_dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.log_softmax(torch.randn(4, 6, generator=gen, dtype=torch.float64), 1).to(input_dtype)
    p = torch.softmax(torch.randn(4, 6, generator=gen, dtype=torch.float64), 1).to(target_dtype)
    return x.requires_grad_(), p.requires_grad_()


@pytest.mark.parametrize("input_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_kl_div_result_and_gradient_dtypes(input_dtype, target_dtype, reduction):
    x, p = _kl_inputs(input_dtype, target_dtype)
    ours = cet.kl_div(x, p, reduction=reduction)
    theirs = F.kl_div(x, p, reduction=reduction)
    want = _expected_dtype(input_dtype, target_dtype)
    assert ours.dtype == want
    if input_dtype in LOW and target_dtype == input_dtype:
        assert theirs.dtype == input_dtype  # PyTorch keeps fp16/bf16; DESIGN.md: float32 here
    else:
        assert theirs.dtype == want  # PyTorch's own promotion
    gx, gp = torch.autograd.grad(ours.sum(), (x, p))
    assert gx.dtype == input_dtype and gp.dtype == target_dtype  # as PyTorch's gradients
    # The truth: float64 on the same (rounded) values.
    xd, pd = x.detach().double(), p.detach().double()
    truth = F.kl_div(xd, pd, reduction=reduction)
    if want == torch.float64:
        torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-14)
        if target_dtype == torch.float64:
            torch.testing.assert_close(theirs, truth, rtol=1e-12, atol=1e-14)
        # else PyTorch takes log t in the target's dtype (fp16: 2e-4 off for float64 input);
        # crossent computes in the result dtype, exact to the float64 truth.
    else:
        torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-6)
    (hx,) = torch.autograd.grad(F.kl_div(xd.requires_grad_(), pd, reduction=reduction).sum(), xd)
    if input_dtype == torch.float64:
        torch.testing.assert_close(gx, hx, rtol=1e-12, atol=1e-14)
    else:  # d/dx = -p (/ batch): exact in the compute dtype, then rounded to input's dtype
        torch.testing.assert_close(gx, hx.to(input_dtype), rtol=0, atol=0)


def test_kl_div_float32_input_float64_target_is_float64_as_pytorch():
    x, p = _kl_inputs(torch.float32, torch.float64)
    for reduction in ["none", "sum", "batchmean"]:
        ours = cet.kl_div(x, p, reduction=reduction)
        theirs = F.kl_div(x, p, reduction=reduction)
        assert ours.dtype == theirs.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, **TOL)
        pairs = zip(torch.autograd.grad(ours.sum(), (x, p)), torch.autograd.grad(theirs.sum(), (x, p)), strict=True)
        for a, b in pairs:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **TOL)


def _bce_inputs(input_dtype, target_dtype, seed=6):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).to(input_dtype).requires_grad_()
    t = torch.rand(5, 7, generator=gen, dtype=torch.float64).to(target_dtype)
    return x, t


@pytest.mark.parametrize("input_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_bce_result_and_gradient_dtypes(input_dtype, target_dtype, reduction):
    x, t = _bce_inputs(input_dtype, target_dtype)
    ours = cet.binary_cross_entropy_with_logits(x, t, reduction=reduction)
    theirs = F.binary_cross_entropy_with_logits(x, t, reduction=reduction)
    want = _expected_dtype(input_dtype, target_dtype)
    assert ours.dtype == want
    # PyTorch 2.13 on the CPU returns the target's dtype, also where it is narrower than the
    # input's (float64 logits, float32 targets: float32): crossent's documented deviation.
    assert theirs.dtype == target_dtype
    (gx,) = torch.autograd.grad(ours.sum(), x)
    assert gx.dtype == input_dtype
    xd, td = x.detach().double(), t.double()
    truth = F.binary_cross_entropy_with_logits(xd, td, reduction=reduction)
    if want == torch.float64:
        torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-6)
    oracle = F.binary_cross_entropy_with_logits(xd.requires_grad_(), td, reduction=reduction)
    (hx,) = torch.autograd.grad(oracle.sum(), xd)
    if input_dtype == torch.float64 and want == torch.float64:
        torch.testing.assert_close(gx, hx, rtol=1e-12, atol=1e-14)
    else:  # float32 accumulation at least, then rounded to input's dtype (half an ulp)
        rtol = 1e-5 if input_dtype == torch.float32 else 8e-3
        torch.testing.assert_close(gx, hx.to(input_dtype), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("weight_dtype", DTYPES + [None], ids=str)
@pytest.mark.parametrize("pos_weight_dtype", DTYPES + [None], ids=str)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64], ids=str)
def test_bce_weight_dtypes_do_not_promote_as_in_pytorch(weight_dtype, pos_weight_dtype, target_dtype):
    x, t = _bce_inputs(torch.float32, target_dtype)
    gen = torch.Generator().manual_seed(7)
    w0, pw0 = torch.rand(2, 7, generator=gen, dtype=torch.float64) * torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    w = None if weight_dtype is None else w0.to(weight_dtype)
    pw = None if pos_weight_dtype is None else pw0.to(pos_weight_dtype)
    ours = cet.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw, reduction="none")
    theirs = F.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw, reduction="none")
    assert ours.dtype == theirs.dtype == target_dtype
    # The oracle: float64 on the same values (PyTorch itself is off by up to 1.7e-2 relative with an
    # fp16 or bf16 pos_weight: it rounds a product to that dtype; crossent computes in the result dtype).
    xd = x.detach().double().requires_grad_()
    truth = F.binary_cross_entropy_with_logits(
        xd, t.double(), weight=None if w is None else w.double(),
        pos_weight=None if pw is None else pw.double(), reduction="none",
    )
    exact = target_dtype == torch.float64 and {weight_dtype, pos_weight_dtype} <= {torch.float64, None}
    tol = 1e-12 if exact else 1e-6  # float64 weights cast to float32, as PyTorch does
    torch.testing.assert_close(ours.double(), truth.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(theirs.double(), truth.detach(), rtol=3e-2, atol=1e-5)  # bf16: 1.7e-2
    (gx,) = torch.autograd.grad(ours.sum(), x)
    (hx,) = torch.autograd.grad(truth.sum(), xd)
    assert gx.dtype == torch.float32
    torch.testing.assert_close(gx, hx.float(), rtol=1e-5, atol=1e-7)


def test_bce_float32_input_float64_target_is_float64_as_pytorch():
    x, t = _bce_inputs(torch.float32, torch.float64)
    pw = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    for reduction in ["none", "sum", "mean"]:
        ours = cet.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction=reduction)
        theirs = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction=reduction)
        assert ours.dtype == theirs.dtype == torch.float64
        xd = x.detach().double().requires_grad_()
        truth = F.binary_cross_entropy_with_logits(xd, t, pos_weight=pw, reduction=reduction)
        torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(theirs, truth, rtol=1e-6, atol=1e-6)  # PyTorch: float32 steps inside
        (a,) = torch.autograd.grad(ours.sum(), x)
        (b,) = torch.autograd.grad(theirs.sum(), x)
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, torch.autograd.grad(truth.sum(), xd)[0].float(), rtol=0, atol=0)


# ---- F.kl_div's warning for reduction="mean" ----------------------------------------------------


def test_kl_div_mean_warns_as_pytorch():
    x, p = _kl_inputs(torch.float64, torch.float64)
    with pytest.warns(UserWarning, match="batchmean") as ours:
        a = cet.kl_div(x, p, reduction="mean")
    with pytest.warns(UserWarning, match="batchmean") as theirs:
        b = F.kl_div(x, p, reduction="mean")
    assert len(ours) == len(theirs) == 1
    assert ours[0].category is theirs[0].category is UserWarning
    assert "'mean'" in str(ours[0].message) and "'batchmean'" in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the caller, as F's (stacklevel=2)
    torch.testing.assert_close(a, b, **TOL)
    with pytest.warns(UserWarning, match="batchmean"):
        cet.kl_div(x, p)  # "mean" is the default, as in F.kl_div
    with pytest.warns(UserWarning, match="batchmean"):
        F.kl_div(x, p)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_div_other_reductions_do_not_warn(reduction):
    x, p = _kl_inputs(torch.float64, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cet.kl_div(x, p, reduction=reduction)
        F.kl_div(x, p, reduction=reduction)  # the oracle is silent too


def test_kl_div_legacy_mean_gives_only_the_deprecation_warning_as_pytorch():
    x, p = _kl_inputs(torch.float64, torch.float64)
    for fn in (cet.kl_div, F.kl_div):
        with pytest.warns(UserWarning) as record:
            fn(x, p, size_average=True)  # legacy arguments mapping to "mean"
        assert [("deprecated" in str(w.message), "batchmean" in str(w.message)) for w in record] == [(True, False)]


def test_kl_div_bad_argument_raises_before_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="target must broadcast"):
            cet.kl_div(torch.zeros(3, 2), torch.zeros(4, 2))
