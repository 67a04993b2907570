"""impl="auto" on the CPU through crossent.cpu's blocked numpy passes, behind autograd:

- probability targets with any option (class weights, label smoothing, z-loss, softcap), or
  without numba: ``_blocked.soft_targets``, the loss and the gradient in one pass; rows whose loss
  is not finite send the call to impl="chunked";
- class indices with a z-loss or a softcap, or without numba: ``CpuBlockedCrossEntropy``
  (``_blocked.lse_and_nll`` in forward, ``_blocked.gradient`` in backward).

Same results as impl="chunked" and the reference composition (float64 to 1e-12), and as the
oracle ``_oracle``, written here from F.cross_entropy in float64 row by row (float64 to 1e-10).
These tests do not need numba."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import crossent.cpu
import crossent.torch as cet
from crossent.cpu import _blocked


@pytest.fixture
def blocked_calls(monkeypatch):
    """Counts the blocked pass's calls: ``loss`` (no gradient written), ``grad`` (loss and gradient)."""
    calls = {"loss": 0, "grad": 0}
    real = _blocked.soft_targets

    def counted(*args, **kwargs):
        calls["grad" if kwargs.get("out") is not None else "loss"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(_blocked, "soft_targets", counted)
    return calls


@pytest.fixture(params=["numba", "no-numba"])
def numba_setting(request, monkeypatch):
    """With numba (when installed) and as installed without it: the options take the blocked pass
    either way; without numba the plain loss does too."""
    if request.param == "numba" and not crossent.cpu.available():
        pytest.skip("numba is not installed")
    if request.param == "no-numba":
        monkeypatch.setattr(crossent.cpu, "available", lambda: False)
    return request.param


def _loss_and_grad(x, t, upstream, **kw):
    leaf = x.detach().clone().requires_grad_()
    loss = cet.cross_entropy(leaf, t, **kw)
    loss.backward(upstream if loss.ndim else upstream.sum())
    return loss.detach(), leaf.grad


def _oracle(x, t, upstream, *, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
            reduction="mean", ignore_index=-100):
    """Loss and gradient of ``x`` from F.cross_entropy in float64, one row at a time, with DESIGN.md's
    additions written out: logits c * tanh(x / c) first; a -inf logit (t = 0 there) masks its class,
    so the row is F.cross_entropy over its finite classes (label smoothing spread over those K); the
    z-loss z * logsumexp(row)**2 on each kept row, not class-weighted, its mean over the kept rows;
    an ignored row contributes 0 (its logits, NaN or not, are never touched)."""
    soft = t.is_floating_point()
    class_dim = 0 if x.ndim == 1 else 1
    c = x.shape[class_dim]
    x64 = x.detach().double().requires_grad_()
    rows_x = x64.movedim(class_dim, -1).reshape(-1, c)
    rows_t = (t.double().movedim(class_dim, -1).reshape(-1, c) if soft else t.reshape(-1))
    w = None if weight is None else weight.detach().double()
    ce_rows, z_rows, denom, kept = [], [], 0.0, 0
    for i in range(rows_x.shape[0]):
        if not soft and int(rows_t[i]) == ignore_index:
            ce_rows.append(torch.zeros((), dtype=torch.float64))
            z_rows.append(torch.zeros((), dtype=torch.float64))
            continue
        xi = rows_x[i]
        if softcap is not None:
            xi = softcap * torch.tanh(xi / softcap)
        finite = torch.isfinite(xi.detach())
        xi = xi[finite][None]
        wi = None if w is None else w[finite]
        if soft:
            ti = rows_t[i][finite][None]
            denom += 1.0
        else:
            label = int(rows_t[i])
            ti = torch.tensor([int(finite[:label].sum())])
            denom += 1.0 if w is None else float(w[label])
        ce_rows.append(F.cross_entropy(xi, ti, weight=wi, label_smoothing=label_smoothing, reduction="sum"))
        z_rows.append(z_loss * torch.logsumexp(xi[0], 0) ** 2)
        kept += 1
    ce_rows, z_rows = torch.stack(ce_rows), torch.stack(z_rows)
    if reduction == "none":
        loss = (ce_rows + z_rows).reshape(x64.movedim(class_dim, -1).shape[:-1])
    elif reduction == "sum":
        loss = ce_rows.sum() + z_rows.sum()
    else:
        loss = ce_rows.sum() / denom + z_rows.sum() / kept
    loss.backward(upstream.double() if loss.ndim else upstream.double().sum())
    return loss.detach(), x64.grad


def _inputs(shape, seed, dtype=torch.float64):
    """Logits (classes on dim 1, or dim 0 for 1-D) with a masked class (-inf) under a zero target in
    the first row, probability targets, an upstream gradient of the loss's "none" shape and class
    weights."""
    g = torch.Generator().manual_seed(seed)
    class_dim = 0 if len(shape) == 1 else 1
    x = torch.randn(shape, generator=g, dtype=dtype) * 3
    t = torch.softmax(torch.randn(shape, generator=g, dtype=dtype), class_dim)
    first = (0,) * (len(shape) - 1) if len(shape) > 1 else ()
    index = first[:class_dim] + (slice(0, 2),) + first[class_dim:]
    x[index] = float("-inf")
    t[index] = 0.0
    up = torch.rand(shape[:class_dim] + shape[class_dim + 1:], generator=g, dtype=dtype)
    w = torch.rand(shape[class_dim], generator=g, dtype=dtype) + 0.5
    return x, t, up, w


OPTIONS = [
    dict(zip(("weighted", "label_smoothing", "z_loss", "softcap"), values, strict=True))
    for values in itertools.product([False, True], [0.0, 0.1, 1.0], [0.0, 1e-3], [None, 5.0])
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_equal_chunked_and_reference_float64(blocked_calls, numba_setting, options, reduction):
    x, t, up, w = _inputs((37, 11), 11)
    kw = dict(options, reduction=reduction, weight=w if options["weighted"] else None)
    del kw["weighted"]
    plain = not options["weighted"] and options["label_smoothing"] == 0 and options["z_loss"] == 0 \
        and options["softcap"] is None
    loss, grad = _loss_and_grad(x, t, up, **kw)
    if plain and numba_setting == "numba":
        assert blocked_calls == {"loss": 0, "grad": 0}  # the numba kernels
    else:
        assert blocked_calls == {"loss": 0, "grad": 1}  # one pass: the gradient written in forward
    for impl in ("chunked", "reference"):
        ref_loss, ref_grad = _loss_and_grad(x, t, up, impl=impl, **kw)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    want_loss, want_grad = _oracle(x, t, up, **kw)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 7, 3), (13,), (2, 9, 2, 3)])
def test_other_shapes_equal_reference(blocked_calls, shape):
    x, t, up, w = _inputs(shape, sum(shape))
    kw = dict(weight=w, label_smoothing=0.2, z_loss=1e-2, softcap=4.0)
    for reduction in ("mean", "sum", "none"):
        loss, grad = _loss_and_grad(x, t, up, reduction=reduction, **kw)
        ref_loss, ref_grad = _loss_and_grad(x, t, up, reduction=reduction, impl="reference", **kw)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
        want_loss, want_grad = _oracle(x, t, up, reduction=reduction, **kw)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert blocked_calls == {"loss": 0, "grad": 3}


def test_float32_matches_float64_truth(blocked_calls):
    """float32 logits: the pass runs in float32 blocks; the loss (summed in float64) and gradient
    are within float32's rounding of the float64 reference on the same values, and no further from
    it than impl="chunked" (float32 too) is."""
    x, t, up, w = _inputs((64, 301), 3)
    x32, t32, up32, w32 = x.float(), t.float(), up.float(), w.float()
    kw = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, reduction="sum")
    loss32, grad32 = _loss_and_grad(x32, t32, up32, weight=w32, **kw)
    assert blocked_calls == {"loss": 0, "grad": 1}
    truth, truth_grad = _oracle(x32, t32, up32, weight=w32, **kw)
    chunked_loss, chunked_grad = _loss_and_grad(x32, t32, up32, weight=w32, impl="chunked", **kw)

    def errors(loss, grad):
        scale = truth_grad.abs().max()
        return abs(loss.double() - truth) / truth, ((grad.double() - truth_grad).abs().max() / scale)

    loss_err, grad_err = errors(loss32, grad32)
    chunked_loss_err, chunked_grad_err = errors(chunked_loss, chunked_grad)
    assert loss32.dtype == torch.float32
    assert loss_err <= max(2e-7, 1.5 * chunked_loss_err)
    assert grad_err <= max(6e-7, 1.5 * chunked_grad_err)  # float32's unit roundoff: 6e-8
    assert (grad32[0, :2] == 0).all()  # the masked classes


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradient_retained_graph_and_no_grad(blocked_calls, reduction):
    """The forward's gradient (upstream 1) times the upstream gradient; a second backward through
    a retained graph writes it again (one more pass); without a gradient wanted the pass writes
    none."""
    x, t, up, w = _inputs((10, 6), 7)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=3.0, reduction=reduction)
    upstream = up if reduction == "none" else up.sum()
    grads = []
    for impl in ("auto", "chunked"):
        leaf = x.clone().requires_grad_()
        loss = cet.cross_entropy(leaf, t, impl=impl, **kw)
        loss.backward(upstream, retain_graph=True)
        once = leaf.grad.clone()
        loss.backward(upstream)
        torch.testing.assert_close(leaf.grad, 2 * once, rtol=1e-12, atol=1e-14)
        grads.append(once)
    assert blocked_calls == {"loss": 0, "grad": 2}
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        cet.cross_entropy(x.clone().requires_grad_(), t, **kw)
    cet.cross_entropy(x, t, **kw)  # logits not requiring grad
    assert blocked_calls == {"loss": 2, "grad": 2}


def test_inplace_backward_writes_into_the_logits(blocked_calls):
    x, t, _, w = _inputs((9, 5), 4)
    kw = dict(weight=w, label_smoothing=0.3, z_loss=1e-2, softcap=2.0)
    want = _loss_and_grad(x, t, torch.ones(()), impl="chunked", **kw)[1]
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, whose memory the in-place gradient may take
    cet.cross_entropy(logits, t, inplace_backward=True, **kw).backward()
    assert blocked_calls == {"loss": 1, "grad": 1}  # the gradient written in backward
    torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logits.detach(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "weight": "w"}])
def test_float64_targets_of_float32_logits_are_read_not_copied(numba_setting, monkeypatch, options):
    """float64 probability targets with float32 logits: the CPU passes get the targets' own memory
    (numba kernels round each entry to float32 as they read it; the blocked pass casts a block at a
    time), with the results of targets converted first, bit for bit."""
    x, t, upstream, w = _inputs((40, 33), 9, dtype=torch.float32)
    t64 = t.to(torch.float64) + 1e-9  # not representable in float32
    options = dict(options, weight=w) if options.get("weight") == "w" else options
    seen = []
    for name in ("soft_cross_entropy", "softmax_minus_targets"):
        real = getattr(crossent.cpu, name)

        def spy(logits, targets, *args, _real=real, **kwargs):
            seen.append(targets.dtype)
            return _real(logits, targets, *args, **kwargs)

        monkeypatch.setattr(crossent.cpu, name, spy)
    real_blocked = _blocked.soft_targets

    def blocked_spy(x_np, t_np, *args, **kwargs):
        seen.append(t_np.dtype)
        return real_blocked(x_np, t_np, *args, **kwargs)

    monkeypatch.setattr(_blocked, "soft_targets", blocked_spy)
    for reduction in ("mean", "none"):
        up = upstream if reduction == "none" else torch.ones(())
        got = _loss_and_grad(x, t64, up, reduction=reduction, **options)
        want = _loss_and_grad(x, t64.to(torch.float32), up, reduction=reduction, **options)
        # The loss is float64 as PyTorch promotes it (float32 logits, float64 targets): the
        # float32 loss cast, so still bit for bit.
        assert got[0].dtype == torch.float64 and got[1].dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0, check_dtype=False)
    assert seen and {str(d) for d in seen} == {"float64", "float32"}, seen


def test_nonfinite_rows_take_the_chunked_path(blocked_calls):
    """A row whose loss is not finite (a positive target on a -inf logit; an all -inf row with
    z-loss; a +inf logit) sends the whole call to impl="chunked", whose conventions hold."""
    x = torch.zeros(4, 3, dtype=torch.float64)
    t = torch.full((4, 3), 1.0 / 3, dtype=torch.float64)
    x[0, 1] = float("-inf")
    x[2] = float("-inf")
    t[2] = 0.0
    x[3, 2] = float("inf")
    up = torch.ones(4, dtype=torch.float64)
    kw = dict(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), z_loss=1e-3, reduction="none")
    loss, grad = _loss_and_grad(x, t, up, **kw)
    assert blocked_calls == {"loss": 0, "grad": 1}  # written, found not finite, handed over
    ref_loss, ref_grad = _loss_and_grad(x, t, up, impl="chunked", **kw)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, equal_nan=True)


@pytest.mark.parametrize("case", ["float16", "bfloat16", "non-contiguous", "off", "weight-requires-grad", "empty"])
def test_what_the_pass_does_not_take(blocked_calls, monkeypatch, case):
    """Half-precision logits (the pass computes in the logits' dtype), logits that are not
    C-contiguous, the fast paths switched off (CROSSENT_CPU_FAST=0), class weights requiring grad
    (impl="reference" differentiates them) and empty inputs take another path, with the same
    values."""
    x, t, up, w = _inputs((6, 5), 5)
    if case in ("float16", "bfloat16"):
        x, t, up, w = (v.to(getattr(torch, case)) for v in (x, t, up, w))
    elif case == "non-contiguous":
        x = x.t().contiguous().t()
    elif case == "off":
        monkeypatch.setenv("CROSSENT_CPU_FAST", "0")
    elif case == "weight-requires-grad":
        w = w.clone().requires_grad_()
    elif case == "empty":
        x, t, up = x[:0], t[:0], up[:0]
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    loss, grad = _loss_and_grad(x, t, up, **kw)
    assert blocked_calls == {"loss": 0, "grad": 0}
    ref_loss, ref_grad = _loss_and_grad(x, t, up, impl="reference", **kw)
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype))
    torch.testing.assert_close(grad, ref_grad)


# -- class indices with a z-loss or a softcap, or without numba: CpuBlockedCrossEntropy ------------


@pytest.fixture
def class_index_calls(monkeypatch):
    """Counts the blocked passes for class indices: ``stats`` (forward) and ``grad`` (backward)."""
    calls = {"stats": 0, "grad": 0}
    for key, name in (("stats", "lse_and_nll"), ("grad", "gradient")):
        real = getattr(_blocked, name)

        def counted(*args, key=key, real=real, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(_blocked, name, counted)
    return calls


def _class_inputs(shape, seed, dtype=torch.float64):
    """Logits (classes on dim 1, or dim 0 for 1-D), class indices with every fourth ignored, an
    ignored row of NaN logits, masked classes (-inf) in the first row, an upstream gradient of the
    loss's "none" shape that is NaN on the ignored NaN row, and class weights."""
    g = torch.Generator().manual_seed(seed)
    class_dim = 0 if len(shape) == 1 else 1
    c = shape[class_dim]
    x = torch.randn(shape, generator=g, dtype=dtype) * 3
    x2 = x.movedim(class_dim, -1).reshape(-1, c) if len(shape) > 1 else x[None]
    y = torch.randint(0, c, shape[:class_dim] + shape[class_dim + 1:], generator=g)
    up = torch.rand(y.shape, generator=g, dtype=dtype)
    if y.ndim:
        y.view(-1)[::4] = -100
        x2[0, :2] = float("-inf")
        y.view(-1)[0] = 3
        if y.numel() > 4:
            x2[4] = float("nan")
            up.view(-1)[4] = float("nan")
    x = x2.reshape(x.movedim(class_dim, -1).shape).movedim(-1, class_dim) if len(shape) > 1 else x2[0]
    w = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, y, up, w


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_class_indices_equal_chunked_and_reference_float64(class_index_calls, numba_setting, options, reduction):
    """Every option, ignored rows (one of NaN logits under a NaN upstream gradient), masked classes:
    the blocked pass takes a softcap, a z-loss with label smoothing, and everything without numba
    (the kernels a z-loss alone)."""
    x, y, up, w = _class_inputs((37, 11), 13)
    kw = dict(options, reduction=reduction, weight=w if options["weighted"] else None)
    del kw["weighted"]
    blocked = (options["z_loss"] > 0 and options["label_smoothing"] > 0) or options["softcap"] is not None \
        or numba_setting == "no-numba"
    upstream = up if reduction == "none" else torch.ones(())
    loss, grad = _loss_and_grad(x, y, upstream, **kw)
    assert class_index_calls == ({"stats": 1, "grad": 1} if blocked else {"stats": 0, "grad": 0})
    for impl in ("chunked", "reference"):
        ref_loss, ref_grad = _loss_and_grad(x, y, upstream, impl=impl, **kw)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    want_loss, want_grad = _oracle(x, y, upstream, **kw)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("shape", [(5, 7, 3), (13,), (2, 9, 2, 3)])
def test_class_indices_other_shapes_equal_reference(class_index_calls, shape):
    x, y, up, w = _class_inputs(shape, sum(shape))
    kw = dict(weight=w, label_smoothing=0.2, z_loss=1e-2, softcap=4.0)
    for reduction in ("mean", "sum", "none"):
        upstream = up if reduction == "none" else torch.full((), 0.7, dtype=torch.float64)
        loss, grad = _loss_and_grad(x, y, upstream, reduction=reduction, **kw)
        ref_loss, ref_grad = _loss_and_grad(x, y, upstream, reduction=reduction, impl="reference", **kw)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
        want_loss, want_grad = _oracle(x, y, upstream, reduction=reduction, **kw)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert class_index_calls == {"stats": 3, "grad": 3}


def test_class_indices_float32_no_worse_than_chunked(class_index_calls):
    x, y, _, w = _class_inputs((64, 301), 5)
    x32, w32 = x.float(), w.float()
    kw = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, reduction="sum")
    one = torch.ones(())
    loss32, grad32 = _loss_and_grad(x32, y, one, weight=w32, **kw)
    assert class_index_calls == {"stats": 1, "grad": 1}
    truth, truth_grad = _oracle(x32, y, one, weight=w32, **kw)
    chunked_loss, chunked_grad = _loss_and_grad(x32, y, one, weight=w32, impl="chunked", **kw)

    def errors(loss, grad):
        return abs(loss.double() - truth) / truth, (grad.double() - truth_grad).abs().max() / truth_grad.abs().max()

    (loss_err, grad_err), (chunked_loss_err, chunked_grad_err) = errors(loss32, grad32), errors(chunked_loss,
                                                                                              chunked_grad)
    assert loss32.dtype == torch.float32
    assert loss_err <= max(2e-7, 1.5 * chunked_loss_err)
    assert grad_err <= max(6e-7, 1.5 * chunked_grad_err)


def test_class_indices_retained_graph_no_grad_and_inplace(class_index_calls):
    """A second backward through a retained graph makes the gradient pass again; without a
    gradient wanted only the statistics pass runs; inplace_backward writes the gradient into the
    logits and bumps their version."""
    x, y, _, w = _class_inputs((10, 6), 7)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    leaf = x.clone().requires_grad_()
    loss = cet.cross_entropy(leaf, y, **kw)
    loss.backward(retain_graph=True)
    once = leaf.grad.clone()
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * once, rtol=1e-12, atol=1e-14)
    assert class_index_calls == {"stats": 1, "grad": 2}
    with torch.no_grad():
        cet.cross_entropy(x, y, **kw)
    assert class_index_calls == {"stats": 2, "grad": 2}
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0
    cet.cross_entropy(logits, y, inplace_backward=True, **kw).backward()
    torch.testing.assert_close(leaf.grad, once, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logits.detach(), once, rtol=1e-12, atol=1e-14)
    leaf = x.clone().requires_grad_()
    loss = cet.cross_entropy(leaf.exp(), y, inplace_backward=True, **kw)  # exp saves its output
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_class_indices_half_precision_takes_the_chunked_path(class_index_calls):
    x, y, up, w = _class_inputs((6, 5), 5, dtype=torch.bfloat16)
    kw = dict(weight=w, z_loss=1e-3, softcap=4.0, reduction="none")
    loss, grad = _loss_and_grad(x, y, up, **kw)
    assert class_index_calls == {"stats": 0, "grad": 0}
    ref_loss, ref_grad = _loss_and_grad(x, y, up, impl="chunked", **kw)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
