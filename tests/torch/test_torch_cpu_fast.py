"""impl="auto" on the CPU takes crossent.cpu's numba kernels where they apply: same results as
impl="chunked" and F.cross_entropy, proven here; probability targets with other options take the
blocked pass (test_torch_cpu_blocked.py), everything else "chunked"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent.cpu
import crossent.torch as cet
from crossent.torch import _cpu_fast

pytestmark = pytest.mark.skipif(not crossent.cpu.available(), reason="numba is not installed")


def _count_calls(monkeypatch, loss_kernel, grad_kernel):
    """Counts the calls of crossent.cpu's functions named ``loss_kernel`` (the loss alone) and
    ``grad_kernel`` (the loss and the gradient in one pass)."""
    calls = {"loss_kernel": 0, "grad_kernel": 0}
    for key, name in (("loss_kernel", loss_kernel), ("grad_kernel", grad_kernel)):
        real = getattr(crossent.cpu, name)

        def counted(*args, key=key, real=real, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(crossent.cpu, name, counted)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of crossent.cpu's class-index kernels (loss alone; loss and gradient)."""
    return _count_calls(monkeypatch, "lse_and_nll", "softmax_minus_onehot")


def _loss_and_grad(x, y, **kw):
    x = x.detach().clone().requires_grad_()
    loss = cet.cross_entropy(x, y, **kw)
    (loss.sum() if loss.ndim else loss).backward()
    return loss.detach(), x.grad


def _class_inputs(shape, weighted, seed):
    """float64 logits of ``shape`` (classes on dim 1, or dim 0 for 1-D), class indices with every
    fourth one ignored, and class weights or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    c = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    y = torch.randint(0, c, tshape, generator=g)
    if y.ndim:
        y.view(-1)[::4] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    return x, y, w


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(37, 11), (5, 7, 3), (13,)])
def test_auto_equals_chunked_and_torch_float64(kernel_calls, reduction, weighted, shape):
    x, y, w = _class_inputs(shape, weighted, seed=sum(shape))
    loss, grad = _loss_and_grad(x, y, weight=w, reduction=reduction)
    assert kernel_calls == {"loss_kernel": 0, "grad_kernel": 1}  # one pass: the gradient in forward
    ref_loss, ref_grad = _loss_and_grad(x, y, weight=w, reduction=reduction, impl="chunked")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    xt = x.detach().clone().requires_grad_()
    t_loss = F.cross_entropy(xt, y, weight=w, reduction=reduction)
    (t_loss.sum() if t_loss.ndim else t_loss).backward()
    torch.testing.assert_close(loss, t_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, xt.grad, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_truth(kernel_calls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 4099, generator=g) * 5
    y = torch.randint(0, 4099, (301,), generator=g)
    loss, grad = _loss_and_grad(x, y)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    truth, truth_grad = _loss_and_grad(x.double(), y, impl="reference")
    ours = abs(loss.double() - truth)
    torchs = abs(F.cross_entropy(x, y).double() - truth)
    assert ours <= torchs + 1e-6
    torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-4, atol=1e-9)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2, 2, 1])
    w = torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: cet.cross_entropy(z, y, weight=w), (x,))
    assert torch.autograd.gradcheck(lambda z: cet.cross_entropy(z, y, reduction="none"), (x,))


def test_ignored_rows_add_nothing_whatever_their_logits(kernel_calls):
    x = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 1.0], [float("-inf"), 0.0, 1.0]])
    y = torch.tensor([2, -100, -100])
    loss, grad = _loss_and_grad(x, y, reduction="sum")
    assert kernel_calls["grad_kernel"] == 1
    torch.testing.assert_close(loss, F.cross_entropy(x[:1], y[:1], reduction="sum"))
    assert torch.equal(grad[1:], torch.zeros(2, 3))


def test_all_ignored_mean_is_zero_with_zero_gradient_unlike_torch(kernel_calls):
    """Documented deviation: a mean with a zero denominator is 0 (PyTorch: NaN)."""
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.full((4,), -100)
    loss, grad = _loss_and_grad(x, y)
    assert kernel_calls["grad_kernel"] == 1
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(x))
    assert torch.isnan(F.cross_entropy(x, y))


def test_inplace_backward_writes_into_the_logits(kernel_calls):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 17, generator=g, dtype=torch.float64)
    y = torch.randint(0, 17, (9,), generator=g)
    expected = torch.func.grad(lambda z: F.cross_entropy(z, y))(x)
    leaf = x.clone().requires_grad_()
    cet.cross_entropy(leaf, y, inplace_backward=True).backward()
    assert kernel_calls == {"loss_kernel": 1, "grad_kernel": 1}  # the gradient written in backward
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-14)
    assert leaf.grad.data_ptr() == leaf.data_ptr()


def test_loss_alone_when_no_gradient_is_wanted(kernel_calls):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    with torch.no_grad():
        cet.cross_entropy(x, y)
    cet.cross_entropy(x.detach(), y)
    assert kernel_calls == {"loss_kernel": 2, "grad_kernel": 0}


def _upstream_case(reduction, seed):
    """(11, 7) float64 logits, class indices with every third ignored, class weights, and an
    upstream gradient (per row for "none")."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(11, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (11,), generator=g)
    y[::3] = -100
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    up = torch.randn(11 if reduction == "none" else (), generator=g, dtype=torch.float64)
    return x, y, w, up


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradient_scales_the_forward_gradient(kernel_calls, reduction):
    """The gradient written in forward is for an upstream gradient of 1; backward multiplies it
    by any other (a scalar, or per row for "none"), as the chunked path's gradient."""
    x, y, w, up = _upstream_case(reduction, seed=3)
    grads = []
    for impl in ("auto", "chunked"):
        leaf = x.clone().requires_grad_()
        cet.cross_entropy(leaf, y, weight=w, reduction=reduction, impl=impl).backward(up)
        grads.append(leaf.grad)
    assert kernel_calls == {"loss_kernel": 0, "grad_kernel": 1}
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_retained_graph_backward_twice_accumulates_the_same_gradient(kernel_calls):
    """The forward's gradient is handed on once; a second backward through a retained graph
    writes it again from the saved logits (the first one's tensor may be the leaf's .grad)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (9,), generator=g)
    loss = cet.cross_entropy(x, y)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    assert kernel_calls == {"loss_kernel": 0, "grad_kernel": 2}
    torch.testing.assert_close(x.grad, 2 * once, rtol=1e-12, atol=0)
    torch.testing.assert_close(once, torch.func.grad(lambda z: F.cross_entropy(z, y))(x.detach()),
                               rtol=1e-12, atol=1e-14)


# ---- label smoothing: the smoothing kernel (crossent.cpu._smoothed_rows) ---------------------------


@pytest.fixture
def smoothing_calls(monkeypatch):
    """Counts the calls of crossent.cpu._smoothed_rows, by whether they wrote a gradient."""
    calls = {"loss": 0, "grad": 0}
    real = crossent.cpu._smoothed_rows

    def counted(x, t, w, eps, scale=None, out=None, keep=None):
        calls["grad" if out is not None else "loss"] += 1
        return real(x, t, w, eps, scale, out, keep)

    monkeypatch.setattr(crossent.cpu, "_smoothed_rows", counted)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.1, 1.0])
@pytest.mark.parametrize("shape", [(37, 11), (5, 7, 3), (13,)])
def test_smoothing_auto_equals_chunked_and_torch_float64(smoothing_calls, reduction, weighted, eps, shape):
    x, y, w = _class_inputs(shape, weighted, seed=sum(shape) + 1)
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    loss, grad = _loss_and_grad(x, y, **kw)
    assert smoothing_calls == {"loss": 0, "grad": 1}  # one pass: the gradient in forward
    ref_loss, ref_grad = _loss_and_grad(x, y, impl="chunked", **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    xt = x.detach().clone().requires_grad_()
    t_loss = F.cross_entropy(xt, y, **kw)  # finite logits: PyTorch's smoothing is crossent's
    (t_loss.sum() if t_loss.ndim else t_loss).backward()
    torch.testing.assert_close(loss, t_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, xt.grad, rtol=1e-10, atol=1e-12)


def test_smoothing_float32_masks_gradcheck_and_edge_rows(smoothing_calls):
    """float32 within float32 rounding of the float64 truth; -inf masks (smoothing spread over the
    finite logits, a DESIGN.md deviation from PyTorch), ignored rows holding NaN, an all -inf row
    and a +inf logit as impl="chunked" gives them; gradcheck."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(301, 1031, generator=g) * 5
    x[:, 7] = float("-inf")
    y = torch.randint(8, 1031, (301,), generator=g)
    y[::5] = -100
    x[5, 3] = float("nan")
    w = torch.rand(1031, generator=g) + 0.5
    loss, grad = _loss_and_grad(x, y, weight=w, label_smoothing=0.2)
    truth, truth_grad = _loss_and_grad(x.double(), y, weight=w.double(), label_smoothing=0.2, impl="reference")
    assert abs(loss.double() - truth) <= 4 * torch.finfo(torch.float32).eps * abs(truth)
    torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-4, atol=1e-9)
    assert torch.equal(grad[:, 7], torch.zeros(301)) and torch.equal(grad[5], torch.zeros(1031))
    inf = float("inf")
    edge = torch.tensor([[0.0, -inf, 1.0, 2.0], [-inf, -inf, -inf, -inf], [inf, 0.0, 1.0, 2.0], [inf, 0.0, 1.0, 2.0],
                         [3.0, 3.0, 1.0, 3.0]], dtype=torch.float64)
    ye = torch.tensor([2, 0, 1, 0, 3])
    for eps in (0.2, 1.0):  # eps = 1 drops the nll term: the all -inf row is still NaN (review D4)
        for impl in ("auto", "chunked"):
            rows = cet.cross_entropy(edge, ye, label_smoothing=eps, reduction="none", impl=impl)
            if impl == "auto":
                got = rows
        # Rows 2 and 3 hold +inf: NaN as F.cross_entropy ("chunked" gives inf there).
        other = [0, 1, 4]
        torch.testing.assert_close(got[other], rows[other], rtol=1e-12, atol=0, equal_nan=True)
        assert torch.isnan(got[1]) and torch.isnan(got[2:4]).all()
        assert torch.isnan(F.cross_entropy(edge[2:4], ye[2:4], label_smoothing=eps, reduction="none")).all()
    z = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    yz = torch.tensor([0, 4, -100, 2, 2, 1])
    wz = torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: cet.cross_entropy(v, yz, weight=wz, label_smoothing=0.3), (z,))
    assert torch.autograd.gradcheck(lambda v: cet.cross_entropy(v, yz, reduction="none", label_smoothing=0.3), (z,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_smoothing_inplace_upstream_and_retained_graph(smoothing_calls, reduction):
    x, y, w, up = _upstream_case(reduction, seed=6)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.15)
    grads = []
    for impl in ("auto", "chunked"):
        leaf = x.clone().requires_grad_()
        cet.cross_entropy(leaf, y, impl=impl, **kw).backward(up)
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
    leaf = x.clone().requires_grad_()  # in place: the gradient written in backward, into the logits
    cet.cross_entropy(leaf, y, inplace_backward=True, **kw).backward(up)
    torch.testing.assert_close(leaf.grad, grads[1], rtol=1e-12, atol=1e-14)
    assert leaf.grad.data_ptr() == leaf.data_ptr()
    leaf = x.clone().requires_grad_()  # twice through a retained graph: the same gradient twice
    loss = cet.cross_entropy(leaf, y, **kw)
    loss.backward(up, retain_graph=True)
    loss.backward(up)
    torch.testing.assert_close(leaf.grad, 2 * grads[1], rtol=1e-12, atol=1e-14)
    # auto: the gradient in forward; in place: the loss alone, then the gradient in backward;
    # retained graph: the gradient in forward, and again in the second backward.
    assert smoothing_calls == {"loss": 1, "grad": 4}


@pytest.mark.parametrize("kwargs, dtype", [
    ({"label_smoothing": 0.1}, torch.bfloat16),
    ({"z_loss": 1e-3, "label_smoothing": 0.1}, torch.float32),
    ({"softcap": 30.0}, torch.float32),
    ({}, torch.bfloat16),
    ({"impl": "chunked"}, torch.float32),
    ({"impl": "reference"}, torch.float32),
])  # fmt: skip
def test_other_options_take_the_chunked_or_chosen_path(kernel_calls, kwargs, dtype):
    x = torch.randn(8, 6).to(dtype)
    y = torch.randint(0, 6, (8,))
    _loss_and_grad(x, y, **kwargs)
    assert kernel_calls == {"loss_kernel": 0, "grad_kernel": 0}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_z_loss_runs_the_kernels_in_every_backward_mode(kernel_calls, reduction, weighted):
    """A z-loss without smoothing on the class-index kernels (z_scale): the loss and gradient
    equal impl="reference" (float64 PyTorch ops) with ignored rows, class weights and an upstream
    gradient, written in forward, in place (inplace_backward) and in a second backward through a
    retained graph."""
    x, y, w = _class_inputs((29, 17), weighted, seed=21)
    kw = dict(weight=w, reduction=reduction, z_loss=3e-3)
    up = torch.rand(29, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    ref = x.clone().requires_grad_()
    want = cet.cross_entropy(ref, y, impl="reference", **kw)
    want.backward(up)
    leaf = x.clone().requires_grad_()
    loss = cet.cross_entropy(leaf, y, **kw)
    loss.backward(up, retain_graph=True)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-12, atol=1e-14)
    loss.backward(up)  # written again by the kernel, with the z-term's factors times up
    torch.testing.assert_close(leaf.grad, 2 * ref.grad, rtol=1e-12, atol=1e-14)
    inplace = x.clone().requires_grad_()
    y_in = inplace * 1.0  # a non-leaf: the gradient is written into its memory
    y_in.retain_grad()
    cet.cross_entropy(y_in, y, inplace_backward=True, **kw).backward(up)
    torch.testing.assert_close(y_in.grad, ref.grad, rtol=1e-12, atol=1e-14)
    assert kernel_calls["grad_kernel"] == 3 and kernel_calls["loss_kernel"] == 1


def test_probability_targets_skip_and_switched_off_path_falls_back(kernel_calls, monkeypatch):
    """Probability targets never reach the class-index kernels; CROSSENT_CPU_FAST=0 turns all off."""
    x = torch.randn(8, 6, dtype=torch.float64)
    _loss_and_grad(x, torch.softmax(torch.randn(8, 6, dtype=torch.float64), 1))
    monkeypatch.setenv("CROSSENT_CPU_FAST", "0")
    _loss_and_grad(x, torch.randint(0, 6, (8,)))
    assert kernel_calls == {"loss_kernel": 0, "grad_kernel": 0}
    assert _cpu_fast.class_index_path(x, False, 0.0, None) is None


def test_bad_targets_still_raise_naming_the_argument():
    with pytest.raises(ValueError, match="target"):
        cet.cross_entropy(torch.randn(3, 4), torch.tensor([0, 4, 1]))


# -- probability targets: crossent.cpu's soft-target kernels ------------------------------------------


@pytest.fixture
def soft_calls(monkeypatch):
    """Counts the calls of crossent.cpu's soft-target forward and backward kernels."""
    return _count_calls(monkeypatch, "soft_cross_entropy", "softmax_minus_targets")


def _soft_loss_and_grad(x, t, upstream, **kw):
    x = x.detach().clone().requires_grad_()
    loss = cet.cross_entropy(x, t, **kw)
    loss.backward(upstream if loss.ndim else upstream.sum())
    return loss.detach(), x.grad


def _probabilities(shape, class_dim, g, dtype):
    return torch.softmax(torch.randn(shape, generator=g, dtype=dtype), class_dim)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(37, 11), (5, 7, 3), (13,)])
def test_soft_auto_equals_chunked_and_torch_float64(soft_calls, reduction, shape):
    g = torch.Generator().manual_seed(sum(shape))
    class_dim = 0 if len(shape) == 1 else 1
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = _probabilities(shape, class_dim, g, torch.float64)
    up = torch.rand(shape[:class_dim] + shape[class_dim + 1:], generator=g, dtype=torch.float64)
    loss, grad = _soft_loss_and_grad(x, t, up, reduction=reduction)
    assert soft_calls == {"loss_kernel": 0, "grad_kernel": 1}  # one pass: the gradient in forward
    ref_loss, ref_grad = _soft_loss_and_grad(x, t, up, reduction=reduction, impl="chunked")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    torch_loss, torch_grad = _soft_loss_and_grad(x, t, up, reduction=reduction, impl="reference")
    torch.testing.assert_close(F.cross_entropy(x, t, reduction=reduction), torch_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-12, atol=1e-14)


def test_soft_float32_matches_float64_truth_and_masked_classes(soft_calls):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 301, generator=g, dtype=torch.float64) * 4
    t = _probabilities((64, 301), 1, g, torch.float64)
    x[:, ::7] = float("-inf")  # masked classes under zero targets: finite losses, kernels used
    t[:, ::7] = 0.0
    t = t / t.sum(dim=1, keepdim=True)
    up = torch.ones(())
    loss32, grad32 = _soft_loss_and_grad(x.float(), t.float(), up, reduction="sum")
    truth, truth_grad = _soft_loss_and_grad(x, t.float().double(), up.double(), reduction="sum", impl="reference")
    assert soft_calls == {"loss_kernel": 0, "grad_kernel": 1}  # one pass: the gradient in forward
    assert loss32.dtype == torch.float32 and torch.isfinite(loss32)
    torch.testing.assert_close(loss32.double(), truth, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad32.double(), truth_grad, rtol=1e-5, atol=1e-7)
    assert (grad32[:, ::7] == 0).all()


def test_soft_inplace_backward_writes_into_the_logits(soft_calls):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    t = _probabilities((9, 5), 1, g, torch.float64)
    want = _soft_loss_and_grad(x, t, torch.ones(()), impl="chunked")[1]
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, whose memory the in-place gradient may take
    cet.cross_entropy(logits, t, inplace_backward=True).backward()
    assert soft_calls == {"loss_kernel": 1, "grad_kernel": 1}  # the gradient written in backward
    torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logits.detach(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_upstream_gradient_and_retained_graph(soft_calls, reduction):
    """The soft forward's gradient (upstream 1) times any upstream gradient equals impl
    "chunked"'s; a second backward through a retained graph writes it again; without a gradient
    wanted only the loss kernel runs."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    t = _probabilities((10, 6), 1, g, torch.float64)
    up = torch.randn(10 if reduction == "none" else (), generator=g, dtype=torch.float64)
    grads = []
    for impl in ("auto", "chunked"):
        leaf = x.clone().requires_grad_()
        loss = cet.cross_entropy(leaf, t, reduction=reduction, impl=impl)
        loss.backward(up, retain_graph=True)
        once = leaf.grad.clone()
        loss.backward(up)
        torch.testing.assert_close(leaf.grad, 2 * once, rtol=1e-12, atol=1e-14)
        grads.append(once)
    assert soft_calls == {"loss_kernel": 0, "grad_kernel": 2}
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        cet.cross_entropy(x.clone().requires_grad_(), t)
    assert soft_calls == {"loss_kernel": 1, "grad_kernel": 2}


def test_soft_nonfinite_rows_take_the_chunked_path(soft_calls):
    """A row whose loss is not finite sends the whole call to impl="chunked" (its conventions)."""
    x = torch.zeros(4, 3, dtype=torch.float64)
    t = torch.full((4, 3), 1.0 / 3, dtype=torch.float64)
    x[0, 1] = float("-inf")  # a positive target on a masked class: +inf
    x[2] = float("-inf")
    t[2] = 0.0  # an all -inf row under zero targets
    x[3, 2] = float("inf")
    up = torch.ones(4, dtype=torch.float64)
    loss, grad = _soft_loss_and_grad(x, t, up, reduction="none")
    # the forward wrote the gradient with the losses, found a loss not finite and handed over
    assert soft_calls == {"loss_kernel": 0, "grad_kernel": 1}
    ref_loss, ref_grad = _soft_loss_and_grad(x, t, up, reduction="none", impl="chunked")
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, equal_nan=True)


@pytest.mark.parametrize("kwargs", [
    {"weight": "classes"}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"softcap": 30.0}, {"impl": "chunked"},
])  # fmt: skip
def test_soft_other_options_do_not_take_the_kernels(soft_calls, kwargs):
    """Class weights, smoothing, a z-loss or a softcap take the blocked pass instead
    (test_torch_cpu_blocked.py); impl="chunked" takes the chunked path."""
    x = torch.randn(8, 6, dtype=torch.float64)
    t = torch.softmax(torch.randn(8, 6, dtype=torch.float64), 1)
    if kwargs.get("weight") == "classes":
        kwargs = {"weight": torch.rand(6, dtype=torch.float64) + 0.5}
    _soft_loss_and_grad(x, t, torch.ones(()), **kwargs)
    assert soft_calls == {"loss_kernel": 0, "grad_kernel": 0}


def test_soft_targets_requiring_grad_are_differentiated_or_refused(soft_calls):
    """impl="auto" differentiates probability targets that require grad (through the reference
    composition: d mean / d t = -log softmax(x) / N); "chunked", which cannot, refuses them."""
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(8, 6, dtype=torch.float64), 1).requires_grad_()
    cet.cross_entropy(x, t).backward()
    assert soft_calls == {"loss_kernel": 0, "grad_kernel": 0}
    torch.testing.assert_close(t.grad, -torch.log_softmax(x.detach(), 1) / 8, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, (torch.softmax(x.detach(), 1) - t.detach()) / 8, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="impl='chunked' does not differentiate probability targets"):
        cet.cross_entropy(x, t, impl="chunked")
    with torch.no_grad():  # nothing to differentiate: any impl
        cet.cross_entropy(x, t, impl="chunked")
    cet.cross_entropy(x, t.detach(), impl="chunked")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_nonfinite_upstream_gradient_on_ignored_rows_leaves_them_zero(kernel_calls, smoothing_calls, inplace, eps):
    """A NaN or inf upstream gradient on an ignored row ("none"), or a NaN scalar when every row
    is ignored ("mean"), leaves the ignored rows' gradient 0 on the CPU kernels, as in
    F.cross_entropy and the chunked path (it was 0 * NaN = NaN), whether the gradient was written
    in forward or (inplace_backward) in backward."""
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, -100, 5, -100])
    up = torch.tensor([1.0, float("nan"), 2.0, float("inf")], dtype=torch.float64)
    for impl in ("auto", "chunked"):
        x = x0.clone().requires_grad_()
        loss = cet.cross_entropy(x * 1.0 if inplace else x, y, reduction="none", label_smoothing=eps, impl=impl,
                                 inplace_backward=inplace and impl == "auto")
        loss.backward(up)
        if impl == "auto":
            got = x.grad
    assert sum((smoothing_calls if eps else kernel_calls).values()) >= 1  # the kernels ran
    xt = x0.clone().requires_grad_()
    F.cross_entropy(xt, y, reduction="none", label_smoothing=eps).backward(up)
    torch.testing.assert_close(got, xt.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, x.grad, rtol=1e-12, atol=0)
    assert torch.equal(got[[1, 3]], torch.zeros(2, 6))
    x = x0.clone().requires_grad_()
    cet.cross_entropy(x * 1.0 if inplace else x, torch.full((4,), -100), label_smoothing=eps,
                      inplace_backward=inplace).backward(torch.tensor(float("nan"), dtype=torch.float64))
    assert torch.equal(x.grad, torch.zeros(4, 6))
