r"""Softmax cross-entropy from logits, with integer or probability targets, and its gradient.

One private Array-API implementation (:func:`_softmax_ce`) computes the per-row loss and, on
request, the closed-form gradient; the public functions validate and delegate (STYLE.md item 2).

Semantics are PyTorch's ``F.cross_entropy`` with DESIGN.md's documented deviations:

* a ``"mean"`` whose denominator is zero (no non-ignored target, an empty batch, a total class
  weight of 0) is 0 with a zero gradient (PyTorch: NaN);
* label smoothing spreads ``label_smoothing`` over the classes whose logit is finite in that row
  (``eps / K``, K = number of finite logits; PyTorch: ``eps / C``, and inf when a logit is -inf);
* a zero target on a -inf logit contributes 0 with a zero gradient; a positive one gives +inf;
* an ignored row contributes 0 whatever its logits are.

Not deviations, but worth knowing (documented in the public docstrings and pinned by tests): a
row of all -inf logits with a non-ignored target gives NaN (as PyTorch), and ``softcap`` maps -inf
to the finite ``-softcap`` (Gemma 2 caps first), so a cap unmasks masked classes.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device, is_jax_array, is_numpy_namespace

from . import _validation as v
from ._xmath import as_0d, mul0


def softmax_cross_entropy(
    logits: Any,
    targets: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    sample_weight: Any = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    base: float | None = None,
) -> Any:
    r"""Cross-entropy between ``targets`` and the softmax of ``logits``.

    With :math:`x` the (soft-capped) logits of one row, :math:`\mathrm{lse} = \log\sum_c e^{x_c}`
    and :math:`\log q_c = x_c - \mathrm{lse}`, the loss of a row is

    .. math::

       \ell = -\sum_c w_c\, t_c \log q_c + z\,\mathrm{lse}^2,
       \qquad t = (1 - \varepsilon)\,\mathrm{target} + \frac{\varepsilon}{K}\,[x_c > -\infty]

    where the target is one-hot for an integer label :math:`y` (then the first term is
    :math:`(1-\varepsilon) w_y (\mathrm{lse} - x_y) - \frac{\varepsilon}{K}\sum_{c} w_c \log q_c`, as
    ``F.cross_entropy``), K is the number of finite logits in the row, ``w`` the class weights,
    ``z`` the z-loss coefficient (PaLM) and the logits are first soft-capped,
    :math:`x \leftarrow s \tanh(x / s)` (Gemma 2), when ``softcap`` is given.

    ``"mean"`` divides the sum of the first term by :math:`\sum_i s_i w_{y_i}` over non-ignored rows
    (``s`` the sample weights; for probability targets by :math:`\sum_i s_i`), and the sum of the
    z-loss term by :math:`\sum_i s_i` over non-ignored rows; a zero denominator gives 0.

    Masks and soft-capping: a -inf logit masks its class (a zero target there contributes 0 with
    a zero gradient, a positive one gives +inf). A row whose logits are all -inf leaves no class
    possible: its softmax is undefined and a non-ignored target there gives NaN (as PyTorch; a
    zero sample weight does not help, 0 * NaN is NaN): give such rows ``ignore_index`` or drop
    them. ``softcap`` is applied first (Gemma 2), and :math:`s \tanh(-\infty / s) = -s` is
    finite: a masked class is no longer masked once capped (it gets probability, label smoothing,
    and a finite loss for a positive target). To keep a mask with a cap, cap first, then set the
    masked logits to -inf, and pass no ``softcap``.

    Under ``jax.jit`` the value checks (labels in range, no NaN in targets, finite weights) are
    skipped, since traced arrays have no values: an out-of-range label then makes its row's loss
    (and gradient) NaN.

    Args:
      logits: shape ``[..., num_classes]`` (classes along ``axis``), real floating point;
        float16/bfloat16 are computed in float32. -inf masks a class (see above).
      targets: integer class indices of shape ``[...]`` (``logits``' shape without ``axis``), or
        probabilities of ``logits``' shape (not validated: distillation targets need not sum to 1).
      axis: the class axis of ``logits`` (``axis=1`` for PyTorch's ``(N, C, d1, ..., dk)`` layout).
      weight: class weights, shape ``[num_classes]``, finite.
      sample_weight: per-row weights, shape ``[...]``, finite.
      ignore_index: a label whose rows contribute nothing (integer targets only).
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      z_loss: coefficient of :math:`\mathrm{lse}^2` (not combinable with ``base``).
      softcap: positive cap :math:`s`, or None; applied before everything else, it turns -inf
        masks into finite logits of :math:`-s` (see above).
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``[...]``: each row's loss times its
        sample weight, 0 on ignored rows).
      base: None for nats, 2 for bits.

    Returns:
      The loss: a 0-d array, or shape ``[...]`` for ``reduction="none"``; float32 at least.

    Example (true class 2 of 3; the logits are log-probabilities, so softmax gives them back):
      >>> import numpy as np, crossent as ce
      >>> good, bad = np.log([[0.1, 0.8, 0.1]]), np.log([[0.7, 0.2, 0.1]])
      >>> round(float(ce.softmax_cross_entropy(good, np.array([1]))), 4)
      0.2231
      >>> round(float(ce.softmax_cross_entropy(bad, np.array([1]))), 4)
      1.6094
      >>> round(float(ce.softmax_cross_entropy(good, np.array([1]), base=2)), 4)  # bits
      0.3219

    References:
      PyTorch ``torch.nn.functional.cross_entropy``; Szegedy et al., Rethinking the Inception
      Architecture (label smoothing, arXiv:1512.00567); Chowdhery et al., PaLM (z-loss,
      arXiv:2204.02311); Gemma Team, Gemma 2 (logit soft-capping, arXiv:2408.00118).
    """
    loss, _ = _softmax_ce(
        logits, targets, axis=axis, weight=weight, sample_weight=sample_weight,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, reduction=reduction, base=base, with_grad=False,
    )
    return loss


def softmax_cross_entropy_and_grad(
    logits: Any,
    targets: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    sample_weight: Any = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    base: float | None = None,
) -> tuple[Any, Any]:
    r""":func:`softmax_cross_entropy` and its gradient with respect to ``logits``, in closed form.

    For a row with class weights ``w`` and smoothed target ``t`` the gradient with respect to the
    (soft-capped) logits is

    .. math:: \frac{\partial \ell}{\partial x} = \Big(\sum_c w_c t_c\Big)\, q - w \odot t
              + 2 z\, \mathrm{lse}\, q,

    which is :math:`q - \mathrm{onehot}(y)` for plain integer targets (softmax minus target),
    scaled by the row's weight over the ``"mean"`` denominator and chained through the soft-cap,
    :math:`\partial (s\tanh(x/s)) / \partial x = 1 - \tanh^2(x/s)`. For ``reduction="none"`` the
    gradient is that of the sum of the per-row losses.

    Masks, ``softcap`` and ``jax.jit`` behave as in :func:`softmax_cross_entropy`: a class masked by
    -inf gets a zero gradient; after ``softcap`` a -inf logit is the finite :math:`-s` and its class
    is no longer masked (its gradient is still 0, since :math:`\tanh' = 0` there, while its
    probability is not); a row of all -inf logits with a non-ignored target gives a NaN loss and
    gradient; value checks are skipped under ``jax.jit``.

    Returns:
      ``(loss, grad)``; ``grad`` has ``logits``' shape and dtype.

    Example:
      >>> import numpy as np, crossent as ce
      >>> loss, grad = ce.softmax_cross_entropy_and_grad(np.zeros((1, 4)), np.array([2]))
      >>> grad.round(4).tolist()
      [[0.25, 0.25, -0.75, 0.25]]
    """
    return _softmax_ce(
        logits, targets, axis=axis, weight=weight, sample_weight=sample_weight,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, reduction=reduction, base=base, with_grad=True,
    )


def _softmax_ce(
    logits: Any, targets: Any, *, axis: int, weight: Any, sample_weight: Any,
    ignore_index: int | None, label_smoothing: float, z_loss: float, softcap: float | None,
    reduction: str, base: float | None, with_grad: bool,
) -> tuple[Any, Any]:
    # ---- validation --------------------------------------------------------------------------
    v.check_array("logits", logits)
    v.check_array("targets", targets)
    xp = v.namespace(logits, targets, weight, sample_weight)
    reduction = v.check_reduction(reduction)
    ln_base = v.log_base(base)
    eps = v.check_unit_interval("label_smoothing", label_smoothing)
    z = v.check_nonnegative_scalar("z_loss", z_loss)
    cap = v.check_softcap(softcap)
    ignore_index = v.check_ignore_index(ignore_index)
    if z > 0 and ln_base is not None:
        raise ValueError(
            f"z_loss and base cannot be combined (z_loss is a regularizer, not a loss in bits): "
            f"got z_loss={z_loss}, base={base}"
        )
    dtype = v.compute_dtype(xp, logits, "logits")
    ax = v.normalize_axis(axis, logits.ndim)
    dev = device(logits)
    x = xp.moveaxis(logits, ax, -1) if ax != logits.ndim - 1 else logits
    x = v.as_float(xp, x, dtype, "logits")
    num_classes = x.shape[-1]
    batch_shape = tuple(x.shape[:-1])

    integer_targets = v.is_integer_array(xp, targets)
    if integer_targets:
        if tuple(targets.shape) != batch_shape:
            raise ValueError(
                f"targets of class indices must have the shape of logits without axis {axis}, "
                f"{batch_shape}, got {tuple(targets.shape)}"
            )
        labels = v.check_labels(xp, targets, num_classes, ignore_index)
    elif v.is_float_array(xp, targets):
        if tuple(targets.shape) != tuple(logits.shape):
            raise ValueError(
                f"targets of probabilities must have the shape of logits {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)} (class indices must have an integer dtype)"
            )
        if ignore_index is not None:
            raise ValueError(
                f"ignore_index applies to integer class targets only, got ignore_index={ignore_index} "
                "with probability targets"
            )
        v.check_no_nan(xp, "targets", targets)
        t = xp.moveaxis(targets, ax, -1) if ax != logits.ndim - 1 else targets
        if not is_numpy_namespace(xp):
            t = v.as_float(xp, t, dtype, "targets")
        # numpy: the fast passes read float32/float64 targets in place, cast others a block at a time;
        # converted below only for the Array-API path.
    else:
        raise TypeError(
            f"targets must be integer class indices or floating-point probabilities, got dtype {targets.dtype}"
        )
    w = None if weight is None else v.check_class_weight(xp, weight, num_classes, dtype)
    sw = None if sample_weight is None else v.check_sample_weight(xp, sample_weight, batch_shape, dtype)

    zero = xp.zeros((), dtype=dtype, device=dev)
    one = xp.ones((), dtype=dtype, device=dev)

    # ---- which rows count ----------------------------------------------------------------------
    if integer_targets and ignore_index is not None:
        keep = ~v.ignored(xp, labels, ignore_index)
    else:
        keep = xp.ones(batch_shape, dtype=xp.bool, device=dev)
    safe_labels = xp.where(keep, labels, xp.zeros((), dtype=labels.dtype, device=dev)) if integer_targets else None
    row_w = xp.where(keep, one, zero) if sw is None else xp.where(keep, sw, zero)

    # ---- per-row loss (and gradient) -------------------------------------------------------------
    fast_grad = None
    blocked = None
    if num_classes == 0:
        # No class: every row is ignored (labels were checked) or has an empty sum.
        ce_row = xp.zeros(batch_shape, dtype=dtype, device=dev)
        lse = xp.zeros(batch_shape, dtype=dtype, device=dev)
        target_w = xp.zeros(batch_shape, dtype=dtype, device=dev) if integer_targets else one
        grad = xp.zeros(x.shape, dtype=dtype, device=dev) if with_grad else None
        z = 0.0
    else:
        # numpy logits and integer labels: numba's kernels where they take the call
        # (_numba_takes), else the Array-API path's arithmetic in blocks of rows
        # (crossent.cpu._blocked: no numba, a softcap, a z-loss with smoothing and the gradient), before the
        # cap, whose full-size tanh it avoids. Probability targets likewise (_numpy_fast_soft).
        numba = False
        soft_fast = None
        if is_numpy_namespace(xp) and not x.flags.c_contiguous and x.size and _cpu_enabled():
            # Fortran order, axis != -1: one C-ordered copy (100% of the logits) for the fast
            # paths, instead of the Array-API path's temporaries (451%).
            x = x.copy(order="C")
        if integer_targets and is_numpy_namespace(xp):
            numba = _numba_takes(x, cap, z, eps, with_grad)
            if not numba:
                blocked = _numpy_blocked_stats(x, safe_labels, cap, keep, eps, w)
        elif is_numpy_namespace(xp):
            soft_fast = _numpy_fast_soft(x, t, w, eps, cap, z, row_w if with_grad else None, reduction, ln_base)
            if soft_fast is None:
                t = v.as_float(xp, t, dtype, "targets")
        if cap is not None and blocked is None and soft_fast is None:
            tanh = xp.tanh(x / cap)
            x = cap * tanh
        fast = None
        if soft_fast is not None:
            lse, ce_row, fast_grad = soft_fast
            target_w = one
            grad = fast_grad
        elif blocked is not None:
            pass  # per-row statistics below; the gradient comes after the reduction's scales
        elif numba and eps > 0.0:
            # numba's smoothing kernels (_numba_takes): the same per-row statistics, and with the
            # gradient wanted, the finished gradient in the same pass.
            blocked, fast_grad = _numpy_fast_smoothed(x, safe_labels, w, eps, keep, row_w, with_grad, reduction,
                                                      ln_base)
        elif integer_targets and eps == 0.0 and is_numpy_namespace(xp):
            if not with_grad:
                fast = _numpy_fast_lse_and_nll(x, safe_labels)
            elif cap is None:
                target_w = one if w is None else xp.where(keep, w[safe_labels], zero)
                fast = _numpy_fast_grad(x, safe_labels, row_w * target_w, keep, reduction, ln_base,
                                        z_loss=z, row_w=row_w)
                if fast is not None:
                    lse, nll, fast_grad = fast
        if soft_fast is not None:
            pass  # lse, ce_row and (with_grad) the finished gradient come from the kernel
        elif blocked is not None:
            # The Array-API path's per-row formulas below, on the fast pass's statistics. The
            # kernels take an ignored row's logits as they are: its values are masked before any
            # arithmetic (0 * inf, an overflowing lse^2) could warn.
            lse, nll = (xp.where(keep, xp.reshape(a, batch_shape), zero) for a in (blocked.lse, blocked.nll))
            target_w = one if w is None else xp.where(keep, w[safe_labels], zero)
            ce_row = (1.0 - eps) * target_w * nll if eps < 1.0 else xp.zeros_like(nll)
            if eps > 0.0:
                smoothed = xp.where(keep, xp.reshape(blocked.smoothed, batch_shape), zero)
                ce_row = ce_row - eps * smoothed / xp.reshape(blocked.count, batch_shape)
            grad = fast_grad
        elif fast is not None:
            lse, nll = (xp.where(keep, a, zero) for a in fast[:2])  # as above
            target_w = one if w is None else xp.where(keep, w[safe_labels], zero)
            ce_row = target_w * nll if w is not None else nll
            grad = fast_grad
        else:
            if integer_targets and ignore_index is not None:
                # An ignored row contributes 0 whatever its logits are: compute it on zeros, so
                # its NaN or all -inf logits raise no floating-point warning and leak into nothing.
                x = xp.where(xp.expand_dims(keep, axis=-1), x, zero)
            # The shift m is a constant to autograd (torch detach, jax stop_gradient): the loss
            # does not depend on it, and differentiating max costs jax.grad 3.7x the time.
            m = _constant(xp.max(x, axis=-1, keepdims=True))
            # Only an all -inf row's max is replaced (by 0, so that x - m is -inf, not NaN). A
            # +inf max stays: x - m is NaN at that logit, so the row's loss and gradient are NaN,
            # as in PyTorch and the CPU kernels (with m = 0 they were +inf and -1 at the label).
            m = xp.where(m == -math.inf, zero, m)
            e = xp.exp(x - m)
            s = xp.sum(e, axis=-1, keepdims=True)
            # log(s) in the compute dtype: a confident float32 row (s = 1 + 2e-9) rounds to s = 1
            # and a loss of 0, an absolute error below float32's eps as in PyTorch. log1p of the
            # non-maximal terms would keep it, at 1.4-2.7x the time of this path (torch, jax.jit)
            # and, for a tied maximum, the curvature of jax.hessian / double backward unless
            # written with expm1; the CPU kernels and crossent.torch keep such losses.
            # A row of all -inf logits (s = 0) has log s = -inf, without numpy's divide-by-zero
            # warning; a NaN sum stays NaN.
            empty = s == 0
            log_s = xp.where(empty, xp.asarray(-math.inf, dtype=dtype, device=dev), xp.log(xp.where(empty, one, s)))
            lse = (log_s + m)[..., 0]
            # log q = (x - m) - log s, never x - lse: x - m is exact, and subtracting lse (rounded at
            # the magnitude of the logits) would cancel catastrophically for float32 logits of 1e4.
            # Every sum below reads x itself rather than a materialized log q: jax.jit then fuses
            # each into one pass over the logits (integer labels: 3.60x -> 1.52x optax's time for
            # the loss, 2.20x -> 0.88x for jax.grad in one pair of runs; README, bench_jax_core.py).
            finite = xp.isfinite(x) if eps > 0.0 or not integer_targets else None
            if integer_targets:
                # Labels were checked, except under jax.jit (traced arrays have no values): there an
                # out-of-range label makes its row NaN, loss and gradient, rather than any number.
                bad = (safe_labels < 0) | (safe_labels >= num_classes)
                index = xp.where(bad, xp.zeros((), dtype=safe_labels.dtype, device=dev), safe_labels)
                nll = log_s[..., 0] - (_take_last(xp, x, index) - m[..., 0])
                target_w = one if w is None else xp.where(keep, _take_last(xp, w, index), zero)
                ce_row = (1.0 - eps) * target_w * nll if eps < 1.0 else xp.zeros_like(nll)
                if eps > 0.0:
                    # sum_F w log q = sum_F w (x - m) - log s sum_F w, over the finite logits F.
                    k = xp.sum(xp.astype(finite, dtype), axis=-1)
                    k = xp.where(k > 0, k, one)
                    w_finite = xp.astype(finite, dtype) if w is None else xp.where(finite, w, zero)
                    # w times the masked x - m, not a masked w (x - m): d/dw of a -inf logit's
                    # unselected term would be 0 * -inf = NaN.
                    shifted_sum = xp.sum(xp.where(finite, x - m, zero) if w is None
                                         else w * xp.where(finite, x - m, zero), axis=-1)
                    smoothed = shifted_sum - log_s[..., 0] * xp.sum(w_finite, axis=-1)
                    ce_row = ce_row - eps * smoothed / k
                # The row's loss times NaN, not a NaN selected: its derivative (jax.grad) is NaN too,
                # and the other rows' derivatives stay what they were (times 1).
                # A kept row of all -inf logits (s = 0) likewise: its loss is NaN through its nll,
                # but autograd differentiates that nll to a finite -1 at the label (jax.grad,
                # torch.autograd), where PyTorch and the closed form give a NaN row.
                one_or_nan = xp.where(bad | empty[..., 0], xp.asarray(math.nan, dtype=dtype, device=dev), one)
                ce_row = ce_row * one_or_nan
            else:
                if eps > 0.0:
                    k = xp.sum(xp.astype(finite, dtype), axis=-1, keepdims=True)
                    k = xp.where(k > 0, k, one)
                    t = (1.0 - eps) * t + xp.where(finite, eps / k, zero)
                wt = t if w is None else w * t
                # -sum wt log q = sum wt (m - x) + log s sum wt: terms of one sign for nonnegative
                # targets. 0 * log 0 = 0: a zero target on a masked (-inf) class contributes
                # nothing. The mask multiplies nothing infinite by zero (no NaN, no warning) and
                # keeps the derivative with respect to the targets, -w log q, wherever log q is
                # finite.
                # A row of all -inf logits (log s = -inf) with zero targets is 0 likewise.
                wt_sum = xp.sum(wt, axis=-1)
                ce_row = (xp.sum(wt * xp.where((wt == 0) & ~finite, zero, m - x), axis=-1)
                          + mul0(xp, wt_sum, log_s[..., 0]))
                # With target mass, such a row is NaN, its gradient too (times NaN, as above: the
                # sum's derivative alone is a finite -w t).
                ce_row = ce_row * xp.where(empty[..., 0] & (wt_sum != 0),
                                           xp.asarray(math.nan, dtype=dtype, device=dev), one)
                target_w = one
            if with_grad:
                q = e / s
                if integer_targets:
                    onehot_f = xp.astype(xp.expand_dims(labels, axis=-1) == xp.arange(num_classes, device=dev), dtype)
                    a = xp.expand_dims(target_w if w is not None else xp.ones(batch_shape, dtype=dtype,
                                                                               device=dev), axis=-1)
                    g = (1.0 - eps) * a * (q - onehot_f)
                    g = xp.where(xp.expand_dims(bad, axis=-1), xp.asarray(math.nan, dtype=dtype, device=dev), g)
                    if eps > 0.0:
                        kk = xp.expand_dims(k, axis=-1)
                        finite_f = xp.astype(finite, dtype)
                        if w is None:
                            g = g + eps * (q - finite_f / kk)
                        else:
                            w_f = xp.sum(xp.where(finite, w, zero), axis=-1, keepdims=True)
                            g = g + eps * (w_f / kk * q - w * finite_f / kk)
                else:
                    g = xp.sum(wt, axis=-1, keepdims=True) * q - wt
                grad = g
            else:
                grad = None
        if integer_targets and eps == 1.0:
            # A kept row without a finite logit (all -inf, or NaN) has no possible class: NaN, as
            # at any other eps (through its nll) and in PyTorch; eps = 1 drops the nll term and
            # spreads nothing. Its lse is -inf or NaN.
            # Times NaN rather than a NaN selected: the row's derivative is NaN too (autograd).
            ce_row = ce_row * xp.where(lse > -math.inf, one, xp.asarray(math.nan, dtype=dtype, device=dev))
        z_row = z * lse * lse if z > 0 else None

    # ---- reduction ---------------------------------------------------------------------------------
    ce_row = xp.where(keep, ce_row, zero)
    if z > 0:
        z_row = xp.where(keep, z_row, zero)
    if reduction == "none":
        loss = ce_row if z == 0 else ce_row + z_row
        if sw is not None:
            loss = loss * row_w
        ce_scale, z_scale = row_w, row_w
    else:
        ce_sum = xp.sum(row_w * ce_row)
        z_sum = xp.sum(row_w * z_row) if z > 0 else None
        if reduction == "sum":
            loss = ce_sum if z == 0 else ce_sum + z_sum
            ce_scale, z_scale = row_w, row_w
        else:
            ce_den = xp.sum(row_w * target_w) if integer_targets else xp.sum(row_w)
            ce_scale = _safe_divide(xp, row_w, ce_den, zero, one)
            loss = _safe_divide(xp, ce_sum, ce_den, zero, one)
            if z > 0:
                z_den = xp.sum(row_w)
                z_scale = _safe_divide(xp, row_w, z_den, zero, one)
                loss = loss + _safe_divide(xp, z_sum, z_den, zero, one)
            else:
                z_scale = None
    if ln_base is not None:
        loss = loss / ln_base
    loss = as_0d(xp, loss)

    if not with_grad:
        return loss, None
    if fast_grad is not None:
        pass  # the kernel wrote the finished gradient (scaled, masked, in the base's unit)
    elif num_classes > 0 and blocked is not None:
        from ..cpu import _blocked

        grad = _blocked.gradient(
            x.reshape(-1, num_classes), safe_labels.reshape(-1), cap, blocked,
            row_weight=None if w is None else target_w.reshape(-1), smoothing=eps, class_weight=w,
            ce_scale=ce_scale.reshape(-1), z_coef=(z_scale * 2.0 * z * lse).reshape(-1) if z > 0 else None,
            keep=keep.reshape(-1), ln_base=ln_base,
        ).reshape(x.shape)
    elif num_classes > 0:
        grad = xp.expand_dims(ce_scale, axis=-1) * grad
        if z > 0:
            grad = grad + xp.expand_dims(z_scale * 2.0 * z * lse, axis=-1) * (e / s)
        if cap is not None:
            grad = grad * (1.0 - tanh * tanh)
        # After the cap's factor, which is NaN at a NaN logit: an ignored row's gradient is 0
        # whatever its logits are.
        grad = xp.where(xp.expand_dims(keep, axis=-1), grad, zero)
        if ln_base is not None:
            grad = grad / ln_base
    if ax != logits.ndim - 1:
        grad = xp.moveaxis(grad, -1, ax)
    return loss, xp.astype(grad, logits.dtype, copy=False)


def _constant(a: Any) -> Any:
    """``a`` as a constant to autograd (its derivative is not propagated): torch's ``detach``,
    jax's ``stop_gradient``; ``a`` itself for arrays without autograd. For a shift whose
    derivative cancels (the loss does not depend on it), so only its cost is saved."""
    if hasattr(a, "detach") and callable(a.detach):
        return a.detach()
    if is_jax_array(a):
        import jax

        return jax.lax.stop_gradient(a)
    return a


def _take_last(xp: Any, a: Any, index: Any) -> Any:
    """``a[..., index]`` per row: the entry of each row of ``a`` (``[..., C]``; 1-D ``a``: the
    same row for every index) at ``index`` (``[...]``, in range), of shape ``index.shape``."""
    if a.ndim == 1:
        return xp.reshape(xp.take(a, xp.reshape(index, (-1,))), index.shape)
    if getattr(xp, "__array_api_version__", "2024.12") < "2024.12":
        # take_along_axis came with the 2024.12 standard: a one-hot sum before it.
        onehot = xp.expand_dims(index, axis=-1) == xp.arange(a.shape[-1], device=device(a))
        return xp.sum(xp.where(onehot, a, xp.zeros((), dtype=a.dtype, device=device(a))), axis=-1)
    return xp.take_along_axis(a, xp.expand_dims(index, axis=-1), axis=-1)[..., 0]


def _safe_divide(xp: Any, num: Any, den: Any, zero: Any, one: Any) -> Any:
    """num / den, and 0 where den == 0 (DESIGN.md: a mean over nothing is 0)."""
    nonzero = den != 0
    return xp.where(nonzero, num / xp.where(nonzero, den, one), zero)


def _numpy_fast_lse_and_nll(x: Any, labels: Any) -> tuple[Any, Any] | None:
    """(lse, nll) from the compiled CPU kernel of crossent.cpu, or None when it does not apply.

    The kernel needs a C-contiguous float32/float64 array; anything else takes the Array-API path.
    """
    import numpy as np

    cpu = _cpu_kernels_for(x)
    if cpu is None:
        return None
    num_classes = x.shape[-1]
    # lse_and_nll forms the loss as (m - x_y) + log sum exp(x - m) in float64 and rounds it once,
    # so it stays accurate where the loss is far below |lse| (lse - picked would not).
    lse, nll = cpu.lse_and_nll(
        x.reshape(-1, num_classes), np.ascontiguousarray(labels.reshape(-1))
    )
    shape = x.shape[:-1]
    return lse.reshape(shape), nll.reshape(shape)


def _numpy_fast_grad(x: Any, labels: Any, row_scale: Any, keep: Any, reduction: str,
                     ln_base: float | None, *, z_loss: float = 0.0, row_w: Any = None) -> tuple[Any, Any, Any] | None:
    """(lse, nll, grad) from crossent.cpu's one-pass gradient kernel, or None when it does not apply.

    ``row_scale`` is each row's weight in the sum (sample weight x class weight of its target, 0 on
    ignored rows); the kernel writes ``scale_i * (softmax(x_i) - onehot(y_i))`` with
    ``scale = row_scale / sum(row_scale)`` for "mean" (0 when that sum is 0), else ``row_scale``.
    With ``z_loss`` z > 0 it adds ``r_i * lse_i * softmax(x_i)``, the z-loss term's gradient, with
    ``r = 2 z row_w`` over ``sum(row_w)`` for "mean" (``row_w``: the rows' weights without the class
    weight, as the z-term is averaged).
    """
    import numpy as np

    cpu = _cpu_kernels_for(x)
    if cpu is None:
        return None
    num_classes = x.shape[-1]
    n = x.size // num_classes
    scale = _row_factors(row_scale, row_scale, n, reduction, ln_base)
    z_scale = _row_factors(2.0 * z_loss * row_w, row_w, n, reduction, ln_base) if z_loss > 0 else None
    grad = np.empty_like(x)
    lse, nll = cpu.softmax_minus_onehot(
        x.reshape(-1, num_classes), np.ascontiguousarray(labels.reshape(-1)), scale, grad.reshape(-1, num_classes),
        keep=np.ascontiguousarray(keep.reshape(-1)), z_scale=z_scale,
    )
    shape = x.shape[:-1]
    return lse.reshape(shape), nll.reshape(shape), grad


def _numpy_fast_soft(x: Any, t: Any, w: Any, eps: float, cap: float | None, z: float, row_scale: Any,
                     reduction: str, ln_base: float | None) -> tuple[Any, Any, Any] | None:
    """(lse, ce, grad or None) for probability targets on numpy ``x`` (not yet capped), or None
    when the numpy fast paths are off (``crossent.cpu.enabled``) or ``x`` is empty: crossent.cpu's
    soft-target kernels (numba) for the plain loss (no softcap, label smoothing or class weights;
    no z-loss with the gradient), else the blocked pass (``crossent.cpu._blocked.soft_targets``).
    ``row_scale`` (None: loss only) is each row's weight in the sum; the gradient is written
    finished, as in ``_numpy_fast_grad`` (scaled, in the base's unit, with the z-loss term)."""
    import numpy as np

    if not _cpu_enabled() or not x.flags.c_contiguous or x.size == 0:
        return None
    from .. import cpu
    from ..cpu import _blocked

    num_classes = x.shape[-1]
    shape = x.shape[:-1]
    x2 = x.reshape(-1, num_classes)
    t2 = t.reshape(-1, num_classes)
    n = x2.shape[0]
    scale = None if row_scale is None else _row_factors(row_scale, row_scale, n, reduction, ln_base)
    grad = None if row_scale is None else np.empty_like(x)
    out = None if grad is None else grad.reshape(-1, num_classes)
    plain = cap is None and eps == 0.0 and w is None and (row_scale is None or z == 0)
    if plain and _cpu_kernels_for(x) is not None:
        lse, ce_row = _soft_kernels(cpu, x2, t2, scale, out)
    else:
        lse, ce_row = _blocked.soft_targets(x2, t2, cap, smoothing=eps, class_weight=w, scale=scale, z_loss=z, out=out)
    return lse.reshape(shape), ce_row.reshape(shape), grad


#: Targets per block when the soft-target kernels get their targets cast or made C-contiguous a
#: block at a time (1 MiB of float32, as crossent.cpu._blocked's blocks): a small fraction of the
#: logits, and enough rows per call for the kernels' threads.
_CAST_BLOCK_ELEMENTS = 1 << 18


def _soft_kernels(cpu: Any, x2: Any, t2: Any, scale: Any, out: Any) -> tuple[Any, Any]:
    """``(lse, ce)`` of crossent.cpu's soft-target kernels on ``[N, C]`` numpy ``x2`` and targets
    ``t2`` (with ``out``: the gradient too, for the row factors ``scale``). C-contiguous float32 or
    float64 targets are read in place (the kernels round each entry to ``x2``'s dtype); other ones
    (float16, Fortran order, strided) are cast into one reused buffer a block of rows at a time (a
    copy of their size would be 100% of the logits or more)."""
    import numpy as np

    if t2.dtype in (np.float32, np.float64) and t2.flags.c_contiguous:  # read in place
        return cpu.soft_cross_entropy(x2, t2) if out is None else cpu.softmax_minus_targets(
            x2, t2, scale, out, keep=np.ones(x2.shape[0], dtype=bool))
    n, c = x2.shape
    rows = max(1, _CAST_BLOCK_ELEMENTS // c)
    buf = np.empty((min(n, rows), c), dtype=x2.dtype)
    lse, ce_row = np.empty(n, dtype=x2.dtype), np.empty(n, dtype=x2.dtype)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        tb = buf[: stop - start]
        tb[...] = t2[start:stop]
        if out is None:
            lse[start:stop], ce_row[start:stop] = cpu.soft_cross_entropy(x2[start:stop], tb)
        else:
            lse[start:stop], ce_row[start:stop] = cpu.softmax_minus_targets(
                x2[start:stop], tb, scale[start:stop], out[start:stop], keep=np.ones(stop - start, dtype=bool))
    return lse, ce_row


def _row_factors(row_scale: Any, row_weight: Any, n: int, reduction: str, ln_base: float | None) -> Any:
    """The float64 ``[n]`` row factors a kernel scales the gradient by: ``row_scale``, over
    ``sum(row_weight)`` for "mean" (0 when that is 0; ``row_weight`` is ``row_scale`` unless the
    kernel weighs by the label's class weight itself), over ``ln_base`` for a base."""
    import numpy as np

    scale = np.broadcast_to(np.asarray(row_scale, dtype=np.float64).reshape(-1), (n,))
    if reduction == "mean":
        den = float(np.sum(np.broadcast_to(np.asarray(row_weight, dtype=np.float64).reshape(-1), (n,))))
        scale = scale / den if den != 0 else np.zeros(n)
    if ln_base is not None:
        scale = scale / ln_base
    return np.ascontiguousarray(scale)


def _numba_takes(x: Any, cap: float | None, z: float, eps: float, with_grad: bool) -> bool:
    """Whether crossent.cpu's numba kernels take this integer-label call on numpy ``x``: without a
    softcap (the blocked path caps block by block; the kernels would need it applied to the whole
    array first), the loss with any other option, the gradient without z-loss or without label
    smoothing (the smoothing kernels have no z-term)."""
    if cap is not None or _cpu_kernels_for(x) is None:
        return False
    return not with_grad or z == 0 or eps == 0.0


def _numpy_fast_smoothed(x: Any, labels: Any, w: Any, eps: float, keep: Any, row_w: Any, with_grad: bool,
                         reduction: str, ln_base: float | None) -> tuple[Any, Any]:
    """``(stats, grad)`` of label smoothing from crossent.cpu's numba kernels: the per-row
    statistics (``crossent.cpu._blocked.RowStats`` without the blocked pass's shift and sum) and,
    with ``with_grad``, the finished gradient (scaled by the row weight over the "mean"
    denominator, in the base's unit; else None)."""
    import numpy as np

    from .. import cpu
    from ..cpu import _blocked

    num_classes = x.shape[-1]
    x2 = x.reshape(-1, num_classes)
    grad = scale = None
    if with_grad:
        # The kernel weighs the (1 - eps) term by the label's class weight itself; "mean" divides
        # by the weighted row count, sum_i row_w_i w_{y_i}.
        target_w = np.where(keep, 1.0 if w is None else w[labels], 0.0)
        scale = _row_factors(row_w, np.asarray(row_w) * target_w, x2.shape[0], reduction, ln_base)
        grad = np.empty_like(x)
    lse, nll, smoothed, count, weight_sum = cpu._smoothed_rows(
        x2, labels.reshape(-1), w, eps, scale, None if grad is None else grad.reshape(-1, num_classes),
        None if grad is None else np.ascontiguousarray(keep.reshape(-1)))
    return _blocked.RowStats(lse, nll, None, None, count, smoothed, weight_sum), grad


def _cpu_enabled() -> bool:
    """Whether crossent.cpu's numpy fast paths are switched on (``crossent.cpu.enabled``)."""
    try:
        from .. import cpu
    except ImportError:
        return False
    return cpu.enabled()


def _numpy_blocked_stats(x: Any, labels: Any, cap: float | None, keep: Any, eps: float, w: Any) -> Any:
    """The per-row statistics (``crossent.cpu._blocked.RowStats``: flat ``[N]`` arrays over the
    batch, ``lse`` and the rest) of crossent.cpu's blocked numpy pass on the logits not yet
    capped, or None when it does not apply: off (``crossent.cpu.ENABLED``,
    ``CROSSENT_CPU_FAST=0``), or ``x`` not C-contiguous (a reshape would copy it) or empty."""
    try:
        from ..cpu import _blocked
    except ImportError:
        return None
    if not _cpu_enabled() or not x.flags.c_contiguous or x.size == 0:
        return None
    num_classes = x.shape[-1]
    return _blocked.lse_and_nll(x.reshape(-1, num_classes), labels.reshape(-1), cap, keep.reshape(-1),
                                smoothing=eps > 0.0, class_weight=w)


def _cpu_kernels_for(x: Any) -> Any:
    """The crossent.cpu module when its compiled kernels can take ``x``, else None.

    They need a non-empty C-contiguous float32/float64 numpy array and numba (``cpu.available()``,
    which is also False when the path is switched off); anything else takes the Array-API path.
    """
    import numpy as np

    if x.dtype not in (np.float32, np.float64) or not x.flags.c_contiguous or x.size == 0:
        return None
    try:
        from .. import cpu
    except ImportError:
        return None
    return cpu if cpu.available() else None
