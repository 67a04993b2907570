"""cet.cross_entropy against F.cross_entropy (the oracle) and written-out formulas, float64."""

from __future__ import annotations

import itertools
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent.torch as cet

IMPLS = ["reference", "chunked"]
REDUCTIONS = ["mean", "sum", "none"]
# (input shape, class count): unbatched (C,), (N, C) and (N, C, d1, d2), odd sizes.
SHAPES = [(7,), (23, 7), (3, 7, 4, 5)]
TOL = dict(rtol=1e-10, atol=1e-12)


def _class_targets(shape, num_classes, ignore_index, gen):
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if len(shape) == 1:
        return torch.tensor(num_classes - 1)  # one row, not ignored (ignore_index is 2 or -100)
    target = torch.randint(0, num_classes, target_shape, generator=gen)
    if len(shape) > 1:
        flat = target.view(-1)
        flat[::4] = ignore_index  # a quarter of the rows ignored
    return target


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "weighted,label_smoothing,ignore_index",
    [(False, 0.0, -100), (True, 0.0, -100), (False, 0.3, -100), (True, 0.3, 2), (True, 1.0, -100)],
)
def test_class_targets_equal_pytorch(
    impl, shape, reduction, weighted, label_smoothing, ignore_index, block_setting
):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, reduction, weighted)).encode()))
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    x = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    target = _class_targets(shape, num_classes, ignore_index, gen)
    weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    kw = dict(
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    ours = cet.cross_entropy(x, target, impl=impl, **kw)
    theirs = F.cross_entropy(x, target, **kw)
    assert ours.shape == theirs.shape
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, x), _grad(theirs, x), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted,label_smoothing", [(False, 0.0), (True, 0.0), (True, 0.2)])
def test_probability_targets_equal_pytorch(
    impl, shape, reduction, weighted, label_smoothing, block_setting
):
    gen = torch.Generator().manual_seed(7)
    class_dim = 0 if len(shape) == 1 else 1
    num_classes = shape[class_dim]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    # Unnormalized, partly negative targets: PyTorch does not validate them, nor do we.
    target = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), class_dim)
    target = target - 0.05
    weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) if weighted else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    ours = cet.cross_entropy(x, target, impl=impl, **kw)
    theirs = F.cross_entropy(x, target, **kw)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, x), _grad(theirs, x), **TOL)


def _z_loss_softcap_composition(x, target, *, weight, ignore_index, reduction, eps, z, cap):
    """The plain composition the issue writes out: softcap, F.cross_entropy, + z * lse^2."""
    logits = x if cap is None else cap * torch.tanh(x / cap)
    ce = F.cross_entropy(
        logits, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps
    )
    valid = (target != ignore_index).to(x.dtype)
    zrow = z * torch.logsumexp(logits, dim=1) ** 2 * valid
    if reduction == "none":
        return ce + zrow
    if reduction == "sum":
        return ce + zrow.sum()
    return ce + zrow.sum() / valid.sum()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "z_loss,softcap,weighted,eps", [(1e-2, None, False, 0.0), (0.0, 2.5, True, 0.1), (0.3, 4.0, True, 0.2)]
)
def test_z_loss_and_softcap_equal_written_out_composition(
    impl, reduction, z_loss, softcap, weighted, eps, block_setting
):
    gen = torch.Generator().manual_seed(11)
    x = (4 * torch.randn(31, 13, generator=gen, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 13, (31,), generator=gen)
    target[::3] = -100
    weight = torch.rand(13, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    ours = cet.cross_entropy(
        x, target, weight, reduction=reduction, label_smoothing=eps, z_loss=z_loss,
        softcap=softcap, impl=impl,
    )
    theirs = _z_loss_softcap_composition(
        x, target, weight=weight, ignore_index=-100, reduction=reduction, eps=eps, z=z_loss,
        cap=softcap,
    )
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, x), _grad(theirs, x), **TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_chunked_all_options(reduction, block_setting):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 2, 1, -100, 3, 0])
    weight = torch.rand(5, generator=gen, dtype=torch.float64) + 0.2
    soft = torch.softmax(torch.randn(9, 5, generator=gen, dtype=torch.float64), 1)

    def f_hard(x):
        return cet.cross_entropy(
            x, target, weight, reduction=reduction, label_smoothing=0.15, z_loss=0.05,
            softcap=3.0, impl="chunked",
        )

    def f_soft(x):
        return cet.cross_entropy(
            x, soft, weight, reduction=reduction, label_smoothing=0.1, z_loss=0.05, impl="chunked"
        )

    assert torch.autograd.gradcheck(f_hard, (x,))
    assert torch.autograd.gradcheck(f_soft, (x,))


def test_legacy_size_average_and_reduce_map_like_pytorch():
    x = torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    for size_average, reduce in itertools.product([None, True, False], [None, True, False]):
        if size_average is None and reduce is None:
            continue
        with pytest.warns(UserWarning, match="deprecated") as ours_warn:
            ours = cet.cross_entropy(x, target, None, size_average, -100, reduce)
        with pytest.warns(UserWarning, match="deprecated") as theirs_warn:
            theirs = F.cross_entropy(x, target, None, size_average, -100, reduce)
        assert [str(w.message) for w in ours_warn] == [str(w.message) for w in theirs_warn]
        torch.testing.assert_close(ours, theirs, **TOL)


def test_positional_order_matches_pytorch():
    x = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 3, 3, 2])
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    args = (x, target, w, None, 3, None, "sum", 0.25)
    torch.testing.assert_close(cet.cross_entropy(*args), F.cross_entropy(*args), **TOL)
    module = cet.CrossEntropyLoss(w, None, 3, None, "sum", 0.25)
    torch.testing.assert_close(
        module(x, target), torch.nn.CrossEntropyLoss(w, None, 3, None, "sum", 0.25)(x, target)
    )
    assert dict(module.named_buffers()).keys() == {"weight"}


# ----------------------------------------------------------------------------------------------
# Documented deviations: each test states PyTorch's behaviour and ours.


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case", ["all-ignored", "empty-batch", "zero-class-weight", "empty-soft-batch"]
)
def test_zero_denominator_mean_is_zero_with_zero_gradient(impl, case):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = None
    if case == "all-ignored":
        target = torch.full((4,), -100)
    elif case == "empty-batch":
        x = torch.randn(0, 3, dtype=torch.float64, requires_grad=True)
        target = torch.zeros(0, dtype=torch.long)
    elif case == "zero-class-weight":
        target = torch.tensor([0, 0, 1, 1])
        weight = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    else:
        x = torch.randn(0, 3, dtype=torch.float64, requires_grad=True)
        target = torch.zeros(0, 3, dtype=torch.float64)
    # PyTorch: 0 / 0 = NaN.
    assert torch.isnan(F.cross_entropy(x, target, weight))
    # Ours: 0, and a zero (not NaN) gradient. (The z-loss is not class-weighted: its mean over
    # the 4 non-ignored rows is not a zero-denominator case, so leave it out there.)
    z_loss = 0.0 if case == "zero-class-weight" else 0.1
    loss = cet.cross_entropy(x, target, weight, impl=impl, z_loss=z_loss, label_smoothing=0.1)
    assert loss.item() == 0.0
    grad = _grad(loss, x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_negative_class_weights_summing_to_zero_give_zero():
    # A total class weight of 0 with non-zero weights: PyTorch divides by 0 (inf or NaN).
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1])
    weight = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert not torch.isfinite(F.cross_entropy(x, target, weight))
    for impl in IMPLS:
        loss = cet.cross_entropy(x, target, weight, impl=impl)
        assert loss.item() == 0.0
        assert torch.equal(_grad(loss, x), torch.zeros_like(x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_spreads_over_finite_logits(impl, reduction, weighted, block_setting):
    """-inf logits mask classes; smoothing gives eps/K to the K finite ones.

    PyTorch gives inf (eps/C goes to every class, -inf included). Oracle: PyTorch on the same
    problem with the masked classes removed (C' = K), which is what masking means.
    """
    gen = torch.Generator().manual_seed(5)
    num_classes, keep = 9, torch.tensor([0, 2, 3, 5, 8])
    x = torch.randn(12, num_classes, generator=gen, dtype=torch.float64)
    masked = torch.ones(num_classes, dtype=torch.bool)
    masked[keep] = False
    x[:, masked] = -math.inf
    x.requires_grad_()
    sub_target = torch.randint(0, len(keep), (12,), generator=gen)
    sub_target[5] = -100
    target = torch.where(sub_target >= 0, keep[sub_target.clamp(min=0)], sub_target)
    weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=0.3)
    assert torch.isinf(F.cross_entropy(x.detach(), target, weight, **kw)).any()
    ours = cet.cross_entropy(x, target, weight, impl=impl, **kw)
    x_sub = x.detach()[:, keep].requires_grad_()
    theirs = F.cross_entropy(x_sub, sub_target, None if weight is None else weight[keep], **kw)
    torch.testing.assert_close(ours, theirs, **TOL)
    grad = _grad(ours, x)
    assert torch.equal(grad[:, masked], torch.zeros_like(grad[:, masked]))
    torch.testing.assert_close(grad[:, keep], _grad(theirs, x_sub), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_zero_target_mass_on_minus_inf_logit_contributes_zero(impl, label_smoothing):
    """PyTorch: 0 * (-inf) = NaN for soft targets. Ours: 0 log 0 = 0, zero gradient there."""
    x = torch.tensor([[0.5, -math.inf, 1.0], [-math.inf, 2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.3, 0.0, 0.7], [0.0, 0.5, 0.5]], dtype=torch.float64)
    assert torch.isnan(F.cross_entropy(x, t))
    xg = x.clone().requires_grad_()
    ours = cet.cross_entropy(xg, t, label_smoothing=label_smoothing, impl=impl, reduction="none")
    keep = [[0, 2], [1, 2]]
    for row, cols in enumerate(keep):
        sub = x[row, cols][None].clone().requires_grad_()
        theirs = F.cross_entropy(sub, t[row, cols][None], label_smoothing=label_smoothing)
        torch.testing.assert_close(ours[row], theirs, **TOL)
    grad = _grad(ours, xg)
    assert grad[0, 1] == 0 and grad[1, 0] == 0
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_positive_mass_on_minus_inf_logit_is_inf(impl):
    # As KL where p > 0 and q = 0; PyTorch agrees for class targets.
    x = torch.tensor([[0.0, -math.inf, 1.0]], dtype=torch.float64)
    assert cet.cross_entropy(x, torch.tensor([1]), impl=impl).item() == math.inf
    assert F.cross_entropy(x, torch.tensor([1])).item() == math.inf
    t = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    assert cet.cross_entropy(x, t, impl=impl).item() == math.inf


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_row_contributes_zero_whatever_its_logits(impl, block_setting):
    """The loss agrees with PyTorch; the ignored row's gradient is 0 (PyTorch: NaN)."""
    x = torch.tensor(
        [[1.0, 2.0, 3.0], [math.nan, math.inf, -math.inf], [0.5, 0.0, -0.5]], dtype=torch.float64
    )
    target = torch.tensor([2, -100, 0])
    theirs = F.cross_entropy(x, target)
    plain = cet.cross_entropy(x, target, impl=impl)
    torch.testing.assert_close(plain, theirs, **TOL)
    # With a softcap too: its derivative is NaN at the NaN logit (the reference path once let
    # that through, masking after the cap).
    for options in ({"label_smoothing": 0.1, "z_loss": 0.1}, {"softcap": 5.0}, {"softcap": 5.0, "z_loss": 0.1}):
        xg = x.clone().requires_grad_()
        ours = cet.cross_entropy(xg, target, impl=impl, **options)
        assert torch.isfinite(ours)
        grad = _grad(ours, xg)
        assert torch.equal(grad[1], torch.zeros(3, dtype=torch.float64)), options
        assert torch.isfinite(grad).all()


def test_nan_logits_propagate():
    x = torch.tensor([[math.nan, 0.0], [1.0, 2.0]], dtype=torch.float64)
    for impl in IMPLS:
        assert torch.isnan(cet.cross_entropy(x, torch.tensor([0, 1]), impl=impl))


# ----------------------------------------------------------------------------------------------
# Precision, in-place backward, torch.compile, properties.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_no_larger_than_pytorch(dtype):
    """float32 loss; error against the float64 truth within torch's own low-precision error."""
    gen = torch.Generator().manual_seed(0)
    x64 = 3 * torch.randn(257, 1031, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 1031, (257,), generator=gen)
    target[::10] = -100
    x = x64.to(dtype).requires_grad_()
    truth_in = x.detach().to(torch.float64).requires_grad_()
    truth = F.cross_entropy(truth_in, target, label_smoothing=0.1)
    (truth_grad,) = torch.autograd.grad(truth, truth_in)
    naive = F.cross_entropy(x, target, label_smoothing=0.1)
    (naive_grad,) = torch.autograd.grad(naive, x)
    ours = cet.cross_entropy(x, target, label_smoothing=0.1, impl="chunked")
    assert ours.dtype == torch.float32
    (ours_grad,) = torch.autograd.grad(ours, x)
    assert ours_grad.dtype == dtype
    ours_err = (ours.double() - truth).abs().item()
    naive_err = (naive.double() - truth).abs().item()
    assert ours_err <= naive_err + 1e-6
    g_ours = (ours_grad.double() - truth_grad).abs().max().item()
    g_naive = (naive_grad.double() - truth_grad).abs().max().item()
    assert g_ours <= g_naive + 1e-7


def test_inplace_backward_writes_gradient_into_input(block_setting):
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(20, 9, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 9, (20,), generator=gen)
    target[::3] = -100
    expected_x = data.clone().requires_grad_()
    expected = _grad(cet.cross_entropy(expected_x, target, impl="chunked", z_loss=0.1), expected_x)
    x = data.clone().requires_grad_()
    loss = cet.cross_entropy(x, target, impl="chunked", z_loss=0.1, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(x.grad, expected, **TOL)
    # The input's memory now holds the gradient (that is what in-place means).
    torch.testing.assert_close(x.detach(), expected, **TOL)


def test_works_inside_torch_compile():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 11, generator=gen, requires_grad=True)
    target = torch.randint(0, 11, (16,), generator=gen)

    def step(x, target):
        return cet.cross_entropy(x * 2.0, target, label_smoothing=0.1, impl="chunked") + 1.0

    compiled = torch.compile(step, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph-break notices
        got = compiled(x, target)
    want = step(x, target)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grad(got, x), _grad(want, x))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    classes=st.integers(1, 9),
    shift=st.floats(-50, 50),
    seed=st.integers(0, 2**16),
)
def test_properties(rows, classes, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,), generator=gen)
    ignored = torch.rand(rows, generator=gen) < 0.3
    target_i = torch.where(ignored, -100, target)
    loss = cet.cross_entropy(x, target_i, reduction="sum", impl="chunked", label_smoothing=0.1)
    # Shifting every logit by a constant changes nothing.
    shifted = cet.cross_entropy(x + shift, target_i, reduction="sum", impl="chunked", label_smoothing=0.1)
    torch.testing.assert_close(loss, shifted, rtol=1e-9, atol=1e-9)
    # ignore_index equals slicing the rows out.
    kept = cet.cross_entropy(x[~ignored], target[~ignored], reduction="sum", impl="chunked", label_smoothing=0.1)
    torch.testing.assert_close(loss, kept, **TOL)
    # Integer labels equal one-hot probability targets.
    onehot = F.one_hot(target, classes).to(torch.float64)
    torch.testing.assert_close(
        cet.cross_entropy(x, target, reduction="none", impl="chunked"),
        cet.cross_entropy(x, onehot, reduction="none", impl="chunked"),
        **TOL,
    )
