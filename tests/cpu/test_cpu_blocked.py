"""The blocked numpy path (crossent.cpu._blocked) of crossent.softmax_cross_entropy with integer
labels: what runs without numba, and with numba for a softcap, or a z-loss with label smoothing and the
gradient.

Held to the Array-API path (the same arithmetic, unblocked: within a few ulps), to float64 PyTorch
(values and autograd gradients), and to its memory bound. Small ``BLOCK_ELEMENTS`` make every
call here span several blocks, the last one short.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce
from crossent import cpu
from crossent.cpu import _blocked

OPTIONS = [
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0, "weight": "w"},
    {"label_smoothing": 0.3, "weight": "w", "softcap": 4.0, "z_loss": 1e-2},
    {},
    {"weight": "w"},
    {"sample_weight": "sw"},
    {"softcap": 4.0},
    {"z_loss": 1e-2},
    {"base": 2},
    {"softcap": 3.0, "z_loss": 0.1, "weight": "w", "sample_weight": "sw"},
]


@pytest.fixture
def no_numba(monkeypatch):
    """crossent as installed without numba: the compiled kernels unavailable, the fast paths on;
    blocks of 50 logits."""
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(_blocked, "BLOCK_ELEMENTS", 50)


@pytest.fixture(params=["blocked", "numba"])
def fast_path(request, monkeypatch):
    """Either crossent without numba (``no_numba``), or with it: then label smoothing runs numba's
    smoothing kernels (crossent.cpu._smoothed_rows), a z-loss with the gradient the
    softmax_minus_onehot kernel (its z_scale), and a softcap, or a z-loss with smoothing and the
    gradient, the blocked path (blocks of 50 logits)."""
    monkeypatch.setattr(_blocked, "BLOCK_ELEMENTS", 50)
    if request.param == "blocked":
        monkeypatch.setattr(cpu, "available", lambda: False)
    else:
        pytest.importorskip("numba")
        if not cpu.available():
            pytest.skip("the numba kernels are switched off in this environment")
    return request.param


def _array_api(f, *args, **kwargs):
    """The Array-API path (every numpy fast path off)."""
    old, cpu.ENABLED = cpu.ENABLED, False
    try:
        return f(*args, **kwargs)
    finally:
        cpu.ENABLED = old


def _inputs(shape, dtype, seed=0, ignored=True):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    y = rng.integers(0, shape[-1], shape[:-1])
    if ignored and y.size > 2:
        y.flat[::3] = -100
    w = rng.uniform(0.1, 2.0, shape[-1])
    sw = rng.uniform(0.0, 2.0, shape[:-1])
    return x, y, w, sw


def _options(opts, w, sw):
    return {k: {"w": w, "sw": sw}.get(v, v) if isinstance(v, str) else v for k, v in opts.items()}


def _close_all(got, want, dtype, ulps, floor=0.0):
    """``_close`` on each output of a loss (or a ``(loss, grad)`` pair)."""
    pairs = zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,), strict=True)
    for g, v in pairs:
        _close(g, v, dtype, ulps, floor)


def _close(got, want, dtype, ulps, floor=0.0):
    """Within ``ulps`` of the larger of ``floor`` and the largest entry of ``want``."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    # Relative to the largest entry: the gradient's small entries carry its absolute rounding.
    eps = np.finfo(np.float32 if dtype == np.float16 else dtype).eps
    if dtype == np.float16 and got.dtype == np.float16:
        eps = np.finfo(np.float16).eps  # the gradient is returned in float16
    scale = max(np.max(np.abs(want.astype(np.float64)), initial=0.0), floor) + np.finfo(np.float64).tiny
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=0, atol=ulps * eps * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(37, 11), (5, 3, 29), (1, 1), (7,)], ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fast_paths_give_the_array_api_paths_loss_and_gradient(fast_path, dtype, shape, opts, reduction):
    x, y, w, sw = _inputs(shape, dtype)
    kwargs = dict(ignore_index=-100, reduction=reduction, **_options(opts, w, sw))
    for f in (ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad):
        got, want = f(x, y, **kwargs), _array_api(f, x, y, **kwargs)
        # One class: the gradient is 0, which rounding may leave at 1e-17.
        _close_all(got, want, dtype, ulps=8, floor=1.0 if shape[-1] == 1 else 0.0)


def _torch_float64(x, y, w, sw, softcap, z_loss, label_smoothing, reduction):
    """Loss and gradient from float64 PyTorch ops: the soft cap, F.cross_entropy (with its label
    smoothing: the logits are finite, where crossent's spreading equals PyTorch's), the z-loss
    z * mean(logsumexp^2) over the non-ignored rows, each row weighted by ``sw``."""
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = softcap * torch.tanh(t / softcap) if softcap else t
    target = torch.from_numpy(y)
    weight = None if w is None else torch.from_numpy(w)
    rows = F.cross_entropy(logits, target, weight=weight, ignore_index=-100, reduction="none",
                           label_smoothing=label_smoothing)
    keep = (target != -100).double()
    row_w = keep if sw is None else keep * torch.from_numpy(sw)
    class_w = keep if weight is None else keep * weight[target.clamp(min=0)]
    z_rows = z_loss * torch.logsumexp(logits, dim=-1) ** 2 * keep
    if reduction == "mean":
        loss = (row_w * rows).sum() / (row_w * class_w).sum() + (row_w * z_rows).sum() / row_w.sum()
    else:
        loss = (row_w * (rows + z_rows)).sum()
    loss.backward()
    return loss.item(), t.grad.numpy()


def _check_against_float64_torch(loss, grad, want_loss, want_grad, kwargs):
    """float32 loss and gradient within 16 ulps of the float64 PyTorch oracle's (in the base's unit)."""
    base = np.log(kwargs.get("base", np.e))
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(float(loss), want_loss / base, rtol=16 * eps)
    np.testing.assert_allclose(grad, want_grad / base, rtol=0, atol=16 * eps * np.abs(want_grad).max() / base)


def _oracle_options(kwargs):
    """The oracles' positional options: weight, sample weight, softcap, z-loss, label smoothing."""
    return (kwargs.get("weight"), kwargs.get("sample_weight"), kwargs.get("softcap"), kwargs.get("z_loss", 0.0),
            kwargs.get("label_smoothing", 0.0))


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fast_paths_against_float64_torch(fast_path, opts, reduction):
    x, y, w, sw = _inputs((53, 17), np.float32, seed=3)
    kwargs = _options(opts, w, sw)
    loss, grad = ce.softmax_cross_entropy_and_grad(x, y, ignore_index=-100, reduction=reduction, **kwargs)
    _check_against_float64_torch(loss, grad, *_torch_float64(x.astype(np.float64), y, *_oracle_options(kwargs),
                                                            reduction), kwargs)


def test_blocked_path_keeps_a_confident_rows_loss(no_numba):
    """log1p of the terms below the maximum: the float32 loss of 2.06e-9 at logits near 1e4 (the
    Array-API path's log of a float32 sum 1 + 2e-9 gives 0)."""
    x = np.array([[1e4, 1e4 - 20.0, 1e4 - 30.0]] * 3, dtype=np.float32)
    want = np.exp(-20.0) + np.exp(-30.0)  # -log softmax_0 = log1p(e^-20 + e^-30), to float64 accuracy
    rows = ce.softmax_cross_entropy(x, np.array([0, 0, 0]), reduction="none")
    np.testing.assert_allclose(rows, want, rtol=1e-6)
    assert np.all(_array_api(ce.softmax_cross_entropy, x, np.array([0, 0, 0]), reduction="none") == 0.0)


def test_fast_paths_edge_rows(fast_path):
    """An ignored row holding NaN and inf adds nothing and raises no floating-point warning
    (warnings are errors here); -inf masks a class; a row of all -inf logits is NaN and a row
    holding +inf is NaN, as F.cross_entropy and the Array-API path (3ca9375; it gave +inf)."""
    inf = np.inf
    x = np.array([
        [np.nan, inf, -inf, 1.0],  # ignored
        [0.0, -inf, 1.0, 2.0],  # a masked class
        [-inf, -inf, -inf, -inf],  # all masked, target kept: NaN (as PyTorch)
        [inf, 0.0, 1.0, 2.0],  # +inf
        [3.0, 3.0, 1.0, 3.0],  # a tied maximum
    ])
    y = np.array([-100, 2, 0, 1, 3])
    rows = ce.softmax_cross_entropy(x, y, ignore_index=-100, reduction="none")
    for smoothing in (0.0, 0.2, 1.0):  # smoothing spreads over the finite logits (DESIGN.md)
        got = ce.softmax_cross_entropy(x, y, ignore_index=-100, reduction="none", label_smoothing=smoothing)
        with np.errstate(all="ignore"):  # the Array-API path warns on the all -inf and +inf rows
            want = _array_api(ce.softmax_cross_entropy, x, y, ignore_index=-100, reduction="none",
                              label_smoothing=smoothing)
        assert np.isnan(want[3])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.isnan(got[2]) and np.isnan(got[3])  # eps = 1 drops the nll term: the all -inf row is still NaN
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-15)
        np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
        kept = [0, 1, 4]
        loss, grad = ce.softmax_cross_entropy_and_grad(x[kept], y[kept], ignore_index=-100, label_smoothing=smoothing)
        want_loss, want_grad = _array_api(ce.softmax_cross_entropy_and_grad, x[kept], y[kept], ignore_index=-100,
                                          label_smoothing=smoothing)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-15)
        np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-15)
    assert rows[0] == 0.0 and np.isnan(rows[2])
    np.testing.assert_allclose(rows[1], -F.log_softmax(torch.tensor(x[1]), dim=0)[2].item(), rtol=1e-15)
    np.testing.assert_allclose(rows[4], np.log(3 + np.exp(-2.0)), rtol=1e-15)
    # With z-loss (which reads each row's lse) the ignored row still adds nothing: the loss and
    # gradient equal those of the other rows alone.
    kept = [1, 4]
    for opts in ({}, {"z_loss": 1e-2}, {"z_loss": 1e-2, "softcap": 5.0}):
        loss, grad = ce.softmax_cross_entropy_and_grad(x[[0, *kept]], y[[0, *kept]], ignore_index=-100, **opts)
        loss_kept, grad_kept = ce.softmax_cross_entropy_and_grad(x[kept], y[kept], **opts)
        assert np.all(grad[0] == 0.0) and grad[1, 1] == 0.0
        np.testing.assert_allclose(loss, loss_kept, rtol=1e-15)
        np.testing.assert_allclose(grad[1:], grad_kept, rtol=1e-15)


def test_blocked_path_extra_memory_is_a_few_blocks(monkeypatch):
    """Loss: a few MiB over 40 MB of logits (the Array-API path holds 4.5 copies); with the
    gradient, the gradient itself and those few MiB."""
    monkeypatch.setattr(cpu, "available", lambda: False)
    x, y, _, _ = _inputs((20000, 500), np.float32, seed=5)
    for f, allowed in ((ce.softmax_cross_entropy, 0.10), (ce.softmax_cross_entropy_and_grad, 1.10)):
        f(x[:10], y[:10], ignore_index=-100)
        tracemalloc.start()
        try:
            f(x, y, ignore_index=-100)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= allowed * x.nbytes, (f.__name__, peak / x.nbytes)


def _spy_with_numba(monkeypatch, module, name):
    """With numba's kernels on (else skip): the list that ``module.name`` appends 1 to per call."""
    pytest.importorskip("numba")
    if not cpu.available():
        pytest.skip("the numba kernels are switched off in this environment")
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_numba_installed_softcap_gradient_runs_blocked(monkeypatch):
    """With numba, a softcap with the gradient (which the kernels do not take) runs the blocked
    gradient, not the Array-API path's full-size temporaries."""
    calls = _spy_with_numba(monkeypatch, _blocked, "gradient")
    x, y, w, _ = _inputs((41, 13), np.float32, seed=6)
    got = ce.softmax_cross_entropy_and_grad(x, y, ignore_index=-100, softcap=5.0, weight=w)
    want = _array_api(ce.softmax_cross_entropy_and_grad, x, y, ignore_index=-100, softcap=5.0, weight=w)
    assert calls == [1]
    _close_all(got, want, np.float32, ulps=8)


def test_label_smoothing_runs_numba_kernels_only_when_switched_on(monkeypatch):
    """With numba, label smoothing on class indices runs crossent.cpu's smoothing kernels (not
    the Array-API path's temporaries); ``crossent.cpu.ENABLED = False`` turns them off too."""
    calls = _spy_with_numba(monkeypatch, cpu, "_smoothed_rows")
    x, y, w, _ = _inputs((41, 13), np.float32, seed=8)
    for f in (ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad):
        got = f(x, y, ignore_index=-100, label_smoothing=0.1, weight=w)
        assert calls == [1]
        want = _array_api(f, x, y, ignore_index=-100, label_smoothing=0.1, weight=w)
        assert calls == [1]
        _close_all(got, want, np.float32, ulps=8)
        calls.clear()


# ---- found by the second read of the fast paths ---------------------------------------------------


def test_fast_paths_warn_not_on_ignored_rows_and_take_read_only_logits(fast_path):
    """Ignored rows holding -inf in the safe label's column, or logits whose lse^2 overflows,
    raise no floating-point warning (warnings are errors here) with class weights, smoothing and
    z-loss; read-only logits and targets work on every numpy path (numba cannot write a read-only
    array, so none may stand in for an output)."""
    x = np.array([[0.1, 0.2, 0.3], [-np.inf, 1.0, 2.0]])
    y = np.array([1, -100])
    w = np.array([1.0, 2.0, 0.5])
    x32 = np.array([[0.1, 0.2, 0.3], [1e30, 0.0, 0.0]], dtype=np.float32)
    cases = [(x, {"weight": w}), (x, {"weight": w, "label_smoothing": 0.1}),
             (x32, {"z_loss": 1e-2, "label_smoothing": 0.1}), (x32, {"z_loss": 1e-2})]
    for logits, opts in cases:
        for f in (ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad):
            got, want = f(logits, y, ignore_index=-100, **opts), _array_api(f, logits, y, ignore_index=-100, **opts)
            _close_all(got, want, logits.dtype.type, ulps=8)
    frozen = np.array([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0]], dtype=np.float32)
    frozen.flags.writeable = False
    probs = np.full((2, 3), 1 / 3, dtype=np.float32)
    probs.flags.writeable = False
    for targets, opts in ((np.array([0, 1]), {}), (np.array([0, 1]), {"label_smoothing": 0.1}),
                          (np.array([0, 1]), {"softcap": 3.0}), (probs, {})):
        for f in (ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad):
            got, want = f(frozen, targets, **opts), _array_api(f, frozen, targets, **opts)
            _close_all(got, want, np.float32, ulps=8)


def test_huge_tied_maxima_give_torchs_gradient(fast_path):
    """softmax as exp((x - m) - log s): exp(x - lse), with lse rounded at 1e30, made every tied
    maximum's probability 1 (the row's gradient then summed to 1, not 0)."""
    x = np.array([[1e30, -1e30, 1e30, 0.0]])
    y = np.array([0])
    for eps in (0.0, 0.3):
        xt = torch.tensor(x, requires_grad=True)
        F.cross_entropy(xt, torch.from_numpy(y), label_smoothing=eps, reduction="sum").backward()
        _, grad = ce.softmax_cross_entropy_and_grad(x, y, label_smoothing=eps, reduction="sum")
        np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_softcap_loss_with_numba_is_capped_block_by_block(monkeypatch):
    """A softcap without the gradient runs the blocked path with numba too: capping the whole
    array before the kernels took two copies of the logits (201% extra memory)."""
    x, y, _, _ = _inputs((20000, 500), np.float32, seed=9)
    for opts in ({"softcap": 30.0}, {"softcap": 30.0, "label_smoothing": 0.1}):
        ce.softmax_cross_entropy(x[:10], y[:10], ignore_index=-100, **opts)
        tracemalloc.start()
        try:
            ce.softmax_cross_entropy(x, y, ignore_index=-100, **opts)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= 0.10 * x.nbytes, (opts, peak / x.nbytes)


def test_blocked_smoothing_counts_finite_logits_not_finite_differences(no_numba):
    """float32 logits spanning more than float32's range: x - max overflows to -inf where x is
    finite; the class still counts among the finite ones (K = 4), as in the Array-API path."""
    x = np.array([[3.0e38, 3.3e38, -3.4e38, 3.4e38]], dtype=np.float32)
    _, grad = ce.softmax_cross_entropy_and_grad(x, np.array([0]), label_smoothing=0.3, reduction="sum")
    with np.errstate(all="ignore"):
        _, want = _array_api(ce.softmax_cross_entropy_and_grad, x, np.array([0]), label_smoothing=0.3, reduction="sum")
    np.testing.assert_allclose(grad, want, rtol=1e-6)
    np.testing.assert_allclose(grad, [[-0.775, -0.075, -0.075, 0.925]], rtol=1e-6)


@pytest.mark.parametrize("layout", ["fortran", "axis0"])
def test_other_layouts_copy_once_and_take_the_fast_paths(fast_path, layout):
    """Logits not C-contiguous with the classes last (Fortran order, classes on axis 0): one
    C-ordered copy, then the fast paths (the Array-API path held 4.5 copies); the loss and
    gradient of float64 PyTorch."""
    x, y, w, _ = _inputs((4000, 250), np.float32, seed=10)
    kwargs = dict(ignore_index=-100, weight=w)
    if layout == "fortran":
        logits, axis = np.asfortranarray(x), -1
    else:
        logits, axis = np.ascontiguousarray(x.T), 0
    loss, grad = ce.softmax_cross_entropy_and_grad(logits, y, axis=axis, **kwargs)
    want_loss, want_grad = _torch_float64(x.astype(np.float64), y, w, None, None, 0.0, 0.0, "mean")
    if layout == "axis0":
        want_grad = want_grad.T
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(float(loss), want_loss, rtol=16 * eps)
    np.testing.assert_allclose(float(ce.softmax_cross_entropy(logits, y, axis=axis, **kwargs)), want_loss,
                               rtol=16 * eps)
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=16 * eps * np.abs(want_grad).max())
    f = ce.softmax_cross_entropy
    f(logits[:, :10] if layout == "axis0" else logits[:10], y[:10], axis=axis, **kwargs)
    tracemalloc.start()
    try:
        f(logits, y, axis=axis, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 1.10 * x.nbytes, peak / x.nbytes


# ---- probability targets (crossent.cpu._blocked.soft_targets) -----------------------------------

SOFT_OPTIONS = [
    {},
    {"weight": "w"},
    {"label_smoothing": 0.2},
    {"label_smoothing": 1.0, "weight": "w"},
    {"softcap": 4.0},
    {"z_loss": 1e-2},
    {"sample_weight": "sw", "base": 2},
    {"softcap": 3.0, "z_loss": 0.1, "weight": "w", "sample_weight": "sw", "label_smoothing": 0.1},
]


def _soft_inputs(shape, dtype, seed=0, masked=True):
    """``_inputs`` with probability targets (rows of softmax(N(0, 1)), every fifth entry 0) and,
    with ``masked``, a first row whose zero-target classes are -inf (masked)."""
    x, _, w, sw = _inputs(shape, dtype, seed, ignored=False)
    s = np.random.default_rng(seed + 100).standard_normal(shape)
    t = np.exp(s - s.max(axis=-1, keepdims=True))
    if shape[-1] > 1:
        t.reshape(-1)[::5] = 0.0
    t /= t.sum(axis=-1, keepdims=True)
    if masked and x.ndim > 1 and shape[-1] > 1:
        row, trow = x.reshape(-1, shape[-1])[0], t.reshape(-1, shape[-1])[0]
        row[trow == 0.0] = -np.inf
    return x, t.astype(dtype), w, sw


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(37, 11), (5, 3, 29), (1, 1), (7,)], ids=str)
@pytest.mark.parametrize("opts", SOFT_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_targets_fast_paths_give_the_array_api_paths_loss_and_gradient(fast_path, dtype, shape, opts, reduction):
    x, t, w, sw = _soft_inputs(shape, dtype)
    kwargs = dict(reduction=reduction, **_options(opts, w, sw))
    for f in (ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad):
        got, want = f(x, t, **kwargs), _array_api(f, x, t, **kwargs)
        _close_all(got, want, dtype, ulps=8, floor=1.0 if shape[-1] == 1 else 0.0)


def _torch_float64_soft(x, t, w, sw, softcap, z_loss, label_smoothing, reduction):
    """Loss and gradient from float64 PyTorch ops with probability targets: the soft cap,
    F.cross_entropy (its label smoothing and class weights; "mean" over the rows, as PyTorch
    divides probability targets by N), and the z-loss z * mean(logsumexp^2), rows weighted by ``sw``."""
    logits_leaf = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = softcap * torch.tanh(logits_leaf / softcap) if softcap else logits_leaf
    weight = None if w is None else torch.from_numpy(w)
    rows = F.cross_entropy(logits, torch.from_numpy(t.astype(np.float64)), weight=weight, reduction="none",
                           label_smoothing=label_smoothing)
    rows = rows + z_loss * torch.logsumexp(logits, dim=-1) ** 2
    row_w = torch.ones_like(rows) if sw is None else torch.from_numpy(sw)
    loss = (row_w * rows).sum()
    if reduction == "mean":
        loss = loss / row_w.sum()
    loss.backward()
    return loss.item(), logits_leaf.grad.numpy()


@pytest.mark.parametrize("opts", SOFT_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_soft_targets_fast_paths_against_float64_torch(fast_path, opts, reduction):
    """Finite logits (where crossent's smoothing over the finite classes is PyTorch's)."""
    x, t, w, sw = _soft_inputs((53, 17), np.float32, seed=3, masked=False)
    kwargs = _options(opts, w, sw)
    loss, grad = ce.softmax_cross_entropy_and_grad(x, t, reduction=reduction, **kwargs)
    _check_against_float64_torch(loss, grad, *_torch_float64_soft(x.astype(np.float64), t, *_oracle_options(kwargs),
                                                                 reduction), kwargs)


def test_soft_targets_blocked_path_keeps_a_confident_rows_loss(no_numba):
    """A one-hot probability target on a confident float32 row: 2.06e-9, as with its class index
    (log1p of the terms below the maximum; the Array-API path gives 0)."""
    x = np.array([[1e4, 1e4 - 20.0, 1e4 - 30.0]] * 3, dtype=np.float32)
    t = np.array([[1.0, 0.0, 0.0]] * 3, dtype=np.float32)
    rows = ce.softmax_cross_entropy(x, t, reduction="none")
    np.testing.assert_allclose(rows, np.exp(-20.0) + np.exp(-30.0), rtol=1e-6)
    assert np.all(_array_api(ce.softmax_cross_entropy, x, t, reduction="none") == 0.0)


@pytest.mark.parametrize("opts", [{}, {"weight": "w", "label_smoothing": 0.1}, {"softcap": 30.0, "z_loss": 1e-3}],
                         ids=lambda o: ",".join(o) or "plain")
def test_soft_targets_extra_memory_is_a_few_blocks(fast_path, opts):
    """Probability targets, with or without numba, options folded in block by block: the loss
    within 10% of the logits' size (the NaN check of the targets included: it held a mask of their
    size, 25% of float32 logits), with the gradient 110% (the gradient itself). The Array-API path
    held 4.8 copies."""
    x, t, w, sw = _soft_inputs((20000, 500), np.float32, seed=5, masked=False)
    kwargs = _options(opts, w, sw)
    for f, allowed in ((ce.softmax_cross_entropy, 0.10), (ce.softmax_cross_entropy_and_grad, 1.10)):
        # Warm up above the parallel kernels' size threshold: numba compiles them on first use,
        # which tracemalloc would count (no compilation cache on a fresh machine).
        f(x[:200], t[:200], **kwargs)
        tracemalloc.start()
        try:
            f(x, t, **kwargs)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= allowed * x.nbytes, (f.__name__, peak / x.nbytes)


def test_soft_targets_take_numba_kernels_for_the_plain_loss_and_the_blocked_pass_otherwise(monkeypatch):
    """With numba: the plain loss and gradient run crossent.cpu's soft-target kernels; class
    weights, smoothing, a softcap or a z-loss with the gradient the blocked pass; none of them
    with the fast paths off."""
    blocked_calls = _spy_with_numba(monkeypatch, _blocked, "soft_targets")
    kernel_calls = _spy_with_numba(monkeypatch, cpu, "softmax_minus_targets")
    x, t, w, _ = _soft_inputs((41, 13), np.float32, seed=6)
    ce.softmax_cross_entropy_and_grad(x, t)
    ce.softmax_cross_entropy_and_grad(x, t, z_loss=0.0)
    assert (blocked_calls, kernel_calls) == ([], [1, 1])
    for opts in ({"weight": w}, {"label_smoothing": 0.1}, {"softcap": 5.0}, {"z_loss": 1e-3}):
        ce.softmax_cross_entropy_and_grad(x, t, **opts)
    assert (blocked_calls, kernel_calls) == ([1] * 4, [1, 1])
    _array_api(ce.softmax_cross_entropy_and_grad, x, t, weight=w)
    assert (blocked_calls, kernel_calls) == ([1] * 4, [1, 1])


def test_full_smoothing_row_without_a_finite_logit_is_nan(fast_path):
    """label_smoothing=1 drops the nll term: a kept row with no finite logit (all NaN, NaN and
    -inf, all -inf) is still NaN, as in PyTorch and the Array-API path (the fast paths gave 0)."""
    nan, inf = np.nan, np.inf
    x = np.array([[nan, nan, nan], [nan, -inf, -inf], [-inf, -inf, -inf], [0.0, 1.0, 2.0]])
    y = np.array([0, 1, 2, 1])
    rows = ce.softmax_cross_entropy(x, y, label_smoothing=1.0, reduction="none")
    with np.errstate(all="ignore"):
        want = _array_api(ce.softmax_cross_entropy, x, y, label_smoothing=1.0, reduction="none")
        torch_rows = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), label_smoothing=1.0, reduction="none")
    assert np.isnan(rows[:3]).all() and np.isnan(want[:3]).all() and torch.isnan(torch_rows[:3]).all()
    np.testing.assert_allclose(rows[3], torch_rows[3].item(), rtol=1e-12)
