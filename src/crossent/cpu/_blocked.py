"""Softmax cross-entropy in blocked numpy: the Array-API path's arithmetic, a block of rows at a
time, with the log-sum of a confident row kept.

:func:`crossent.softmax_cross_entropy` on numpy logits runs numba's kernels when it can. When it
cannot (numba not installed; a ``softcap``, which the kernels would need applied to the whole array
first; a ``z_loss`` with the gradient; probability targets with class weights or label smoothing),
its Array-API path would form several temporaries of the logits' size (450% of the logits at
200000 x 1000 float32) and pay a page fault for every new page of them. The functions here do the
same operations in the logits' dtype on blocks of ``BLOCK_ELEMENTS`` logits held in buffers reused
from block to block: the extra memory is a few blocks, and every pass over the logits runs in
cache. One change: ``log s`` is ``log1p`` of the terms below the maximum, which keeps a confident
row's small loss (2e-9 at float32 logits near 1e4, as the numba kernels do; the Array-API path
gives 0 there, see ``crossent.core._softmax``). The results are otherwise those of the Array-API
path within a few ulps (tested).

Integer labels:

* :func:`lse_and_nll`: per row, the shift ``m`` (the maximum, 0 where it is not finite), the sum
  ``s`` of ``exp(x - m)``, ``lse = log s + m`` and ``nll = log s - (x_y - m)``.
* :func:`gradient`: the finished gradient from the row statistics of :func:`lse_and_nll` (a second
  pass: ``exp`` again, no maximum or sum), with the scales the caller took from the reduction.

Probability targets: :func:`soft_targets`, the loss and (with the reduction's row factors, which
do not depend on the loss) the finished gradient in one pass, class weights and label smoothing
folded into the targets of each block.

No floating-point warnings: inf and NaN rows give what the Array-API path gives (NaN or inf), and
ignored rows, which the caller masks, are taken as zeros as there. A kept row holding +inf (after
the soft cap; no NaN) has a NaN loss and gradient row, as ``F.cross_entropy``, crossent.cpu's
kernels and the Array-API path give.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Logits per block: 1 MiB of float32 per buffer. At 200000 x 1000 float32 (2 cores, numpy 2.4)
#: blocks of 2^14 / 2^16 / 2^18 / 2^20 elements took 0.64 / 0.48 / 0.43 / 0.42 s for the loss: below
#: 2^18 the per-block call overhead shows, above it the buffers leave L2.
BLOCK_ELEMENTS = 1 << 18


def _blocks(n: int, c: int):
    """(start, stop) of consecutive row blocks of about ``BLOCK_ELEMENTS`` logits."""
    step = max(1, BLOCK_ELEMENTS // max(c, 1))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _capped(block: np.ndarray, softcap: float | None, out: np.ndarray) -> np.ndarray:
    """``softcap * tanh(block / softcap)`` into ``out`` (the Array-API path's order), or ``block``."""
    if softcap is None:
        return block
    np.divide(block, softcap, out=out)
    np.tanh(out, out=out)
    np.multiply(softcap, out, out=out)
    return out


@dataclasses.dataclass
class RowStats:
    r"""What :func:`lse_and_nll` returns: ``[N]`` arrays of the logits' dtype. ``count`` and
    ``smoothed`` only with label smoothing (else None): the number K of finite (capped) logits,
    1 where there is none, and :math:`\sum_{j\,\mathrm{finite}} w_j \log q_j` (``w`` = 1 without
    class weights); ``weight_sum``, with class weights and smoothing, :math:`\sum_{j\,\mathrm{finite}} w_j`."""

    lse: np.ndarray
    nll: np.ndarray
    shift: np.ndarray | None  # None from numba's smoothing kernels, which write the gradient themselves
    sumexp: np.ndarray | None
    count: np.ndarray | None = None
    smoothed: np.ndarray | None = None
    weight_sum: np.ndarray | None = None


def lse_and_nll(
    x: np.ndarray, labels: np.ndarray, softcap: float | None, keep: np.ndarray, *, smoothing: bool = False,
    class_weight: np.ndarray | None = None,
) -> RowStats:
    """Row statistics (``RowStats``) of C-contiguous ``x`` ``[N, C]`` (C >= 1) with labels ``[N]``
    in ``[0, C)``, after the optional soft cap: the shift ``m``, ``sumexp`` (the sum ``s``), ``lse``
    and ``nll``; with ``smoothing``, also what the smoothed loss needs (``class_weight`` ``[C]``:
    the weights of its terms). Rows where ``keep`` is False are taken as zeros, as the Array-API
    path takes ignored rows."""
    n, c = x.shape
    lse, nll, shift, sumexp = (np.empty(n, dtype=x.dtype) for _ in range(4))
    stats = RowStats(lse, nll, shift, sumexp)
    rows_per_block = min(n, max(1, BLOCK_ELEMENTS // c))
    buf = np.empty((rows_per_block, c), dtype=x.dtype)
    if smoothing:
        stats.count, stats.smoothed = np.empty(n, dtype=x.dtype), np.empty(n, dtype=x.dtype)
        e_buf = np.empty((rows_per_block, c), dtype=x.dtype)
        finite_buf = np.empty((rows_per_block, c), dtype=bool)
        if class_weight is not None:
            stats.weight_sum = np.empty(n, dtype=x.dtype)
    with np.errstate(all="ignore"):
        for start, stop in _blocks(n, c):
            d = buf[: stop - start]
            b = _capped(x[start:stop], softcap, d)
            dropped = ~keep[start:stop]
            if dropped.any():
                if b is not d:
                    d[...] = b
                    b = d
                b[dropped] = 0.0
            rows = np.arange(stop - start)
            m, s = shift[start:stop], sumexp[start:stop]
            top = np.argmax(b, axis=1)  # a maximum (the first NaN if any: then m is NaN, as max gives)
            m[...] = b[rows, top]
            max_finite = np.isfinite(m)
            plus_inf = m == np.inf  # a +inf logit and no NaN (argmax stops at the first NaN)
            m[~max_finite] = 0.0
            if smoothing:
                finite = finite_buf[: stop - start]
                np.isfinite(b, out=finite)  # of x itself: x - m may overflow where x does not
            np.subtract(b, m[:, None], out=d)
            picked = d[rows, labels[start:stop]]  # x_y - m
            e = e_buf[: stop - start] if smoothing else d  # smoothing reads x - m again below
            np.exp(d, out=e)
            # s = 1 + rest: the maximum's term (exactly 1) is left out of the sum and log s taken as
            # log1p(rest), so a confident row keeps its loss of 2e-9 (log of a float32 sum 1 + 2e-9
            # gives 0). Rows whose maximum is not finite sum every term, as the Array-API path.
            e[rows[max_finite], top[max_finite]] = 0.0
            np.sum(e, axis=1, out=s)
            log_s = np.where(max_finite, np.log1p(s), np.log(s))
            s[max_finite] += 1.0
            np.add(log_s, m, out=lse[start:stop])
            np.negative(picked - log_s, out=nll[start:stop])
            if plus_inf.any():
                # No softmax in a row holding +inf: NaN loss and (through a NaN sum) a NaN gradient
                # row, as F.cross_entropy gives; lse stays +inf.
                nll[start:stop][plus_inf] = np.nan
                s[plus_inf] = np.nan
            if smoothing:
                k = stats.count[start:stop]
                np.sum(finite, axis=1, out=k)
                k[k <= 0] = 1.0
                np.subtract(d, log_s[:, None], out=d)  # log q
                d[~finite] = 0.0
                if class_weight is not None:
                    np.multiply(class_weight, d, out=d)
                    np.sum(np.where(finite, class_weight, 0.0), axis=1, out=stats.weight_sum[start:stop])
                np.sum(d, axis=1, out=stats.smoothed[start:stop])
                stats.smoothed[start:stop][plus_inf] = np.nan
    return stats


def gradient(
    x: np.ndarray,
    labels: np.ndarray,
    softcap: float | None,
    stats: RowStats,
    *,
    row_weight: np.ndarray | None,
    smoothing: float,
    class_weight: np.ndarray | None,
    ce_scale: np.ndarray,
    z_coef: np.ndarray | None,
    keep: np.ndarray,
    ln_base: float | None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    r"""The gradient ``[N, C]`` (``x``'s dtype) of the loss whose row statistics
    :func:`lse_and_nll` returned, as the Array-API path forms it:

    .. math:: g = \Big(c_i \big((1 - \varepsilon)\, a_i\, (q - \mathrm{onehot}(y))
              + \varepsilon\, (\tfrac{W_i}{K_i} q - \tfrac{w \odot f}{K_i})\big) + z_i\, q\Big)
              \odot (1 - \tanh^2(x / \mathrm{cap})) / \ln b,
              \qquad q = e^{x - m} / s,

    with ``a`` the class weight of the row's label (``row_weight``, 1 when None), ``w`` the class
    weights (``class_weight``, 1 when None), ``f`` the indicator of finite (capped) logits,
    ``K = count`` and ``W = weight_sum`` (K without class weights) from ``stats``, ``\varepsilon``
    the ``smoothing``, ``c`` the reduction's ``ce_scale``, ``z`` the z-loss term ``z_coef`` (None:
    none), the soft-cap factor only with ``softcap`` and ``ln b`` only with ``ln_base``; rows where
    ``keep`` is False are 0. Written into ``out`` (``[N, C]``, ``x``'s dtype; a new array when None),
    which may be ``x`` itself: each block of ``x`` is read before its rows are written."""
    n, c = x.shape
    if out is None:
        out = np.empty_like(x)
    rows = min(n, max(1, BLOCK_ELEMENTS // c))
    q_buf = np.empty((rows, c), dtype=x.dtype)
    t_buf = np.empty((rows, c), dtype=x.dtype) if softcap is not None else None
    if smoothing:
        s_buf = np.empty((rows, c), dtype=x.dtype)
        finite_buf = np.empty((rows, c), dtype=bool)
    coef = None  # (1 - eps) a, per row; None where it is 1
    if row_weight is not None:
        coef = (1.0 - smoothing) * row_weight
    elif smoothing:
        coef = np.full(n, 1.0 - smoothing, dtype=x.dtype)
    with np.errstate(all="ignore"):
        for start, stop in _blocks(n, c):
            k = stop - start
            q = q_buf[:k]
            t = None if t_buf is None else t_buf[:k]
            if t is not None:
                np.divide(x[start:stop], softcap, out=t)
                np.tanh(t, out=t)  # tanh(x / cap), kept for the chain rule
                np.multiply(softcap, t, out=q)  # the capped logits
            else:
                q[...] = x[start:stop]
            if smoothing:
                finite = finite_buf[:k]
                np.isfinite(q, out=finite)
            np.subtract(q, stats.shift[start:stop, None], out=q)
            np.exp(q, out=q)
            np.divide(q, stats.sumexp[start:stop, None], out=q)
            g = out[start:stop]
            g[...] = q
            g[np.arange(k), labels[start:stop]] -= 1.0
            if coef is not None:
                np.multiply(coef[start:stop, None], g, out=g)
            if smoothing:
                kk = stats.count[start:stop, None]
                sm = s_buf[:k]
                if class_weight is None:
                    np.divide(finite, kk, out=sm)  # f / K
                    np.subtract(q, sm, out=sm)
                else:
                    wk = stats.weight_sum[start:stop] / stats.count[start:stop]
                    np.multiply(wk[:, None], q, out=sm)  # W / K q
                    np.subtract(sm, np.where(finite, class_weight, 0.0) / kk, out=sm)
                np.multiply(smoothing, sm, out=sm)
                np.add(g, sm, out=g)
            np.multiply(ce_scale[start:stop, None], g, out=g)
            if z_coef is not None:
                np.multiply(z_coef[start:stop, None], q, out=q)
                np.add(g, q, out=g)
            if t is not None:
                np.multiply(t, t, out=t)
                np.subtract(1.0, t, out=t)
                np.multiply(g, t, out=g)
            g[~keep[start:stop]] = 0.0  # after the cap's factor, NaN at a NaN logit
            if ln_base is not None:
                np.divide(g, ln_base, out=g)
    return out


def _effective_targets(t: np.ndarray, finite: np.ndarray, smoothing: float, class_weight: np.ndarray | None,
                       out: np.ndarray) -> np.ndarray:
    r"""The targets a block's loss weighs ``log q`` by, as the Array-API path forms them:
    :math:`w \odot ((1 - \varepsilon)\, t + \varepsilon f / K)` (``f`` the finite logits, ``K``
    their count per row, 1 where there is none), written into ``out``; ``t`` itself without
    smoothing or class weights."""
    if not smoothing and class_weight is None:
        return t
    if smoothing:
        k = np.sum(finite, axis=1)
        k[k == 0] = 1
        np.divide(finite, k[:, None], out=out)
        np.multiply(smoothing, out, out=out)
        out += (1.0 - smoothing) * t
    else:
        out[...] = t
    if class_weight is not None:
        np.multiply(out, class_weight, out=out)
    return out


def soft_targets(
    x: np.ndarray,
    t: np.ndarray,
    softcap: float | None,
    *,
    smoothing: float = 0.0,
    class_weight: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    z_loss: float = 0.0,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Softmax cross-entropy of C-contiguous ``x`` ``[N, C]`` (C >= 1) against probability
    targets ``t`` ``[N, C]`` (any layout and real floating dtype: copied to ``x``'s, C-ordered, a block at a time)
    after the optional soft cap, with label smoothing and class weights folded into the targets
    block by block (:func:`_effective_targets`, :math:`t'`): returns ``(lse, ce)``, ``[N]`` arrays of
    ``x``'s dtype, :math:`\mathrm{ce}_i = -\sum_j t'_{ij} \log q_{ij}`, a zero target on an infinite
    logit adding nothing (0 log 0 = 0; a NaN logit keeps the row's NaN), as in the Array-API path.

    With ``out`` (``[N, C]``, ``x``'s dtype) and the row factors ``scale`` (``[N]``: the row's weight
    over the reduction's denominator and the base), also the finished gradient

    .. math:: g_i = \big(s_i (T_i q_i - t'_i) + 2 z s_i\, \mathrm{lse}_i\, q_i\big)
              \odot (1 - \tanh^2(x_i / \mathrm{cap})), \qquad T_i = \textstyle\sum_j t'_{ij},

    (``z`` = ``z_loss``; the soft-cap factor only with ``softcap``), exact zeros where
    :math:`s_i = 0` and the row's lse is finite (NaN where it is not), as in crossent.cpu's
    soft-target kernels given keep flags."""
    n, c = x.shape
    lse, ce = np.empty(n, dtype=x.dtype), np.empty(n, dtype=x.dtype)
    rows_per_block = min(n, max(1, BLOCK_ELEMENTS // c))
    d_buf, e_buf = (np.empty((rows_per_block, c), dtype=x.dtype) for _ in range(2))
    finite_buf = np.empty((rows_per_block, c), dtype=bool)
    folded = smoothing or class_weight is not None
    t_buf = np.empty((rows_per_block, c), dtype=x.dtype) if folded else None
    # Targets of another dtype or layout are copied into C order a block at a time: the same sums,
    # so the same results as for targets cast up front.
    cast = t.dtype != x.dtype or not t.flags.c_contiguous
    cast_buf = np.empty((rows_per_block, c), dtype=x.dtype) if cast else None
    tanh_buf = np.empty((rows_per_block, c), dtype=x.dtype) if softcap is not None and out is not None else None
    with np.errstate(all="ignore"):
        for start, stop in _blocks(n, c):
            k = stop - start
            rows = np.arange(k)
            d = d_buf[:k]
            if softcap is None:
                d[...] = x[start:stop]
            else:
                th = d if tanh_buf is None else tanh_buf[:k]
                np.divide(x[start:stop], softcap, out=th)
                np.tanh(th, out=th)  # tanh(x / cap), kept for the chain rule when the gradient is wanted
                np.multiply(softcap, th, out=d)
            finite = finite_buf[:k]
            np.isfinite(d, out=finite)
            # The infinite logits, where a zero target adds 0 (not a NaN one: its row stays NaN).
            infinite = None if finite.all() else np.isinf(d)
            top = np.argmax(d, axis=1)  # a maximum (the first NaN if any, as in lse_and_nll)
            m = d[rows, top]
            max_finite = np.isfinite(m)
            plus_inf = m == np.inf  # a +inf (capped) logit and no NaN: NaN loss and gradient row
            m[~max_finite] = 0.0
            np.subtract(d, m[:, None], out=d)
            e = e_buf[:k]
            np.exp(d, out=e)
            # log s as log1p of the terms below the maximum, as in lse_and_nll.
            e[rows[max_finite], top[max_finite]] = 0.0
            s = np.sum(e, axis=1)
            log_s = np.where(max_finite, np.log1p(s), np.log(s))
            s[max_finite] += 1.0
            block_lse = lse[start:stop]
            np.add(log_s, m, out=block_lse)
            np.subtract(d, log_s[:, None], out=d)  # log q
            tb = t[start:stop]
            if cast_buf is not None:
                cast_buf[:k] = tb
                tb = cast_buf[:k]
            tb = _effective_targets(tb, finite, smoothing, class_weight, None if t_buf is None else t_buf[:k])
            np.multiply(tb, d, out=d)
            if infinite is not None:
                d[(tb == 0) & infinite] = 0.0  # 0 log 0 = 0 on a masked class
            np.negative(np.sum(d, axis=1), out=ce[start:stop])
            ce[start:stop][plus_inf] = np.nan  # as F.cross_entropy (its log_softmax is NaN there)
            if out is None:
                continue
            e[rows[max_finite], top[max_finite]] = 1.0
            np.divide(e, s[:, None], out=e)  # q
            g = out[start:stop]
            row_scale = scale[start:stop]
            np.multiply(np.sum(tb, axis=1)[:, None], e, out=g)
            np.subtract(g, tb, out=g)
            np.multiply(row_scale[:, None], g, out=g)
            if z_loss:
                np.multiply((2.0 * z_loss * row_scale * block_lse)[:, None], e, out=e)
                np.add(g, e, out=g)
            if tanh_buf is not None:
                th = tanh_buf[:k]
                np.multiply(th, th, out=th)
                np.subtract(1.0, th, out=th)
                np.multiply(g, th, out=g)
            # A row of factor 0 adds 0 x its gradient: exact zeros, NaN where its softmax is not
            # finite (as the kernels with keep flags, the Array-API path and PyTorch).
            g[(row_scale == 0.0) & np.isfinite(block_lse)] = 0.0
            g[plus_inf] = np.nan
    return lse, ce
