"""crossent.triton.cross_entropy against float64 PyTorch, on the ``device`` of conftest.py: CPU
tensors under TRITON_INTERPRET=1, or CUDA tensors with the kernels compiled (TRITON_INTERPRET=0).

Shapes are odd on purpose: C = 4099 (not a power of two, more than one 4096-column step per row),
N = 1, 5, 37. Each call is one kernel launch forward and one backward. Inputs are drawn on the CPU
(the same numbers on every device) and moved to the device; the oracle runs on the device.
"""

from __future__ import annotations

import doctest

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402

import crossent.triton as ctr  # noqa: E402
from crossent.triton import _launchers, cross_entropy  # noqa: E402

C = 4099
IGNORE = -100

OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "smoothing+weight": {"label_smoothing": 0.2, "weight": True},
    "zloss+softcap": {"z_loss": 1e-2, "softcap": 4.0},
    "all": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0},
}


def make(n, device, c=C, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3.0
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        target[1::ignore_every] = IGNORE
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return logits.to(device), target.to(device), weight.to(device)


def options(name, weight):
    opts = dict(OPTIONS[name])
    if opts.pop("weight", False):
        opts["weight"] = weight
    return opts


def upstream(loss, reduction, seed=1):
    """A non-trivial upstream gradient: random per row for "none", 1.7 for scalars."""
    if reduction == "none":
        g = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return g.to(device=loss.device, dtype=loss.dtype)
    return torch.tensor(1.7, dtype=loss.dtype, device=loss.device)


def run_triton(logits, target, **opts):
    x = logits.detach().clone().requires_grad_()
    loss = cross_entropy(x, target, **opts)
    loss.backward(upstream(loss, opts.get("reduction", "mean")).to(loss.dtype))
    return loss.detach(), x.grad


def run_reference(ref, logits, target, **opts):
    x = logits.detach().to(torch.float64).clone().requires_grad_()
    o = {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    o.pop("inplace_backward", None)
    loss = ref(x, target, **o)
    loss.backward(upstream(loss, o.get("reduction", "mean")))
    return loss.detach(), x.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_float32_matches_float64_pytorch(ref, name, reduction, device):
    logits, target, weight = make(37, device)
    opts = options(name, weight)
    loss, grad = run_triton(logits.float(), target, reduction=reduction, **{
        k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()})
    want, want_grad = run_reference(ref, logits.float(), target, reduction=reduction, **opts)
    assert loss.dtype == torch.float32
    assert loss.shape == want.shape
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_streamed_rows(ref, monkeypatch, reduction, device):
    """Rows longer than one block: two passes in 1024-column steps (5 steps for C = 4099)."""
    monkeypatch.setattr(_launchers, "SINGLE_BLOCK_MAX", 512)
    monkeypatch.setattr(_launchers, "LOOP_BLOCK", 1024)
    assert _launchers._row_block(C) == (1024, 16, False)
    logits, target, weight = make(37, device)
    for name in ("plain", "all"):
        opts = options(name, weight)
        loss, grad = run_triton(logits.float(), target, reduction=reduction, **{
            k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()})
        want, want_grad = run_reference(ref, logits.float(), target, reduction=reduction, **opts)
        torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-8)
    # the in-place gradient and the backward scale over several steps as well
    x = logits.float().requires_grad_()
    loss = cross_entropy(x, target, reduction=reduction, inplace_backward=True)
    loss.backward(upstream(loss, reduction))
    want, want_grad = run_reference(ref, logits.float(), target, reduction=reduction)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n", [1, 5])
def test_small_batches(ref, n, device):
    logits, target, weight = make(n, device, ignore_every=0)
    opts = options("all", weight)
    loss, grad = run_triton(logits.float(), target, **opts)
    want, want_grad = run_reference(ref, logits.float(), target, **opts)
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_naive_torch(ref, dtype, device):
    """Error against the float64 truth on the same (rounded) inputs <= naive torch's + tol."""
    logits, target, weight = make(37, device)
    opts = options("all", weight)
    low = logits.to(dtype)
    loss, grad = run_triton(low, target, reduction="none", **opts)
    truth, truth_grad = run_reference(ref, low, target, reduction="none", **opts)
    # Naive: the same PyTorch ops run in the low precision itself.
    x = low.detach().clone().requires_grad_()
    naive = ref(x, target, reduction="none", **{k: (v.to(dtype) if isinstance(v, torch.Tensor) else v)
                                               for k, v in opts.items()})
    naive.backward(upstream(naive, "none").to(dtype))
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    err = (loss.double() - truth).abs().max()
    naive_err = (naive.double() - truth).abs().max()
    assert err <= naive_err + tol * truth.abs().max()
    gerr = (grad.double() - truth_grad).abs().max()
    naive_gerr = (x.grad.double() - truth_grad).abs().max()
    assert gerr <= naive_gerr + tol * truth_grad.abs().max()


def test_inplace_backward_writes_gradient_into_logits(ref, device):
    logits, target, _ = make(37, device)
    x = logits.float().requires_grad_()
    before = x.detach().clone()
    loss = cross_entropy(x, target, inplace_backward=True)
    want, want_grad = run_reference(ref, before, target)
    # The forward already overwrote the logits with d loss / d logits (upstream gradient 1).
    torch.testing.assert_close(x.detach().double(), want_grad / 1.7, rtol=1e-5, atol=1e-8)
    loss.backward()
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_grad / 1.7, rtol=1e-5, atol=1e-8)
    # ... and x.grad is that memory, not a copy of it (no N x C buffer, even for a leaf)
    assert x.grad.data_ptr() == x.data_ptr()


def test_inplace_backward_refuses_rows_that_share_memory(device):
    # An expand()ed row: writing row 0's gradient would change the logits rows 1-3 still read.
    row = torch.randn(1, 10, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_()
    target = torch.tensor([1, 2, 3, 4], device=device)
    with pytest.raises(ValueError, match=r"inplace_backward=True needs logits whose rows do not overlap"):
        cross_entropy(row.expand(4, 10), target, inplace_backward=True)
    loss = cross_entropy(row.expand(4, 10), target, reduction="none")  # out of place: fine
    want = torch.nn.functional.cross_entropy(row.detach().double().expand(4, 10), target, reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
    with torch.no_grad():  # nothing is written: nothing to refuse
        cross_entropy(row.expand(4, 10), target, inplace_backward=True)


def test_default_leaves_logits_untouched_and_no_grad_writes_nothing(ref, device):
    logits, target, _ = make(5, device)
    x = logits.float().requires_grad_()
    before = x.detach().clone()
    cross_entropy(x, target).backward()
    assert torch.equal(x.detach(), before)
    with torch.no_grad():
        loss = cross_entropy(x, target, inplace_backward=True)
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(loss.double(), ref(before.double(), target), rtol=2e-6, atol=1e-6)


def test_upstream_gradient_of_one_and_backward_twice(device):
    logits, target, _ = make(5, device)
    x = logits.float().requires_grad_()
    loss = cross_entropy(x, target, reduction="sum")
    loss.backward(retain_graph=True)
    y = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(y, target, reduction="sum").backward()
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_strided_logits(ref, device):
    logits, target, _ = make(5, device)
    want, want_grad = run_reference(ref, logits.float(), target, label_smoothing=0.1)
    wide = torch.zeros(5, C + 13, dtype=torch.float32, device=device)
    wide[:, 3 : 3 + C] = logits.float()
    wide.requires_grad_()
    by_rows = wide[:, 3 : 3 + C]  # row stride C + 13, used in place
    tall = logits.float().t().contiguous().requires_grad_()
    by_cols = tall.t()  # column stride 5: copied to rows first
    for x, grad_of in ((by_rows, lambda: wide.grad[:, 3 : 3 + C]), (by_cols, lambda: tall.grad.t())):
        loss = cross_entropy(x, target, label_smoothing=0.1)
        loss.backward(torch.tensor(1.7, device=device))
        torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(grad_of().double(), want_grad, rtol=1e-5, atol=1e-8)


def test_custom_ignore_index_inside_class_range(ref, device):
    logits, target, weight = make(37, device, ignore_every=0)
    target[::3] = 11
    opts = dict(ignore_index=11, label_smoothing=0.1, weight=weight)
    loss, grad = run_triton(logits.float(), target, **{
        k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()})
    want, want_grad = run_reference(ref, logits.float(), target, **opts)
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-8)
    assert torch.count_nonzero(grad[::3]) == 0


def test_shift_invariance_at_large_logits(ref, device):
    """Logits near 1e4 in float32: the loss and gradient equal those of the unshifted logits
    (the kernels use x - max and max - x_t, both exact, never x - lse)."""
    logits, target, weight = make(37, device)
    shifted = logits.float() + 1.0e4
    opts = dict(label_smoothing=0.1)
    loss, grad = run_triton(shifted, target, reduction="none", **opts)
    want, want_grad = run_reference(ref, shifted, target, reduction="none", **opts)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_deterministic(device):
    logits, target, weight = make(37, device)
    opts = options("all", weight.float())
    a = run_triton(logits.float(), target, **opts)
    b = run_triton(logits.float(), target, **opts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- documented deviations from PyTorch (DESIGN.md "Semantics") ---------------------------------


@pytest.mark.parametrize("case", ["all_ignored", "zero_weight", "empty"])
def test_zero_denominator_mean_is_zero_with_zero_grad(case, device):
    logits, target, weight = make(5, device)
    opts = {}
    if case == "all_ignored":
        target = torch.full_like(target, IGNORE)
    elif case == "zero_weight":
        target = torch.full_like(target, 7)
        weight = weight.float().clone()
        weight[7] = 0.0
        opts["weight"] = weight
    else:
        logits, target = logits[:0], target[:0]
    x = logits.float().requires_grad_()
    loss = cross_entropy(x, target, label_smoothing=0.1, **opts)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_minus_inf_logits_get_no_smoothing_mass_and_zero_grad(ref, device):
    """Classes with -inf logits drop out: same loss and gradient as slicing them away."""
    logits, target, weight = make(37, device)
    masked = 10
    target = torch.where(target == IGNORE, target, target.clamp(min=masked))
    full = logits.float().clone()
    full[:, :masked] = float("-inf")
    opts = dict(label_smoothing=0.2, z_loss=1e-2)
    x = full.clone().requires_grad_()
    loss = cross_entropy(x, target, weight=weight.float(), **opts)
    loss.backward()
    shifted = torch.where(target == IGNORE, target, target - masked)
    want, want_grad = run_reference(ref, full[:, masked:], shifted, weight=weight[masked:], **opts)
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(x.grad[:, masked:].double(), want_grad / 1.7, rtol=1e-5, atol=1e-8)
    assert torch.count_nonzero(x.grad[:, :masked]) == 0
    assert torch.isfinite(x.grad).all()


def test_inf_at_target_and_nan_propagate(device):
    logits, target, _ = make(5, device, ignore_every=0)
    x = logits.float().clone()
    x[0, target[0]] = float("-inf")
    x[1, 17] = float("nan")
    loss = cross_entropy(x, target, reduction="none")
    assert loss[0] == float("inf")
    assert torch.isnan(loss[1])
    assert torch.isfinite(loss[2:]).all()


# -- argument checking -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"z_loss": -1.0}, ValueError, "z_loss"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"weight": torch.ones(3)}, ValueError, "weight"),
        ({"inplace_backward": 1}, TypeError, "inplace_backward"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ],
)
def test_bad_options(kwargs, error, match, device):
    logits, target, _ = make(2, device, c=5, ignore_every=0)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        cross_entropy(logits.float(), target, **kwargs)


def test_numpy_scalar_options_equal_python_ones_and_bool_is_refused(device):
    # As PyTorch takes them (np.float32 is not a float subclass, np.int64 not an int one).
    np = pytest.importorskip("numpy")
    logits, target, _ = make(5, device, c=7, ignore_every=2)
    logits, target = logits.float(), target.clone()
    target[target == IGNORE] = 3
    python = cross_entropy(logits, target, ignore_index=3, label_smoothing=0.1, z_loss=1e-2, softcap=4.0,
                           reduction="none")
    numpy_ = cross_entropy(logits, target, ignore_index=np.int64(3), label_smoothing=np.float32(0.1),
                           z_loss=np.float32(1e-2), softcap=np.float16(4.0), reduction="none")
    assert torch.equal(python[target == 3], torch.zeros_like(python[target == 3]))
    torch.testing.assert_close(numpy_, python, rtol=1e-6, atol=0)  # float32(0.1) != 0.1 exactly
    with pytest.raises(TypeError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=True)
    with pytest.raises(TypeError, match="ignore_index"):
        cross_entropy(logits, target, ignore_index=np.bool_(True))


def test_class_weight_requiring_grad_is_refused_by_crossent_triton_itself(device):
    logits, target, weight = make(3, device, c=6, ignore_every=0)
    weight = weight.float().requires_grad_()
    with pytest.raises(ValueError, match="does not differentiate class weights, and weight requires grad"):
        cross_entropy(logits.float(), target, weight=weight)
    with torch.no_grad():  # no gradient wanted: nothing to refuse
        cross_entropy(logits.float(), target, weight=weight)
    cross_entropy(logits.float(), target, weight=weight.detach())


def test_bad_data(device):
    logits, target, _ = make(3, device, c=5, ignore_every=0)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(logits, target)  # float64
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(logits.float()[None], target)
    with pytest.raises(ValueError, match="target"):
        cross_entropy(logits.float(), target[:2])
    with pytest.raises(TypeError, match="target"):
        cross_entropy(logits.float(), target.float())
    bad = target.clone()
    bad[2] = 5
    if device == "cpu":
        with pytest.raises(ValueError, match=r"target\[2\] = 5"):
            cross_entropy(logits.float(), bad)
    else:
        # CUDA targets are not checked by value (that would need a host sync): the row's loss
        # is NaN instead (the _kernels module docstring), and the other rows are unaffected.
        loss = cross_entropy(logits.float(), bad, reduction="none")
        assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()


@pytest.mark.parametrize(("dtype", "label", "ignore_index"), [
    (torch.uint8, 156, -100),    # -100 wraps to 156 in uint8
    (torch.int16, 4464, 70000),  # 70000 wraps to 4464 in int16
])
def test_narrow_targets_are_checked_after_widening(ref, dtype, label, ignore_index, interpreter):
    """The value check compares int64 targets with ``ignore_index``: in the target's own dtype
    ``ignore_index`` wraps, and an out-of-range label equal to the wrapped value passed as
    "ignored" (the kernel then gave a NaN loss). Valid narrow targets equal their int64 loss."""
    logits, _, _ = make(3, interpreter, c=50, ignore_every=0)
    bad = torch.tensor([1, label, 2], dtype=dtype)
    with pytest.raises(ValueError, match=rf"target must be in \[0, 50\) or ignore_index={ignore_index}; "
                                         rf"target\[1\] = {label}"):
        cross_entropy(logits.float(), bad, ignore_index=ignore_index)
    good = torch.tensor([1, 49, 2], dtype=dtype)
    loss, grad = run_triton(logits.float(), good, ignore_index=ignore_index, reduction="none")
    want, want_grad = run_reference(ref, logits.float(), good.long(), ignore_index=ignore_index, reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-8)


def test_docstring_examples_run(interpreter):
    """The module's examples use CPU tensors, which only the interpreter runs."""
    failures, tried = doctest.testmod(ctr, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 4 and failures == 0


def test_inplace_backward_on_a_saved_output_raises_autograds_inplace_error(device):
    """exp saves its output; the kernel overwrites it with the gradient in the forward. The
    logits' version is bumped, so exp's backward raises instead of reading the gradient (it gave
    a gradient off by up to 1.96 before); a producer that saves nothing (x * 2) still gets
    torch's gradient."""
    logits, target, _ = make(6, device, c=5)
    h = (logits.float() / 3.0).requires_grad_()
    loss = cross_entropy(h.exp(), target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x = logits.float().requires_grad_()
    cross_entropy(x * 2.0, target, inplace_backward=True).backward()
    y = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(y * 2.0, target).backward()
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-7)


def test_inplace_backward_through_crossent_torch_bumps_the_version(device):
    """The same through crossent.torch's impl="triton" (the path the functional takes)."""
    import crossent.torch as cet

    logits, target, _ = make(6, device, c=5)
    h = (logits.float() / 3.0).requires_grad_()
    loss = cet.cross_entropy(h.exp(), target, impl="triton", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_through_crossent_torch_writes_into_a_padded_vocabulary_view(ref, device):
    """``logits[:, :V]`` of a vocabulary padded to 64 columns (row stride 64, unit column stride)
    goes to the kernel as it is: the gradient is written into the caller's memory (no N x C copy)
    and equals float64 PyTorch's; the padding columns are left alone."""
    import crossent.torch as cet

    logits, target, _ = make(6, device, c=50)
    padded = torch.full((6, 64), 7.0, dtype=torch.float32, device=device)
    padded[:, :50] = logits.float()
    leaf = padded.clone().requires_grad_()
    base = leaf * 1.0  # non-leaf: its gradient reaches ``leaf`` through the multiplication
    view = base[:, :50]
    loss = cet.cross_entropy(view, target, impl="triton", label_smoothing=0.1, inplace_backward=True)
    want, want_grad = run_reference(ref, logits, target, label_smoothing=0.1)
    # The forward overwrote the view with d loss / d logits for an upstream gradient of 1.
    torch.testing.assert_close(base.detach()[:, :50].double(), want_grad / 1.7, rtol=1e-5, atol=1e-8)
    assert torch.equal(base.detach()[:, 50:], padded[:, 50:])
    loss.backward(torch.tensor(1.7, device=device))
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad[:, :50].double(), want_grad, rtol=1e-5, atol=1e-8)
    assert torch.count_nonzero(leaf.grad[:, 50:]) == 0


def test_crossent_torch_hands_row_strided_input_to_the_kernels_as_it_is(ref, monkeypatch, device):
    """cet.linear_cross_entropy(impl="triton") passes a column slice of a wider buffer (row
    stride D + 7) to crossent.triton without a copy; the gradients are float64 PyTorch's."""
    import crossent.torch as cet

    seen = []
    real = ctr.linear_cross_entropy

    def spy(x, *args, **kwargs):
        seen.append((x.data_ptr(), x.stride()))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ctr, "linear_cross_entropy", spy)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(23, 12, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 23, (9,), generator=gen)
    target[4] = IGNORE
    wide = torch.zeros(9, 19, device=device)
    wide[:, 3:15] = x.float().to(device)
    wide.requires_grad_()
    wf = w.float().to(device).requires_grad_()
    view = wide[:, 3:15]
    loss = cet.linear_cross_entropy(view, wf, target.to(device), impl="triton", z_loss=1e-2)
    assert seen == [(view.data_ptr(), (19, 1))]
    loss.backward(torch.tensor(1.7, device=device))
    xr, wr = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    want = ref(xr @ wr.T, target.to(device), z_loss=1e-2)
    want.backward(torch.tensor(1.7, dtype=torch.float64, device=device))
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(wide.grad[:, 3:15].double(), xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wf.grad.double(), wr.grad, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(wide.grad[:, :3]) == 0 and torch.count_nonzero(wide.grad[:, 15:]) == 0


def test_double_backward_raises_instead_of_dropping_the_hessian(device):
    """create_graph=True, then a second backward through the gradient: a RuntimeError naming the
    function (torch's once_differentiable let it through when the upstream gradient is a
    constant); the first-order gradient is still torch's."""
    logits, target, _ = make(6, device, c=5)
    x = logits.float().requires_grad_()
    (g,) = torch.autograd.grad(cross_entropy(x, target), x)
    y = logits.clone().requires_grad_()
    (gy,) = torch.autograd.grad(torch.nn.functional.cross_entropy(y, target), y)
    torch.testing.assert_close(g.double(), gy, rtol=1e-5, atol=1e-7)
    # The kernel's logits are not saved (that would keep them alive): no error node could reach
    # them, so the create_graph=True backward itself raises (a penalty differentiated with
    # respect to x would otherwise silently lose the loss's curvature).
    with pytest.raises(RuntimeError, match="crossent.triton.cross_entropy cannot be differentiated twice"):
        loss = cross_entropy(x, target)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        torch.autograd.grad(loss + 100 * g.pow(2).sum(), x)

    gen = torch.Generator().manual_seed(3)
    e = torch.randn(6, 4, generator=gen).to(device).requires_grad_()
    w = torch.randn(5, 4, generator=gen).to(device).requires_grad_()
    (ge,) = torch.autograd.grad(ctr.linear_cross_entropy(e, w, target), e, create_graph=True)
    msg = "crossent.triton.linear_cross_entropy cannot be differentiated twice"
    with pytest.raises(RuntimeError, match=msg):
        ge.pow(2).sum().backward()
    with pytest.raises(RuntimeError, match=msg):  # the error node hangs off the saved inputs
        torch.autograd.grad(ge.pow(2).sum(), w)


def _second_order_error_at(loss_of, inputs):
    """"first" when the create_graph=True backward of ``loss_of(*inputs)`` raises crossent's
    second-order RuntimeError, "second" when that backward works and a backward through its
    gradients raises it; anything else fails the test."""
    loss = loss_of(*inputs)
    try:
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
    except RuntimeError as e:
        assert "cannot be differentiated twice" in str(e)
        return "first"
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        sum(g.pow(2).sum() for g in grads).backward()
    return "second"


@pytest.mark.parametrize(("loss", "impl", "extra", "where"), [
    ("ce", "triton", {}, "first"),
    ("ce", "chunked", {}, "second"),
    ("lce", "triton", {}, "second"),
    ("lce", "triton", {"reduction": "none"}, "second"),
    ("lce", "triton", {"memory_budget": 1 << 20}, "first"),  # the row schedule
    ("lce", "chunked", {}, "first"),
    ("lce", "chunked", {"reduction": "none"}, "second"),
])
def test_where_the_second_order_error_is_raised(loss, impl, extra, where, device):
    """Pins the table of crossent.torch.functional's module docstring (and crossent.triton's
    docstrings): which backward raises the second-order RuntimeError, per path."""
    import crossent.torch as cet

    logits, target, _ = make(6, device, c=5)
    gen = torch.Generator().manual_seed(4)
    if loss == "ce":
        inputs = [logits.float().requires_grad_()]

        def loss_of(x):
            return cet.cross_entropy(x, target, impl=impl, **extra)
    else:
        inputs = [torch.randn(6, 4, generator=gen).to(device).requires_grad_(),
                  torch.randn(5, 4, generator=gen).to(device).requires_grad_()]

        def loss_of(e, w):
            return cet.linear_cross_entropy(e, w, target, impl=impl, **extra).sum()
    assert _second_order_error_at(loss_of, inputs) == where


def test_class_weight_requiring_grad_is_refused_by_impl_triton(device):
    import crossent.torch as cet

    logits, target, weight = make(6, device, c=5)
    message = "impl='triton' does not differentiate class weights, and weight requires grad"
    with pytest.raises(ValueError, match=message):
        cet.cross_entropy(logits.float(), target, weight=weight[:5].float().requires_grad_(), impl="triton")
