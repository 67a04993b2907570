"""ScoreAccumulator at the edges (review of crossent.metrics): zero and extreme sample weights,
infinite losses of rows of weight 0, the weighted loss histogram, and arguments refused by name.
Oracles: scikit-learn's log_loss and float64 NumPy transcriptions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss

from crossent.metrics import InvalidDataError, ScoreAccumulator


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _data(n=301, C=4, seed=0):
    rng = np.random.default_rng(seed)
    p = _softmax(rng.normal(size=(n, C)) * 2)
    return p, rng.integers(0, C, n), rng.uniform(0.1, 3.0, n)


# ---- weight 0 ----------------------------------------------------------------------------------


def test_class_whose_rows_all_weigh_zero_has_no_mean():
    p, y, w = _data()
    w[y == 2] = 0.0
    r = ScoreAccumulator(4).update(p, y, sample_weight=w).compute()
    entry = r.per_class[2]
    assert entry["rows"] == (y == 2).sum() > 0 and entry["weight"] == 0.0
    assert entry["cross_entropy_nats"] is None and entry["accuracy"] is None
    kept = w > 0
    expected = log_loss(y[kept], p[kept], sample_weight=w[kept], labels=[0, 1, 2, 3])
    np.testing.assert_allclose(r.cross_entropy_nats, expected, rtol=1e-12)
    for k in (0, 1, 3):
        rows = y == k
        np.testing.assert_allclose(
            r.per_class[k]["cross_entropy_nats"],
            log_loss(y[rows], p[rows], sample_weight=w[rows], labels=[0, 1, 2, 3]), rtol=1e-12)


# ---- weights at the ends of float64's range ---------------------------------------------------


def test_weights_whose_sum_overflows_are_refused_by_name():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    y = np.array([0, 0])
    acc = ScoreAccumulator(2, weight_name="w")
    with pytest.raises(InvalidDataError, match=r"column 'w', data row 6: the sample weights sum "
                                               r"beyond float64's largest number .* at this row"):
        acc.update(p, y, sample_weight=np.array([1e308, 1e308]), start=5)
    assert acc.rows == 0 and acc.weight == 0.0  # nothing of the batch was added


def test_weighted_losses_that_overflow_are_refused_by_name():
    # each weight and their sum are finite; weight * loss (10.000045 nats) is not
    z = np.array([[0.0, 10.0], [0.0, 0.0]])
    acc = ScoreAccumulator(2, from_logits=True, weight_name="w")
    with pytest.raises(InvalidDataError, match=r"column 'w', data row 0: the weighted losses of "
                                               r"class '0' sum beyond"):
        acc.update(z, np.array([0, 1]), sample_weight=np.array([1e308, 1.0]))
    assert acc.rows == 0


def test_merge_that_overflows_is_refused_and_adds_nothing():
    p = np.array([[0.5, 0.5]])
    a = ScoreAccumulator(2).update(p, np.array([0]), sample_weight=np.array([1e308]))
    b = ScoreAccumulator(2).update(p, np.array([1]), sample_weight=np.array([1e308]))
    with pytest.raises(InvalidDataError, match="sample weights sum beyond .* when merging parts"):
        a.merge(b)
    assert a.rows == 1 and a.weight == 1e308


def test_subnormal_weight_is_refused_naming_column_and_row():
    p = np.array([[0.7, 0.3], [0.4, 0.6]])
    y = np.array([1, 0])
    with pytest.raises(InvalidDataError, match=r"column 'w', data row 4: sample weight 5e-324 "
                                               r"is below the smallest normal float64"):
        ScoreAccumulator(2, weight_name="w").update(
            p, y, sample_weight=np.array([1.0, 5e-324]), start=3)


@pytest.mark.parametrize("scale", [1e-300, 1e-305, 1e300, 3e307])
def test_extreme_but_representable_weights_give_the_scaled_mean(scale):
    """The weighted mean does not depend on the weights' scale: equal to the weights near 1."""
    p, y, w = _data(n=7, C=3, seed=1)
    w = w / w.sum()  # sum 1, so scale * w sums to scale
    r = ScoreAccumulator(3).update(p, y, sample_weight=scale * w).compute()
    expected = log_loss(y, p, sample_weight=w, labels=[0, 1, 2])
    np.testing.assert_allclose(r.cross_entropy_nats, expected, rtol=1e-12)
    oracle = np.average(p.argmax(1) == y, weights=w)
    np.testing.assert_allclose(r.accuracy, oracle, rtol=1e-12)
    np.testing.assert_allclose(r.weight, scale, rtol=1e-12)


def test_logits_too_far_apart_for_float64_are_refused():
    z = np.array([[1e308, -1e308], [0.0, 1.0]])
    with pytest.raises(InvalidDataError, match=r"column 'scores', data row 0: the largest logit "
                                               r"1e\+308 and the true class's -1e\+308"):
        ScoreAccumulator(2, from_logits=True).update(z, np.array([1, 0]))


# ---- infinite losses of rows of weight 0 ------------------------------------------------------


def test_infinite_loss_of_a_row_of_weight_zero_is_not_counted():
    z = np.array([[0.0, -np.inf], [1.0, 0.0], [2.0, 0.5]])
    y = np.array([1, 0, 1])
    r = ScoreAccumulator(2, from_logits=True).update(
        z, y, sample_weight=np.array([0.0, 1.0, 2.0])).compute()
    assert r.infinite_loss_rows == 0 and math.isfinite(r.cross_entropy_nats)
    expected = log_loss(y[1:], _softmax(z[1:]), sample_weight=[1.0, 2.0], labels=[0, 1])
    np.testing.assert_allclose(r.cross_entropy_nats, expected, rtol=1e-12)
    assert r.per_class[1]["infinite_loss_rows"] == 0
    assert math.isfinite(r.per_class[1]["cross_entropy_nats"])
    assert r.loss_histogram["max"] == pytest.approx(-np.log(_softmax(z[2:])[0, 1]), rel=1e-12)
    # with weight > 0 the same row counts, and makes the means inf
    r = ScoreAccumulator(2, from_logits=True).update(
        z, y, sample_weight=np.array([0.5, 1.0, 2.0])).compute()
    assert r.infinite_loss_rows == 1 and r.cross_entropy_nats == math.inf
    assert r.per_class[1]["infinite_loss_rows"] == 1
    assert r.per_class[1]["cross_entropy_nats"] == math.inf
    assert r.loss_histogram["max"] == math.inf


# ---- the loss histogram weighs its bins -------------------------------------------------------


def test_loss_histogram_weights_match_numpy_weighted_histogram():
    p, y, w = _data(n=2000, C=5, seed=2)
    r = ScoreAccumulator(5, hist_bin_width=0.05, hist_max=3.0).update(
        p, y, sample_weight=w).compute()
    h = r.loss_histogram
    loss = -np.log(p[np.arange(len(y)), y])
    edges = np.arange(0, 3.0 + 1e-9, 0.05)
    inside, _ = np.histogram(loss[loss < 3.0], bins=edges, weights=w[loss < 3.0])
    np.testing.assert_allclose(h["weights"][:-1], inside, rtol=1e-12)
    np.testing.assert_allclose(h["weights"][-1], w[loss >= 3.0].sum(), rtol=1e-12)
    # this data reaches past hist_max (loss.max() is about 10.5): the last bin holds those rows
    assert loss.max() >= 3.0 and h["weights"][-1] > 0
    assert r.cross_entropy_nats == pytest.approx(np.average(loss, weights=w), rel=1e-12)
    # the mean of the in-range bins is the weighted mean of the in-range losses, to half a bin
    centers = (np.arange(len(h["weights"]) - 1) + 0.5) * 0.05
    inside_mean = np.average(loss[loss < 3.0], weights=w[loss < 3.0])
    assert abs(np.average(centers, weights=h["weights"][:-1]) - inside_mean) <= 0.025
    # with hist_max past every loss the last bin is empty and the histogram's mean is the loss's
    hist_max = 0.05 * math.ceil(loss.max() / 0.05 + 1)
    r = ScoreAccumulator(5, hist_bin_width=0.05, hist_max=hist_max).update(
        p, y, sample_weight=w).compute()
    h = r.loss_histogram
    assert h["weights"][-1] == 0
    centers = (np.arange(len(h["weights"])) + 0.5) * 0.05
    assert abs(np.average(centers, weights=h["weights"]) - np.average(loss, weights=w)) <= 0.025
    # without weights, the weights are the counts
    h = ScoreAccumulator(5).update(p, y).compute().loss_histogram
    np.testing.assert_array_equal(h["weights"], h["counts"])


# ---- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [np.array(["a", "b", "c"]), ("a", "b", "c")])
def test_class_names_may_be_any_sequence(names):
    assert ScoreAccumulator(3, class_names=names).class_names == ("a", "b", "c")


def test_class_names_may_be_a_pandas_index():
    pd = pytest.importorskip("pandas")
    acc = ScoreAccumulator(3, class_names=pd.Index(["a", "b", "c"]))
    assert acc.class_names == ("a", "b", "c")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": True}, TypeError, "num_classes must be a positive integer, got bool"),
        ({"n_bins": True}, TypeError, "n_bins must be a positive integer, got bool True"),
        ({"n_bins": "15"}, TypeError, "n_bins must be a positive integer, got str '15'"),
        ({"n_bins": 0}, ValueError, "n_bins must be a positive integer, got 0"),
        ({"tolerance": "0.1"}, TypeError, "tolerance must be a finite number >= 0 or None, got str"),
        ({"tolerance": False}, TypeError, "tolerance must be a finite number >= 0 or None, got bool"),
        ({"tolerance": -0.1}, ValueError, "tolerance must be a finite number >= 0 or None, got -0.1"),
        ({"tolerance": math.inf}, ValueError, "tolerance must be a finite number >= 0 or None"),
        ({"hist_bin_width": "a"}, TypeError, "hist_bin_width must be a finite number > 0, got str"),
        ({"hist_bin_width": 0.0}, ValueError, "hist_bin_width must be a finite number > 0, got 0.0"),
        ({"hist_bin_width": math.nan}, ValueError, "hist_bin_width must be a finite number > 0"),
        ({"hist_max": math.inf}, ValueError,
         r"hist_max must be a finite number above hist_bin_width=0.01, got inf"),
        ({"hist_max": 0.005}, ValueError, "hist_max must be a finite number above hist_bin_width"),
        ({"hist_max": True}, TypeError, "hist_max must be a finite number above hist_bin_width"),
        ({"hist_max": 1e9}, ValueError, "hist_max / hist_bin_width must be at most 1,000,000 bins"),
        ({"from_logits": True, "normalize": True}, ValueError,
         r"normalize applies to probabilities only \(from_logits=False\)"),
    ],
)
def test_constructor_refuses_bad_arguments_by_name(kwargs, error, match):
    kwargs = {"num_classes": 2, **kwargs}
    num_classes = kwargs.pop("num_classes")
    with pytest.raises(error, match=match):
        ScoreAccumulator(num_classes, **kwargs)
