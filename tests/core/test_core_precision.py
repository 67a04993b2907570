"""Relative accuracy where the result is far smaller than its parts: KL of nearby float32
distributions (against scipy.special.rel_entr) and the loss of confident float32 rows on the
Array-API path (against a float64 log-sum-exp). The truth is always float64 arithmetic on the
very same (already rounded) float32 inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, rel_entr

import crossent as ce

F32_EPS = float(np.finfo(np.float32).eps)


def nearby_distributions(spread, rows=64, classes=1000, seed=3):
    """p ~ Dirichlet(1), q = p e^(spread noise) renormalized, both rounded to float32 (the
    distillation / RL-policy regime: KL of about spread^2 / 2)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(classes), size=rows)
    q = p * np.exp(spread * rng.normal(size=p.shape))
    q /= q.sum(-1, keepdims=True)
    return p.astype(np.float32), q.astype(np.float32)


@pytest.mark.parametrize("spread", [1e-4, 1e-3, 3e-2])
def test_kl_divergence_of_nearby_float32_distributions_is_as_accurate_as_rel_entr(xp, asxp, tonp, spread):
    """Finding 1: H(P, Q) - H(P) cancels catastrophically in float32 (negative KL, errors above
    100% at spread 1e-4). Per row, crossent's error against the float64 rel_entr truth must be no
    larger than scipy's own float32 rel_entr error plus a float32 summation tolerance, never
    negative, and its median relative error within 2x of scipy's."""
    p, q = nearby_distributions(spread)
    truth = rel_entr(p.astype(np.float64), q.astype(np.float64)).sum(-1)
    scipy32 = rel_entr(p, q).sum(-1).astype(np.float64)
    got = tonp(ce.kl_divergence(asxp(p), asxp(q))).astype(np.float64)
    assert got.dtype == np.float64 and got.shape == (64,)
    assert np.all(got >= 0), got.min()
    terms = np.abs(rel_entr(p.astype(np.float64), q.astype(np.float64))).sum(-1)
    err, scipy_err = np.abs(got - truth), np.abs(scipy32 - truth)
    allowed = scipy_err + 16 * F32_EPS * terms
    assert np.all(err <= allowed), (int(np.argmax(err - allowed)), err.max(), scipy_err.max())
    assert np.median(err / truth) <= 2 * np.median(scipy_err / truth) + 4 * F32_EPS


def test_kl_divergence_terms_match_rel_entr_over_every_regime(xp, asxp, tonp):
    """Every branch of the elementwise p log(p/q): p = 0 (0, also where q = 0), q = 0 < p (inf),
    ratios near 1 (log1p branch), far from 1 both ways, and subnormal float32 q (where p / q
    overflows). Checked term by term (1-element rows) against rel_entr in float64."""
    tiny32 = float(np.finfo(np.float32).smallest_normal)
    p = np.array([0.0, 0.0, 0.3, 0.5, 0.5, 0.5, 1e-30, 0.9, 0.7, 0.25, 1.0, 0.5, 1e-40], np.float32)
    q = np.array([0.0, 0.4, 0.0, 0.5, 0.5000001, 0.74, 0.9, 1e-30, 0.35, 0.5, 1e-44, tiny32 / 4, 1e-44],
                 np.float32)
    if xp.__name__.startswith("jax"):
        p, q = p[:-3], q[:-3]  # XLA on the CPU flushes subnormals to zero: no subnormal cases
    truth = rel_entr(p.astype(np.float64), q.astype(np.float64))
    got = tonp(ce.kl_divergence(asxp(p[:, None]), asxp(q[:, None])))
    assert got.dtype == np.float32
    assert got[0] == 0 and got[1] == 0 and got[2] == np.inf
    np.testing.assert_allclose(got[3:], truth[3:], rtol=8 * F32_EPS, atol=0)


def test_kl_divergence_float64_and_bits_match_rel_entr(xp, asxp, tonp):
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(37), size=11)
    q = rng.dirichlet(np.ones(37), size=11)
    p[0, :5] = 0.0
    q[1, 3] = 0.0
    p[1, 3] = 0.0
    for base, scale in ((None, 1.0), (2, np.log(2))):
        np.testing.assert_allclose(
            tonp(ce.kl_divergence(asxp(p), asxp(q), base=base)), rel_entr(p, q).sum(-1) / scale, rtol=1e-13
        )


def test_kl_divergence_gradients_pass_gradcheck():
    """The elementwise form stays differentiable in both arguments (torch finite differences)."""
    rng = np.random.default_rng(6)
    p = torch.tensor(rng.dirichlet(np.ones(9), size=4), requires_grad=True)
    q = torch.tensor(rng.dirichlet(np.ones(9), size=4), requires_grad=True)
    with torch.no_grad():
        q[0] = p[0] * (1 + 1e-3 * torch.linspace(-1, 1, 9, dtype=torch.float64))  # the log1p branch
    assert torch.autograd.gradcheck(lambda a, b: ce.kl_divergence(a, b), (p, q))
    a = p.detach().clone().requires_grad_(True)
    b = q.detach().clone().requires_grad_(True)
    ce.kl_divergence(a, b).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), (torch.log(p / q) + 1).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(b.grad.numpy(), (-p / q).detach().numpy(), rtol=1e-12)


# ---- finding 4: confident float32 rows on the generic (Array-API) path -----------------------------

CONFIDENT = np.array([[1e4, 1e4 - 20, 1e4 - 30]], np.float32)


def float64_loss(x, y):
    """-log softmax(x)[y] = logsumexp(x - x_y) in float64 (the shift is exact for float32 values;
    logsumexp(x) - x_y would lose 1e4 * 1e-16 to rounding, 5% of a loss of 2e-9)."""
    x = np.asarray(x, dtype=np.float64)
    return logsumexp(x - np.take_along_axis(x, np.asarray(y)[:, None], -1), axis=-1)


def test_confident_float32_row_float64_oracle_value():
    np.testing.assert_allclose(float64_loss(CONFIDENT, np.array([0]))[0], 2.0612472e-09, rtol=1e-7)


def _layout(name):
    """(logits, integer labels, one-hot float targets) of two confident rows, in one library and
    memory layout."""
    two = np.vstack([CONFIDENT, CONFIDENT])
    labels = np.array([0, 0])
    onehot = np.zeros((2, 3), np.float32)
    onehot[:, 0] = 1.0
    if name == "numpy C order":
        return two, labels, onehot
    if name == "numpy Fortran order":
        return np.asfortranarray(two), labels, np.asfortranarray(onehot)
    if name == "numpy strided":
        return np.vstack([two, two])[::2], labels, np.vstack([onehot, onehot])[::2]
    if name == "torch":
        return torch.from_numpy(two), torch.from_numpy(labels), torch.from_numpy(onehot)
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray(two), jnp.asarray(labels.astype(np.int32)), jnp.asarray(onehot)


@pytest.mark.parametrize("layout", ["numpy C order", "numpy Fortran order", "numpy strided", "torch", "jax"])
def test_confident_float32_row_is_within_float32_eps_in_every_layout_and_library(layout, tonp):
    """Finding 4, decided: the generic (Array-API) path takes log(sum exp(x - max)) in float32, so
    a loss of 2e-9 may come out as 0 (absolute error below float32's eps, as PyTorch's); the CPU
    kernels (C-ordered numpy) keep it (the exact value, tested in tests/cpu). log1p of the
    non-maximal terms cost 1.4-2.7x the time of the generic path (torch, jax.jit). Loss and
    gradient within a few eps of float64, integer and one-hot targets."""
    x, labels, onehot = _layout(layout)
    truth = float64_loss(CONFIDENT, np.array([0]))[0]  # 2.0612472e-09
    x64 = torch.tensor(np.vstack([CONFIDENT, CONFIDENT]), dtype=torch.float64, requires_grad=True)
    F.cross_entropy(x64, torch.tensor([0, 0]), reduction="sum").backward()
    for targets in (labels, onehot):
        loss = tonp(ce.softmax_cross_entropy(x, targets, reduction="none"))
        assert loss.dtype == np.float32
        np.testing.assert_allclose(loss, [truth, truth], rtol=0, atol=F32_EPS)
        loss_sum, grad = ce.softmax_cross_entropy_and_grad(x, targets, reduction="sum")
        np.testing.assert_allclose(float(tonp(loss_sum)), 2 * truth, rtol=0, atol=2 * F32_EPS)
        np.testing.assert_allclose(tonp(grad), x64.grad.numpy(), rtol=1e-5, atol=F32_EPS)
    if layout == "numpy C order":  # the CPU kernels: the exact value
        np.testing.assert_allclose(tonp(ce.softmax_cross_entropy(x, labels, reduction="none")), [truth, truth],
                                   rtol=1e-6)


def test_confident_float32_rows_generic_path_absolute_accuracy(monkeypatch, xp, asxp, tonp):
    """Random confident rows (margins 10 to 80, ties included) on the Array-API path (the CPU
    kernels switched off): within float32 rounding of float64 (absolute for the tiny losses,
    relative for the rest), also with label smoothing and z_loss (the log-sum-exp itself)."""
    from crossent import cpu

    monkeypatch.setattr(cpu, "ENABLED", False)
    rng = np.random.default_rng(8)
    n, c = 61, 17
    x = rng.normal(size=(n, c)) - rng.uniform(10, 80, size=(n, 1))
    x[np.arange(n), rng.integers(0, c, size=n)] = 0.0
    x[:5, :2] = 0.0  # ties at the maximum: log 2
    x = (x + rng.uniform(-1e3, 1e3, size=(n, 1))).astype(np.float32)
    y = np.argmax(x, axis=-1)
    truth = float64_loss(x, y)
    got = tonp(ce.softmax_cross_entropy(asxp(x), asxp(y), reduction="none")).astype(np.float64)
    np.testing.assert_allclose(got, truth, rtol=4 * F32_EPS, atol=4 * F32_EPS)  # a 17-term float32 sum
    x64 = x.astype(np.float64)
    expected = F.cross_entropy(torch.from_numpy(x64), torch.from_numpy(y), reduction="none",
                               label_smoothing=0.05).numpy()
    got = tonp(ce.softmax_cross_entropy(asxp(x), asxp(y), reduction="none", label_smoothing=0.05))
    np.testing.assert_allclose(got, expected, rtol=64 * F32_EPS)
    lse = logsumexp(x64, axis=-1)
    got = tonp(ce.softmax_cross_entropy(asxp(x), asxp(y), reduction="none", z_loss=1e-4))
    np.testing.assert_allclose(got, truth + 1e-4 * lse**2, rtol=16 * F32_EPS, atol=4 * F32_EPS)


def test_tied_maxima_keep_their_curvature():
    """jax.hessian / double backward at tied logits (a zero-initialised head): the exact Hessian
    of the mean loss is (diag(q) - q q^T) / N."""
    x = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 3])
    hessian = torch.autograd.functional.hessian(lambda z: ce.softmax_cross_entropy(z, y), x)
    q = torch.full((4,), 0.25, dtype=torch.float64)
    block = (torch.diag(q) - torch.outer(q, q)) / 3
    for i in range(3):
        torch.testing.assert_close(hessian[i, :, i, :], block, rtol=1e-12, atol=1e-15)
