"""A total that leaves float64's range is reported at the first row that takes it there, the
same row whatever the batch size (it named the last row of the batch, so the row moved with
``--batch-rows``): the sample-weight total, the loss total and a class's loss sum. The row is
the first at which the running total, added row by row in float64, becomes inf; a loss sum
may become inf only at a row of weight > 0 with an infinite loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crossent.metrics import InvalidDataError, ScoreAccumulator

BATCHES = [1, 2, 3, 7, 64, None]  # None: the whole data in one update
MAX = float(np.finfo(np.float64).max)


def _feed(acc, scores, y, w, batch, start=0):
    """Update ``acc`` with the rows in batches of ``batch`` (None: one); returns the error."""
    n, rows = len(y), acc.rows
    batch = n if batch is None else batch
    for a in range(0, n, batch):
        b = min(a + batch, n)
        before = (acc.rows, acc.weight, acc.loss_sum, acc.class_loss.copy())
        try:
            acc.update(scores[a:b], y[a:b], sample_weight=None if w is None else w[a:b],
                       start=start + a)
        except InvalidDataError as exc:
            # nothing of the failing batch was added
            assert (acc.rows, acc.weight, acc.loss_sum) == before[:3]
            np.testing.assert_array_equal(acc.class_loss, before[3])
            assert acc.rows == rows + a
            return exc
    return None


def _oracle(w, loss, y, C):
    """(row, what) of the first row at which a running total becomes inf, in plain Python
    floats (float64; Python's float + and * give inf on overflow); None when none does."""
    w, loss, y = ([float(v) for v in w], [float(v) for v in loss], [int(k) for k in y])
    W = L = 0.0
    cw, cl, cinf = [0.0] * C, [0.0] * C, [0] * C
    ninf = 0
    for i, (wi, li, k) in enumerate(zip(w, loss, y, strict=True)):
        wl = 0.0 if wi == 0 else wi * li
        if wi > 0 and li == math.inf:
            ninf += 1
            cinf[k] += 1
        W += wi
        cw[k] += wi
        L += wl
        cl[k] += wl
        if math.isinf(W) or math.isinf(cw[k]):
            return i, "weights"
        if math.isinf(cl[k]) and not cinf[k]:
            return i, f"class {k}"
        if math.isinf(L) and not ninf:
            return i, "total"
    return None


def _probs(n, y, q_true, C=2):
    """Rows whose true class has probability ``q_true`` (the rest spread evenly)."""
    p = np.full((n, C), (1 - q_true) / (C - 1))
    p[np.arange(n), y] = q_true
    return p


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("start", [0, 1000])
def test_weight_total_names_its_first_row(batch, start):
    # running total k * 1e307: 1.7e308 after 17 rows, 1.8e308 > MAX (inf) at the 18th (row 17)
    n = 40
    y = np.arange(n) % 2
    p = _probs(n, y, 0.75)
    w = np.full(n, 1e307)
    assert _oracle(w, -np.log(p[np.arange(n), y]), y, 2) == (17, "weights")
    exc = _feed(ScoreAccumulator(2, weight_name="w"), p, y, w, batch, start=start)
    assert exc is not None and exc.row == start + 17 and exc.column == "w"
    assert str(exc).startswith(
        f"column 'w', data row {start + 17}: the sample weights sum beyond float64's largest "
        "number (1.8e308) at this row; scale the sample weights down")


@pytest.mark.parametrize("batch", BATCHES)
def test_earlier_updates_near_the_limit(batch):
    """Row 0 alone brings the total to 1.75e308; then 1e306 a row: 1.79e308 after row 4,
    1.80e308 > MAX at row 5, whether the first update holds row 0 alone or more rows."""
    n = 12
    y = np.zeros(n, np.int64)
    p = _probs(n, y, 0.5)
    w = np.full(n, 1e306)
    w[0] = 1.75e308
    assert _oracle(w, np.full(n, math.log(2)), y, 2) == (5, "weights")
    acc = ScoreAccumulator(2)
    acc.update(p[:1], y[:1], sample_weight=w[:1])
    assert acc.weight == 1.75e308
    exc = _feed(acc, p[1:], y[1:], w[1:], batch, start=1)
    assert exc is not None and exc.row == 5 and "the sample weights sum beyond" in str(exc)
    assert acc.rows == 1 + (0 if batch is None else (4 // batch) * batch)  # whole batches
    assert acc.weight < MAX


@pytest.mark.parametrize("batch", BATCHES)
def test_weighted_loss_total_without_a_class(batch):
    # loss 10 nats, weight 1e306: 1e307 a row, half in each class: the total is inf at row 17
    # (1.8e308) while each class holds 9e307; the weight total is 1.8e307
    n = 30
    y = np.arange(n) % 2
    p = _probs(n, y, math.exp(-10.0))
    w = np.full(n, 1e306)
    assert _oracle(w, -np.log(p[np.arange(n), y]), y, 2) == (17, "total")
    exc = _feed(ScoreAccumulator(2, weight_name="w"), p, y, w, batch)
    assert exc is not None and exc.row == 17
    assert str(exc).startswith("column 'w', data row 17: the weighted losses sum beyond float64's "
                               "largest number (1.8e308) at this row; scale the sample weights")


@pytest.mark.parametrize("batch", BATCHES)
def test_class_loss_sum_is_named(batch):
    # class 'b' (odd rows) takes 1e307 a row, class 'a' (even rows) ln 2 a row at weight 1:
    # class 'b' and the total leave the range together at b's 18th row, row 35
    n = 50
    y = np.arange(n) % 2
    p = _probs(n, y, 0.5)
    p[y == 1] = [1 - math.exp(-10.0), math.exp(-10.0)]
    w = np.where(y == 1, 1e306, 1.0)
    assert _oracle(w, -np.log(p[np.arange(n), y]), y, 2) == (35, "class 1")
    exc = _feed(ScoreAccumulator(2, class_names=["a", "b"], weight_name="w"), p, y, w, batch)
    assert exc is not None and exc.row == 35
    assert str(exc).startswith("column 'w', data row 35: the weighted losses of class 'b' sum "
                               "beyond float64's largest number (1.8e308) at this row")


@pytest.mark.parametrize("batch", BATCHES)
def test_unweighted_losses_name_no_column(batch):
    # logits [0, 1e307] with class 0 true: a loss of 1e307 nats per row, no sample weights
    n = 25
    z = np.tile([0.0, 1e307], (n, 1))
    y = np.zeros(n, np.int64)
    exc = _feed(ScoreAccumulator(2, from_logits=True), z, y, None, batch)
    assert exc is not None and exc.row == 17 and exc.column is None
    assert str(exc) == ("data row 17: the losses of class '0' sum beyond float64's largest "
                        "number (1.8e308) at this row")


@pytest.mark.parametrize("batch", BATCHES)
def test_overflow_before_an_infinite_loss_is_not_hidden(batch):
    """Rows 0 and 1 (class 0) weigh 1e307 * 10.00005 nats each: class 0 and the total overflow
    at row 1; row 2 (class 0, weight 1) has an infinite loss. The whole batch at once was let
    through (an infinite loss in the class made its inf look legitimate): a mean of inf."""
    z = np.array([[0.0, 10.0], [0.0, 10.0], [-np.inf, 0.0], [0.0, 1.0]])
    y = np.zeros(4, np.int64)
    w = np.array([1e307, 1e307, 1.0, 1.0])
    loss = [10.0 + math.log1p(math.exp(-10.0))] * 2 + [math.inf, math.log1p(math.e)]
    assert _oracle(w, loss, y, 2) == (1, "class 0")
    exc = _feed(ScoreAccumulator(2, from_logits=True, weight_name="w"), z, y, w, batch)
    assert exc is not None and exc.row == 1
    assert "data row 1: the weighted losses of class '0' sum beyond" in str(exc)


@pytest.mark.parametrize("batch", BATCHES)
def test_infinite_loss_first_is_a_legitimate_inf(batch):
    """An infinite loss at row 0 (class 0): class 0's and the total's inf come from it, the
    large rows after it overflow nothing; the same rows in class 1 overflow at row 3."""
    z = np.array([[-np.inf, 0.0], [0.0, 10.0], [0.0, 10.0], [0.0, 10.0]])
    y = np.array([0, 0, 0, 0])
    w = np.array([1.0, 1e307, 1e307, 1e307])
    acc = ScoreAccumulator(2, from_logits=True)
    assert _feed(acc, z, y, w, batch) is None
    r = acc.compute()
    assert r.cross_entropy_nats == math.inf and r.infinite_loss_rows == 1
    assert r.weight == 1.0 + 3e307 and acc.class_weight[1] == 0.0
    z2 = np.array([[-np.inf, 0.0], [10.0, 0.0], [10.0, 0.0], [10.0, 0.0]])
    y2 = np.array([0, 1, 1, 1])
    exc = _feed(ScoreAccumulator(2, from_logits=True), z2, y2, w, batch)
    # class 1 reaches 1.00000454e308 at row 1, inf at row 2 (the total is inf from row 0)
    assert exc is not None and exc.row == 2
    assert "the weighted losses of class '1' sum beyond" in str(exc)


@pytest.mark.parametrize("batch", BATCHES)
def test_weights_are_named_when_both_leave_at_one_row(batch):
    # weight 9e307 and loss 1.5 nats a row: after row 1 the weights sum to 1.8e308 and the
    # weighted losses to 2.7e308, both inf: the weights are named (they are checked first)
    n = 5
    y = np.zeros(n, np.int64)
    p = _probs(n, y, math.exp(-1.5))
    w = np.full(n, 9e307)
    assert _oracle(w, -np.log(p[:, 0]), y, 2) == (1, "weights")
    exc = _feed(ScoreAccumulator(2), p, y, w, batch)
    assert exc is not None and exc.row == 1 and "the sample weights sum beyond" in str(exc)


@pytest.mark.parametrize("seed", range(8))
def test_random_rows_against_a_row_by_row_oracle(seed):
    """Weights 0 or log-uniform in [1e303, 3e307], 3 classes, logits with now and then a -inf
    true class: the first row of the Python row-by-row oracle, at every batch size."""
    rng = np.random.default_rng(seed)
    n, C = 300, 3
    z = rng.normal(0.0, 3.0, (n, C))
    y = rng.integers(0, C, n)
    z[rng.random(n) < 0.03, :] = 0.0
    masked = np.flatnonzero(rng.random(n) < 0.02)
    z[masked, y[masked]] = -np.inf
    w = 10.0 ** rng.uniform(303, math.log10(3e307), n)
    w[rng.random(n) < 0.2] = 0.0
    zmax = z.max(axis=1, keepdims=True)
    loss = (np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]) - z[np.arange(n), y]
    expected = _oracle(w, loss, y, C)
    assert expected is not None
    row, what = expected
    for batch in BATCHES:
        exc = _feed(ScoreAccumulator(C, from_logits=True), z, y, w, batch)
        assert exc is not None and exc.row == row, (batch, str(exc), expected)
        if what == "weights":
            assert "the sample weights sum" in str(exc)
        elif what == "total":
            assert "the weighted losses sum" in str(exc)
        else:
            assert f"the weighted losses of class '{what.split()[1]}' sum" in str(exc)


@pytest.mark.parametrize("batch", [1, 3, None])
def test_stored_totals_stay_finite_near_the_limit(batch):
    """Rows that bring the weight total to 1.79e308 without passing it are added (in the rare
    branch's row-by-row sums), and the mean is that of the weights scaled down."""
    n = 9
    y = np.arange(n) % 2
    p = _probs(n, y, 0.75)  # 0.29 nats: the weighted losses sum to 5.1e307
    w = np.full(n, 1.79e308 / n)
    acc = ScoreAccumulator(2)
    assert _feed(acc, p, y, w, batch) is None
    r = acc.compute()
    np.testing.assert_allclose(r.weight, 1.79e308, rtol=1e-14)
    np.testing.assert_allclose(r.cross_entropy_nats, -math.log(0.75), rtol=1e-14)
    assert np.isfinite(acc.class_weight).all() and np.isfinite(acc.class_loss).all()
