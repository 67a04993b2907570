"""ScoreAccumulator against the core functions, scikit-learn and direct float64 transcriptions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, log_loss

import crossent as ce
from crossent.metrics import InvalidDataError, ScoreAccumulator


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _logits_ce(z, y, w=None):
    """The oracle for logits: scipy's log_softmax in float64, the target's entry, weighted mean."""
    logp = log_softmax(np.asarray(z, dtype=np.float64), axis=1)
    return float(-np.average(logp[np.arange(len(y)), y], weights=w))


def _data(n=1237, C=7, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, C)) * 2).astype(dtype)
    p = _softmax(z.astype(np.float64)).astype(dtype)
    y = rng.integers(0, C, n)
    w = rng.uniform(0.1, 3.0, n)
    return z, p, y, w


def _ece_reference(conf, correct, w, bins=15):
    """Expected calibration error transcribed from its definition, one bin at a time."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        in_bin = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        n_b = w[in_bin].sum()
        if n_b == 0:
            continue
        acc_b = (w[in_bin] * correct[in_bin]).sum() / n_b
        conf_b = (w[in_bin] * conf[in_bin]).sum() / n_b
        total += abs(acc_b - conf_b) * n_b / w.sum()
    return total


@pytest.mark.parametrize("weighted", [False, True])
def test_probs_equal_sklearn_and_core(weighted):
    _, p, y, w = _data()
    sw = w if weighted else None
    r = ScoreAccumulator(p.shape[1]).update(p, y, sample_weight=sw).compute()
    # no probability here is near 0 or 1, so scikit-learn's clipping does not matter
    assert p.min() > 1e-6 and p.max() < 1 - 1e-6
    expected = log_loss(y, y_proba=p, sample_weight=sw, labels=list(range(p.shape[1])))
    np.testing.assert_allclose(r.cross_entropy_nats, expected, rtol=1e-12)
    np.testing.assert_allclose(
        r.cross_entropy_nats, float(ce.log_loss(p, y, sample_weight=sw)), rtol=1e-12
    )
    np.testing.assert_allclose(r.cross_entropy_bits, expected / math.log(2), rtol=1e-12)
    np.testing.assert_allclose(r.perplexity, math.exp(expected), rtol=1e-12)
    acc = accuracy_score(y, p.argmax(axis=1), sample_weight=sw)
    np.testing.assert_allclose(r.accuracy, acc, rtol=1e-12)
    assert r.rows == len(y)


@pytest.mark.parametrize("weighted", [False, True])
def test_logits_equal_core_softmax_cross_entropy(weighted):
    z, p, y, w = _data(seed=1)
    sw = w if weighted else None
    r = ScoreAccumulator(z.shape[1], from_logits=True).update(z, y, sample_weight=sw).compute()
    core = float(ce.softmax_cross_entropy(z, y, sample_weight=sw))
    np.testing.assert_allclose(r.cross_entropy_nats, core, rtol=1e-12)
    ref = log_loss(y, y_proba=p, sample_weight=sw, labels=list(range(z.shape[1])))
    np.testing.assert_allclose(r.cross_entropy_nats, ref, rtol=1e-10)
    np.testing.assert_allclose(r.accuracy, accuracy_score(y, z.argmax(1), sample_weight=sw))


def test_float32_inputs_match_core_float32():
    z, p, y, _ = _data(seed=2, dtype=np.float32)
    p = p / p.sum(axis=1, keepdims=True, dtype=np.float32)
    rp = ScoreAccumulator(7).update(p, y).compute()
    np.testing.assert_allclose(rp.cross_entropy_nats, float(ce.log_loss(p, y)), rtol=1e-6)
    p64 = p.astype(np.float64)
    expected = log_loss(y, p64 / p64.sum(axis=1, keepdims=True), labels=list(range(7)))
    np.testing.assert_allclose(rp.cross_entropy_nats, expected, rtol=1e-6)
    rz = ScoreAccumulator(7, from_logits=True).update(z, y).compute()
    z64 = z.astype(np.float64)
    np.testing.assert_allclose(
        rz.cross_entropy_nats, float(ce.softmax_cross_entropy(z64, y)), rtol=1e-6
    )
    np.testing.assert_allclose(rz.cross_entropy_nats, _logits_ce(z64, y), rtol=1e-6)


def test_per_class_equals_core_on_each_class_subset():
    _, p, y, w = _data(seed=3)
    r = ScoreAccumulator(7).update(p, y, sample_weight=w).compute()
    for entry in r.per_class:
        k = entry["class"]
        rows = y == k
        assert entry["rows"] == rows.sum()
        np.testing.assert_allclose(entry["weight"], w[rows].sum(), rtol=1e-12)
        np.testing.assert_allclose(
            entry["cross_entropy_nats"],
            float(ce.log_loss(p[rows], y[rows], sample_weight=w[rows])),
            rtol=1e-12,
        )
        np.testing.assert_allclose(
            entry["cross_entropy_nats"],
            log_loss(y[rows], p[rows], sample_weight=w[rows], labels=list(range(7))),
            rtol=1e-12,
        )
        np.testing.assert_allclose(
            entry["accuracy"],
            accuracy_score(y[rows], p[rows].argmax(1), sample_weight=w[rows]),
            rtol=1e-12,
        )


def test_absent_class_is_none():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    r = ScoreAccumulator(3).update(p, np.array([0, 1])).compute()
    assert r.per_class[2] == {"class": 2, "name": "2", "rows": 0, "weight": 0.0,
                              "cross_entropy_nats": None, "accuracy": None,
                              "infinite_loss_rows": 0}


@pytest.mark.parametrize("from_logits", [False, True])
def test_expected_calibration_error_matches_definition(from_logits):
    z, p, y, w = _data(n=3001, seed=4)
    scores = z if from_logits else p
    r = ScoreAccumulator(7, from_logits=from_logits).update(scores, y, sample_weight=w).compute()
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    np.testing.assert_allclose(r.expected_calibration_error, _ece_reference(conf, correct, w),
                               rtol=1e-9, atol=1e-12)
    assert len(r.calibration) == 15
    np.testing.assert_allclose(sum(b["weight"] for b in r.calibration), w.sum(), rtol=1e-12)


def test_calibration_bin_edges_are_right_closed():
    # confidence exactly 1/3 belongs to bin 4 of 15 ((4/15, 5/15]); 1.0 to the last bin
    p = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])
    r = ScoreAccumulator(3).update(p, np.array([0, 0])).compute()
    weights = [b["weight"] for b in r.calibration]
    assert weights[4] == 1 and weights[14] == 1 and sum(weights) == 2



@pytest.mark.parametrize("n_bins", [15, 25, 50, 100, 7])
def test_calibration_bins_are_the_reported_edges(n_bins):
    """A confidence equal to a reported edge k/B lies in the bin whose ``upper`` it is, and one
    just above in the next, as a numpy transcription with the same edges (searchsorted) puts them:
    ceil(c * B) - 1 put c = 0.56 in (0.56, 0.57] at B = 100 (0.56 * 100 rounds up to 56.000...01)."""
    edges = np.arange(n_bins + 1) / n_bins
    conf = np.concatenate([edges[1:], np.nextafter(edges[1:-1], 2.0), np.nextafter(edges[1:], -1.0)])
    conf = conf[conf > 0.5]  # a top-label confidence of two classes
    p = np.stack([conf, 1.0 - conf], axis=1)
    acc = ScoreAccumulator(2, n_bins=n_bins)
    acc.update(p, np.zeros(len(conf), dtype=np.int64))
    r = acc.compute()
    got = np.array([b["weight"] for b in r.calibration])
    want = np.bincount(np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1), minlength=n_bins)
    np.testing.assert_array_equal(got, want)
    for b in r.calibration:  # every confidence in its bin lies in (lower, upper]
        inside = conf[(conf > b["lower"]) & (conf <= b["upper"])]
        assert b["weight"] == len(inside)
    if n_bins == 100:
        two = ScoreAccumulator(2, n_bins=100).update(np.array([[0.56, 0.44], [0.555, 0.445]]), np.array([0, 1]))
        assert [b["weight"] for b in two.compute().calibration][55] == 2

def test_loss_histogram_counts_match_numpy_histogram():
    _, p, y, _ = _data(n=2000, seed=5)
    acc = ScoreAccumulator(7, hist_bin_width=0.05, hist_max=3.0).update(p, y)
    h = acc.compute().loss_histogram
    loss = -np.log(p[np.arange(len(y)), y])
    edges = np.arange(0, 3.0 + 1e-9, 0.05)
    inside, _ = np.histogram(loss[loss < 3.0], bins=edges)
    np.testing.assert_array_equal(h["counts"][:-1], inside)
    assert h["counts"][-1] == (loss >= 3.0).sum()
    np.testing.assert_allclose([h["min"], h["max"]], [loss.min(), loss.max()])


def test_from_logits_nothing_is_clipped_where_sklearn_clips():
    """True-class probability below float64's eps: scikit-learn clips it, logits do not."""
    z = np.array([[0.0, 50.0, -3.0], [1.0, 2.0, 3.0]])
    y = np.array([0, 2])
    exact = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[[0, 1], y]
    ours = ScoreAccumulator(3, from_logits=True).update(z, y).compute().cross_entropy_nats
    np.testing.assert_allclose(ours, exact.mean(), rtol=1e-14)  # (50 + 0.4076) / 2
    sk = log_loss(y, y_proba=_softmax(z), labels=[0, 1, 2])
    eps = np.finfo(np.float64).eps
    np.testing.assert_allclose(sk, (-np.log(eps) + exact[1]) / 2, rtol=1e-12)
    assert ours - sk > 6.9  # clipping at eps caps the first row's loss at 36.04 nats


def test_certain_prediction_scores_zero_where_sklearn_clips_the_top():
    p = np.array([[0.0, 1.0], [1.0, 0.0]])
    y = np.array([1, 0])
    ours = ScoreAccumulator(2).update(p, y).compute().cross_entropy_nats
    assert ours == 0.0
    assert log_loss(y, y_proba=p) > 0.0  # clipped to 1 - eps


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    C=st.integers(2, 6),
    split=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
    from_logits=st.booleans(),
    weighted=st.booleans(),
)
def test_merge_of_parts_equals_whole(n, C, split, seed, from_logits, weighted):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, C)) * 3
    scores = z if from_logits else _softmax(z)
    y = rng.integers(0, C, n)
    w = rng.uniform(0, 2, n) if weighted else None
    k = int(split * n)
    whole = ScoreAccumulator(C, from_logits=from_logits).update(scores, y, sample_weight=w)
    a = ScoreAccumulator(C, from_logits=from_logits).update(
        scores[:k], y[:k], sample_weight=None if w is None else w[:k])
    b = ScoreAccumulator(C, from_logits=from_logits).update(
        scores[k:], y[k:], sample_weight=None if w is None else w[k:], start=k)
    merged = a.merge(b).compute()
    expected = whole.compute()
    assert merged.rows == expected.rows
    for name in ("weight", "cross_entropy_nats", "accuracy", "expected_calibration_error"):
        np.testing.assert_allclose(getattr(merged, name), getattr(expected, name),
                                   rtol=1e-12, atol=1e-15, err_msg=name)
    np.testing.assert_array_equal(merged.loss_histogram["counts"],
                                  expected.loss_histogram["counts"])
    np.testing.assert_allclose(merged.loss_histogram["weights"],
                               expected.loss_histogram["weights"], rtol=1e-12, atol=1e-15)
    for m, e in zip(merged.calibration, expected.calibration, strict=True):
        np.testing.assert_allclose(m["weight"], e["weight"], rtol=1e-12, atol=1e-15)


def test_merge_rejects_other_settings():
    with pytest.raises(ValueError, match="other must have the same num_classes"):
        ScoreAccumulator(3).merge(ScoreAccumulator(4))
    with pytest.raises(TypeError, match="other must be a ScoreAccumulator"):
        ScoreAccumulator(3).merge({"rows": 1})


def test_normalize_divides_rows_by_their_sum():
    p = np.array([[0.2, 0.6, 0.4], [0.25, 0.25, 0.5]])
    y = np.array([1, 2])
    r = ScoreAccumulator(3, normalize=True).update(p, y).compute()
    np.testing.assert_allclose(r.cross_entropy_nats, float(ce.log_loss(p, y, normalize=True)),
                               rtol=1e-12)
    expected = log_loss(y, p / p.sum(axis=1, keepdims=True), labels=[0, 1, 2])
    np.testing.assert_allclose(r.cross_entropy_nats, expected, rtol=1e-12)
    with pytest.raises(InvalidDataError, match=r"data row 0: probabilities of the row sum to"):
        ScoreAccumulator(3).update(p, y)


def test_zero_total_weight_gives_no_mean():
    """Weight 0 leaves nothing to average: None, not a perfect 0 next to accuracy 0."""
    p = np.array([[0.5, 0.5]])
    r = ScoreAccumulator(2).update(p, np.array([0]), sample_weight=np.array([0.0])).compute()
    assert (r.rows, r.weight) == (1, 0.0)
    assert (r.cross_entropy_nats, r.cross_entropy_bits, r.perplexity, r.accuracy,
            r.expected_calibration_error) == (None, None, None, None, None)
    assert r.per_class[0]["cross_entropy_nats"] is None and r.per_class[0]["accuracy"] is None
    assert r.to_dict()["cross_entropy_nats"] is None


def test_negative_infinite_logits_mask_classes():
    z = np.array([[-np.inf, 1.0, 2.0], [-np.inf, 0.0, 0.0]])
    r = ScoreAccumulator(3, from_logits=True).update(z, np.array([2, 0])).compute()
    assert r.infinite_loss_rows == 1 and r.cross_entropy_nats == math.inf
    r = ScoreAccumulator(3, from_logits=True).update(z, np.array([2, 1])).compute()
    np.testing.assert_allclose(r.cross_entropy_nats, float(ce.softmax_cross_entropy(
        z, np.array([2, 1]))), rtol=1e-14)
    np.testing.assert_allclose(r.cross_entropy_nats, _logits_ce(z, np.array([2, 1])), rtol=1e-14)


@pytest.mark.parametrize(
    ("scores", "targets", "weights", "from_logits", "message"),
    [
        ([[0.5, 0.5], [1.5, -0.5]], [0, 1], None, False,
         r"column 'p_a', data row 11: probability 1.5 is not in \[0, 1\]"),
        ([[0.5, 0.5], [np.nan, 0.5]], [0, 1], None, False,
         r"column 'p_a', data row 11: probability NaN is not in \[0, 1\]"),
        ([[0.5, 0.5], [0.5, 0.4]], [0, 1], None, False,
         r"column 'p_a..p_b', data row 11: probabilities of the row sum to 0.9"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, 2], None, False,
         r"column 'y', data row 11: label 2 is not a class index in \[0, 2\)"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, -1], None, False,
         r"column 'y', data row 11: label -1 is not a class index"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, 1], [1.0, -2.0], False,
         r"column 'w', data row 11: sample weight -2.0 is not a finite number >= 0"),
        ([[0.5, 0.5], [0.5, 0.5]], [0, 1], [np.inf, 1.0], False,
         r"column 'w', data row 10: sample weight inf"),
        ([[0.0, 1.0], [2.0, np.nan]], [0, 1], None, True,
         r"column 'p_b', data row 11: logit is NaN"),
        ([[np.inf, 1.0], [2.0, 1.0]], [0, 1], None, True,
         r"column 'p_a', data row 10: logit is \+inf"),
        ([[0.0, 1.0], [-np.inf, -np.inf]], [0, 1], None, True,
         r"column 'p_a..p_b', data row 11: every logit of the row is -inf"),
    ],
)
def test_bad_rows_name_column_and_row(scores, targets, weights, from_logits, message):
    acc = ScoreAccumulator(2, from_logits=from_logits, column_names=["p_a", "p_b"],
                           target_name="y", weight_name="w")
    with pytest.raises(InvalidDataError, match=message) as info:
        acc.update(np.array(scores), np.array(targets),
                   sample_weight=None if weights is None else np.array(weights), start=10)
    assert info.value.row in (10, 11)
    assert acc.rows == 0  # nothing of a bad batch is added


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scores": np.zeros((2, 3))}, ValueError, r"scores must have shape \[n, 2\], got \[2, 3\]"),
        ({"targets": np.zeros(3, int)}, ValueError, r"targets must have shape \[2\], got \[3\]"),
        ({"targets": np.zeros(2)}, TypeError, "targets must be integer class indices"),
        ({"scores": np.array([["a", "b"], ["c", "d"]])}, TypeError, "scores must hold real"),
        ({"sample_weight": np.ones(3)}, ValueError, r"sample_weight must have shape \[2\]"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"scores": np.full((2, 2), 0.5), "targets": np.array([0, 1]), "sample_weight": None}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ScoreAccumulator(2).update(args["scores"], args["targets"],
                                   sample_weight=args["sample_weight"])


def test_constructor_validates():
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        ScoreAccumulator(0)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        ScoreAccumulator(2, n_bins=0)
    with pytest.raises(ValueError, match="class_names must have num_classes=2 entries, got 3"):
        ScoreAccumulator(2, class_names=["a", "b", "c"])


def test_ties_in_argmax_take_the_first_class_like_numpy():
    p = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.25, 0.25, 0.5]])
    y = np.array([0, 1, 2])
    r = ScoreAccumulator(3).update(p, y).compute()
    np.testing.assert_allclose(r.accuracy, accuracy_score(y, p.argmax(axis=1)))
    assert r.per_class[1]["accuracy"] == 0.0


def test_to_dict_has_the_documented_keys():
    _, p, y, _ = _data(n=50)
    d = ScoreAccumulator(7).update(p, y).compute().to_dict()
    for key in ("rows", "classes", "cross_entropy_nats", "cross_entropy_bits", "perplexity",
                "accuracy", "expected_calibration_error", "per_class"):
        assert key in d
    assert d["classes"] == 7 and len(d["per_class"]) == 7


def test_update_takes_a_batch_object():
    from crossent.io import Batch

    _, p, y, w = _data(n=40)
    batch = Batch(p[10:], y[10:], w[10:], start=10, path="mem")
    a = ScoreAccumulator(7).update(p[:10], y[:10], sample_weight=w[:10]).update(batch).compute()
    b = ScoreAccumulator(7).update(p, y, sample_weight=w).compute()
    np.testing.assert_allclose(a.cross_entropy_nats, b.cross_entropy_nats, rtol=1e-12)
    with pytest.raises(TypeError, match="targets must be given"):
        ScoreAccumulator(7).update(p)


# ---- input edges: torch dtypes, empty batches, argument names --------------------------------


def test_torch_bfloat16_and_requires_grad_are_read_detached():
    torch = pytest.importorskip("torch")
    z, p, y, _ = _data(n=61, C=5, seed=4)
    zb = torch.tensor(z).to(torch.bfloat16)
    z_rounded = zb.double().numpy()  # the values the accumulator sees, exactly
    expected = float(ce.softmax_cross_entropy(z_rounded, y))
    got = ScoreAccumulator(5, from_logits=True).update(zb, torch.tensor(y)).compute()
    np.testing.assert_allclose(got.cross_entropy_nats, expected, rtol=1e-6)
    np.testing.assert_allclose(got.cross_entropy_nats, _logits_ce(z_rounded, y), rtol=1e-6)
    leaf = torch.tensor(z, requires_grad=True)
    got = ScoreAccumulator(5, from_logits=True).update(leaf, torch.tensor(y)).compute()
    np.testing.assert_allclose(got.cross_entropy_nats, float(ce.softmax_cross_entropy(z, y)), rtol=1e-12)
    np.testing.assert_allclose(got.cross_entropy_nats, _logits_ce(z, y), rtol=1e-12)
    # bfloat16 probabilities keep bfloat16's eps: the row-sum tolerance is sqrt(2**-7)
    pb = torch.tensor(p).to(torch.bfloat16)
    r = ScoreAccumulator(5).update(pb, torch.tensor(y)).compute()
    q = pb.double().numpy()[np.arange(61), y]
    assert (q < 2**-7).any()  # clipped at bfloat16's eps, as log_loss(eps="auto") would
    np.testing.assert_allclose(r.cross_entropy_nats, -np.mean(np.log(np.maximum(q, 2**-7))), rtol=1e-12)
    assert r.clipped_rows == int((q < 2**-7).sum())
    with pytest.raises(InvalidDataError, match=r"tolerance 0\.0884"):
        ScoreAccumulator(2).update(torch.tensor([[0.6, 0.6]], dtype=torch.bfloat16), torch.tensor([0]))


def test_empty_batch_with_list_targets():
    acc = ScoreAccumulator(3).update(np.zeros((0, 3)), [])
    assert acc.rows == 0 and acc.compute().cross_entropy_nats is None
    acc.update(np.zeros((0, 3)), [], sample_weight=[])
    assert acc.rows == 0


def test_string_sample_weight_names_the_argument():
    _, p, y, _ = _data(n=2, C=3)
    with pytest.raises(TypeError, match="sample_weight must hold real numbers, got dtype <U1"):
        ScoreAccumulator(3).update(p, y, sample_weight=["a", "b"])
    with pytest.raises(TypeError, match="weights must hold real numbers"):
        ScoreAccumulator(3, weight_name="weights").update(p, y, sample_weight=["a", "b"])


@pytest.mark.parametrize(("tolerance", "error"), [
    (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("x", TypeError),
    (True, TypeError),
])
def test_update_refuses_a_bad_tolerance(tolerance, error):
    _, p, y, _ = _data(n=2, C=3)
    with pytest.raises(error, match="tolerance must be a finite number >= 0 or None, got"):
        ScoreAccumulator(3).update(p, y, tolerance=tolerance)


def test_merge_refuses_other_class_names():
    _, p, y, _ = _data(n=20, C=2)
    a = ScoreAccumulator(2, class_names=["a", "b"]).update(p, y)
    b = ScoreAccumulator(2, class_names=["b", "a"]).update(p, y)
    with pytest.raises(ValueError, match="class_names"):
        a.merge(b)
    assert a.rows == 20  # nothing was added
    ScoreAccumulator(2, class_names=["a", "b"]).merge(a)  # the same names merge
