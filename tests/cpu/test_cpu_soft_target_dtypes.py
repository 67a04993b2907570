"""Probability targets that are not a C-contiguous array of the logits' dtype (float64 targets
with float32 logits, Fortran order, float16) on the numpy fast paths: cast a block of rows at a
time, never copied whole (a copy was 100% of float32 logits: float64 targets, or Fortran-ordered
ones on the numba path), with the results of targets cast up front. And the blocked pass's 0 log 0
convention: a zero target on an infinite logit adds 0, a NaN logit keeps its row's NaN."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce
from crossent import cpu


@pytest.fixture(params=["numba", "blocked"])
def soft_path(request, monkeypatch):
    """The numba soft-target kernels (plain loss), or the blocked pass (numba as if not installed)."""
    if request.param == "numba":
        pytest.importorskip("numba")
        if not cpu.available():
            pytest.skip("the numba kernels are switched off in this environment")
    else:
        monkeypatch.setattr(cpu, "available", lambda: False)
    return request.param


def _inputs(n, c, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    t = rng.random((n, c))
    t /= t.sum(axis=1, keepdims=True)
    return x, t


LAYOUTS = {
    "float64": lambda t: t,
    "float32-fortran": lambda t: np.asfortranarray(t.astype(np.float32)),
    "float16": lambda t: t.astype(np.float16),
    "float64-strided": lambda t: np.repeat(t, 2, axis=1)[:, ::2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "weight": "w"}])
def test_targets_cast_by_blocks_equal_targets_cast_first(soft_path, layout, options):
    """Several cast blocks (2^18 targets each) and several blocked-pass blocks, the last short."""
    x, t = _inputs(2500, 1001, seed=1)
    targets = LAYOUTS[layout](t)
    if options.get("weight") == "w":
        options = dict(options, weight=np.linspace(0.5, 1.5, 1001))
    first = targets.astype(np.float32, order="C")
    for reduction in ("none", "sum"):
        loss = ce.softmax_cross_entropy(x, targets, reduction=reduction, **options)
        np.testing.assert_array_equal(loss, ce.softmax_cross_entropy(x, first, reduction=reduction, **options))
        loss_g, grad = ce.softmax_cross_entropy_and_grad(x, targets, reduction=reduction, **options)
        want_loss, want_grad = ce.softmax_cross_entropy_and_grad(x, first, reduction=reduction, **options)
        np.testing.assert_array_equal(loss_g, want_loss)
        np.testing.assert_array_equal(grad, want_grad)
    # and against float64 PyTorch on the same (float32-rounded) values
    weight = None if "weight" not in options else torch.from_numpy(options["weight"])
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    ref = F.cross_entropy(xt, torch.from_numpy(first.astype(np.float64)), weight=weight,
                          label_smoothing=options.get("label_smoothing", 0.0), reduction="sum")
    ref.backward()
    np.testing.assert_allclose(loss_g, ref.item(), rtol=1e-6)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["float64", "float32-fortran"])
def test_no_copy_of_the_targets(soft_path, layout):
    """Extra memory of float32 C-ordered targets' calls plus about a block of cast targets (1 MiB; the
    copy this replaced was 100% of the logits), and within 10% of the logits for the loss (110%
    with the gradient, itself 100%)."""
    x, t = _inputs(20000, 500, seed=2)

    def peak(f, targets):
        f(x[:400], targets[:400])  # numba compiles its parallel kernels (above 2^16 elements) first
        tracemalloc.start()
        try:
            f(x, targets)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    targets = LAYOUTS[layout](t)
    for f, allowed in ((ce.softmax_cross_entropy, 0.10), (ce.softmax_cross_entropy_and_grad, 1.10)):
        used, baseline = peak(f, targets), peak(f, t.astype(np.float32))
        # a block of cast targets (1 MiB) and small change
        assert used <= baseline + 2 * 4 * (1 << 18), (f.__name__, used, baseline)
        assert used <= allowed * x.nbytes + 4 * (1 << 18), (f.__name__, used / x.nbytes)


@pytest.mark.parametrize("numba_kernels", [True, False])
@pytest.mark.parametrize("logits_dtype, targets_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_cpu_soft_passes_read_other_float_targets_in_place(monkeypatch, numba_kernels, logits_dtype,
                                                           targets_dtype):
    """crossent.cpu's soft-target passes take C-contiguous float32/float64 targets of the other
    dtype as they are (the numba kernels copy nothing, not even a block: they round each entry to
    the logits' dtype as they read it) with the results of targets converted first, bit for bit,
    including a -inf logit under a zero target and an all -inf row."""
    if numba_kernels:
        pytest.importorskip("numba")
        if not cpu.available():
            pytest.skip("the numba kernels are switched off in this environment")
    else:
        monkeypatch.setattr(cpu, "available", lambda: False)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((300, 257)) * 3).astype(logits_dtype)  # 77100 logits: the parallel kernels
    t = rng.random((300, 257)).astype(targets_dtype) / 257  # not exactly representable in float32
    x[3, 7], t[3, 7] = -np.inf, 0.0
    x[4], t[4] = -np.inf, 0.0
    converted = t.astype(logits_dtype)
    assert cpu._check_targets(t, x) is t
    out, scale = np.empty_like(x), np.linspace(0.5, 1.5, 300)
    for with_grad in (False, True):
        def call(targets, with_grad=with_grad):
            if not with_grad:
                return cpu.soft_cross_entropy(x, targets)
            return cpu.softmax_minus_targets(x, targets, scale, out)

        call(t)  # compiled outside the measured call
        tracemalloc.start()
        try:
            got = call(t)
            used = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if numba_kernels:  # (the numpy passes' float64 blocks have their own bound, block-sized)
            assert used < 0.05 * x.nbytes, used
        grad = out.copy()
        for a, b in zip(got, call(converted), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(grad, out)
        assert np.isfinite(got[1][3]) and got[1][4] == 0


@pytest.mark.parametrize("fast", ["blocked", "array-api"])
def test_zero_targets_mask_infinite_logits_not_nan_ones(monkeypatch, fast):
    """0 log 0 = 0 on a -inf logit (a masked class; an all -inf row under zero targets adds 0),
    but a NaN logit makes its row NaN whatever the targets, as in PyTorch: the blocked pass masked
    every non-finite logit, so an all-NaN row under zero targets gave 0."""
    if fast == "blocked":
        monkeypatch.setattr(cpu, "available", lambda: False)
    else:
        monkeypatch.setattr(cpu, "ENABLED", False)
    nan, inf = np.nan, np.inf
    x = np.array([[nan, nan, nan], [0.3, -0.2, 1.0], [nan, -inf, 0.0], [-inf, 0.0, 1.0], [-inf, -inf, -inf],
                  [nan, -inf, -inf]])
    t = np.array([[0.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.0, 0.0, 1.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0]])
    for options in ({}, {"label_smoothing": 0.1}, {"weight": np.array([1.0, 2.0, 0.5])}, {"softcap": 5.0}):
        loss = ce.softmax_cross_entropy(x, t, reduction="none", **options)
        assert np.isnan(loss[[0, 2, 5]]).all(), (options, loss)
        assert np.isfinite(loss[[1, 3]]).all(), (options, loss)
        with torch.no_grad():
            want = F.cross_entropy(torch.from_numpy(x[[0, 2, 5]]), torch.from_numpy(t[[0, 2, 5]]), reduction="none")
        assert torch.isnan(want).all()
    assert ce.softmax_cross_entropy(x[[4]], t[[4]], reduction="none")[0] == 0
