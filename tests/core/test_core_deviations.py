"""DESIGN.md's documented deviations from PyTorch, each shown side by side: what PyTorch gives,
what crossent gives, and (for the gradient) that crossent's is zero or finite as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce

NEG_INF = -np.inf


def torch_ce(logits, targets, **kwargs):
    x = torch.from_numpy(np.array(logits, dtype=np.float64)).requires_grad_(True)
    loss = F.cross_entropy(x, torch.from_numpy(np.asarray(targets)), **kwargs)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach().numpy(), g.numpy()


# 1. A mean whose denominator is zero is 0 with a zero gradient (PyTorch: NaN).


def test_all_targets_ignored_mean_is_zero(xp, asxp, tonp):
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    labels = np.array([-100, -100])
    torch_loss, torch_grad = torch_ce(logits, labels, ignore_index=-100)
    assert np.isnan(torch_loss)
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels), ignore_index=-100)
    assert float(tonp(loss)) == 0.0
    assert np.all(tonp(grad) == 0.0)
    assert (
        float(
            tonp(
                ce.softmax_cross_entropy(
                    asxp(logits), asxp(labels), ignore_index=-100, label_smoothing=0.1, z_loss=1e-2
                )
            )
        )
        == 0.0
    )


def test_empty_batch_mean_is_zero(xp, asxp, tonp):
    logits = np.zeros((0, 4))
    labels = np.zeros((0,), dtype=np.int64)
    torch_loss, _ = torch_ce(logits, labels)
    assert np.isnan(torch_loss)
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels))
    assert float(tonp(loss)) == 0.0
    assert tuple(grad.shape) == (0, 4)
    soft = ce.softmax_cross_entropy(asxp(logits), asxp(np.zeros((0, 4))))
    assert float(tonp(soft)) == 0.0
    assert tuple(ce.softmax_cross_entropy(asxp(logits), asxp(labels), reduction="none").shape) == (0,)
    assert float(tonp(ce.softmax_cross_entropy(asxp(logits), asxp(labels), reduction="sum"))) == 0.0


def test_zero_total_class_weight_mean_is_zero(xp, asxp, tonp):
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    labels = np.array([0, 0])
    weight = np.array([0.0, 1.0, 1.0])
    torch_loss, _ = torch_ce(logits, labels, weight=torch.from_numpy(weight))
    assert np.isnan(torch_loss)
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels), weight=asxp(weight))
    assert float(tonp(loss)) == 0.0
    assert np.all(tonp(grad) == 0.0)


def test_binary_cross_entropy_empty_batch_mean_is_zero(xp, asxp, tonp):
    empty = np.zeros((0,))
    torch_loss = F.binary_cross_entropy_with_logits(
        torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    )
    assert torch.isnan(torch_loss)
    assert torch.isnan(F.binary_cross_entropy(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)))
    loss, grad = ce.binary_cross_entropy_with_logits_and_grad(asxp(empty), asxp(empty))
    assert float(tonp(loss)) == 0.0
    assert tuple(grad.shape) == (0,)
    assert float(tonp(ce.binary_cross_entropy_with_logits(asxp(empty), asxp(empty)))) == 0.0
    assert float(tonp(ce.binary_cross_entropy(asxp(empty), asxp(empty)))) == 0.0


def test_log_loss_all_ignored_mean_is_zero(xp, asxp, tonp):
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    labels = np.array([-100, -100])
    torch_loss = F.nll_loss(torch.log(torch.from_numpy(probs)), torch.from_numpy(labels))
    assert torch.isnan(torch_loss)
    assert float(tonp(ce.log_loss(asxp(probs), asxp(labels), ignore_index=-100))) == 0.0


def test_zero_classes_follow_torch_for_sum_and_none(xp, asxp, tonp):
    """C = 0: "sum" and "none" as PyTorch (soft targets over no classes cost 0), "mean" 0."""
    logits = np.zeros((3, 0))
    targets = np.zeros((3, 0))
    for reduction in ["sum", "none"]:
        expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets), reduction=reduction).numpy()
        got = ce.softmax_cross_entropy(asxp(logits), asxp(targets), reduction=reduction)
        np.testing.assert_array_equal(tonp(got), expected)
    assert float(tonp(ce.softmax_cross_entropy(asxp(logits), asxp(targets)))) == 0.0


# 2. Label smoothing gives eps / K to each of the K classes with a finite logit in that row
#    (PyTorch gives inf as soon as any logit is -inf).


@pytest.mark.parametrize("soft", [False, True])
def test_label_smoothing_spreads_over_finite_classes_only(xp, asxp, tonp, soft, ref):
    logits = np.array([[2.0, NEG_INF, 0.5, -1.0, NEG_INF], [0.1, 0.2, 0.3, 0.4, 0.5]])
    labels = np.array([0, 3])
    targets = np.eye(5)[labels] if soft else labels
    eps = 0.2
    torch_loss, _ = torch_ce(logits, targets, label_smoothing=eps, reduction="none")
    assert torch_loss[0] == np.inf and np.isfinite(torch_loss[1])
    # Row 0 has K = 3 finite classes: (1 - eps) (-log q_0) + eps / 3 sum_{c finite} (-log q_c).
    finite = np.array([0, 2, 3])
    logq = logits[0, finite] - np.log(np.exp(logits[0, finite]).sum())
    row0 = (1 - eps) * -logq[0] + eps / 3 * -logq.sum()
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(targets), label_smoothing=eps, reduction="sum")
    got = tonp(ce.softmax_cross_entropy(asxp(logits), asxp(targets), label_smoothing=eps, reduction="none"))
    np.testing.assert_allclose(got, [row0, torch_loss[1]], rtol=1e-12)
    np.testing.assert_allclose(got, ref.softmax_ce(logits, targets, label_smoothing=eps, reduction="none"), rtol=1e-12)
    g = tonp(grad)
    assert np.all(np.isfinite(g))
    assert np.all(g[0, [1, 4]] == 0.0)
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-12)


# 3. -inf logits mask classes: a zero target there costs 0 with zero gradient (PyTorch and plain
#    optax: NaN for soft targets); a positive target on a -inf logit gives +inf.


def test_masked_class_with_zero_target_contributes_nothing(xp, asxp, tonp):
    logits = np.array([[1.0, NEG_INF, 0.0], [NEG_INF, 2.0, 1.0]])
    targets = np.array([[0.3, 0.0, 0.7], [0.0, 0.5, 0.5]])
    torch_loss, _ = torch_ce(logits, targets, reduction="none")
    assert np.all(np.isnan(torch_loss))
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(targets), reduction="sum")
    finite = [np.array([1.0, 0.0]), np.array([2.0, 1.0])]
    t = [np.array([0.3, 0.7]), np.array([0.5, 0.5])]
    expected = sum(-(ti * (li - np.log(np.exp(li).sum()))).sum() for li, ti in zip(finite, t, strict=True))
    np.testing.assert_allclose(float(tonp(loss)), expected, rtol=1e-12)
    g = tonp(grad)
    assert np.all(np.isfinite(g))
    assert g[0, 1] == 0.0 and g[1, 0] == 0.0


def test_integer_label_with_minus_inf_elsewhere_is_finite_like_torch(xp, asxp, tonp):
    logits = np.array([[1.0, NEG_INF, 0.0, NEG_INF]])
    labels = np.array([2])
    torch_loss, torch_grad = torch_ce(logits, labels)
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels))
    np.testing.assert_allclose(float(tonp(loss)), torch_loss, rtol=1e-12)
    np.testing.assert_allclose(tonp(grad), torch_grad, rtol=1e-12, atol=0)


def test_positive_target_on_minus_inf_logit_is_inf(xp, asxp, tonp, ref):
    logits = np.array([[1.0, NEG_INF, 0.0], [0.0, 1.0, 2.0]])
    soft = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    torch_soft, _ = torch_ce(logits, soft, reduction="none")
    assert torch_soft[0] == np.inf  # PyTorch agrees here: target mass on a masked class
    got = tonp(ce.softmax_cross_entropy(asxp(logits), asxp(soft), reduction="none"))
    assert got[0] == np.inf
    np.testing.assert_allclose(got[1], ref.softmax_ce(logits, soft, reduction="none")[1], rtol=1e-12)
    labels = np.array([1, 0])
    torch_hard, _ = torch_ce(logits, labels, reduction="none")
    hard = tonp(ce.softmax_cross_entropy(asxp(logits), asxp(labels), reduction="none"))
    assert torch_hard[0] == np.inf and hard[0] == np.inf
    np.testing.assert_allclose(hard[1], torch_hard[1], rtol=1e-12)


def test_ignored_row_contributes_zero_whatever_its_logits(xp, asxp, tonp):
    logits = np.array([[np.nan, NEG_INF, np.inf], [NEG_INF, NEG_INF, NEG_INF], [1.0, 2.0, 3.0]])
    labels = np.array([-100, -100, 1])
    expected = F.cross_entropy(torch.from_numpy(logits[2:]), torch.from_numpy(labels[2:])).item()
    # softcap: the cap's derivative is NaN at the NaN logit; the row's gradient is still 0.
    for kwargs in [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-2}, {"softcap": 5.0}, {"softcap": 5.0, "z_loss": 1e-2}]:
        loss, grad = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels), ignore_index=-100, **kwargs)
        none = tonp(ce.softmax_cross_entropy(asxp(logits), asxp(labels), ignore_index=-100, reduction="none", **kwargs))
        assert np.all(none[:2] == 0.0)
        assert np.all(tonp(grad)[:2] == 0.0)
        if not kwargs:
            np.testing.assert_allclose(float(tonp(loss)), expected, rtol=1e-12)


def test_kl_divergence_zero_p_on_zero_q_is_zero_where_torch_gives_nan(xp, asxp, tonp):
    p = np.array([[0.5, 0.5, 0.0]])
    q = np.array([[0.25, 0.75, 0.0]])
    torch_kl = F.kl_div(torch.log(torch.from_numpy(q)), torch.from_numpy(p), reduction="none")
    assert torch.isnan(torch_kl.sum())
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    np.testing.assert_allclose(tonp(ce.kl_divergence(asxp(p), asxp(q))), [expected], rtol=1e-12)


# 4. NaN in logits propagates (as in every peer).


def test_nan_logits_propagate(xp, asxp, tonp):
    logits = np.array([[1.0, np.nan, 0.0], [1.0, 2.0, 3.0]])
    labels = np.array([0, 1])
    assert np.isnan(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item())
    assert np.isnan(float(tonp(ce.softmax_cross_entropy(asxp(logits), asxp(labels)))))
    x = np.array([np.nan, 1.0])
    y = np.zeros(2)
    assert np.isnan(float(tonp(ce.binary_cross_entropy_with_logits(asxp(x), asxp(y)))))


# 5. BCE with logits: an infinite logit on the side its target excludes contributes 0.


def test_bce_with_logits_infinite_logit_on_the_excluded_side_is_zero_where_torch_gives_nan(xp, asxp, tonp):
    """t = 0 with x = -inf (and t = 1 with x = +inf) is a certain, correct prediction: loss 0 and
    gradient 0 (0 * softplus(+-inf) = 0); PyTorch computes 0 * inf = NaN there. A target on the
    side an infinite logit excludes (t = 1, x = -inf) costs +inf (PyTorch: NaN too)."""
    x = np.array([-np.inf, np.inf, -np.inf, 0.5])
    t = np.array([0.0, 1.0, 1.0, 1.0])
    xt = torch.from_numpy(x).requires_grad_(True)
    torch_loss = F.binary_cross_entropy_with_logits(xt, torch.from_numpy(t), reduction="none")
    assert torch.isnan(torch_loss[:3]).all()
    loss = tonp(ce.binary_cross_entropy_with_logits(asxp(x), asxp(t), reduction="none"))
    np.testing.assert_array_equal(loss[:3], [0.0, 0.0, np.inf])
    np.testing.assert_allclose(loss[3], torch_loss[3].item(), rtol=1e-12)
    _, grad = ce.binary_cross_entropy_with_logits_and_grad(asxp(x[:2]), asxp(t[:2]), reduction="sum")
    np.testing.assert_array_equal(tonp(grad), [0.0, 0.0])


def test_bce_with_logits_plus_inf_logit_on_a_zero_target_is_inf_as_in_torch(xp, asxp, tonp):
    """The other included side (t = 0, x = +inf) is +inf in PyTorch too (README said NaN)."""
    torch_loss = F.binary_cross_entropy_with_logits(torch.tensor([np.inf], dtype=torch.float64),
                                                    torch.tensor([0.0], dtype=torch.float64))
    assert torch_loss.item() == np.inf
    assert tonp(ce.binary_cross_entropy_with_logits(asxp(np.array([np.inf])), asxp(np.array([0.0])))) == np.inf


def test_bce_from_probabilities_clips_at_eps_where_torch_clamps_the_log_at_minus_100(xp, asxp, tonp):
    """ce.binary_cross_entropy clips p to [eps, 1 - eps] by default (eps="auto": finfo of the
    probabilities' dtype, as scikit-learn does), so a float64 p = 1e-20 on the true class costs
    -log(2.2e-16) = 36.04 where F.binary_cross_entropy (log clamped at -100) gives 46.05 and p = 0
    gives 100. eps=None: the exact 46.05, and inf at p = 0."""
    p, t = np.array([1e-20, 0.3, 0.0]), np.ones(3)
    torch_loss = F.binary_cross_entropy(torch.from_numpy(p), torch.from_numpy(t), reduction="none").numpy()
    np.testing.assert_allclose(torch_loss, [-np.log(1e-20), -np.log(0.3), 100.0], rtol=1e-12)
    clipped = tonp(ce.binary_cross_entropy(asxp(p), asxp(t), reduction="none"))
    eps = np.finfo(np.float64).eps
    np.testing.assert_allclose(clipped, [-np.log(eps), -np.log(0.3), -np.log(eps)], rtol=1e-12)
    exact = tonp(ce.binary_cross_entropy(asxp(p), asxp(t), eps=None, reduction="none"))
    np.testing.assert_allclose(exact[:2], torch_loss[:2], rtol=1e-12)
    assert exact[2] == np.inf
