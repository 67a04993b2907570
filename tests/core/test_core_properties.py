"""Hypothesis properties of the core losses (STYLE.md item 9), on every array backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import crossent as ce

# Examples per backend: jax compiles every primitive for each new shape (seconds per example), so
# it runs a smoke check only; the properties are exercised in depth on numpy.
EXAMPLES = {"numpy": 40, "array_api_strict": 12, "torch": 12, "jax.numpy": 1}


def run(xp, body, *strategies):
    """Run ``body`` as a Hypothesis test with this backend's example budget."""
    test = settings(
        max_examples=EXAMPLES.get(xp.__name__, 10),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )(given(*strategies)(body))
    test()


def close(a, b, rtol=1e-9, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


finite = st.floats(-30.0, 30.0, allow_nan=False, width=64)


@st.composite
def problems(draw, min_rows=1, max_rows=6, max_classes=6):
    """(logits (N, C), labels (N,), class weights (C,))."""
    n = draw(st.integers(min_rows, max_rows))
    c = draw(st.integers(1, max_classes))
    logits = draw(hnp.arrays(np.float64, (n, c), elements=finite))
    labels = np.asarray(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=np.int64)
    weight = draw(hnp.arrays(np.float64, (c,), elements=st.floats(0.1, 3.0)))
    return logits, labels, weight


@st.composite
def distributions(draw, shape):
    raw = draw(hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0)))
    raw[..., 0] += 1e-3  # no all-zero row
    return raw / raw.sum(-1, keepdims=True)


smoothing = st.sampled_from([0.0, 0.1, 0.5])
reductions = st.sampled_from(["mean", "sum", "none"])


def test_integer_labels_equal_one_hot_targets(xp, asxp, tonp):
    def body(problem, eps, reduction, weighted):
        logits, labels, weight = problem
        w = asxp(weight) if weighted else None
        if weighted and reduction == "mean":
            reduction = "sum"  # weighted means differ by design: sum of w_y vs N rows
        one_hot = np.eye(logits.shape[1])[labels]
        hard = ce.softmax_cross_entropy(asxp(logits), asxp(labels), weight=w, label_smoothing=eps, reduction=reduction)
        soft = ce.softmax_cross_entropy(asxp(logits), asxp(one_hot), weight=w, label_smoothing=eps, reduction=reduction)
        close(tonp(hard), tonp(soft))
        _, g_hard = ce.softmax_cross_entropy_and_grad(
            asxp(logits), asxp(labels), weight=w, label_smoothing=eps, reduction=reduction
        )
        _, g_soft = ce.softmax_cross_entropy_and_grad(
            asxp(logits), asxp(one_hot), weight=w, label_smoothing=eps, reduction=reduction
        )
        close(tonp(g_hard), tonp(g_soft))

    run(xp, body, problems(), smoothing, reductions, st.booleans())


def test_ignore_index_equals_removing_the_rows(xp, asxp, tonp):
    def body(problem, drop, eps, z, reduction):
        logits, labels, weight = problem
        drop = np.asarray(drop[: len(labels)] + [False] * len(labels))[: len(labels)]
        marked = np.where(drop, -100, labels)
        kwargs = {"weight": asxp(weight), "label_smoothing": eps, "z_loss": z}
        if reduction == "none":
            kwargs["reduction"] = "none"
        full, g_full = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(marked), ignore_index=-100, **kwargs)
        kept, g_kept = ce.softmax_cross_entropy_and_grad(asxp(logits[~drop]), asxp(labels[~drop]), **kwargs)
        if reduction == "none":
            close(tonp(full)[~drop], tonp(kept))
            assert np.all(tonp(full)[drop] == 0.0)
        else:
            close(tonp(full), tonp(kept))
        close(tonp(g_full)[~drop], tonp(g_kept))
        assert np.all(tonp(g_full)[drop] == 0.0)

    run(
        xp,
        body,
        problems(),
        st.lists(st.booleans(), max_size=6),
        smoothing,
        st.sampled_from([0.0, 1e-3]),
        st.sampled_from(["mean", "none"]),
    )


def test_axis_k_equals_moveaxis(xp, asxp, tonp):
    def body(data, k, soft, reduction):
        shape = data.draw(st.tuples(*[st.integers(1, 4)] * 3))
        logits = data.draw(hnp.arrays(np.float64, shape, elements=finite))
        moved = np.moveaxis(logits, k, -1)
        if soft:
            t_last = data.draw(distributions(moved.shape))
            targets, targets_last = np.moveaxis(t_last, -1, k), t_last
        else:
            targets = data.draw(hnp.arrays(np.int64, moved.shape[:-1], elements=st.integers(0, shape[k] - 1)))
            targets_last = targets
        got = ce.softmax_cross_entropy(asxp(logits), asxp(targets), axis=k, reduction=reduction, label_smoothing=0.1)
        want = ce.softmax_cross_entropy(asxp(moved), asxp(targets_last), reduction=reduction, label_smoothing=0.1)
        close(tonp(got), tonp(want))
        _, g = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(targets), axis=k)
        _, g_last = ce.softmax_cross_entropy_and_grad(asxp(moved), asxp(targets_last))
        close(tonp(g), np.moveaxis(tonp(g_last), -1, k))
        p = data.draw(distributions(moved.shape))
        q = data.draw(distributions(moved.shape))
        for f in (ce.entropy, ce.cross_entropy, ce.kl_divergence):
            args = (p,) if f is ce.entropy else (p, q)
            close(tonp(f(*[asxp(np.moveaxis(a, -1, k)) for a in args], axis=k)), tonp(f(*[asxp(a) for a in args])))

    run(xp, body, st.data(), st.integers(0, 2), st.booleans(), reductions)


def test_information_inequalities(xp, asxp, tonp):
    """CE >= H (Gibbs), KL >= 0, KL = CE - H."""

    def body(data):
        shape = data.draw(st.tuples(st.integers(1, 5), st.integers(1, 6)))
        p = data.draw(distributions(shape))
        q = data.draw(distributions(shape))
        q = np.where(q == 0, 1e-12, q)
        q /= q.sum(-1, keepdims=True)
        h = tonp(ce.entropy(asxp(p)))
        cross = tonp(ce.cross_entropy(asxp(p), asxp(q)))
        kl = tonp(ce.kl_divergence(asxp(p), asxp(q)))
        assert np.all(cross >= h - 1e-12)
        assert np.all(kl >= -1e-12)
        close(kl, cross - h, atol=1e-9)
        close(tonp(ce.kl_divergence(asxp(p), asxp(p))), np.zeros(shape[0]), atol=1e-12)

    run(xp, body, st.data())


def test_adding_a_constant_to_the_logits_changes_nothing(xp, asxp, tonp):
    def body(problem, shift, eps, reduction, masked):
        logits, labels, weight = problem
        if masked and logits.shape[1] > 1:
            other = (labels + 1) % logits.shape[1]
            logits = logits.copy()
            logits[np.arange(len(labels)), other] = -np.inf
        shifts = np.asarray(shift[: len(labels)] + [0.0] * len(labels))[: len(labels), None]
        kwargs = {"weight": asxp(weight), "label_smoothing": eps, "reduction": reduction}
        base, g = ce.softmax_cross_entropy_and_grad(asxp(logits), asxp(labels), **kwargs)
        moved, g_moved = ce.softmax_cross_entropy_and_grad(asxp(logits + shifts), asxp(labels), **kwargs)
        close(tonp(moved), tonp(base), rtol=1e-9, atol=1e-8)
        close(tonp(g_moved), tonp(g), rtol=1e-9, atol=1e-9)

    run(xp, body, problems(), st.lists(st.floats(-1e3, 1e3), max_size=6), smoothing, reductions, st.booleans())


def test_gradients_are_finite_under_minus_inf_masks(xp, asxp, tonp):
    def body(data, eps, soft):
        logits, labels, weight = data.draw(problems())
        n, c = logits.shape
        mask = data.draw(hnp.arrays(np.bool_, (n, c)))
        mask[np.arange(n), labels] = False  # the target class stays visible
        logits = np.where(mask, -np.inf, logits)
        if soft:
            t = data.draw(distributions((n, c)))
            t = np.where(mask, 0.0, t)
            t[np.arange(n), labels] += 0.1
            targets = t / t.sum(-1, keepdims=True)
        else:
            targets = labels
        loss, grad = ce.softmax_cross_entropy_and_grad(
            asxp(logits), asxp(targets), weight=asxp(weight), label_smoothing=eps, z_loss=1e-3
        )
        g = tonp(grad)
        assert np.isfinite(float(tonp(loss)))
        assert np.all(np.isfinite(g))
        assert np.all(g[mask] == 0.0)

    run(xp, body, st.data(), smoothing, st.booleans())


def test_sample_weight_counts_equal_repeated_rows(xp, asxp, tonp):
    """An integer sample weight k on a row is the same as that row appearing k times."""

    def body(problem, counts, reduction):
        logits, labels, weight = problem
        counts = np.asarray(counts[: len(labels)] + [1] * len(labels))[: len(labels)]
        if counts.sum() == 0:
            counts[0] = 1
        kwargs = {"weight": asxp(weight), "label_smoothing": 0.1, "reduction": reduction}
        weighted = ce.softmax_cross_entropy(
            asxp(logits), asxp(labels), sample_weight=asxp(counts.astype(np.float64)), **kwargs
        )
        repeated = ce.softmax_cross_entropy(
            asxp(np.repeat(logits, counts, axis=0)), asxp(np.repeat(labels, counts)), **kwargs
        )
        close(tonp(weighted), tonp(repeated))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        weighted = ce.log_loss(
            asxp(probs),
            asxp(labels),
            normalize=True,
            sample_weight=asxp(counts.astype(np.float64)),
            reduction=reduction,
        )
        repeated = ce.log_loss(
            asxp(np.repeat(probs, counts, axis=0)), asxp(np.repeat(labels, counts)), normalize=True, reduction=reduction
        )
        close(tonp(weighted), tonp(repeated))

    run(xp, body, problems(), st.lists(st.integers(0, 3), max_size=6), st.sampled_from(["mean", "sum"]))


@pytest.mark.parametrize("f", ["binary_cross_entropy_with_logits", "binary_cross_entropy"])
def test_binary_equals_two_class_softmax(xp, asxp, tonp, f):
    """BCE of logit x is the softmax CE of logits (0, x); BCE of p is log_loss of (1 - p, p)."""

    def body(data):
        n = data.draw(st.integers(1, 8))
        x = data.draw(hnp.arrays(np.float64, (n,), elements=finite))
        y = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 1)))
        two = np.stack([np.zeros(n), x], axis=-1)
        if f == "binary_cross_entropy_with_logits":
            got = ce.binary_cross_entropy_with_logits(asxp(x), asxp(y.astype(np.float64)))
            want = ce.softmax_cross_entropy(asxp(two), asxp(y))
        else:
            p = 1 / (1 + np.exp(-np.clip(x, -5, 5)))
            got = ce.binary_cross_entropy(asxp(p), asxp(y.astype(np.float64)))
            want = ce.log_loss(asxp(np.stack([1 - p, p], axis=-1)), asxp(y))
        close(tonp(got), tonp(want))

    run(xp, body, st.data())
