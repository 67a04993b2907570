"""A streaming, mergeable accumulator of cross-entropy, accuracy and calibration.

The per-row losses are the formulas of ``crossent.log_loss`` (``eps="auto"``) and
``crossent.softmax_cross_entropy`` (the tests pin them to those functions and to scikit-learn),
computed here in numpy rather than by calling the core functions, for two reasons measured on
16384 x 16 float32 batches: the whole ``update`` (validation, losses, accuracy, calibration
bins, histogram) takes 1.5-1.9 ms, while ``log_loss(reduction="none")`` alone takes 6-7 ms and
``softmax_cross_entropy`` 10-19 ms, which would put ``crossent score`` past its time target; and a
bad row must be reported with its column and data row, which the core's ValueErrors do not carry,
so the validation has to happen here anyway. Batches are made column-major: over a short class
axis, numpy's row reductions are ~20x faster in that layout.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["InvalidDataError", "ScoreAccumulator", "ScoreResult"]

LN2 = math.log(2.0)
TINY = float(np.finfo(np.float64).tiny)  # smallest normal float64: a nonzero weight's floor
MAX_HIST_BINS = 1_000_000  # 16 MB of histogram per accumulator
# Totals below this cannot have overflowed anywhere: each per-class sum is a part of them (and
# non-negative), so a batch looks per class only when a total reaches it (or is inf).
_SAFE = 1e308


def _real(value, name, *, what="a real number"):
    """``value`` as a float; a TypeError naming ``name`` unless it is a real number (bools are not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return float(value)


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _tolerance(value):
    """A row-sum tolerance: None, or a finite real number >= 0 (a ValueError/TypeError naming it)."""
    if value is None:
        return None
    number = _real(value, "tolerance", what="a finite number >= 0 or None")
    if not (0 <= number < math.inf):  # False for NaN
        raise ValueError(f"tolerance must be a finite number >= 0 or None, got {value!r}")
    return number


def _is_first_max(scores, target_score, row_max, t):
    """``argmax(scores, axis=1) == t`` (first maximum wins) without a slow row-wise argmax."""
    correct = target_score == row_max
    if not correct.any():
        return correct
    ties = np.count_nonzero(scores == row_max[:, None], axis=1) > 1
    tied = np.flatnonzero(correct & ties)
    if tied.size:
        correct[tied] = scores[tied].argmax(axis=1) == t[tied]
    return correct


def _to_numpy(value, name):
    """``value`` as a NumPy array, and the eps of its dtype as given (None: the array's own).

    Torch tensors are detached and moved to the CPU (a tensor that requires grad is only read);
    bfloat16, which NumPy lacks, is upcast to float32 and keeps bfloat16's eps. Anything else
    goes through ``np.asarray``; a failure there is reported with the argument's name.
    """
    given_eps = None
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            given_eps = float(torch.finfo(torch.bfloat16).eps)
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value), given_eps
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of numbers, got {type(value).__name__}: {exc}") from None


class InvalidDataError(ValueError):
    """A row that cannot be scored; ``column`` and ``row`` (0-based data row) say where."""

    def __init__(self, message: str, *, column=None, row=None):
        where = []
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"data row {row}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.column = column
        self.row = row


@dataclass(frozen=True)
class ScoreResult:
    """What ``ScoreAccumulator.compute()`` returns; ``to_dict()`` is the JSON of ``crossent score``.

    Means divide by the total sample weight (the number of rows without weights). A mean whose
    weight is 0 (no rows, or rows whose sample weights are all 0) is None, overall, per class
    and per calibration bin: there is nothing to average, and 0 would read as a perfect score
    (the loss *functions* return 0 for an empty mean instead, for their gradients' sake).
    ``infinite_loss_rows`` (overall and per class) counts the rows of weight > 0 whose loss is
    +inf (a true class masked by a -inf logit): exactly the rows that make that mean inf (a row
    of weight 0 adds nothing to a mean, so an infinite loss there is counted only in ``rows``).
    ``clipped_rows`` counts the rows whose probability of the true class was below eps and was
    clipped to it.

    ``loss_histogram`` holds ``bin_width``; ``counts``, the rows per bin of finite loss (the
    last bin: losses >= ``bins * bin_width``, ``hist_max`` rounded up to a multiple of
    ``bin_width``); ``weights``, the sample weight per bin (equal to
    ``counts`` without sample weights), so a plot of ``weights`` has the weighted mean as its
    mean; ``min`` and ``max``, the extreme losses of the rows above (``max`` is inf when
    ``infinite_loss_rows`` > 0), None when there are none.
    """

    rows: int
    weight: float
    class_names: tuple[str, ...]
    cross_entropy_nats: float | None
    accuracy: float | None
    expected_calibration_error: float | None
    per_class: tuple[dict, ...]
    calibration: tuple[dict, ...]
    loss_histogram: dict
    infinite_loss_rows: int
    clipped_rows: int = 0

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @property
    def cross_entropy_bits(self) -> float | None:
        return None if self.cross_entropy_nats is None else self.cross_entropy_nats / LN2

    @property
    def perplexity(self) -> float | None:
        if self.cross_entropy_nats is None:
            return None
        try:
            return math.exp(self.cross_entropy_nats)
        except OverflowError:
            return math.inf

    def to_dict(self) -> dict:
        """The result as plain Python values (what ``crossent score --format json`` prints): the
        summary fields, ``calibration_bins`` (the number of bins) and the ``per_class`` and
        ``calibration`` tables as lists of dicts; an infinite or NaN number stays a float here
        (the JSON output writes it as the string "inf", "-inf" or "nan")."""
        return {
            "rows": self.rows,
            "weight": self.weight,
            "classes": self.classes,
            "class_names": list(self.class_names),
            "cross_entropy_nats": self.cross_entropy_nats,
            "cross_entropy_bits": self.cross_entropy_bits,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "expected_calibration_error": self.expected_calibration_error,
            "calibration_bins": len(self.calibration),
            "infinite_loss_rows": self.infinite_loss_rows,
            "clipped_rows": self.clipped_rows,
            "per_class": [dict(entry) for entry in self.per_class],
            "calibration": [dict(entry) for entry in self.calibration],
        }


class ScoreAccumulator:
    r"""Streaming, mergeable cross-entropy, accuracy and calibration of class predictions.

    Feed batches of ``scores`` ``[n, C]`` (probabilities, or logits with ``from_logits=True``)
    and ``targets`` ``[n]`` (class indices) with ``update``; combine the accumulators of
    separate parts with ``merge``; read the metrics with ``compute``. All sums are float64, so
    the result does not depend on how the rows were split (up to float64 rounding).

    Per row, with sample weight :math:`w_i` (1 by default) and true class :math:`y_i`:

    .. math::
        \ell_i = -\log \max(q_{i, y_i}, \epsilon) \quad\text{(probabilities)},\qquad
        \ell_i = \log\sum_k e^{z_{ik}} - z_{i, y_i} \quad\text{(logits)}

    cross-entropy :math:`= \sum_i w_i \ell_i / \sum_i w_i`; accuracy
    :math:`= \sum_i w_i [\arg\max_k q_{ik} = y_i] / \sum_i w_i` (ties: the first maximal class
    wins, as ``numpy.argmax``; also for the calibration bins' accuracy); with the top-label confidence
    :math:`c_i = \max_k q_{ik}` put in ``n_bins`` equal-width bins :math:`(b/B, (b+1)/B]`,
    expected calibration error :math:`= \sum_b |\mathrm{acc}_b - \mathrm{conf}_b| n_b / n`
    (:math:`n_b` the weight in bin b). :math:`\epsilon` is ``finfo(scores.dtype).eps`` of the
    scores as given (float16 included, although they are computed in float32), the same
    clipping as ``crossent.log_loss(eps="auto")``; ``clipped_rows`` counts the rows it changed.
    Logits are never clipped.

    Validation is per row and vectorized: probabilities must lie in [0, 1] and sum to 1 within
    ``tolerance`` (default ``sqrt(finfo(dtype).eps)`` of the scores as given, as
    ``crossent.log_loss``; a batch may bring its own default, as text does) unless
    ``normalize=True`` (probabilities only: with ``from_logits=True`` it is a ValueError);
    logits must not be NaN or +inf and a row needs a finite logit (-inf masks a class); weights
    must be finite and >= 0 (a non-numeric ``sample_weight`` is a TypeError naming it). A
    nonzero weight must be at least the smallest normal float64 (2.2e-308; below it, products
    lose their precision), and the sums of the weights and of the weighted losses must stay
    within float64's range (1.8e308): the weighted mean does not change when every weight is
    scaled by one factor, so scale them (the error names the row at which a sum, added row by
    row, leaves the range, whatever the batch size; a loss sum may be inf only through a row
    of weight > 0 whose loss is +inf). Torch tensors are detached and read on the CPU;
    bfloat16 scores are computed in float32 with bfloat16's eps. A bad row raises
    ``InvalidDataError`` naming the column (``column_names``, ``weight_name``) and the 0-based
    data row (``start`` + position in the batch).

    ``tolerance`` is None or a finite number >= 0; ``n_bins`` and ``num_classes`` are positive
    integers (not bools); ``hist_bin_width`` and ``hist_max`` are finite numbers with
    ``0 < hist_bin_width < hist_max`` and at most ``MAX_HIST_BINS`` (10^6) bins between them.
    A bad argument is a TypeError or ValueError naming it.

    Per-row losses also go into a fixed-bin histogram (``hist_bin_width`` nats wide, up to
    ``hist_max`` nats, then one overflow bin) of rows and of their sample weight (see
    ``ScoreResult``), so the memory does not grow with the data.

    >>> acc = ScoreAccumulator(3)
    >>> _ = acc.update(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]), np.array([1, 1]))
    >>> r = acc.compute()
    >>> round(r.cross_entropy_nats, 4), r.accuracy   # (-ln 0.8 - ln 0.2) / 2
    (0.9163, 0.5)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        from_logits: bool = False,
        normalize: bool = False,
        tolerance: float | None = None,
        n_bins: int = 15,
        class_names=None,
        column_names=None,
        target_name: str = "targets",
        weight_name: str = "sample_weight",
        hist_bin_width: float = 0.01,
        hist_max: float = 50.0,
    ):
        C = _positive_int(num_classes, "num_classes")
        n_bins = _positive_int(n_bins, "n_bins")
        tolerance = _tolerance(tolerance)
        width = _real(hist_bin_width, "hist_bin_width", what="a finite number > 0")
        if not (0 < width < math.inf):  # False for NaN
            raise ValueError(f"hist_bin_width must be a finite number > 0, got {hist_bin_width!r}")
        top = _real(hist_max, "hist_max", what="a finite number above hist_bin_width")
        if not (width < top < math.inf):
            raise ValueError(
                f"hist_max must be a finite number above hist_bin_width={width!r}, got {hist_max!r}"
            )
        hist_bins = math.ceil(top / width)
        if hist_bins > MAX_HIST_BINS:
            raise ValueError(
                f"hist_max / hist_bin_width must be at most {MAX_HIST_BINS:,} bins, got "
                f"{hist_max!r} / {hist_bin_width!r} = {hist_bins:,}"
            )
        if from_logits and normalize:
            raise ValueError("normalize applies to probabilities only (from_logits=False)")
        for name, value in (("class_names", class_names), ("column_names", column_names)):
            if value is not None and len(value) != C:
                raise ValueError(f"{name} must have num_classes={C} entries, got {len(value)}")
        self.num_classes = C
        self.from_logits = bool(from_logits)
        self.normalize = bool(normalize)
        self.tolerance = tolerance
        self.n_bins = n_bins
        self.class_names = tuple(str(c) for c in (range(C) if class_names is None else class_names))
        self.column_names = tuple(column_names) if column_names is not None else None
        self.target_name = target_name
        self.weight_name = weight_name
        self.hist_bin_width = width
        self.hist_bins = hist_bins
        self.rows = 0
        self.weight = 0.0
        self.loss_sum = 0.0
        self.correct = 0.0
        self.infinite_loss_rows = 0
        self.clipped_rows = 0
        self.class_infinite = np.zeros(C, np.int64)
        self.class_rows = np.zeros(C, np.int64)
        self.class_weight = np.zeros(C)
        self.class_loss = np.zeros(C)
        self.class_correct = np.zeros(C)
        self.bin_weight = np.zeros(self.n_bins)
        self.bin_confidence = np.zeros(self.n_bins)
        self.bin_correct = np.zeros(self.n_bins)
        self.loss_hist = np.zeros(self.hist_bins + 1, np.int64)  # last bin: >= hist_max
        self.loss_hist_weight = np.zeros(self.hist_bins + 1)
        self.loss_min = math.inf
        self.loss_max = -math.inf

    # ------------------------------------------------------------------ update

    def update(self, scores, targets=None, /, *, sample_weight=None, start: int = 0,
               tolerance: float | None = None):
        """Add a batch: ``scores`` ``[n, C]``, ``targets`` ``[n]`` int, ``sample_weight`` ``[n]``.

        ``start`` is the 0-based data row of ``scores[0]`` (for error messages). ``tolerance``
        is this batch's row-sum tolerance when the accumulator has none of its own (default:
        ``sqrt(finfo(scores.dtype).eps)``). A single ``crossent.io.Batch`` (anything with
        ``scores``, ``targets``, ``sample_weight`` and ``start``, and optionally ``tolerance``)
        may be passed instead: ``acc.update(batch)``. Returns self. Nothing is added when the
        batch has a bad row.
        """
        if targets is None:
            if not all(hasattr(scores, a) for a in ("scores", "targets", "sample_weight", "start")):
                raise TypeError(
                    "targets must be given, or scores must be a batch with scores, targets, "
                    f"sample_weight and start; got {type(scores).__name__} alone"
                )
            batch = scores
            if sample_weight is not None:
                raise TypeError("sample_weight must not be given with a batch (it carries its own)")
            return self.update(batch.scores, batch.targets, sample_weight=batch.sample_weight,
                               start=batch.start, tolerance=getattr(batch, "tolerance", None))
        tolerance = _tolerance(tolerance)
        scores, given_eps = _to_numpy(scores, "scores")
        targets, _ = _to_numpy(targets, self.target_name)
        if targets.size == 0 and targets.dtype.kind == "f":
            targets = targets.astype(np.int64)  # np.asarray([]) is float64: an empty batch is fine
        if scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(
                f"scores must have shape [n, {self.num_classes}], got {list(scores.shape)}"
            )
        if scores.dtype.kind not in "iuf":
            raise TypeError(f"scores must hold real numbers, got dtype {scores.dtype}")
        # eps and the default tolerance follow the dtype as given (float16's, not float32's)
        given = scores.dtype if scores.dtype.kind == "f" else np.dtype(np.float64)
        eps = given_eps if given_eps is not None else float(np.finfo(given).eps)
        # column-major: reductions over a short class axis run ~20x faster than over C-order rows
        if scores.dtype.kind != "f":
            scores = scores.astype(np.float64, order="F")
        elif scores.dtype.itemsize < 4:
            scores = scores.astype(np.float32, order="F")
        else:
            scores = np.asfortranarray(scores)
        n = scores.shape[0]
        if targets.shape != (n,):
            raise ValueError(f"targets must have shape [{n}], got {list(targets.shape)}")
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
        if n:
            bad = (targets < 0) | (targets >= self.num_classes)
            if bad.any():
                row = int(np.argmax(bad))
                raise InvalidDataError(
                    f"label {targets[row]} is not a class index in [0, {self.num_classes})",
                    column=self.target_name,
                    row=start + row,
                )
        weight = None
        if sample_weight is not None:
            weight, _ = _to_numpy(sample_weight, self.weight_name)
            if weight.dtype.kind not in "iuf":
                raise TypeError(
                    f"{self.weight_name} must hold real numbers, got dtype {weight.dtype}"
                )
            weight = weight.astype(np.float64)
            if weight.shape != (n,):
                raise ValueError(f"sample_weight must have shape [{n}], got {list(weight.shape)}")
            ok = np.isfinite(weight) & (weight >= 0)
            if not ok.all():
                row = int(np.argmin(ok))
                raise InvalidDataError(
                    f"sample weight {float(weight[row])!r} is not a finite number >= 0",
                    column=self.weight_name,
                    row=start + row,
                )
            subnormal = (weight > 0) & (weight < TINY)
            if subnormal.any():
                row = int(np.argmax(subnormal))
                raise InvalidDataError(
                    f"sample weight {float(weight[row])!r} is below the smallest normal float64 "
                    f"({TINY!r}), where its products lose their precision; scale the weights up "
                    "(the weighted means do not change)",
                    column=self.weight_name,
                    row=start + row,
                )
        if n == 0:
            return self
        if self.from_logits:
            loss, predicted, confidence = self._from_logits(scores, targets, start)
            clipped = 0
        else:
            if self.tolerance is not None:
                tolerance = self.tolerance
            elif tolerance is None:
                tolerance = math.sqrt(eps)
            loss, predicted, confidence, clipped = self._from_probs(
                scores, targets, start, tolerance=tolerance, eps=eps
            )
        self._add(loss, predicted, confidence, targets, weight, start)
        self.clipped_rows += clipped
        return self

    def _column(self, k: int) -> str:
        return self.column_names[k] if self.column_names else f"scores[:, {k}]"

    def _from_probs(self, p, t, start, *, tolerance, eps):
        rows = np.arange(p.shape[0])
        hi = p.max(axis=1)
        lo = p.min(axis=1)
        if not (lo.min() >= 0 and hi.max() <= 1):  # False for NaN
            r = int(np.argmin((lo >= 0) & (hi <= 1)))
            row = p[r]
            k = int(np.argmin((row >= 0) & (row <= 1)))
            what = "NaN" if np.isnan(row[k]) else f"{float(row[k])!r}"
            raise InvalidDataError(
                f"probability {what} is not in [0, 1]", column=self._column(k), row=start + r
            )
        total = p.sum(axis=1, dtype=np.float64)
        if self.normalize:
            if (total <= 0).any():
                r = int(np.argmax(total <= 0))
                raise InvalidDataError(
                    "probabilities of the row are all 0: nothing to normalize",
                    column=self._columns_span(),
                    row=start + r,
                )
        else:
            tol = tolerance
            if not (total.min() >= 1.0 - tol and total.max() <= 1.0 + tol):
                r = int(np.argmax(np.abs(total - 1.0) > tol))
                raise InvalidDataError(
                    f"probabilities of the row sum to {float(total[r])!r}, not 1 (tolerance {tol:.3g}); "
                    "pass normalize=True (--normalize) to renormalize them",
                    column=self._columns_span(),
                    row=start + r,
                )
        q = p[rows, t]
        correct = _is_first_max(p, q, hi, t)
        loss = q.astype(np.float64)
        confidence = hi.astype(np.float64)
        if self.normalize:
            loss /= total
            confidence /= total
        clipped = int(np.count_nonzero(loss < eps))
        np.maximum(loss, eps, out=loss)
        np.log(loss, out=loss)
        np.negative(loss, out=loss)
        return loss, correct, confidence, clipped

    def _from_logits(self, z, t, start):
        rows = np.arange(z.shape[0])
        m = z.max(axis=1)
        ok = np.isfinite(m)  # False for NaN or +inf anywhere in the row, or no finite logit
        if not ok.all():
            r = int(np.argmin(ok))
            row = z[r]
            if np.isnan(row).any():
                k, what = int(np.argmax(np.isnan(row))), "logit is NaN"
            elif np.isposinf(row).any():
                k, what = int(np.argmax(np.isposinf(row))), "logit is +inf"
            else:
                k, what = None, "every logit of the row is -inf"
            raise InvalidDataError(
                what, column=self._columns_span() if k is None else self._column(k), row=start + r
            )
        zt = z[rows, t]
        correct = _is_first_max(z, zt, m, t)
        # exp in the input precision (float32 has SIMD exp; every term is in (0, 1]), sums and
        # logs in float64
        with np.errstate(over="ignore"):  # -inf where the logits span more than float64
            shifted = z - m[:, None]
        np.exp(shifted, out=shifted)
        sum_exp = shifted.sum(axis=1, dtype=np.float64)
        with np.errstate(over="ignore"):
            loss = (m.astype(np.float64) - zt) + np.log(sum_exp)
        if np.isinf(loss.max()):  # +inf is a masked true class; else float64 logits >1.8e308 apart
            span = np.isinf(loss) & np.isfinite(zt)
            if span.any():
                r = int(np.argmax(span))
                raise InvalidDataError(
                    f"the largest logit {float(m[r])!r} and the true class's "
                    f"{float(zt[r])!r} are too far apart: the loss is beyond float64's range",
                    column=self._columns_span(),
                    row=start + r,
                )
        return loss, correct, 1.0 / sum_exp

    def _columns_span(self) -> str:
        if self.column_names:
            return f"{self.column_names[0]}..{self.column_names[-1]}"
        return "scores"

    def _add(self, loss, correct, confidence, t, weight, start):
        """Add a validated batch; nothing is added when its weighted sums leave float64's range."""
        C, B, H = self.num_classes, self.n_bins, self.hist_bins + 1
        n = loss.size
        correct = correct.astype(np.float64)
        loss_max = float(loss.max())  # losses are >= 0, never NaN (validated): inf is the max
        finite = np.isfinite(loss) if loss_max == math.inf else None
        # the rows whose +inf loss counts: those of weight > 0 (a row of weight 0 adds nothing)
        if finite is None:
            counted_inf = None
        elif weight is None:
            counted_inf = ~finite
        else:
            counted_inf = ~finite & (weight > 0)
        n_inf = 0 if counted_inf is None else int(np.count_nonzero(counted_inf))
        if weight is None:
            wl, wc, wconf = loss, correct, confidence
            batch_weight = float(n)
        else:
            # weights are 0 or >= the smallest normal float64 (validated); a product can still
            # overflow to inf, which the range check below reports
            with np.errstate(invalid="ignore", over="ignore"):
                wl = weight * loss
            if finite is not None:  # 0 * inf: a row of weight 0 adds nothing
                wl[~finite & (weight == 0)] = 0.0
            wc, wconf = weight * correct, weight * confidence
            with np.errstate(over="ignore"):
                batch_weight = float(weight.sum())
        with np.errstate(over="ignore"):
            loss_sum = float(wl.sum())
        sequential = None
        if not (self.weight + batch_weight < _SAFE and self.loss_sum + loss_sum < _SAFE):
            # rare (a total near float64's limit, or infinite losses): raises at the first row
            # whose running total leaves the range, else the sums to store (see _running_totals)
            with np.errstate(over="ignore"):
                sequential = self._running_totals(wl, t, weight, counted_inf, start,
                                                  batch_weight=batch_weight, loss_sum=loss_sum)
        # every check is done: add in place (no extra per-class arrays: for a large C each
        # fresh one costs page faults, 3-4x the time of a 1-row batch of 256000 classes)
        self.rows += n
        self.weight += batch_weight
        self.loss_sum += loss_sum
        self.correct += float(wc.sum())
        if n_inf:
            self.infinite_loss_rows += n_inf
            self.class_infinite += np.bincount(t[counted_inf], minlength=C)
        self.class_rows += np.bincount(t, minlength=C)
        self.class_weight += np.bincount(t, weights=weight, minlength=C)
        self.class_loss += np.bincount(t, weights=wl, minlength=C)
        if sequential is not None:  # the running totals checked: what batches of 1 row store
            weight_total, loss_total, class_weights, class_losses = sequential
            if weight_total is not None:
                self.weight = weight_total
            if loss_total is not None:
                self.loss_sum = loss_total
            for total, (classes, finals) in ((self.class_weight, class_weights), (self.class_loss, class_losses)):
                total[classes] = finals
        self.class_correct += np.bincount(t, weights=wc, minlength=C)
        # Bin b holds confidences in (b/B, (b+1)/B], compared with the edges compute() reports
        # (ceil(c * B) - 1 put c = 0.56 in (0.56, 0.57] at B = 100: 0.56 * 100 rounds up).
        b = np.searchsorted(np.arange(B + 1) / B, confidence, side="left") - 1
        np.clip(b, 0, B - 1, out=b)
        self.bin_weight += np.bincount(b, weights=weight, minlength=B)
        self.bin_confidence += np.bincount(b, weights=wconf, minlength=B)
        self.bin_correct += np.bincount(b, weights=wc, minlength=B)
        fl = loss if finite is None else loss[finite]
        if fl.size:
            with np.errstate(over="ignore"):  # a loss near 1.8e308: inf, the last bin
                h = fl / self.hist_bin_width
            np.minimum(h, self.hist_bins, out=h)
            h = h.astype(np.intp)
            rows = np.bincount(h, minlength=H)
            self.loss_hist += rows
            self.loss_hist_weight += (rows if weight is None else
                                      np.bincount(h, weights=weight if finite is None
                                                  else weight[finite], minlength=H))
            self.loss_min = min(self.loss_min, float(fl.min()))
            self.loss_max = max(self.loss_max, float(fl.max()))
        if n_inf:
            self.loss_max = math.inf

    def _running_totals(self, wl, t, weight, counted_inf, start, *, batch_weight, loss_sum):
        """The totals after the batch, added row by row; InvalidDataError at the first row that
        takes one beyond float64's range (the rare branch of ``_add``: a total reached _SAFE).

        A total's running value after row i is ``(...((total + v_0) + v_1) ... + v_i)`` in
        float64 (the sum a batch of one row at a time stores), for the weight total, the
        (weighted) loss total and each class's weight and loss sums. The row reported is the
        first at which one of them becomes inf, so it does not depend on the batch size; a
        loss sum may become inf only at a row of weight > 0 whose loss is +inf (else it is an
        overflow, of weight * loss or of the sum). Checked and stored are the same running
        values, so an overflow is never stored and never goes unreported. Where several totals
        leave the range at one row, the weights are named first, then a class's losses.

        Returns ``(weight, loss_sum, (classes, class_weights), (classes, class_losses))``: the
        totals to store, those followed row by row (a total is None, a class is not listed,
        when it stays below _SAFE: there the order of the additions cannot make it inf).
        ``batch_weight`` and ``loss_sum`` are the batch's (pairwise) sums ``_add`` took.
        """
        C = self.num_classes
        weighted = weight is not None
        legit = (lambda r: False) if counted_inf is None else (lambda r: bool(counted_inf[r]))
        found = []  # (row, rank, class or None): rank 0 weights, 1 a class's losses, 2 the total

        def running(total, values):
            return np.cumsum(np.concatenate(([total], values)))[1:]

        def first_inf(run):
            inf = np.isinf(run)
            return int(np.argmax(inf)) if inf[-1] else None  # running sums never decrease

        # the totals: the weight can only overflow; the loss sum may already be inf (legitimately)
        new_weight, new_loss = None, None
        if weighted and not self.weight + batch_weight < _SAFE:
            run = running(self.weight, weight)
            new_weight, r = float(run[-1]), first_inf(run)
            if r is not None:
                found.append((r, 0, None))
        if math.isfinite(self.loss_sum) and not self.loss_sum + loss_sum < _SAFE:
            run = running(self.loss_sum, wl)
            new_loss, r = float(run[-1]), first_inf(run)
            if r is not None and not legit(r):
                found.append((r, 2, None))
        # the classes whose sum reaches _SAFE (a finite sum before the batch: an inf one has an
        # infinite loss already), followed row by row in class order
        sums = []
        for rank, state, values in ((0, self.class_weight, weight), (1, self.class_loss, wl)):
            if values is None:
                sums.append((np.zeros(0, np.intp), np.zeros(0)))
                continue
            near = np.isfinite(state) & ~(state + np.bincount(t, weights=values, minlength=C)
                                          < _SAFE)
            rows = np.flatnonzero(near[t])
            rows = rows[np.argsort(t[rows], kind="stable")]
            classes, finals = [], []
            for part in np.split(rows, np.flatnonzero(np.diff(t[rows])) + 1) if rows.size else ():
                k = int(t[part[0]])
                run = running(state[k], values[part])
                classes.append(k)
                finals.append(run[-1])
                r = first_inf(run)
                if r is not None and (rank == 0 or not legit(part[r])):
                    found.append((int(part[r]), rank, k))
            sums.append((np.array(classes, np.intp), np.array(finals)))
        if found:
            r, rank, k = min(found, key=lambda f: f[:2])
            rescale = "; scale the sample weights down (the weighted means do not change)"
            if rank == 0:
                what = "the sample weights"
            else:
                what = (f"the {'weighted ' if weighted else ''}losses"
                        + ("" if k is None else f" of class {self.class_names[k]!r}"))
            raise InvalidDataError(
                f"{what} sum beyond float64's largest number (1.8e308) at this row"
                + (rescale if weighted else ""),
                column=self.weight_name if weighted else None,
                row=start + r,
            )
        return (new_weight, new_loss, *sums)

    def _check_range(self, *, weight, class_weight, loss_sum, class_loss, infinite_loss_rows,
                     class_infinite, where, weighted=True):
        """InvalidDataError when a total would leave float64's range (naming the weights).

        A sum of losses may be inf only where a row of weight > 0 has an infinite loss; any
        other inf is an overflow (of weight * loss, or of the sum), and would read as an inf mean.
        """
        rescale = "; scale the sample weights down (the weighted means do not change)"
        if not (math.isfinite(weight) and np.isfinite(class_weight).all()):
            raise InvalidDataError(
                f"the sample weights sum beyond float64's largest number (1.8e308) {where}"
                + rescale,
                column=self.weight_name,
            )
        overflow = np.isinf(class_loss) & (class_infinite == 0)
        if overflow.any() or (math.isinf(loss_sum) and not infinite_loss_rows):
            of_class = (f" of class {self.class_names[int(np.argmax(overflow))]!r}"
                        if overflow.any() else "")
            raise InvalidDataError(
                f"the {'weighted ' if weighted else ''}losses{of_class} sum beyond float64's "
                f"largest number (1.8e308) {where}" + (rescale if weighted else ""),
                column=self.weight_name if weighted else None,
            )

    # ------------------------------------------------------------------ merge / compute

    def _config(self):
        return (self.num_classes, self.from_logits, self.normalize, self.n_bins,
                self.hist_bin_width, self.hist_bins, self.class_names)

    def merge(self, other: ScoreAccumulator, /) -> ScoreAccumulator:
        """Add the rows of ``other`` (an accumulator with the same settings); returns self.

        Nothing is added, and ``InvalidDataError`` names the weights, when the merged sums of
        the weights or weighted losses leave float64's range.
        """
        if not isinstance(other, ScoreAccumulator):
            raise TypeError(f"other must be a ScoreAccumulator, got {type(other).__name__}")
        if other._config() != self._config():
            raise ValueError(
                "other must have the same num_classes, from_logits, normalize, n_bins, "
                f"histogram bins and class_names: got {other._config()}, this one has {self._config()}"
            )
        with np.errstate(over="ignore"):
            self._check_range(  # (merges are few: no fast path)
                weight=self.weight + other.weight,
                class_weight=self.class_weight + other.class_weight,
                loss_sum=self.loss_sum + other.loss_sum,
                class_loss=self.class_loss + other.class_loss,
                infinite_loss_rows=self.infinite_loss_rows + other.infinite_loss_rows,
                class_infinite=self.class_infinite + other.class_infinite,
                where="when merging parts",
                weighted=not (self.weight == self.rows and other.weight == other.rows),
            )
        for name in ("rows", "weight", "loss_sum", "correct", "infinite_loss_rows",
                     "clipped_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("class_rows", "class_infinite", "class_weight", "class_loss", "class_correct",
                     "bin_weight", "bin_confidence", "bin_correct", "loss_hist", "loss_hist_weight"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.loss_min = min(self.loss_min, other.loss_min)
        self.loss_max = max(self.loss_max, other.loss_max)
        return self

    def compute(self) -> ScoreResult:
        """The metrics of all rows added so far (see the class docstring for the formulas).

        A mean whose weight is 0 is None (see ``ScoreResult``).
        """

        def mean(num, den):
            return float(num / den) if den != 0 else None

        per_class = []
        for k in range(self.num_classes):
            w = float(self.class_weight[k])
            per_class.append({
                "class": k,
                "name": self.class_names[k],
                "rows": int(self.class_rows[k]),
                "weight": w,
                "cross_entropy_nats": mean(self.class_loss[k], w),
                "accuracy": mean(self.class_correct[k], w),
                "infinite_loss_rows": int(self.class_infinite[k]),
            })
        calibration = []
        for b in range(self.n_bins):
            w = float(self.bin_weight[b])
            calibration.append({
                "lower": b / self.n_bins,
                "upper": (b + 1) / self.n_bins,
                "weight": w,
                "confidence": mean(self.bin_confidence[b], w),
                "accuracy": mean(self.bin_correct[b], w),
            })
        ece = mean(np.abs(self.bin_correct - self.bin_confidence).sum(), self.weight)
        seen = self.loss_min <= self.loss_max  # a finite loss, or an infinite one that counts
        histogram = {
            "bin_width": self.hist_bin_width,
            "counts": self.loss_hist.copy(),  # last entry: losses >= bins * bin_width
            "weights": self.loss_hist_weight.copy(),
            "min": self.loss_min if seen else None,
            "max": self.loss_max if seen else None,
        }
        return ScoreResult(
            rows=self.rows,
            weight=self.weight,
            class_names=self.class_names,
            cross_entropy_nats=mean(self.loss_sum, self.weight),
            accuracy=mean(self.correct, self.weight),
            expected_calibration_error=ece,
            per_class=tuple(per_class),
            calibration=tuple(calibration),
            loss_histogram=histogram,
            infinite_loss_rows=self.infinite_loss_rows,
            clipped_rows=self.clipped_rows,
        )
