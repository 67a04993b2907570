"""Each docstring formula pinned by a direct NumPy transcription (tests/core/conftest.py).

The transcriptions are themselves checked against PyTorch where PyTorch defines the loss, so a
wrong sign or a wrong normaliser in either place shows up here (optax once shipped a formula
without its minus sign; doctests did not catch it)."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce

OPTIONS = list(
    itertools.product(
        [None, "weight"],  # class weights
        [0.0, 0.25],  # label_smoothing
        [0.0, 2e-3],  # z_loss
        [None, 7.0],  # softcap
        ["mean", "sum", "none"],
    )
)


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def masked_problem(rng, soft):
    logits = rng.normal(scale=4.0, size=(8, 5))
    labels = rng.integers(0, 5, size=8)
    labels[[1, 5]] = -100
    logits[2, (labels[2] + 1) % 5] = -np.inf  # a masked class
    logits[3, :3] = -np.inf
    logits[3, 4] = 1.0
    labels[3] = 4
    if soft:
        t = rng.random((8, 5))
        t[~np.isfinite(logits)] = 0.0
        return logits, t / t.sum(-1, keepdims=True)
    return logits, labels


@pytest.mark.parametrize(("weight", "eps", "z", "cap", "reduction"), OPTIONS)
@pytest.mark.parametrize("soft", [False, True])
def test_softmax_cross_entropy_formula(xp, asxp, tonp, ref, soft, weight, eps, z, cap, reduction):
    rng = rng_for("formula", soft, weight, eps, z, cap)
    logits, targets = masked_problem(rng, soft)
    w = rng.uniform(0.2, 2.0, size=5) if weight else None
    kwargs = {"label_smoothing": eps, "z_loss": z, "softcap": cap, "reduction": reduction}
    if not soft:
        kwargs["ignore_index"] = -100
    expected = ref.softmax_ce(logits, targets, weight=w, **kwargs)
    got = ce.softmax_cross_entropy(asxp(logits), asxp(targets), weight=None if w is None else asxp(w), **kwargs)
    np.testing.assert_allclose(tonp(got), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("soft", [False, True])
def test_reference_agrees_with_torch_where_torch_is_defined(ref, soft):
    """No -inf logits: the transcription equals F.cross_entropy for every option it covers."""
    rng = rng_for("ref-vs-torch", soft)
    logits = rng.normal(scale=3.0, size=(8, 5))
    w = rng.uniform(0.2, 2.0, size=5)
    if soft:
        targets = rng.random((8, 5))
        kwargs = {}
    else:
        targets = rng.integers(0, 5, size=8)
        targets[[0, 3]] = -100
        kwargs = {"ignore_index": -100}
    for eps, reduction in itertools.product([0.0, 0.3, 1.0], ["mean", "sum", "none"]):
        expected = F.cross_entropy(
            torch.from_numpy(logits),
            torch.from_numpy(targets),
            weight=torch.from_numpy(w),
            label_smoothing=eps,
            reduction=reduction,
        ).numpy()
        np.testing.assert_allclose(
            ref.softmax_ce(logits, targets, weight=w, label_smoothing=eps, reduction=reduction, **kwargs),
            expected,
            rtol=1e-12,
            atol=1e-14,
        )


def test_log_loss_formula(xp, asxp, tonp, ref):
    rng = rng_for("log_loss")
    p = rng.dirichlet(np.ones(5), size=8)
    p[0] = [0.0, 0.0, 1.0, 0.0, 0.0]
    y = rng.integers(0, 5, size=8)
    y[[2, 6]] = -100
    w = rng.uniform(0.2, 2.0, size=5)
    t = rng.dirichlet(np.ones(5), size=8)
    for reduction, base in itertools.product(["mean", "sum", "none"], [None, 2]):
        got = ce.log_loss(asxp(p), asxp(y), weight=asxp(w), ignore_index=-100, reduction=reduction, base=base)
        expected = ref.log_loss(p, y, weight=w, ignore_index=-100, reduction=reduction, base=base)
        np.testing.assert_allclose(tonp(got), expected, rtol=1e-10, atol=1e-12)
        got = ce.log_loss(asxp(p), asxp(t), reduction=reduction)
        np.testing.assert_allclose(tonp(got), ref.log_loss(p, t, reduction=reduction), rtol=1e-10, atol=1e-12)
    got = ce.log_loss(asxp(p), asxp(np.where(y < 0, 0, y)), eps=1e-3, reduction="none")
    expected = ref.log_loss(p, np.where(y < 0, 0, y), eps=1e-3, reduction="none")
    np.testing.assert_allclose(tonp(got), expected, rtol=1e-12)


def test_binary_formulas(xp, asxp, tonp, ref):
    rng = rng_for("binary")
    x = rng.normal(scale=3.0, size=(8, 5))
    p = rng.uniform(size=(8, 5))
    y = rng.uniform(size=(8, 5))
    w = rng.uniform(0.5, 2.0, size=(8, 5))
    pw = rng.uniform(0.5, 3.0, size=5)
    for reduction, base in itertools.product(["mean", "sum", "none"], [None, 2]):
        got = ce.binary_cross_entropy_with_logits(
            asxp(x), asxp(y), weight=asxp(w), pos_weight=asxp(pw), label_smoothing=0.1, reduction=reduction, base=base
        )
        expected = ref.bce_with_logits(
            x, y, weight=w, pos_weight=pw, label_smoothing=0.1, reduction=reduction, base=base
        )
        np.testing.assert_allclose(tonp(got), expected, rtol=1e-10, atol=1e-12)
        got = ce.binary_cross_entropy(
            asxp(p), asxp(y), weight=asxp(w), pos_weight=asxp(pw), reduction=reduction, base=base
        )
        expected = ref.bce(p, y, weight=w, pos_weight=pw, reduction=reduction, base=base)
        np.testing.assert_allclose(tonp(got), expected, rtol=1e-10, atol=1e-12)
    got = ce.binary_cross_entropy(asxp(p), asxp(y), eps=1e-2, reduction="none")
    np.testing.assert_allclose(tonp(got), ref.bce(p, y, eps=1e-2, reduction="none"), rtol=1e-12)


def test_information_formulas(xp, asxp, tonp, ref):
    rng = rng_for("info")
    p = rng.dirichlet(np.ones(5) * 0.5, size=8)
    q = rng.dirichlet(np.ones(5), size=8)
    p[0, :2] = 0.0
    p[0] /= p[0].sum()
    q[1, 3] = 0.0  # p > 0 = q: CE and KL are +inf there
    for base in (None, 2, 10):
        np.testing.assert_allclose(tonp(ce.entropy(asxp(p), base=base)), ref.entropy(p, base=base), rtol=1e-12)
        np.testing.assert_allclose(
            tonp(ce.cross_entropy(asxp(p), asxp(q), base=base)), ref.cross_entropy(p, q, base=base), rtol=1e-12
        )
        np.testing.assert_allclose(
            tonp(ce.kl_divergence(asxp(p), asxp(q), base=base)), ref.kl_divergence(p, q, base=base), rtol=1e-12
        )
    assert tonp(ce.cross_entropy(asxp(p), asxp(q)))[1] == np.inf


def test_no_clipping_with_eps_none(xp, asxp, tonp):
    """eps=None clips nothing: a certain right answer costs 0, a certain wrong one +inf, and
    neither raises a floating-point warning (filterwarnings = error)."""
    p = np.array([0.0, 1.0, 0.0, 1.0, 0.25])
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    got = tonp(ce.binary_cross_entropy(asxp(p), asxp(y), eps=None, reduction="none"))
    np.testing.assert_array_equal(got[:4], [0.0, 0.0, np.inf, np.inf])
    np.testing.assert_allclose(got[4], np.log(4), rtol=1e-15)
    probs = np.array([[0.0, 1.0], [1.0, 0.0], [0.25, 0.75]])
    labels = np.array([1, 1, 1])
    got = tonp(ce.log_loss(asxp(probs), asxp(labels), eps=None, reduction="none"))
    np.testing.assert_allclose(got, [0.0, np.inf, -np.log(0.75)], rtol=1e-15)
    soft = tonp(ce.log_loss(asxp(probs), asxp(np.eye(2)[labels]), eps=None, reduction="none"))
    np.testing.assert_array_equal(soft, got)


def test_sample_weight_rows_under_reduction_none(xp, asxp, tonp, ref):
    """reduction="none" with sample weights: each row's loss (z-loss included) times its weight,
    0 on ignored rows; log_loss likewise."""
    rng = rng_for("sw-none")
    logits, labels = masked_problem(rng, soft=False)
    sw = rng.uniform(0.0, 2.0, size=8)
    kwargs = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "none"}
    got = ce.softmax_cross_entropy(asxp(logits), asxp(labels), sample_weight=asxp(sw), **kwargs)
    np.testing.assert_allclose(tonp(got), sw * ref.softmax_ce(logits, labels, **kwargs), rtol=1e-12)
    p = rng.dirichlet(np.ones(5), size=8)
    got = ce.log_loss(asxp(p), asxp(labels), sample_weight=asxp(sw), ignore_index=-100, reduction="none")
    expected = sw * ref.log_loss(p, labels, ignore_index=-100, reduction="none")
    np.testing.assert_allclose(tonp(got), expected, rtol=1e-12)
