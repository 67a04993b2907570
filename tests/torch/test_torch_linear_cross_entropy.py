"""cet.linear_cross_entropy against the plain composition and PyTorch 2.13's native op."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet

REDUCTIONS = ["mean", "sum", "none"]
TOL = dict(rtol=1e-10, atol=1e-12)


def _problem(lead=(29,), dim=6, vocab=17, seed=0, bias=True, ignore_every=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, vocab, lead, generator=gen)
    if ignore_every:
        y.view(-1)[::ignore_every] = -100
    return x, w, b, y


def _composition(x, w, y, *, linear_bias=None, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The plain composition, z-loss and softcap written out (classes last, any lead shape)."""
    logits = F.linear(x, w, linear_bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lead = y.shape if not y.is_floating_point() else y.shape[:-1]
    flat = logits.reshape(-1, w.shape[0])
    yf = y.reshape(-1, w.shape[0]) if y.is_floating_point() else y.reshape(-1)
    ce = F.cross_entropy(flat, yf, weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    valid = (yf != ignore_index).to(flat.dtype) if not y.is_floating_point() else torch.ones(
        flat.shape[0], dtype=flat.dtype)
    zrow = z_loss * torch.logsumexp(flat, dim=1) ** 2 * valid
    if reduction == "none":
        return (ce + zrow).reshape(lead)
    if reduction == "sum":
        return ce + zrow.sum()
    return ce + zrow.sum() / valid.sum()


def _grads(loss, inputs):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss.sum(), inputs)


OPTIONS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.2),
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(weight=True, label_smoothing=0.1, z_loss=0.05, softcap=2.0),
    dict(ignore_index=3, label_smoothing=0.3),
]


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(29,), (3, 7)], ids=["N-D", "B-T-D"])
def test_equals_plain_composition(impl, reduction, opts, bias, lead):
    x, w, b, y = _problem(lead=lead, bias=bias)
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(17, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.2
    y = torch.where(y == -100, opts.get("ignore_index", -100), y)
    for chunk_size in ([None, 4] if impl == "chunked" else [None]):
        ours = cet.linear_cross_entropy(
            x, w, y, linear_bias=b, reduction=reduction, impl=impl, chunk_size=chunk_size, **opts
        )
        theirs = _composition(x, w, y, linear_bias=b, reduction=reduction, **opts)
        assert ours.shape == theirs.shape == (lead if reduction == "none" else ())
        torch.testing.assert_close(ours, theirs, **TOL)
        for g_ours, g_theirs in zip(_grads(ours, (x, w, b)), _grads(theirs, (x, w, b)), strict=True):
            torch.testing.assert_close(g_ours, g_theirs, **TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_probability_targets(reduction, label_smoothing, block_setting):
    x, w, b, _ = _problem(lead=(4, 5))
    gen = torch.Generator().manual_seed(2)
    t = torch.softmax(torch.randn(4, 5, 17, generator=gen, dtype=torch.float64), -1)
    weight = torch.rand(17, generator=gen, dtype=torch.float64)
    kw = dict(linear_bias=b, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    ours = cet.linear_cross_entropy(x, w, t, impl="chunked", z_loss=0.01, **kw)
    theirs = _composition(x, w, t, z_loss=0.01, **kw)
    torch.testing.assert_close(ours, theirs, **TOL)
    for g_ours, g_theirs in zip(_grads(ours, (x, w, b)), _grads(theirs, (x, w, b)), strict=True):
        torch.testing.assert_close(g_ours, g_theirs, **TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("native_chunked", [False, True])
@pytest.mark.parametrize("opts", [dict(), dict(weight=True), dict(bias=True), dict(label_smoothing=0.2)],
                         ids=["plain", "weight", "bias", "smoothing"])
def test_equals_pytorch_native_linear_cross_entropy(reduction, native_chunked, opts):
    """torch.nn.functional.linear_cross_entropy (2.13), reference path and chunked path."""
    if native_chunked and "label_smoothing" in opts:
        pytest.skip("PyTorch's chunked path does not take label_smoothing (it falls back)")
    x, w, b, y = _problem(bias=opts.get("bias", False))
    kw = dict(reduction=reduction, ignore_index=-100, linear_bias=b)
    if opts.get("weight"):
        kw["weight"] = torch.rand(17, dtype=torch.float64) + 0.1
    if "label_smoothing" in opts:
        kw["label_smoothing"] = opts["label_smoothing"]
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8) if native_chunked else None
    theirs = F.linear_cross_entropy(x, w, y, options=options, **kw)
    ours = cet.linear_cross_entropy(x, w, y, impl="chunked", chunk_size=8, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for g_ours, g_theirs in zip(_grads(ours, (x, w, b)), _grads(theirs, (x, w, b)), strict=True):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    x, w, b, y = _problem(lead=(7,), dim=3, vocab=5, ignore_every=3)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25], dtype=torch.float64)

    def f(x, w, b):
        return cet.linear_cross_entropy(
            x, w, y, linear_bias=b, weight=weight, reduction=reduction, label_smoothing=0.1,
            z_loss=0.05, softcap=2.5, impl="chunked", chunk_size=3,
        )

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_frozen_weight_and_no_grad():
    x, w, b, y = _problem()
    w_frozen = w.detach()
    ours = cet.linear_cross_entropy(x, w_frozen, y, linear_bias=b.detach(), impl="chunked")
    (gx,) = torch.autograd.grad(ours, x)
    theirs = _composition(x, w_frozen, y, linear_bias=b.detach())
    (gx_theirs,) = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(gx, gx_theirs, **TOL)
    with torch.no_grad():
        loss = cet.linear_cross_entropy(x, w, y, linear_bias=b, impl="chunked")
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, theirs.detach(), **TOL)


def test_deviations_hold_for_linear():
    """All rows ignored: PyTorch's composition gives NaN; ours 0 with zero gradients."""
    x, w, b, y = _problem(lead=(5,))
    y = torch.full((5,), -100)
    assert torch.isnan(F.cross_entropy(F.linear(x, w, b), y))
    for impl in ["chunked", "reference"]:
        loss = cet.linear_cross_entropy(x, w, y, linear_bias=b, impl=impl, z_loss=0.1)
        assert loss.item() == 0.0
        for g in _grads(loss, (x, w, b)):
            assert torch.equal(g, torch.zeros_like(g))
    empty = torch.zeros(0, 6, dtype=torch.float64, requires_grad=True)
    loss = cet.linear_cross_entropy(empty, w, torch.zeros(0, dtype=torch.long), impl="chunked")
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_plain_composition(dtype):
    """Loss float32; loss and gradient errors against the float64 truth within the naive ones'."""
    gen = torch.Generator().manual_seed(4)
    n, d, v = 203, 37, 1009
    x64 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w64 = torch.randn(v, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::7] = -100
    x, w = x64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    xt, wt = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = F.cross_entropy(F.linear(xt, wt), y, label_smoothing=0.1)
    truth_g = torch.autograd.grad(truth, (xt, wt))
    naive = F.cross_entropy(F.linear(x, w).float(), y, label_smoothing=0.1)
    naive_g = torch.autograd.grad(naive, (x, w))
    ours = cet.linear_cross_entropy(x, w, y, label_smoothing=0.1, impl="chunked", chunk_size=50)
    assert ours.dtype == torch.float32
    ours_g = torch.autograd.grad(ours, (x, w))
    assert abs(ours.item() - truth.item()) <= abs(naive.item() - truth.item()) + 1e-5
    for g, gn, gt in zip(ours_g, naive_g, truth_g, strict=True):
        assert g.dtype == dtype
        err = (g.double() - gt).abs().max().item()
        err_naive = (gn.double() - gt).abs().max().item()
        assert err <= 1.5 * err_naive + 1e-6, (err, err_naive)


def test_module_matches_pytorch_module():
    torch.manual_seed(0)
    ours = cet.LinearCrossEntropyLoss(6, 17, bias=True, dtype=torch.float64, label_smoothing=0.1)
    theirs = torch.nn.LinearCrossEntropyLoss(
        6, 17, bias=True, dtype=torch.float64, label_smoothing=0.1, ignore_index=-100
    )
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x, _, _, y = _problem()
    torch.testing.assert_close(ours(x, y), theirs(x, y), **TOL)
    g_ours = torch.autograd.grad(ours(x, y), list(ours.parameters()))
    g_theirs = torch.autograd.grad(theirs(x, y), list(theirs.parameters()))
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_works_inside_torch_compile():
    x, w, b, y = _problem()

    def step(x, w, b):
        return cet.linear_cross_entropy(torch.tanh(x), w, y, linear_bias=b, impl="chunked") * 2

    import warnings

    compiled = torch.compile(step, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = compiled(x, w, b)
    want = step(x, w, b)
    torch.testing.assert_close(got, want)
    for a, c in zip(_grads(got, (x, w, b)), _grads(want, (x, w, b)), strict=True):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_blocks_equal_composition(reduction):
    """Blocks of >= 2**16 logits take the fused-softmax path (small ones do not)."""
    from crossent.torch import _chunked

    n, d, v, rows = 150, 8, 1201, 60
    assert rows * v >= _chunked._FUSED_SOFTMAX_MIN_ELEMENTS
    x, w, b, y = _problem(lead=(n,), dim=d, vocab=v, seed=9)
    weight = torch.rand(v, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = dict(linear_bias=b, weight=weight, reduction=reduction, label_smoothing=0.1,
              z_loss=1e-3, softcap=5.0)
    ours = cet.linear_cross_entropy(x, w, y, impl="chunked", chunk_size=rows, **kw)
    theirs = _composition(x, w, y, **kw)
    torch.testing.assert_close(ours, theirs, **TOL)
    for g_ours, g_theirs in zip(_grads(ours, (x, w, b)), _grads(theirs, (x, w, b)), strict=True):
        torch.testing.assert_close(g_ours, g_theirs, **TOL)
    # The same through cross_entropy on materialized logits (one block of 150 x 1201).
    logits = F.linear(x, w, b).detach().requires_grad_()
    ours_ce = cet.cross_entropy(logits, y, weight, reduction=reduction, label_smoothing=0.1,
                                z_loss=1e-3, softcap=5.0, impl="chunked")
    theirs_ce = _composition(logits, torch.eye(v, dtype=torch.float64), y, weight=weight,
                             reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    torch.testing.assert_close(ours_ce, theirs_ce, **TOL)
    torch.testing.assert_close(_grads(ours_ce, (logits,))[0], _grads(theirs_ce, (logits,))[0], **TOL)
