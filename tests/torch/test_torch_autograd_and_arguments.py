"""Autograd contracts and drop-in argument types of crossent.torch, against PyTorch's autograd.

Oracles: ``torch.nn.functional.cross_entropy`` / ``linear_cross_entropy`` (and their modules),
float64 compositions of torch ops, ``torch.autograd.gradcheck`` / ``gradgradcheck``.

- second order: the fused paths (auto's CPU kernels, chunked) raise on a double backward instead
  of returning a gradient without the loss's curvature; impl="reference" gives torch's;
- gradients to probability targets and class weights: "auto" differentiates them (as torch does
  where torch defines it), explicit fused impls refuse them by name;
- ``inplace_backward`` bumps the logits' autograd version (autograd's in-place check works);
- NumPy scalars and 0-d tensors as options, ``ignore_index=None`` for the linear loss;
- edge inputs: ``weight`` of the wrong type, D = 0, C = 0;
- ``torch.func`` with impl="reference";
- LinearCrossEntropyLoss's documented differences from torch's module.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent.cpu
import crossent.torch as cet

F64 = torch.float64
HAS_TORCH_LINEAR_CE = hasattr(F, "linear_cross_entropy")
needs_torch_linear_ce = pytest.mark.skipif(
    not HAS_TORCH_LINEAR_CE, reason="torch.nn.functional.linear_cross_entropy needs PyTorch 2.13+"
)
SECOND_ORDER = "cannot be differentiated twice"


def _data(seed=0, n=7, c=5, d=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=F64)
    t = torch.randint(0, c, (n,), generator=g)
    t[2] = -100
    soft = torch.softmax(torch.randn(n, c, generator=g, dtype=F64), -1)
    e = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(c, d, generator=g, dtype=F64)
    cw = torch.rand(c, generator=g, dtype=F64) + 0.5
    return x, t, soft, e, w, cw


# ---------------------------------------------------------------------------------------------
# 1. Second-order gradients


@pytest.mark.parametrize("impl", ["auto", "chunked"])
@pytest.mark.parametrize("kind", ["int", "soft"])
def test_cross_entropy_double_backward_raises_on_fused_paths(impl, kind):
    x0, t, soft, *_ = _data()
    target = t if kind == "int" else soft
    x = x0.clone().requires_grad_()
    (g,) = torch.autograd.grad(cet.cross_entropy(x, target, impl=impl), x, create_graph=True)
    # The first-order gradient is still right...
    xr = x0.clone().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(xr, target), xr)
    torch.testing.assert_close(g.detach(), gr, rtol=1e-10, atol=1e-12)
    # ... but differentiating it again is an error, not a gradient without the Hessian term.
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        (100 * g.pow(2).sum() + x.sum()).backward()
    with pytest.raises(RuntimeError, match="impl='reference'"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.skipif(not crossent.cpu.available(), reason="numba is not installed")
def test_cpu_kernels_double_backward_raises(monkeypatch):
    """auto's CPU kernels (crossent.cpu) are the path the reviewer's reproducer took."""
    from crossent.torch import _cpu_fast

    calls = []
    real = _cpu_fast.CpuFastCrossEntropy.apply
    monkeypatch.setattr(_cpu_fast.CpuFastCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    import crossent.torch.functional as functional

    monkeypatch.setattr(functional, "_cpu_fast_cross_entropy", _cpu_fast.CpuFastCrossEntropy.apply)
    x0, t, *_ = _data()
    x = x0.clone().requires_grad_()
    (g,) = torch.autograd.grad(cet.cross_entropy(x, t), x, create_graph=True)
    assert calls, "impl='auto' did not take the CPU kernels"
    with pytest.raises(RuntimeError, match=r"CPU kernels\) " + SECOND_ORDER):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_linear_double_backward_raises_on_fused_paths(impl):
    _, t, _, e0, w0, _ = _data()
    e, w = e0.clone().requires_grad_(), w0.clone().requires_grad_()
    (ge,) = torch.autograd.grad(cet.linear_cross_entropy(e, w, t, impl=impl), e)
    er, wr = e0.clone().requires_grad_(), w0.clone().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(er @ wr.T, t), er)
    torch.testing.assert_close(ge, gr, rtol=1e-10, atol=1e-12)
    # The gradients are computed in the forward (nothing saved for an error node to hang off):
    # the create_graph=True backward itself raises, or a penalty differentiated with respect to
    # [e, w] (also reached by the loss term) would silently lose the loss's curvature.
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        loss = cet.linear_cross_entropy(e, w, t, impl=impl)
        (ge,) = torch.autograd.grad(loss, e, create_graph=True)
        torch.autograd.grad(loss + 100 * ge.pow(2).sum(), [e, w])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_backward_then_plain_backward_accumulates():
    """A create_graph=True backward that is not differentiated again still leaves the right
    .grad, and a later plain backward accumulates onto it."""
    x0, t, *_ = _data()
    x = x0.clone().requires_grad_()
    cet.cross_entropy(x, t, impl="chunked").backward(create_graph=True)
    cet.cross_entropy(x, t, impl="chunked", reduction="sum").backward()
    xr = x0.clone().requires_grad_()
    F.cross_entropy(xr, t).backward()
    F.cross_entropy(xr, t, reduction="sum").backward()
    torch.testing.assert_close(x.grad.detach(), xr.grad, rtol=1e-10, atol=1e-12)


def test_reference_gradient_penalty_matches_torch():
    """The reviewer's gradient penalty d/dx [100 ||dL/dx||^2 + sum x]: impl="reference" equals
    torch (the fused paths raise, above)."""
    x0, t, *_ = _data()

    def penalty(fn):
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        (100 * g.pow(2).sum() + x.sum()).backward()
        return x.grad

    want = penalty(lambda x: F.cross_entropy(x, t))
    got = penalty(lambda x: cet.cross_entropy(x, t, impl="reference"))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (want - 1.0).abs().max() > 0.1  # the Hessian term is not negligible here


@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.2}, {"weight": True}, {"z_loss": 0.1, "softcap": 3.0}, {"soft": True}],
    ids=["plain", "smoothing", "weight", "zloss-softcap", "soft"],
)
def test_reference_gradgradcheck(options):
    x0, t, soft, _, _, cw = _data(n=4, c=3)
    options = dict(options)
    target = soft if options.pop("soft", False) else t
    if options.pop("weight", False):
        options["weight"] = cw
    x = x0.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x: cet.cross_entropy(x, target, impl="reference", **options), (x,)
    )


def test_reference_linear_gradgradcheck():
    _, t, _, e0, w0, _ = _data(n=4, c=3, d=2)
    e, w = e0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = torch.randn(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda e, w, b: cet.linear_cross_entropy(e, w, t, linear_bias=b, impl="reference"), (e, w, b)
    )


# ---------------------------------------------------------------------------------------------
# 2. Gradients to probability targets and class weights


@needs_torch_linear_ce
@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_linear_soft_target_gradient_matches_torch(shape):
    g = torch.Generator().manual_seed(1)
    e = torch.randn(*shape, 3, generator=g, dtype=F64)
    w = torch.randn(5, 3, generator=g, dtype=F64)
    s0 = torch.randn(*shape, 5, generator=g, dtype=F64)
    s = s0.clone().requires_grad_()
    loss = cet.linear_cross_entropy(e, w, torch.softmax(s, -1))
    loss.backward()
    sr = s0.clone().requires_grad_()
    want = F.cross_entropy((e @ w.T).reshape(-1, 5), torch.softmax(sr, -1).reshape(-1, 5))
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.grad, sr.grad, rtol=1e-10, atol=1e-12)
    if len(shape) == 1:
        s2 = s0.clone().requires_grad_()
        F.linear_cross_entropy(e, w, torch.softmax(s2, -1)).backward()
        torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_linear_soft_target_requiring_grad_refused_by_fused_impls(impl):
    _, _, soft, e, w, _ = _data()
    message = rf"impl='{impl}' does not differentiate probability targets, and target requires grad"
    with pytest.raises(ValueError, match=message):
        cet.linear_cross_entropy(e, w, soft.clone().requires_grad_(), impl=impl)
    # Without autograd (or with a detached target) there is nothing to refuse.
    with torch.no_grad():
        got = cet.linear_cross_entropy(e, w, soft.clone().requires_grad_(), impl="chunked")
    torch.testing.assert_close(got, F.cross_entropy(e @ w.T, soft), rtol=1e-10, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_class_weight_gradient_soft_targets_matches_torch(reduction, smoothing):
    x, _, soft, e, w, cw0 = _data()
    cw = cw0.clone().requires_grad_()
    loss = cet.cross_entropy(x, soft, weight=cw, reduction=reduction, label_smoothing=smoothing)
    loss.sum().backward()
    cwr = cw0.clone().requires_grad_()
    want = F.cross_entropy(x, soft, weight=cwr, reduction=reduction, label_smoothing=smoothing)
    want.sum().backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(cw.grad, cwr.grad, rtol=1e-10, atol=1e-12)
    # The linear loss too.
    cw2 = cw0.clone().requires_grad_()
    cet.linear_cross_entropy(e, w, soft, weight=cw2, reduction=reduction,
                             label_smoothing=smoothing).sum().backward()
    cwr2 = cw0.clone().requires_grad_()
    F.cross_entropy(e @ w.T, soft, weight=cwr2, reduction=reduction,
                    label_smoothing=smoothing).sum().backward()
    torch.testing.assert_close(cw2.grad, cwr2.grad, rtol=1e-10, atol=1e-12)


def test_class_weight_gradient_class_indices():
    """torch refuses (nll_loss is not differentiable in weight); crossent's auto differentiates
    the same formula, checked by gradcheck and against the float64 composition
    sum_i w_{y_i} nll_i / sum_i w_{y_i}."""
    x, t, _, _, _, cw0 = _data()
    with pytest.raises(RuntimeError, match="weight"):
        F.cross_entropy(x, t, weight=cw0.clone().requires_grad_())
    cw = cw0.clone().requires_grad_()
    cet.cross_entropy(x, t, weight=cw).backward()
    valid = t != -100
    cwr = cw0.clone().requires_grad_()
    nll = -torch.log_softmax(x[valid], -1).gather(1, t[valid, None]).squeeze(1)
    (cwr[t[valid]] * nll).sum().div(cwr[t[valid]].sum()).backward()
    torch.testing.assert_close(cw.grad, cwr.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda w: cet.cross_entropy(x, t, weight=w, label_smoothing=0.2), (cw0.clone().requires_grad_(),)
    )


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_class_weight_requiring_grad_refused_by_fused_impls(impl, fn):
    x, t, _, e, w, cw = _data()
    args = (x, t) if fn == "cross_entropy" else (e, w, t)
    message = rf"impl='{impl}' does not differentiate class weights, and weight requires grad"
    with pytest.raises(ValueError, match=message):
        getattr(cet, fn)(*args, weight=cw.clone().requires_grad_(), impl=impl)
    with torch.no_grad():  # nothing to differentiate: no error
        getattr(cet, fn)(*args, weight=cw.clone().requires_grad_(), impl="chunked")


# ---------------------------------------------------------------------------------------------
# 3. inplace_backward and autograd's version counter


@pytest.mark.parametrize("impl", ["auto", "chunked"])
@pytest.mark.parametrize("kind", ["int", "soft"])
def test_inplace_backward_on_a_saved_output_raises(impl, kind):
    """exp saves its output; writing the gradient over it must trip autograd's in-place check
    on every path (the CPU kernels wrote through numpy, unseen, and exp's gradient came out
    wrong by 0.83)."""
    x0, t, soft, *_ = _data()
    target = t if kind == "int" else soft
    h = x0.clone().requires_grad_()
    loss = cet.cross_entropy(h.exp(), target, impl=impl, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("impl", ["auto", "chunked"])
@pytest.mark.parametrize("kind", ["int", "soft"])
def test_inplace_backward_after_a_non_saving_op_and_on_a_leaf(impl, kind):
    """Producers that do not save their output (a leaf, x * 2) still get torch's gradient."""
    x0, t, soft, *_ = _data()
    target = t if kind == "int" else soft
    xr = x0.clone().requires_grad_()
    F.cross_entropy(xr * 2.0, target).backward()
    x = x0.clone().requires_grad_()
    cet.cross_entropy(x * 2.0, target, impl=impl, inplace_backward=True).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    leaf = x0.clone().requires_grad_()
    cet.cross_entropy(leaf, target, impl=impl, inplace_backward=True).backward()
    lr = x0.clone().requires_grad_()
    F.cross_entropy(lr, target).backward()
    torch.testing.assert_close(leaf.grad, lr.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 4. NumPy scalars and 0-d tensors as options; ignore_index=None for the linear loss


@pytest.mark.parametrize("smoothing", [np.float32(0.1), np.float64(0.25), torch.tensor(0.3), np.int64(0)],
                         ids=["np.float32", "np.float64", "tensor", "np.int64"])
@pytest.mark.parametrize("ignore", [np.int64(1), np.int32(-100), torch.tensor(3)],
                         ids=["np.int64", "np.int32", "tensor"])
def test_numpy_and_tensor_scalars_match_torch(smoothing, ignore):
    x, t, *_ = _data()
    t = torch.where(t == -100, int(ignore), t)  # rows 2 (and any of class `ignore`) are ignored
    want = F.cross_entropy(x, t, label_smoothing=smoothing, ignore_index=ignore, reduction="none")
    got = cet.cross_entropy(x, t, label_smoothing=smoothing, ignore_index=ignore, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    mod = cet.CrossEntropyLoss(label_smoothing=smoothing, ignore_index=ignore)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=smoothing, ignore_index=ignore)
    torch.testing.assert_close(mod(x, t), ref(x, t), rtol=1e-10, atol=0)


def test_numpy_z_loss_and_softcap_match_the_float64_composition():
    x, t, *_ = _data()
    got = cet.cross_entropy(x, t, z_loss=np.float32(0.5), softcap=np.int64(2), reduction="none")
    z = 2.0 * torch.tanh(x / 2.0)
    lse = torch.logsumexp(z, -1)
    valid = t != -100
    want = torch.where(valid, F.cross_entropy(z, t, reduction="none") + float(np.float32(0.5)) * lse**2, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    _, _, _, e, w, _ = _data()
    got_lin = cet.linear_cross_entropy(e, w, t, z_loss=torch.tensor(0.5), softcap=np.float32(2.0))
    z = 2.0 * torch.tanh(e @ w.T / 2.0)
    lse = torch.logsumexp(z, -1)
    want_lin = F.cross_entropy(z, t) + 0.5 * lse[valid].pow(2).mean()
    torch.testing.assert_close(got_lin, want_lin, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"label_smoothing": True}, TypeError, r"label_smoothing must be a float in \[0, 1\], got True"),
        ({"label_smoothing": np.float32(1.5)}, ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        ({"label_smoothing": torch.tensor([0.1])}, TypeError, r"label_smoothing must be a float in \[0, 1\]"),
        ({"label_smoothing": "0.1"}, TypeError, r"label_smoothing must be a float in \[0, 1\], got '0.1'"),
        ({"z_loss": np.float64(-1.0)}, ValueError, r"z_loss must be a finite float >= 0, got -1.0"),
        ({"z_loss": np.bool_(True)}, TypeError, r"z_loss must be a finite float >= 0"),
        ({"softcap": np.float32(0.0)}, ValueError, r"softcap must be None or a finite float > 0, got 0.0"),
        ({"softcap": torch.tensor(True)}, TypeError, r"softcap must be None or a finite float > 0"),
        ({"ignore_index": True}, TypeError, r"ignore_index must be an int, got True"),
        ({"ignore_index": np.bool_(False)}, TypeError, r"ignore_index must be an int"),
        ({"ignore_index": 1.0}, TypeError, r"ignore_index must be an int, got 1.0"),
        ({"ignore_index": np.float64(1.0)}, TypeError, r"ignore_index must be an int"),
        ({"ignore_index": torch.tensor(1.0)}, TypeError, r"ignore_index must be an int"),
        ({"ignore_index": torch.tensor([1])}, TypeError, r"ignore_index must be an int"),
        ({"ignore_index": None}, TypeError, r"ignore_index must be an int, got None"),
    ],
)
def test_bad_scalar_options_are_refused_by_name(kwargs, error, message):
    x, t, *_ = _data()
    with pytest.raises(error, match=message):
        cet.cross_entropy(x, t, **kwargs)


@needs_torch_linear_ce
@pytest.mark.parametrize("kind", ["int", "soft"])
@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
def test_linear_ignore_index_none_is_torchs_default(kind, impl):
    _, t, soft, e, w, _ = _data()
    target = t if kind == "int" else soft
    got = cet.linear_cross_entropy(e, w, target, ignore_index=None, impl=impl, reduction="none")
    want = F.linear_cross_entropy(e, w, target, ignore_index=None, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert got[2] == 0 if kind == "int" else True  # row 2's target is -100


@needs_torch_linear_ce
def test_linear_module_ignore_index_none_and_numpy_options_match_torch():
    _, t, _, e, _, _ = _data()
    ours = cet.LinearCrossEntropyLoss(3, 5, bias=True, dtype=F64, ignore_index=None,
                                      label_smoothing=np.float32(0.1))
    theirs = torch.nn.LinearCrossEntropyLoss(3, 5, bias=True, dtype=F64, ignore_index=None,
                                             label_smoothing=np.float32(0.1))
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(e, t), theirs(e, t), rtol=1e-10, atol=0)
    ours.ignore_index = np.int64(0)
    t = t.clamp(min=0)
    torch.testing.assert_close(ours(e, t), F.cross_entropy(ours.linear(e), t, ignore_index=0,
                                                           label_smoothing=np.float32(0.1)),
                               rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------
# 5. Edge inputs: weight's type, D = 0, C = 0


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference", "triton"])
def test_weight_of_the_wrong_type_names_weight(impl):
    x, t, _, e, w, _ = _data()
    message = r"weight must be None or a 1-D floating-point torch.Tensor, got list"
    with pytest.raises(TypeError, match=message):
        cet.cross_entropy(x, t, weight=[1.0] * 5, impl=impl)
    with pytest.raises(TypeError, match=message):
        cet.linear_cross_entropy(e, w, t, weight=[1.0] * 5, impl=impl)
    with pytest.raises(TypeError, match=r"weight must be None or a 1-D floating-point torch.Tensor, got ndarray"):
        cet.cross_entropy(x, t, weight=np.ones(5), validate=False)


@needs_torch_linear_ce
@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_zero_hidden_dim_matches_torch(impl, reduction, bias):
    """D = 0: the logits are the bias (0 without one: log V per row), as torch computes."""
    t = torch.tensor([0, 4, -100, 2])
    e0 = torch.zeros(4, 0, dtype=F64)
    w0 = torch.zeros(5, 0, dtype=F64)
    b0 = torch.linspace(-1.0, 1.0, 5, dtype=F64) if bias else None
    e, w = e0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = None if b0 is None else b0.clone().requires_grad_()
    got = cet.linear_cross_entropy(e, w, t, linear_bias=b, impl=impl, reduction=reduction)
    got.sum().backward()
    br = None if b0 is None else b0.clone().requires_grad_()
    want = F.linear_cross_entropy(e0, w0, t, linear_bias=br, reduction=reduction)
    if bias:
        want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    composed = F.cross_entropy(torch.zeros(4, 5, dtype=F64) + (0.0 if b0 is None else b0), t, reduction=reduction)
    torch.testing.assert_close(got, composed, rtol=1e-10, atol=0)
    if not bias and reduction == "mean":
        assert math.isclose(got.item(), math.log(5), rel_tol=1e-12)
    assert e.grad.shape == (4, 0) and w.grad.shape == (5, 0)
    if bias:
        torch.testing.assert_close(b.grad, br.grad, rtol=1e-10, atol=1e-12)


@pytest.fixture(params=["compacted", "all-rows"])
def chunked_rows(request, monkeypatch):
    """The chunked path's row schedule: ignored rows dropped first (the CPU's), or every row
    processed (what CUDA tensors take; C = 0 made it reduce over an empty class axis)."""
    from crossent.torch import _chunked

    monkeypatch.setattr(_chunked, "COMPACT_IGNORED_ROWS_ON_CPU", request.param == "compacted")
    return request.param


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
def test_linear_zero_hidden_dim_three_d_and_zero_classes(impl, chunked_rows):
    got = cet.linear_cross_entropy(torch.zeros(2, 3, 0), torch.zeros(4, 0),
                                   torch.zeros(2, 3, dtype=torch.long), impl=impl, reduction="none")
    torch.testing.assert_close(got, torch.full((2, 3), math.log(4)))
    # V = 0: only ignored rows (class indices) or empty probability rows can be scored.
    x = torch.randn(2, 4)
    none_int = cet.linear_cross_entropy(x, torch.zeros(0, 4), torch.full((2,), -100), impl=impl, reduction="none")
    none_soft = cet.linear_cross_entropy(x, torch.zeros(0, 4), torch.zeros(2, 0), impl=impl, reduction="none")
    torch.testing.assert_close(none_int, torch.zeros(2))
    torch.testing.assert_close(none_soft, torch.zeros(2))


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("kind", ["int", "soft"])
@pytest.mark.parametrize("shape", [(3, 0), (2, 0, 3)])
def test_zero_classes_follow_torch(impl, kind, shape, chunked_rows):
    """C = 0: "sum"/"none" as torch (zeros), "mean" 0 (the zero-denominator rule; torch: NaN),
    an empty gradient, on every impl (impl="reference" raised an IndexError). torch 2.13 raises
    "size mismatch" for C = 0 with extra dimensions, so (2, 0, 3) is compared with torch on the
    same rows laid out as (6, 0)."""
    x0 = torch.randn(*shape, dtype=F64)
    target = (torch.full(shape[:1] + shape[2:], -100) if kind == "int" else torch.rand(*shape, dtype=F64))
    rows = shape[0] * math.prod(shape[2:])
    x2d = x0.movedim(1, -1).reshape(rows, 0)
    t2d = target.reshape(rows) if kind == "int" else target.movedim(1, -1).reshape(rows, 0)
    for reduction in ("sum", "none"):
        x = x0.clone().requires_grad_()
        got = cet.cross_entropy(x, target, impl=impl, reduction=reduction)
        want = F.cross_entropy(x2d, t2d, reduction=reduction).reshape(got.shape)
        torch.testing.assert_close(got, want.abs(), rtol=0, atol=0)  # torch gives -0.0
        got.sum().backward()
        assert x.grad.shape == x0.shape
    assert cet.cross_entropy(x0, target, impl=impl).item() == 0.0
    # z-loss reads an lse of 0 with no class, as in core (logsumexp of nothing is -inf: it was inf).
    rows = cet.cross_entropy(x0, target, impl=impl, z_loss=0.1, reduction="none")
    assert torch.equal(rows, torch.zeros_like(rows))


def test_zero_classes_reference_unvalidated_target_is_nan():
    """A non-ignored target with no class (only reachable with validate=False) gives NaN on the
    reference path, as on the Triton path; ignored rows give 0."""
    got = cet.cross_entropy(torch.randn(3, 0), torch.tensor([0, -100, -100]), impl="reference",
                            reduction="none", validate=False)
    assert torch.isnan(got[0]) and got[1:].eq(0).all()
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 0\)"):
        cet.cross_entropy(torch.randn(3, 0), torch.tensor([0, -100, -100]), impl="reference")


# ---------------------------------------------------------------------------------------------
# 6. LinearCrossEntropyLoss's documented differences from torch's module


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="needs PyTorch 2.13+")
def test_linear_module_docstring_lists_its_differences_from_torch():
    theirs = set(inspect.signature(torch.nn.LinearCrossEntropyLoss.__init__).parameters) - {"self"}
    ours = set(inspect.signature(cet.LinearCrossEntropyLoss.__init__).parameters) - {"self"}
    doc = cet.LinearCrossEntropyLoss.__doc__
    assert theirs - ours == {"out_features", "options"}
    for name in theirs - ours:
        assert f"``{name}=``" in doc
    for name in ours - theirs:
        assert f"``{name}``" in doc
    for name in ours & theirs - {"in_features", "num_classes"}:
        assert f"{name}" in doc
    with pytest.raises(TypeError, match="options"):
        cet.LinearCrossEntropyLoss(3, 5, options=None)


# ---------------------------------------------------------------------------------------------
# 7. torch.func


def test_torch_func_works_with_reference_and_is_refused_by_fused_paths():
    x, t, soft, *_ = _data()
    want = torch.func.grad(lambda x: F.cross_entropy(x, t))(x)
    got = torch.func.grad(lambda x: cet.cross_entropy(x, t, impl="reference"))(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    batch_x = torch.stack([x, 2 * x, -x])
    batch_t = torch.stack([t, t.flip(0), t])
    want_v = torch.vmap(lambda x, t: F.cross_entropy(x, t))(batch_x, batch_t)
    got_v = torch.vmap(lambda x, t: cet.cross_entropy(x, t, impl="reference", validate=False))(batch_x, batch_t)
    torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=0)
    for impl in ("auto", "chunked"):
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.grad(lambda x, impl=impl: cet.cross_entropy(x, t, impl=impl))(x)
    doc = cet.cross_entropy.__doc__ + inspect.getmodule(cet.cross_entropy).__doc__
    assert "torch.func" in doc
