"""Float64 references for the core losses, written out from DESIGN.md's formulas.

These are the oracles for what PyTorch/SciPy/scikit-learn/optax do not define (z_loss, softcap,
the documented deviations). Each is a direct NumPy transcription of the formula, kept
deliberately naive apart from the stable log-sum-exp; they are exposed through the ``ref``
fixture so that every test file shares one copy.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
from scipy.special import log_expit, logsumexp, xlogy


def _reduce(rows, denominator, reduction):
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / denominator if denominator != 0 else 0.0


def softmax_ce(
    logits,
    targets,
    *,
    axis=-1,
    weight=None,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    reduction="mean",
    base=None,
):
    r"""Reference: per row i (class axis moved last), with x = softcap * tanh(logits / softcap),
    log q_ic = x_ic - logsumexp_c x_ic, w the class weights (ones by default), F_i the set of
    classes with a finite logit, K_i = |F_i|, eps = label_smoothing:

    integer targets y_i (rows with y_i == ignore_index contribute 0 and are not counted):
        row_i = (1 - eps) w_{y_i} (-log q_{i y_i}) + eps / K_i sum_{c in F_i} w_c (-log q_ic)
        mean  = sum_i row_i / sum_{i valid} w_{y_i}
    probability targets t_ic (every row counted):
        t'_ic = (1 - eps) t_ic + eps / K_i [c in F_i]
        row_i = -sum_c w_c t'_ic log q_ic, with 0 log 0 = 0
        mean  = sum_i row_i / N
    plus z_loss * logsumexp_c(x_ic)^2 on every valid row ("mean" divides its sum by the number of
    valid rows); a zero denominator gives 0; base b divides by log b.
    """
    x = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, -1)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    n_classes = x.shape[-1]
    lse = logsumexp(x, axis=-1)
    logq = x - lse[..., None]
    w = np.ones(n_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    finite = np.isfinite(x)
    k = finite.sum(-1)
    eps = label_smoothing
    targets = np.asarray(targets)
    if np.issubdtype(targets.dtype, np.integer):
        valid = np.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
        y = np.where(valid, targets, 0)
        nll = -np.take_along_axis(logq, y[..., None], -1)[..., 0]
        wy = w[y] * valid
        rows = (1 - eps) * wy * nll if eps < 1 else np.zeros(nll.shape)
        if eps > 0:
            rows = rows + eps * -np.where(finite, w * logq, 0.0).sum(-1) / k
        rows = np.where(valid, rows, 0.0)
        denominator = wy.sum()
    else:
        t = np.moveaxis(np.asarray(targets, dtype=np.float64), axis, -1)
        if eps > 0:
            t = (1 - eps) * t + eps * finite / k[..., None]
        rows = -(w * np.where(t == 0, 0.0, t * logq)).sum(-1)
        valid = np.ones(rows.shape, bool)
        denominator = rows.size
    z_rows = np.where(valid, z_loss * lse**2, 0.0) if z_loss else np.zeros(rows.shape)
    if reduction == "none":
        out = rows + z_rows
    elif reduction == "sum":
        out = rows.sum() + z_rows.sum()
    else:
        n_valid = valid.sum()
        out = (rows.sum() / denominator if denominator != 0 else 0.0) + (z_rows.sum() / n_valid if n_valid else 0.0)
    if base is not None:
        out = out / np.log(base)
    return out


def log_loss(probs, targets, *, axis=-1, eps="auto", weight=None, ignore_index=None, reduction="mean", base=None):
    """Reference: -sum_c w_c t_ic log max(p_ic, eps), integer targets pick one class; weighted
    mean over non-ignored rows like softmax_ce. (Only the lower end is clipped: a confident right
    prediction costs exactly 0; scikit-learn also clips at 1 - eps, a difference below eps.)"""
    p = np.moveaxis(np.asarray(probs, dtype=np.float64), axis, -1)
    e = np.finfo(np.asarray(probs).dtype).eps if eps == "auto" else eps
    logp = np.log(np.maximum(p, e))
    w = np.ones(p.shape[-1]) if weight is None else np.asarray(weight, dtype=np.float64)
    targets = np.asarray(targets)
    if np.issubdtype(targets.dtype, np.integer):
        valid = np.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
        y = np.where(valid, targets, 0)
        wy = w[y] * valid
        rows = -wy * np.take_along_axis(logp, y[..., None], -1)[..., 0]
        denominator = wy.sum()
    else:
        t = np.moveaxis(np.asarray(targets, dtype=np.float64), axis, -1)
        rows = -(w * t * logp).sum(-1)
        denominator = rows.size
    out = _reduce(rows, denominator, reduction)
    return out if base is None else out / np.log(base)


def bce(probs, targets, *, eps="auto", weight=None, pos_weight=None, reduction="mean", base=None):
    """Reference: -w [pw y log p + (1 - y) log(1 - p)], p clipped to [eps, 1 - eps]."""
    p = np.asarray(probs, dtype=np.float64)
    e = np.finfo(np.asarray(probs).dtype).eps if eps == "auto" else eps
    p = np.clip(p, e, 1 - e)
    y = np.asarray(targets, dtype=np.float64)
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
    rows = -(pw * y * np.log(p) + (1 - y) * np.log1p(-p))
    if weight is not None:
        rows = rows * np.asarray(weight, dtype=np.float64)
    out = _reduce(rows, rows.size, reduction)
    return out if base is None else out / np.log(base)


def bce_with_logits(logits, targets, *, weight=None, pos_weight=None, label_smoothing=0.0, reduction="mean", base=None):
    """Reference: y' = (1 - eps) y + eps / 2; -w [pw y' log sigma(x) + (1 - y') log sigma(-x)]."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    y = (1 - label_smoothing) * y + label_smoothing / 2
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
    rows = -(pw * y * log_expit(x) + (1 - y) * log_expit(-x))
    if weight is not None:
        rows = rows * np.asarray(weight, dtype=np.float64)
    out = _reduce(rows, rows.size, reduction)
    return out if base is None else out / np.log(base)


def entropy(p, *, axis=-1, base=None):
    """Reference: H(P) = -sum_c p_c log p_c with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    out = -xlogy(p, p).sum(axis)
    return out if base is None else out / np.log(base)


def cross_entropy(p, q, *, axis=-1, base=None):
    """Reference: H(P, Q) = -sum_c p_c log q_c with 0 log 0 = 0 and +inf where p > 0 = q."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    out = -xlogy(p, q).sum(axis)
    return out if base is None else out / np.log(base)


def kl_divergence(p, q, *, axis=-1, base=None):
    """Reference: KL(P || Q) = sum_c p_c log(p_c / q_c), 0 where p = 0, +inf where p > 0 = q."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    out = terms.sum(axis)
    return out if base is None else out / np.log(base)


def _quiet(f):
    """The references produce inf/nan on purpose in masked positions and then select them away."""

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        with np.errstate(all="ignore"):
            return f(*args, **kwargs)

    return wrapped


@pytest.fixture(scope="session")
def ref():
    """The float64 references above, as ``ref.softmax_ce(...)`` etc."""
    funcs = [softmax_ce, log_loss, bce, bce_with_logits, entropy, cross_entropy, kl_divergence]
    return types.SimpleNamespace(**{f.__name__: _quiet(f) for f in funcs})
