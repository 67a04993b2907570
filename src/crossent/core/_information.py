r"""Entropy, cross-entropy and KL divergence of probability vectors.

These work on probabilities, not logits, and never renormalize: a vector that does not sum to 1 is
taken as given (the formulas are those of :func:`scipy.special.entr` and :func:`scipy.special.rel_entr`
summed over ``axis``). Values must lie in [0, 1] and must not be NaN.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device

from . import _validation as v
from ._xmath import log0, mul0


def _prepare(name_arrays: list[tuple[str, Any]], axis: int) -> tuple[Any, list[Any], int]:
    for name, x in name_arrays:
        v.check_array(name, x)
    xp = v.namespace(*(x for _, x in name_arrays))
    first_name, first = name_arrays[0]
    for name, x in name_arrays[1:]:
        if tuple(x.shape) != tuple(first.shape):
            raise ValueError(
                f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(x.shape)}"
            )
    float_dtypes = [v.compute_dtype(xp, x, name) for name, x in name_arrays if v.is_float_array(xp, x)]
    dtype = xp.result_type(*float_dtypes) if float_dtypes else xp.float64
    out = []
    for name, x in name_arrays:
        x = v.as_float(xp, x, dtype, name)
        v.check_in_unit_interval(xp, name, x)
        out.append(x)
    ax = v.normalize_axis(axis, first.ndim)
    return xp, out, ax


def _scale(value: Any, base: Any) -> Any:
    ln_base = v.log_base(base)
    return value if ln_base is None else value / ln_base


def entropy(p: Any, *, axis: int = -1, base: float | None = None) -> Any:
    r"""Shannon entropy of each distribution along ``axis``.

    .. math:: H(P) = -\sum_i p_i \log p_i, \qquad 0 \log 0 = 0.

    Args:
      p: probabilities, shape ``[..., num_classes]`` (classes along ``axis``), values in [0, 1].
      axis: the class axis.
      base: ``None`` for nats, ``2`` for bits, any positive number other than 1.

    Returns:
      The entropy of each distribution, shape ``[...]`` (``p``'s shape without ``axis``).

    The range check of the probabilities is skipped inside ``jax.jit``.

    Example:
      >>> import numpy as np, crossent as ce
      >>> round(float(ce.entropy(np.array([0.5, 0.5]), base=2)), 4)
      1.0
      >>> round(float(ce.entropy(np.array([0.1, 0.8, 0.1]))), 4)
      0.639

    References: C. E. Shannon, A Mathematical Theory of Communication (1948).
    """
    xp, (p,), ax = _prepare([("p", p)], axis)
    zero = xp.zeros((), dtype=p.dtype)
    safe = xp.where(p > 0, p, xp.ones((), dtype=p.dtype))
    terms = xp.where(p > 0, -p * xp.log(safe), zero)
    return _scale(xp.sum(terms, axis=ax), base)


def cross_entropy(p: Any, q: Any, *, axis: int = -1, base: float | None = None) -> Any:
    r"""Cross-entropy of the predicted distribution ``q`` relative to the true distribution ``p``.

    .. math:: H(P, Q) = -\sum_i p_i \log q_i,

    with :math:`0 \log q = 0` for every q (including 0) and :math:`+\infty` where
    :math:`p_i > 0` and :math:`q_i = 0`. Nothing is clipped.

    Args:
      p: true probabilities, shape ``[..., num_classes]``, values in [0, 1].
      q: predicted probabilities, same shape, values in [0, 1].
      axis: the class axis.
      base: ``None`` for nats, ``2`` for bits.

    Returns:
      Shape ``[...]``.

    The range check of the probabilities is skipped inside ``jax.jit``.

    Example (true class 2 of 3, one-hot; the loss is -log of the probability of the true class):
      >>> import numpy as np, crossent as ce
      >>> p = np.array([0.0, 1.0, 0.0])
      >>> round(float(ce.cross_entropy(p, np.array([0.1, 0.8, 0.1]))), 4)
      0.2231
      >>> round(float(ce.cross_entropy(p, np.array([0.7, 0.2, 0.1]))), 4)
      1.6094
    """
    xp, (p, q), ax = _prepare([("p", p), ("q", q)], axis)
    # log q = -inf where q == 0: +inf where p > 0, and 0 log 0 = 0 where p == 0.
    terms = -mul0(xp, p, log0(xp, q))
    return _scale(xp.sum(terms, axis=ax), base)


def kl_divergence(p: Any, q: Any, *, axis: int = -1, base: float | None = None) -> Any:
    r"""Kullback-Leibler divergence :math:`D_{KL}(P \| Q)`.

    .. math:: D_{KL}(P \| Q) = \sum_i p_i \log \frac{p_i}{q_i} = H(P, Q) - H(P),

    with :math:`0 \log(0 / q) = 0` and :math:`+\infty` where :math:`p_i > 0` and
    :math:`q_i = 0` (the terms of :func:`scipy.special.rel_entr`, summed over ``axis``). Each term
    is computed as :math:`p_i \log(p_i / q_i)`, with ``log1p((p - q) / q)`` where :math:`q_i / 2
    \le p_i \le 3 q_i / 2`, not as the difference of two sums that would cancel: for nearby
    float32 distributions :math:`H(P, Q) - H(P)` loses every digit (and even its sign).

    Args:
      p: true probabilities, shape ``[..., num_classes]``, values in [0, 1].
      q: predicted probabilities, same shape, values in [0, 1].
      axis: the class axis.
      base: ``None`` for nats, ``2`` for bits.

    Returns:
      Shape ``[...]``, every entry >= 0 for distributions that sum to 1.

    The range check of ``p`` and ``q`` needs their values, so it is skipped inside ``jax.jit``.

    Example (KL = CE - H):
      >>> import numpy as np, crossent as ce
      >>> p, q = np.array([0.2, 0.5, 0.3]), np.array([0.1, 0.8, 0.1])
      >>> kl = float(ce.kl_divergence(p, q))
      >>> round(kl, 4), round(float(ce.cross_entropy(p, q) - ce.entropy(p)), 4)
      (0.2332, 0.2332)
    """
    xp, (p, q), ax = _prepare([("p", p), ("q", q)], axis)
    dev = device(p)
    zero = xp.zeros((), dtype=p.dtype, device=dev)
    one = xp.ones((), dtype=p.dtype, device=dev)
    inf = xp.asarray(math.inf, dtype=p.dtype, device=dev)
    both = (p > 0) & (q > 0)
    # Placeholders of 1 where a term is 0 or inf by convention: no log(0) or 0/0 is evaluated.
    p1 = xp.where(both, p, one)
    q1 = xp.where(both, q, one)
    terms = xp.where(both, p1 * _log_ratio(xp, p1, q1), xp.where(p > 0, inf, zero))
    return _scale(xp.sum(terms, axis=ax), base)


def _log_ratio(xp: Any, p: Any, q: Any) -> Any:
    """``log(p / q)`` for positive ``p, q <= 1``, accurate to a few ulps of the result.

    Near ``p = q`` the ratio's own rounding (one ulp of 1) would swamp a log of 1e-4: there
    ``p - q`` is exact (Sterbenz: q/2 <= p <= 2q) and ``log1p((p - q) / q)`` is accurate. Elsewhere
    ``|log(p/q)| >= log 1.5`` and ``log(p / q)`` is accurate unless ``q`` is subnormal (the ratio
    could overflow), where ``log p - log q`` is used instead.
    """
    d = p - q
    near = xp.abs(d) <= 0.5 * q
    tiny = float(xp.finfo(q.dtype).smallest_normal)
    normal = q >= tiny
    q_normal = xp.where(normal, q, xp.ones_like(q))
    far = xp.where(normal, xp.log(p / q_normal), xp.log(p) - xp.log(q))
    # Both branches are evaluated everywhere: give log1p only the arguments it is meant for.
    return xp.where(near, xp.log1p(xp.where(near, d, xp.zeros_like(d)) / q), far)
