r"""Cross-entropy losses from probabilities: categorical ``log_loss`` and ``binary_cross_entropy``.

Working from probabilities needs a guard against ``log(0)``: here it is the documented clipping
``eps="auto"`` (``finfo(probs.dtype).eps``, the epsilon of the input dtype), the only clipping
anywhere in crossent. Nothing is ever renormalized silently: ``log_loss`` raises on rows that do
not sum to 1 unless ``normalize=True``.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device

from . import _validation as v
from ._softmax import _safe_divide
from ._xmath import as_0d, log0, log1m0, mul0


def log_loss(
    probs: Any,
    targets: Any,
    *,
    axis: int = -1,
    eps: float | str | None = "auto",
    normalize: bool = False,
    weight: Any = None,
    sample_weight: Any = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    base: float | None = None,
) -> Any:
    r"""Categorical cross-entropy of predicted probabilities (scikit-learn's ``log_loss``).

    .. math:: \ell_i = -\sum_c w_c\, t_{ic} \log \max(q_{ic}, \epsilon),

    with :math:`t_i` one-hot for integer labels (then :math:`\ell_i = -w_{y_i}\log q_{i y_i}`).
    ``"mean"`` divides by :math:`\sum_i s_i w_{y_i}` over non-ignored rows (``s`` the sample
    weights); for probability targets by :math:`\sum_i s_i`. A zero denominator gives 0.

    Args:
      probs: predicted probabilities, shape ``[..., num_classes]``, values in [0, 1], each row
        summing to 1 within ``sqrt(finfo(probs.dtype).eps)``.
      targets: integer labels of shape ``[...]`` or probabilities of ``probs``' shape.
      axis: the class axis.
      eps: lower clip of ``probs`` before the log: ``"auto"`` is ``finfo(probs.dtype).eps``, the
        epsilon of the probabilities as given (float16: 9.77e-4, bfloat16: 7.8e-3, float32:
        1.19e-7, as scikit-learn), although they are computed in float32 at least; ``None`` or 0
        clips nothing (a zero probability on the true class then gives inf). The clip bounds each
        row's loss by ``-log(eps)``: on float32 probabilities of a softmax this gives
        scikit-learn's value, not the exact loss; for that, pass ``eps=None`` or use
        :func:`softmax_cross_entropy` on the logits.
      normalize: divide each row by its sum first (otherwise rows must already sum to 1).
      weight: class weights ``[num_classes]``; sample_weight: row weights ``[...]``.
      ignore_index: a label whose rows contribute nothing.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (each row's loss times its sample weight,
        0 on ignored rows).
      base: None for nats, 2 for bits.

    Example (true class 2 of 3):
      >>> import numpy as np, crossent as ce
      >>> round(float(ce.log_loss(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]), np.array([1, 1]),
      ...                         reduction="sum")), 4)
      1.8326
      >>> ce.log_loss(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]), np.array([1, 1]),
      ...             reduction="none").round(4).tolist()
      [0.2231, 1.6094]

    The value checks (probabilities in [0, 1], row sums, labels in range, no NaN) need the
    values, so they are skipped inside ``jax.jit``.

    References: scikit-learn ``sklearn.metrics.log_loss`` (which clips at both ends and therefore
    differs where predictions are 0 or 1).
    """
    v.check_array("probs", probs)
    v.check_array("targets", targets)
    xp = v.namespace(probs, targets, weight, sample_weight)
    reduction = v.check_reduction(reduction)
    ln_base = v.log_base(base)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    ignore_index = v.check_ignore_index(ignore_index)
    dtype = v.compute_dtype(xp, probs, "probs")
    clip = v.check_eps(xp, eps, probs.dtype)
    ax = v.normalize_axis(axis, probs.ndim)
    dev = device(probs)
    q = xp.moveaxis(probs, ax, -1) if ax != probs.ndim - 1 else probs
    q = v.as_float(xp, q, dtype, "probs")
    v.check_in_unit_interval(xp, "probs", q)
    num_classes = q.shape[-1]
    batch_shape = tuple(q.shape[:-1])
    zero = xp.zeros((), dtype=dtype, device=dev)
    one = xp.ones((), dtype=dtype, device=dev)

    row_sums = xp.sum(q, axis=-1, keepdims=True)
    if normalize:
        if v.host_bool(xp.any(row_sums == 0)):
            raise ValueError(
                "probs: normalize=True needs every row to have a positive sum, got a row of zeros at "
                f"row {v._first(xp, row_sums[..., 0] == 0)}"
            )
        q = q / row_sums
    elif num_classes > 0:
        # The tolerance of the probabilities' own dtype: a bfloat16 softmax cannot sum to 1 any
        # closer than bfloat16's precision, however precisely it is summed here.
        tol = math.sqrt(float(xp.finfo(probs.dtype).eps))
        off = xp.abs(row_sums[..., 0] - 1.0) > tol
        if v.host_bool(xp.any(off)):
            i = v._first(xp, off)
            bad = float(xp.reshape(row_sums, (-1,))[i])
            raise ValueError(
                f"probs: each row must sum to 1 within {tol:.3g} (pass normalize=True to renormalize), "
                f"got a row summing to {bad:.10g} at row {i}"
            )
    log_q = xp.log(xp.maximum(q, xp.asarray(clip, dtype=dtype, device=dev))) if clip > 0 else log0(xp, q)

    w = None if weight is None else v.check_class_weight(xp, weight, num_classes, dtype)
    sw = None if sample_weight is None else v.check_sample_weight(xp, sample_weight, batch_shape, dtype)
    if v.is_integer_array(xp, targets):
        if tuple(targets.shape) != batch_shape:
            raise ValueError(
                f"targets of class indices must have the shape of probs without axis {axis}, "
                f"{batch_shape}, got {tuple(targets.shape)}"
            )
        labels = v.check_labels(xp, targets, num_classes, ignore_index)
        keep = ~v.ignored(xp, labels, ignore_index)
        onehot = xp.expand_dims(labels, axis=-1) == xp.arange(num_classes, device=dev)
        target_w = one if w is None else xp.sum(xp.where(onehot, w, zero), axis=-1)
        row = -target_w * xp.sum(xp.where(onehot, log_q, zero), axis=-1)
        # Under jax.jit the labels are not checked: an out-of-range one (no one-hot entry) makes
        # its row NaN, as in softmax_cross_entropy, instead of a loss of 0 counted in the mean.
        bad = keep & ((labels < 0) | (labels >= num_classes))
        row = row * xp.where(bad, xp.asarray(math.nan, dtype=dtype, device=dev), one)
    elif v.is_float_array(xp, targets):
        if tuple(targets.shape) != tuple(probs.shape):
            raise ValueError(
                f"targets of probabilities must have the shape of probs {tuple(probs.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        if ignore_index is not None:
            raise ValueError(
                f"ignore_index applies to integer class targets only, got ignore_index={ignore_index} "
                "with probability targets"
            )
        v.check_no_nan(xp, "targets", targets)
        t = xp.moveaxis(targets, ax, -1) if ax != probs.ndim - 1 else targets
        t = v.as_float(xp, t, dtype, "targets")
        wt = t if w is None else w * t
        row = -xp.sum(mul0(xp, wt, log_q), axis=-1)
        keep = xp.ones(batch_shape, dtype=xp.bool, device=dev)
        target_w = one
    else:
        raise TypeError(
            f"targets must be integer class indices or floating-point probabilities, got dtype {targets.dtype}"
        )
    row_w = xp.where(keep, one, zero) if sw is None else xp.where(keep, sw, zero)
    row = xp.where(keep, row, zero)
    loss = _reduce(xp, row, row_w, row_w * target_w, reduction, sw is not None, zero, one)
    return as_0d(xp, loss if ln_base is None else loss / ln_base)


def binary_cross_entropy(
    probs: Any,
    targets: Any,
    *,
    eps: float | str | None = "auto",
    weight: Any = None,
    pos_weight: Any = None,
    reduction: str = "mean",
    base: float | None = None,
) -> Any:
    r"""Binary cross-entropy of predicted probabilities, elementwise.

    .. math:: \ell = -w\,\big[p_w\, t \log \hat p + (1 - t) \log(1 - \hat p)\big],
              \qquad \hat p = \min(\max(p, \epsilon), 1 - \epsilon)

    as ``F.binary_cross_entropy`` (which instead clamps each log at -100; both agree on
    probabilities in :math:`[\epsilon, 1-\epsilon]`). ``"mean"`` is the mean over all elements
    (PyTorch's rule: weights rescale elements, they are not a denominator); an empty input gives 0.

    Args:
      probs: probabilities in [0, 1], any shape.
      targets: same shape (labels 0/1 or soft targets; not range-checked, as in PyTorch).
      eps: clip of ``probs`` (``"auto"`` = ``finfo(probs.dtype).eps`` of the input dtype, e.g.
        9.77e-4 for float16; None or 0: no clip).
      weight: elementwise weight broadcastable to ``probs``.
      pos_weight: weight of the positive term, broadcastable to ``probs`` (e.g. ``[num_labels]``).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``; base: None for nats, 2 for bits.

    The value checks (probabilities in [0, 1], no NaN, finite weights) are skipped inside
    ``jax.jit``, where arrays have no values.

    Example:
      >>> import numpy as np, crossent as ce
      >>> round(float(ce.binary_cross_entropy(np.array([0.8, 0.2]), np.array([1.0, 0.0]))), 4)
      0.2231
    """
    v.check_array("probs", probs)
    v.check_array("targets", targets)
    xp = v.namespace(probs, targets, weight, pos_weight)
    reduction = v.check_reduction(reduction)
    ln_base = v.log_base(base)
    dtype = v.compute_dtype(xp, probs, "probs")
    clip = v.check_eps(xp, eps, probs.dtype)
    dev = device(probs)
    p = v.as_float(xp, probs, dtype, "probs")
    v.check_in_unit_interval(xp, "probs", p)
    t = _binary_targets(xp, targets, probs, dtype)
    if clip > 0:
        p = xp.clip(p, clip, 1.0 - clip)
    zero = xp.zeros((), dtype=dtype, device=dev)
    one = xp.ones((), dtype=dtype, device=dev)
    pos = t if pos_weight is None else _broadcast_weight(xp, "pos_weight", pos_weight, p.shape, dtype) * t
    # 0 log 0 = 0 where a target excludes an unclipped 0 or 1 (eps=0); derivatives kept elsewhere.
    elem = -(mul0(xp, pos, log0(xp, p)) + mul0(xp, 1.0 - t, log1m0(xp, p)))
    if weight is not None:
        elem = _broadcast_weight(xp, "weight", weight, p.shape, dtype) * elem
    loss = _reduce_elementwise(xp, elem, reduction, zero, one)
    return as_0d(xp, loss if ln_base is None else loss / ln_base)


def _binary_targets(xp: Any, targets: Any, inputs: Any, dtype: Any) -> Any:
    if tuple(targets.shape) != tuple(inputs.shape):
        raise ValueError(
            f"targets must have the shape of the input {tuple(inputs.shape)}, got {tuple(targets.shape)}"
        )
    t = v.as_float(xp, targets, dtype, "targets")
    v.check_no_nan(xp, "targets", t)
    return t


def _broadcast_weight(xp: Any, name: str, w: Any, shape: tuple, dtype: Any) -> Any:
    v.check_array(name, w)
    try:
        w_b = xp.broadcast_to(w, shape)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{name} must be broadcastable to the input's shape {tuple(shape)}, got shape {tuple(w.shape)}"
        ) from exc
    w_b = v.as_float(xp, w_b, dtype, name)
    v.check_finite_weights(xp, name, w_b)
    return w_b


def _reduce(xp: Any, row: Any, row_w: Any, den_w: Any, reduction: str, weighted_rows: bool,
            zero: Any, one: Any) -> Any:
    """Reduce per-row losses: "none" (times sample weights), "sum", or weighted "mean"."""
    if reduction == "none":
        return row * row_w if weighted_rows else row
    total = xp.sum(row_w * row)
    if reduction == "sum":
        return total
    return _safe_divide(xp, total, xp.sum(den_w), zero, one)


def _reduce_elementwise(xp: Any, elem: Any, reduction: str, zero: Any, one: Any) -> Any:
    if reduction == "none":
        return elem
    total = xp.sum(elem)
    if reduction == "sum":
        return total
    n = xp.asarray(float(math.prod(elem.shape)), dtype=elem.dtype, device=device(elem))
    return _safe_divide(xp, total, n, zero, one)
