"""Every bad input DESIGN.md lists gets a ValueError/TypeError whose message names the argument
(and, where it is a scalar, shows what came); the inputs just inside the limits are accepted."""

from __future__ import annotations

import numpy as np
import pytest

import crossent as ce

BAD = (ValueError, TypeError)
NAN = np.nan


@pytest.fixture
def problem(asxp):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5))
    labels = np.array([0, 4, 2, 1])
    return asxp(logits), asxp(labels), logits, labels


# softmax_cross_entropy (and its _and_grad, which validates the same way)

LOSSES = [ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad]


@pytest.mark.parametrize("f", LOSSES)
@pytest.mark.parametrize("bad", [5, 7])
def test_label_out_of_range(xp, asxp, problem, f, bad):
    x, _, _, labels = problem
    labels = labels.copy()
    labels[1] = bad
    with pytest.raises(BAD, match="targets") as info:
        f(x, asxp(labels))
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("f", LOSSES)
@pytest.mark.parametrize("ignore_index", [None, -100])
def test_negative_label_other_than_ignore_index(xp, asxp, problem, f, ignore_index):
    x, _, _, labels = problem
    labels = labels.copy()
    labels[2] = -1
    with pytest.raises(BAD, match="targets"):
        f(x, asxp(labels), ignore_index=ignore_index)
    labels[2] = -100  # -100 is only special when it is the ignore_index
    if ignore_index is None:
        with pytest.raises(BAD, match="targets"):
            f(x, asxp(labels))
    else:
        f(x, asxp(labels), ignore_index=ignore_index)


@pytest.mark.parametrize("f", LOSSES)
def test_target_shape_mismatch(xp, asxp, problem, f):
    x, _, logits, _ = problem
    with pytest.raises(BAD, match="targets"):
        f(x, asxp(np.array([0, 1, 2])))
    with pytest.raises(BAD, match="targets"):
        f(x, asxp(np.full((4, 4), 0.25)))
    with pytest.raises(BAD, match="targets"):
        f(x, asxp(np.zeros((4, 5), dtype=np.int64)))


@pytest.mark.parametrize("f", LOSSES)
def test_nan_in_soft_targets(xp, asxp, problem, f):
    x, _, _, _ = problem
    t = np.full((4, 5), 0.2)
    t[3, 1] = NAN
    with pytest.raises(BAD, match="targets"):
        f(x, asxp(t))


@pytest.mark.parametrize("f", LOSSES)
def test_class_weight_of_wrong_length_or_nan(xp, asxp, problem, f):
    x, y, _, _ = problem
    with pytest.raises(BAD, match=r"\bweight\b"):
        f(x, y, weight=asxp(np.ones(4)))
    with pytest.raises(BAD, match=r"\bweight\b"):
        f(x, y, weight=asxp(np.array([1.0, NAN, 1.0, 1.0, 1.0])))


@pytest.mark.parametrize("f", LOSSES)
def test_sample_weight_of_wrong_shape_or_nan(xp, asxp, problem, f):
    x, y, _, _ = problem
    with pytest.raises(BAD, match="sample_weight"):
        f(x, y, sample_weight=asxp(np.ones(5)))
    with pytest.raises(BAD, match="sample_weight"):
        f(x, y, sample_weight=asxp(np.array([1.0, 1.0, NAN, 1.0])))


@pytest.mark.parametrize("f", LOSSES)
@pytest.mark.parametrize("eps", [-0.1, 1.5, NAN])
def test_label_smoothing_outside_unit_interval(xp, problem, f, eps):
    x, y, _, _ = problem
    with pytest.raises(BAD, match="label_smoothing") as info:
        f(x, y, label_smoothing=eps)
    assert str(eps) in str(info.value)


@pytest.mark.parametrize("f", LOSSES)
def test_label_smoothing_limits_are_accepted(xp, problem, tonp, f):
    x, y, _, _ = problem
    for eps in (0.0, 1.0):
        out = f(x, y, label_smoothing=eps)
        loss = out[0] if isinstance(out, tuple) else out
        assert np.isfinite(float(tonp(loss)))


@pytest.mark.parametrize("f", LOSSES)
def test_unknown_reduction(xp, problem, f):
    x, y, _, _ = problem
    with pytest.raises(BAD, match="reduction") as info:
        f(x, y, reduction="avg")
    assert "avg" in str(info.value)


@pytest.mark.parametrize("f", LOSSES)
def test_z_loss_together_with_base(xp, problem, f):
    x, y, _, _ = problem
    with pytest.raises(ValueError, match="z_loss"):
        f(x, y, z_loss=1e-4, base=2)


# log_loss


def test_log_loss_probabilities_outside_unit_interval_or_nan(xp, asxp):
    y = asxp(np.array([0, 1]))
    for bad in (1.25, -0.25, NAN):
        p = np.array([[0.5, 0.5], [bad, 1.0 - bad]])
        with pytest.raises(BAD, match="probs"):
            ce.log_loss(asxp(p), y)


def test_log_loss_labels_out_of_range_and_shape(xp, asxp):
    p = asxp(np.array([[0.5, 0.5], [0.3, 0.7]]))
    with pytest.raises(BAD, match="targets"):
        ce.log_loss(p, asxp(np.array([0, 2])))
    with pytest.raises(BAD, match="targets"):
        ce.log_loss(p, asxp(np.array([0, -1])))
    with pytest.raises(BAD, match="targets"):
        ce.log_loss(p, asxp(np.array([0, 1, 1])))
    with pytest.raises(BAD, match="reduction"):
        ce.log_loss(p, asxp(np.array([0, 1])), reduction="avg")
    with pytest.raises(BAD, match=r"\bweight\b"):
        ce.log_loss(p, asxp(np.array([0, 1])), weight=asxp(np.ones(3)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_log_loss_rows_must_sum_to_one_within_sqrt_eps(xp, asxp, tonp, ref, dtype):
    """Rows off by 10 sqrt(eps) raise (naming normalize=True as the way out); rows off by
    sqrt(eps) / 10 pass untouched; normalize=True renormalizes."""
    tol = np.sqrt(np.finfo(dtype).eps)
    y = np.array([0, 1, 2])
    good = np.array([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    off = good.copy()
    off[1] *= 1 + 10 * tol
    with pytest.raises(ValueError, match="normalize") as info:
        ce.log_loss(asxp(off.astype(dtype)), asxp(y))
    assert "probs" in str(info.value)
    near = good.copy()
    near[1] *= 1 + tol / 10
    got = ce.log_loss(asxp(near.astype(dtype)), asxp(y), reduction="none")
    np.testing.assert_allclose(
        tonp(got), ref.log_loss(near.astype(dtype), y, reduction="none"), rtol=1e-6 if dtype == np.float32 else 1e-12
    )
    scaled = good * np.array([[1.0], [0.9], [0.4]])
    got = ce.log_loss(asxp(scaled.astype(dtype)), asxp(y), normalize=True, reduction="none")
    np.testing.assert_allclose(
        tonp(got), ref.log_loss(good, y, reduction="none"), rtol=1e-6 if dtype == np.float32 else 1e-12
    )


# binary cross-entropy


def test_binary_cross_entropy_bad_inputs(xp, asxp):
    p = np.array([0.2, 0.7, 0.5])
    y = np.array([0.0, 1.0, 1.0])
    for bad in (1.5, -0.5, NAN):
        with pytest.raises(BAD, match="probs"):
            ce.binary_cross_entropy(asxp(np.array([0.2, bad, 0.5])), asxp(y))
    with pytest.raises(BAD, match="targets"):
        ce.binary_cross_entropy(asxp(p), asxp(np.array([0.0, NAN, 1.0])))
    with pytest.raises(BAD, match="targets"):
        ce.binary_cross_entropy(asxp(p), asxp(np.array([0.0, 1.0])))
    with pytest.raises(BAD, match=r"\bweight\b"):
        ce.binary_cross_entropy(asxp(p), asxp(y), weight=asxp(np.array([1.0, NAN, 1.0])))
    with pytest.raises(BAD, match="pos_weight"):
        ce.binary_cross_entropy(asxp(p), asxp(y), pos_weight=asxp(np.array([NAN])))
    with pytest.raises(BAD, match="reduction"):
        ce.binary_cross_entropy(asxp(p), asxp(y), reduction="mean ")


BCE_LOGITS = [ce.binary_cross_entropy_with_logits, ce.binary_cross_entropy_with_logits_and_grad]


@pytest.mark.parametrize("f", BCE_LOGITS)
def test_binary_cross_entropy_with_logits_bad_inputs(xp, asxp, f):
    x = asxp(np.array([[0.2, -3.0], [1.0, 4.0]]))
    y = np.array([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(BAD, match="targets"):
        f(x, asxp(np.array([[0.0, NAN], [1.0, 0.0]])))
    with pytest.raises(BAD, match="targets"):
        f(x, asxp(np.zeros((2, 3))))
    with pytest.raises(BAD, match=r"\bweight\b"):
        f(x, asxp(y), weight=asxp(np.array([NAN, 1.0])))
    with pytest.raises(BAD, match=r"\bweight\b"):
        f(x, asxp(y), weight=asxp(np.ones((3, 1))))
    with pytest.raises(BAD, match="pos_weight"):
        f(x, asxp(y), pos_weight=asxp(np.array([1.0, NAN])))
    for eps in (-0.5, 2.0):
        with pytest.raises(BAD, match="label_smoothing"):
            f(x, asxp(y), label_smoothing=eps)
    with pytest.raises(BAD, match="reduction"):
        f(x, asxp(y), reduction="elementwise")


def test_binary_targets_outside_unit_interval_are_used_as_given(xp, asxp, tonp, ref):
    """As in PyTorch, BCE-with-logits targets are not validated (only NaN is an error)."""
    x = np.array([0.3, -1.2, 2.0])
    y = np.array([1.5, -0.5, 0.25])
    got = ce.binary_cross_entropy_with_logits(asxp(x), asxp(y), reduction="none")
    np.testing.assert_allclose(tonp(got), ref.bce_with_logits(x, y, reduction="none"), rtol=1e-12)


# entropy, cross_entropy, kl_divergence


@pytest.mark.parametrize("bad", [1.5, -0.5, NAN])
def test_distribution_functions_reject_bad_probabilities(xp, asxp, bad):
    good = np.array([[0.5, 0.5], [0.25, 0.75]])
    broken = good.copy()
    broken[1, 0] = bad
    with pytest.raises(BAD, match=r"\bp\b"):
        ce.entropy(asxp(broken))
    for f in (ce.cross_entropy, ce.kl_divergence):
        with pytest.raises(BAD, match=r"\bp\b"):
            f(asxp(broken), asxp(good))
        with pytest.raises(BAD, match=r"\bq\b"):
            f(asxp(good), asxp(broken))


def test_distribution_functions_reject_shape_mismatch(xp, asxp):
    p = asxp(np.array([[0.5, 0.5], [0.25, 0.75]]))
    q = asxp(np.array([[0.2, 0.3, 0.5]]))
    for f in (ce.cross_entropy, ce.kl_divergence):
        with pytest.raises(BAD, match=r"\bq\b"):
            f(p, q)


def test_soft_targets_and_negative_class_weights_are_not_validated(xp, asxp, tonp, ref):
    """DESIGN.md: soft targets need not lie in [0, 1] or sum to 1; class weights may be any
    finite reals, negative too."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 3))
    t = rng.normal(size=(5, 3))
    w = np.array([1.0, -0.5, 2.0])
    for reduction in ("mean", "sum", "none"):
        got = ce.softmax_cross_entropy(asxp(logits), asxp(t), weight=asxp(w), reduction=reduction)
        np.testing.assert_allclose(tonp(got), ref.softmax_ce(logits, t, weight=w, reduction=reduction), rtol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"base": 1}, "base"),
        ({"base": -2.0}, "base"),
        ({"base": "bits"}, "base"),
        ({"z_loss": -1e-4}, "z_loss"),
        ({"softcap": 0.0}, "softcap"),
        ({"softcap": -5.0}, "softcap"),
        ({"axis": 2}, "axis"),
    ],
)
def test_bad_scalar_options_are_named(problem, kwargs, name):
    x, y, _, _ = problem
    for f in LOSSES:
        with pytest.raises(BAD, match=name):
            f(x, y, **kwargs)


def test_log_loss_eps_outside_its_range_is_named(xp, asxp):
    p = asxp(np.array([[0.5, 0.5], [0.3, 0.7]]))
    y = asxp(np.array([0, 1]))
    for eps in (0.7, -1e-3, "tiny"):
        with pytest.raises(BAD, match="eps"):
            ce.log_loss(p, y, eps=eps)
        with pytest.raises(BAD, match="eps"):
            ce.binary_cross_entropy(p, asxp(np.array([[0.0, 1.0], [1.0, 0.0]])), eps=eps)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_log_loss_row_sum_tolerance_is_that_of_the_input_dtype(dtype_name):
    """DESIGN.md: rows must sum to 1 within sqrt(finfo(dtype).eps) of the probabilities' own
    dtype. A softmax rounded to bfloat16 is off by ~1e-3 (beyond float32's 3.5e-4) and must pass;
    a row off by 10 sqrt(eps) of that dtype must not."""
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    rng = np.random.default_rng(4)
    p64 = torch.softmax(torch.from_numpy(rng.normal(size=(50, 1000)) * 2), -1)
    p = p64.to(dtype)
    labels = torch.from_numpy(rng.integers(0, 1000, size=50))
    got = ce.log_loss(p, labels, reduction="none")
    # eps="auto" clips at the epsilon of the input dtype (as scikit-learn), not of float32.
    clip = torch.finfo(dtype).eps
    expected = -torch.log(p.double()[torch.arange(50), labels].clamp_min(clip))
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), rtol=1e-6)
    tol = np.sqrt(torch.finfo(dtype).eps)
    off = p.clone()
    off[3] = (p64[3] * (1 - 10 * tol)).to(dtype)
    with pytest.raises(ValueError, match="normalize"):
        ce.log_loss(off, labels)
