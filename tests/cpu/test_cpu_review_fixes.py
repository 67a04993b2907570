"""Fixes from the CPU review: the no-numba fallback at large logits, rows holding +inf (NaN as in
PyTorch), numba's workqueue threading layer under concurrent calls, and resizable ``.grad``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from crossent import cpu  # noqa: E402


def _torch_grad(x: np.ndarray, labels: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row loss and scale_i * d loss_i / d x_i by float64 torch (the oracle)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(xt, torch.tensor(labels), reduction="none")
    (loss * torch.tensor(scale)).sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("magnitude", [1e8, 1e12, 1e17])
def test_softmax_minus_onehot_at_large_logits_matches_torch(cpu_route, magnitude):
    rng = np.random.default_rng(7)
    # Offsets of order 1 on top of a huge common value: x - lse would round log_s away.
    x = magnitude + np.ldexp(np.round(rng.normal(size=(5, 7)) * 8), int(np.floor(np.log2(magnitude))) - 52 + 3)
    x[0] = magnitude  # seven equal logits: softmax 1/7 each
    labels = np.array([0, 3, 6, 1, 2])
    scale = np.array([1.0, 0.5, 2.0, 1.0, 0.25])
    out = np.empty_like(x)
    _, nll = cpu.softmax_minus_onehot(x, labels, scale, out)
    want_loss, want_grad = _torch_grad(x, labels, scale)
    np.testing.assert_allclose(out, want_grad, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(nll, want_loss, rtol=1e-10, atol=1e-15)
    if magnitude == 1e17:
        np.testing.assert_allclose(out[0], [-6 / 7] + [1 / 7] * 6, rtol=1e-12)


def test_review_repro_three_equal_huge_logits(cpu_route):
    out = np.empty((1, 3))
    cpu.softmax_minus_onehot(np.array([[1e17] * 3]), np.array([0]), 1.0, out)
    np.testing.assert_allclose(out[0], [-2 / 3, 1 / 3, 1 / 3], rtol=1e-12)


_THREADS_SCRIPT = r"""
import threading
import numba, torch, torch.nn.functional as F
import crossent.torch as cet
from crossent import cpu
assert cpu.available()
torch.manual_seed(0)
xs = [torch.randn(2000, 1000, dtype=torch.float32) for _ in range(4)]
ts = [torch.randint(0, 1000, (2000,)) for _ in range(4)]
results, errors = {}, []
def work(k):
    try:
        for _ in range(10):
            x = xs[k].clone().requires_grad_(True)
            loss = cet.cross_entropy(x, ts[k])
            loss.backward()
        results[k] = (float(loss), x.grad.clone())
    except Exception as e:  # pragma: no cover - reported below
        errors.append(repr(e))
threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors, errors
assert numba.threading_layer() == "workqueue", numba.threading_layer()
for k in range(4):
    x = xs[k].double().requires_grad_(True)
    want = F.cross_entropy(x, ts[k])
    want.backward()
    loss, grad = results[k]
    assert abs(loss - float(want)) <= 1e-5 * abs(float(want)), (k, loss, float(want))
    assert float((grad.double() - x.grad).abs().max()) < 1e-8, k
print("ok", cpu._workqueue)
"""


def test_concurrent_threads_under_numba_workqueue_layer(tmp_path):
    """numba's workqueue layer terminates the process (SIGABRT) when two threads run parallel
    kernels at once: crossent.cpu serializes them there."""
    pytest.importorskip("numba")
    script = tmp_path / "threads.py"
    script.write_text(_THREADS_SCRIPT)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", CROSSENT_CPU_FAST="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stdout.strip() == "ok True"


# ---- rows holding +inf: NaN loss and an all-NaN gradient row, as F.cross_entropy ----------------

_INF = np.inf
# Row 0: +inf off the label; row 2: +inf on the label; row 4: +inf, ignored (label -100): 0.
_X_INF = np.array([
    [0.0, _INF, 1.0, -0.5],
    [0.5, 0.2, 0.1, -1.0],
    [_INF, 0.0, 0.0, 2.0],
    [1.0, 2.0, 3.0, 0.25],
    [_INF, 1.0, 2.0, 3.0],
    [-0.3, 0.7, _INF, _INF],
])
_Y_INF = np.array([0, 1, 0, 3, -100, 1])
_INF_ROWS = [0, 2, 5]


def _oracle(x: np.ndarray, y: np.ndarray, *, weight=None, eps=0.0, z=0.0, reduction="none"):
    """float64 F.cross_entropy plus z lse^2 on the kept rows (crossent's z-loss), and its gradient."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = torch.tensor(y)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    loss = F.cross_entropy(xt, yt, weight=w, reduction="none", label_smoothing=eps)
    kept = torch.nonzero(yt != -100)[:, 0]
    if z:
        loss = loss.index_add(0, kept, z * torch.logsumexp(xt[kept], dim=1) ** 2)
    loss.sum().backward()
    grad = xt.grad.numpy()
    # F's gradient on an ignored row holding +inf is NaN (log_softmax's backward: 0 - NaN * 0);
    # crossent's ignored rows are 0 whatever their logits (DESIGN.md).
    grad[y == -100] = 0.0
    return loss.detach().numpy(), grad


def _check_inf_rows(loss, grad, want_loss, want_grad):
    loss, grad = np.asarray(loss, dtype=np.float64), np.asarray(grad, dtype=np.float64)
    assert np.isnan(want_loss[_INF_ROWS]).all() and np.isnan(want_grad[_INF_ROWS]).all()  # the oracle
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(want_loss))
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(want_grad))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(grad[4], 0.0)  # the ignored row


@pytest.mark.parametrize("z", [0.0, 0.1])
def test_cpu_softmax_minus_onehot_plus_inf_rows(cpu_route, z):
    keep = _Y_INF != -100
    labels = np.where(keep, _Y_INF, 0)
    out = np.empty_like(_X_INF)
    lse, nll = cpu.softmax_minus_onehot(_X_INF, labels, keep.astype(float), out, keep=keep,
                                        z_scale=2 * z * keep if z else None)
    want_loss, want_grad = _oracle(_X_INF, _Y_INF, z=z)
    with np.errstate(invalid="ignore"):
        loss = np.where(keep, nll + (z * lse.astype(np.float64) ** 2 if z else 0.0), 0.0)
    _check_inf_rows(loss, out, want_loss, want_grad)
    assert (lse[_INF_ROWS] == np.inf).all()  # lse itself is +inf, as torch.logsumexp
    _, nll_only = cpu.lse_and_nll(_X_INF, labels)
    np.testing.assert_array_equal(nll_only, nll)


def test_cpu_factor_zero_on_plus_inf_row_is_nan(cpu_route):
    """A kept row with factor 0 (class weight 0, sample weight 0) holding +inf: NaN, as F gives
    0 * NaN; the review's case was [0, nan, 0] from the kernels."""
    out = np.empty((1, 3))
    cpu.softmax_minus_onehot(np.array([[0.0, np.inf, 1.0]]), np.array([0]), 0.0, out, keep=np.array([True]),
                             z_scale=0.2)
    assert np.isnan(out).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_smoothing_and_soft_kernels_plus_inf_rows(dtype):
    pytest.importorskip("numba")
    assert cpu.available()
    x = np.ascontiguousarray(_X_INF[[0, 1, 2, 3, 5]], dtype=dtype)
    y = _Y_INF[[0, 1, 2, 3, 5]]
    out = np.empty_like(x)
    lse, nll, smoothed, count, _ = cpu._smoothed_rows(x, y, None, 0.2, np.ones(5), out, np.ones(5, dtype=bool))
    want_loss, want_grad = _oracle(x.astype(np.float64), y, eps=0.2)
    loss = 0.8 * nll.astype(np.float64) - 0.2 * smoothed / count
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, want_loss, equal_nan=True, **tol)
    np.testing.assert_allclose(out, want_grad, equal_nan=True, **tol)
    assert np.isnan(out[[0, 2, 4]]).all()
    # probability targets
    t = np.full_like(x, 0.25)
    g = np.empty_like(x)
    _, ce_rows = cpu.softmax_minus_targets(x, t, 1.0, g)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want = F.cross_entropy(xt, torch.tensor(t, dtype=torch.float64), reduction="none")
    want.sum().backward()
    np.testing.assert_allclose(ce_rows, want.detach().numpy(), equal_nan=True, **tol)
    np.testing.assert_allclose(g, xt.grad.numpy(), equal_nan=True, **tol)
    np.testing.assert_array_equal(np.isnan(cpu.soft_cross_entropy(x, t)[1]), np.isnan(want.detach().numpy()))


@pytest.mark.parametrize("options", [dict(), dict(z=0.1), dict(eps=0.2), dict(eps=0.2, z=0.1), dict(eps=1.0),
                                     dict(weight=[1.0, 0.5, 0.0, 2.0])])
def test_torch_auto_plus_inf_rows_match_f(options, cpu_route):
    """cet.cross_entropy(impl="auto") on the CPU: the numba kernels, or the blocked numpy pass
    (no numba; also a z-loss with smoothing) give F's NaN rows."""
    import crossent.torch as cet
    from crossent.torch import _cpu_fast

    eps, z, weight = options.get("eps", 0.0), options.get("z", 0.0), options.get("weight")
    x = torch.tensor(_X_INF, requires_grad=True)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    path = _cpu_fast.class_index_path(x, False, z, None, eps)
    assert path == ("kernels" if cpu_route == "numba" and not (z and eps) else "blocked")
    loss = cet.cross_entropy(x, torch.tensor(_Y_INF), weight=w, reduction="none", label_smoothing=eps, z_loss=z)
    loss.sum().backward()
    want_loss, want_grad = _oracle(_X_INF, _Y_INF, weight=weight, eps=eps, z=z)
    _check_inf_rows(loss.detach().numpy(), x.grad.numpy(), want_loss, want_grad)


@pytest.mark.parametrize("options", [dict(), dict(z_loss=0.1), dict(label_smoothing=0.2),
                                     dict(label_smoothing=0.2, z_loss=0.1)])
def test_core_numpy_plus_inf_rows_match_f(options, cpu_route):
    """crossent.softmax_cross_entropy_and_grad on numpy logits (kernels, or the blocked pass)."""
    import crossent as ce

    loss, grad = ce.softmax_cross_entropy_and_grad(_X_INF, _Y_INF, ignore_index=-100, reduction="none", **options)
    want_loss, want_grad = _oracle(_X_INF, _Y_INF, eps=options.get("label_smoothing", 0.0),
                                   z=options.get("z_loss", 0.0))
    _check_inf_rows(loss, grad, want_loss, want_grad)


def test_blocked_gradient_plus_inf_rows_match_f():
    """crossent.cpu._blocked directly (the no-numba and softcap/z-loss+smoothing cpu_route)."""
    from crossent.cpu import _blocked

    keep = _Y_INF != -100
    labels = np.where(keep, _Y_INF, 0)
    stats = _blocked.lse_and_nll(_X_INF, labels, None, keep)
    scale = keep.astype(np.float64)
    grad = _blocked.gradient(_X_INF, labels, None, stats, row_weight=None, smoothing=0.0, class_weight=None,
                             ce_scale=scale, z_coef=None, keep=keep, ln_base=None)
    want_loss, want_grad = _oracle(_X_INF, _Y_INF)
    _check_inf_rows(np.where(keep, stats.nll, 0.0), grad, want_loss, want_grad)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(weight=np.array([1.0, 0.5, 2.0, 1.5]))])
def test_core_numpy_soft_targets_plus_inf_rows_match_f(options, cpu_route):
    """Probability targets (numba's soft kernels, or the blocked ``soft_targets`` with smoothing
    or class weights): NaN loss and gradient rows where a logit is +inf, as F."""
    import crossent as ce

    rng = np.random.default_rng(3)
    t = rng.dirichlet(np.ones(4), size=6)
    loss, grad = ce.softmax_cross_entropy_and_grad(_X_INF, t, reduction="none", **options)
    xt = torch.tensor(_X_INF, requires_grad=True)
    w = options.get("weight")
    want = F.cross_entropy(xt, torch.tensor(t), weight=None if w is None else torch.tensor(w), reduction="none",
                           label_smoothing=options.get("label_smoothing", 0.0))
    want.sum().backward()
    inf_rows = [0, 2, 4, 5]
    assert np.isnan(want.detach().numpy()[inf_rows]).all() and np.isnan(xt.grad.numpy()[inf_rows]).all()
    assert np.isnan(loss[inf_rows]).all() and np.isnan(grad[inf_rows]).all()
    np.testing.assert_allclose(loss[[1, 3]], want.detach().numpy()[[1, 3]], rtol=1e-10)
    np.testing.assert_allclose(grad[[1, 3]], xt.grad.numpy()[[1, 3]], rtol=1e-10, atol=1e-14)
