r"""Binary cross-entropy from logits (sigmoid cross-entropy) and its closed-form gradient.

Stable form: :math:`\log\sigma(x) = -\mathrm{softplus}(-x)` and
:math:`\log(1-\sigma(x)) = -\mathrm{softplus}(x)`, with
:math:`\mathrm{softplus}(x) = \max(x, 0) + \mathrm{log1p}(e^{-|x|})`: no ``log(0)``, no clipping.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device

from . import _validation as v
from ._probabilities import _binary_targets, _broadcast_weight, _reduce_elementwise
from ._softmax import _constant
from ._xmath import as_0d, mul0


def binary_cross_entropy_with_logits(
    logits: Any,
    targets: Any,
    *,
    weight: Any = None,
    pos_weight: Any = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    base: float | None = None,
) -> Any:
    r"""Binary cross-entropy of ``sigmoid(logits)``, elementwise, computed from the logits.

    .. math:: \ell = w\,\big[p_w\, t\, \mathrm{softplus}(-x) + (1 - t)\, \mathrm{softplus}(x)\big],
              \qquad t \leftarrow (1 - \varepsilon)\, t + \varepsilon / 2

    as ``F.binary_cross_entropy_with_logits`` (label smoothing as optax / Keras: towards 1/2).
    ``"mean"`` averages over all elements; an empty input gives 0.

    Args:
      logits: any shape, real floating point (float16/bfloat16 computed in float32).
      targets: same shape; 0/1 labels or soft targets (not range-checked, as in PyTorch).
      weight: elementwise weight broadcastable to ``logits``.
      pos_weight: positive-class weight broadcastable to ``logits`` (e.g. ``[num_labels]``).
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``; base: None for nats, 2 for bits.

    The value checks (no NaN in targets, finite weights) are skipped inside ``jax.jit``.

    Example:
      >>> import numpy as np, crossent as ce
      >>> x = np.log(np.array([0.8, 0.2]) / (1 - np.array([0.8, 0.2])))  # logit of 0.8 and 0.2
      >>> round(float(ce.binary_cross_entropy_with_logits(x, np.array([1.0, 0.0]))), 4)
      0.2231
    """
    loss, _ = _bce_logits(logits, targets, weight=weight, pos_weight=pos_weight,
                          label_smoothing=label_smoothing, reduction=reduction, base=base,
                          with_grad=False)
    return loss


def binary_cross_entropy_with_logits_and_grad(
    logits: Any,
    targets: Any,
    *,
    weight: Any = None,
    pos_weight: Any = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    base: float | None = None,
) -> tuple[Any, Any]:
    r""":func:`binary_cross_entropy_with_logits` and its gradient with respect to ``logits``.

    .. math:: \frac{\partial \ell}{\partial x} = w\,\big[(1 + (p_w - 1)\,t)\,\sigma(x) - p_w\, t\big],

    which is :math:`\sigma(x) - t` without weights; divided by the number of elements for
    ``"mean"``. For ``reduction="none"`` it is the gradient of the sum of the elementwise losses.

    Returns:
      ``(loss, grad)``: the loss as :func:`binary_cross_entropy_with_logits` gives it, and
      ``grad`` of ``logits``' shape and dtype.

    Example:
      >>> import numpy as np, crossent as ce
      >>> loss, grad = ce.binary_cross_entropy_with_logits_and_grad(np.zeros(2), np.array([1.0, 0.0]))
      >>> grad.tolist()
      [-0.25, 0.25]
    """
    return _bce_logits(logits, targets, weight=weight, pos_weight=pos_weight,
                       label_smoothing=label_smoothing, reduction=reduction, base=base,
                       with_grad=True)


def _bce_logits(logits: Any, targets: Any, *, weight: Any, pos_weight: Any, label_smoothing: float,
                reduction: str, base: float | None, with_grad: bool) -> tuple[Any, Any]:
    v.check_array("logits", logits)
    v.check_array("targets", targets)
    xp = v.namespace(logits, targets, weight, pos_weight)
    reduction = v.check_reduction(reduction)
    ln_base = v.log_base(base)
    eps = v.check_unit_interval("label_smoothing", label_smoothing)
    dtype = v.compute_dtype(xp, logits, "logits")
    dev = device(logits)
    x = v.as_float(xp, logits, dtype, "logits")
    t = _binary_targets(xp, targets, logits, dtype)
    if eps > 0:
        t = (1.0 - eps) * t + 0.5 * eps
    zero = xp.zeros((), dtype=dtype, device=dev)
    one = xp.ones((), dtype=dtype, device=dev)
    pw = None if pos_weight is None else _broadcast_weight(xp, "pos_weight", pos_weight, x.shape, dtype)
    w = None if weight is None else _broadcast_weight(xp, "weight", weight, x.shape, dtype)

    pos = t if pw is None else pw * t
    neg = 1.0 - t
    # 0 * softplus(+-inf) must be 0, not NaN: an infinite logit on the side the target excludes.
    # mul0 masks only that case, so d loss / d targets stays right where t is 0 or 1.
    elem = mul0(xp, pos, _softplus(xp, -x, zero)) + mul0(xp, neg, _softplus(xp, x, zero))
    if w is not None:
        elem = w * elem
    loss = _reduce_elementwise(xp, elem, reduction, zero, one)
    if ln_base is not None:
        loss = loss / ln_base
    loss = as_0d(xp, loss)
    if not with_grad:
        return loss, None
    sig = _sigmoid(xp, x, zero, one)
    grad = (pos + neg) * sig - pos  # = (1 + (pw - 1) t) sigma - pw t
    if w is not None:
        grad = w * grad
    n = math.prod(grad.shape)
    if reduction == "mean" and n:
        grad = grad / n
    if ln_base is not None:
        grad = grad / ln_base
    return loss, xp.astype(grad, logits.dtype, copy=False)


def _softplus(xp: Any, x: Any, zero: Any) -> Any:
    r"""log(1 + e^x) as :math:`m + \operatorname{log1p}(e^{x - m} + \operatorname{expm1}(-m))` with
    the shift :math:`m = \max(x, 0)` (0 where not finite) a constant to autograd: one of the two
    terms is 1, so nothing overflows, and the derivative is :math:`\sigma(x)` everywhere. Not
    :math:`\max(x, 0) + \operatorname{log1p}(e^{-|x|})`: the same value, but autograd's one-sided
    derivatives of max and |x| at x = 0 (jax: 1/2 and 1) made jax.grad of the loss 0 at a logit
    of 0 and torch's second derivative 0 there; nor numpy's ``logaddexp``, which warns on NaN."""
    # +inf is its own value (derivative 1), kept out of the formula, whose backward would read
    # e^(inf - m) at the shift 0 (NaN gradients at infinite logits).
    pos_inf = x == math.inf
    x_safe = xp.where(pos_inf, zero, x)
    m = xp.maximum(x_safe, zero)
    m = _constant(xp.where(xp.isfinite(m), m, zero))
    return xp.where(pos_inf, x, m + xp.log1p(xp.exp(x_safe - m) + xp.expm1(-m)))


def _sigmoid(xp: Any, x: Any, zero: Any, one: Any) -> Any:
    # exp of a non-positive number only: no overflow for |x| large.
    ex = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, one / (one + ex), ex / (one + ex))
