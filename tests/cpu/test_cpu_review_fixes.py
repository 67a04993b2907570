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


@pytest.fixture(params=["numba", "no-numba"])
def route(request, monkeypatch):
    """The compiled kernels, or the numpy fallback as when numba is not installed."""
    if request.param == "numba":
        pytest.importorskip("numba")
        monkeypatch.setattr(cpu, "_numba_importable", None)
    else:
        monkeypatch.setattr(cpu, "_numba_importable", False)
    monkeypatch.setattr(cpu, "ENABLED", True)
    assert cpu.available() is (request.param == "numba")
    return request.param


def _torch_grad(x: np.ndarray, labels: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row loss and scale_i * d loss_i / d x_i by float64 torch (the oracle)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(xt, torch.tensor(labels), reduction="none")
    (loss * torch.tensor(scale)).sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("magnitude", [1e8, 1e12, 1e17])
def test_softmax_minus_onehot_at_large_logits_matches_torch(route, magnitude):
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


def test_review_repro_three_equal_huge_logits(route):
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
