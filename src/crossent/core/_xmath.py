"""Two elementwise helpers for 0 * log 0 = 0 without NaN, warnings or lost derivatives.

``xp.where(t == 0, 0, t * log_q)`` is the obvious way to get 0 log 0 = 0, but it still evaluates
0 * -inf (NaN, and a RuntimeWarning under numpy) and it cuts the derivative with respect to ``t``
wherever ``t == 0`` (autograd differentiates through the branch it picked). Masking the infinite
factor instead keeps both: :func:`mul0` gives exactly 0 where ``t == 0`` meets an infinity, and
``t * v`` everywhere else, so d/dt is ``v`` wherever ``v`` is finite.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device, is_numpy_namespace


def mul0(xp: Any, t: Any, v: Any) -> Any:
    """``t * v`` with ``0 * (+-inf) = 0`` (the convention 0 log 0 = 0)."""
    zero = xp.zeros((), dtype=v.dtype, device=device(v))
    return t * xp.where((t == 0) & xp.isinf(v), zero, v)


def log0(xp: Any, x: Any) -> Any:
    """``log(x)`` for ``x >= 0``, with ``log(0) = -inf`` and no divide-by-zero warning."""
    dev = device(x)
    positive = x > 0
    safe = xp.where(positive, x, xp.ones((), dtype=x.dtype, device=dev))
    return xp.where(positive, xp.log(safe), xp.asarray(-math.inf, dtype=x.dtype, device=dev))


def log1m0(xp: Any, x: Any) -> Any:
    """``log(1 - x)`` for ``x <= 1``, via log1p, with ``log(0) = -inf`` and no warning."""
    dev = device(x)
    below = x < 1
    safe = xp.where(below, x, xp.zeros((), dtype=x.dtype, device=dev))
    return xp.where(below, xp.log1p(-safe), xp.asarray(-math.inf, dtype=x.dtype, device=dev))


def as_0d(xp: Any, loss: Any) -> Any:
    """A reduced loss as a 0-d array: numpy's sums return a NumPy scalar (``np.float64``) where
    its ``where`` and division give a 0-d ``ndarray``; other namespaces return arrays already."""
    return xp.asarray(loss) if is_numpy_namespace(xp) else loss
