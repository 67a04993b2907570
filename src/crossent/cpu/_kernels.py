"""numba kernels behind :mod:`crossent.cpu` (imported lazily: importing this module imports numba).

Layout of the work: one logits row of C values is 4 KiB (float32, C = 1000), so it stays in the
L1/L2 cache between the passes over it. Per row:

1. the row maximum m (skips NaN; NaN still propagates through the sum in pass 2);
2. in float64, the number of entries equal to m and the sum ``rest`` of exp(x_j - m) over the
   others, so that log_s = log(sum_j exp(x_j - m)) is ``log1p(rest)`` when m is attained once;
   then lse = m + log_s and the loss nll = (m - x_label) + log_s (exact first term);
3. (gradient kernel only) out_j = scale * (exp(x_j - lse) - [j == label]): exact zeros for a row
   whose ``keep`` flag is false (an ignored row, whatever its logits), and for scale == 0 when
   lse is finite (the product is 0 there anyway, so the pass over the row is skipped). A kept row
   with scale == 0 and lse -inf or NaN (all -inf or a NaN logit: class weight 0 or sample weight
   0 on such a row) gets the product in IEEE arithmetic, 0 * NaN = NaN where the softmax is NaN,
   as PyTorch, impl="chunked", the blocked pass and the Array-API path give.

A kept row holding +inf (and no NaN) has lse +inf but no softmax: its loss (nll, and with label
smoothing or soft targets the whole loss) and its whole gradient row are NaN, whatever its
factors, as F.cross_entropy gives (its log_softmax is NaN across such a row); ignored rows stay 0.

Rows are split across threads with ``prange`` (serial entry points serve small inputs and forked
processes). Nothing of size N x C is allocated: the extra memory is the outputs (arrays of N).

Why a hand-written exp for float32 logits: numba lowers ``math.exp`` to a scalar libm call that
LLVM cannot vectorize (no SVML here), and that call dominates the time. ``_exp_nonpos`` below is
exp in float64 arithmetic, written with plain arithmetic plus one bit cast so that LLVM vectorizes
it (4 float64 lanes with AVX2):

    exp(d) = 2**k * exp(r),  k = round(d / ln 2),  r = d - k ln 2,  |r| <= ln(2) / 2,

with exp(r) by its Taylor polynomial of degree 8 (relative truncation error below
e**0.35 * 0.3466**9 / 9! = 2.8e-10, a hundredth of float32's half ulp 3.0e-8) and 2**k built
from the exponent bits. The reduction runs in float64, so it is exact to about 1e-16 for |d| < 745. This is the
standard Cody-Waite range reduction (W. J. Cody and W. Waite, "Software Manual for the Elementary
Functions", 1980). float64 logits use libm's ``math.exp`` (correct to an ulp) instead: the
polynomial is not accurate enough for float64 results.

Floating-point flags: the row-sum functions (and only they) allow reassociation
(``fastmath={"reassoc", "contract"}``) so that LLVM can keep several float64 partial sums in
vector lanes; that changes only the order of a float64 sum. No flag that assumes the absence
of NaN or inf is used, so NaN and inf propagate as in IEEE arithmetic.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

_LOG2E = 1.4426950408889634  # 1 / ln 2
_LN2 = 0.6931471805599453
# Below this, exp(d) is under float64's smallest normal (2**-1022); the sum it joins holds a 1.
_EXP_ZERO_BELOW = -708.0
_SUM_FLAGS = {"reassoc", "contract"}
# Taylor coefficients 1/k! of exp(r), k = 2..8 (k = 0, 1 are 1).
_P2, _P3, _P4, _P5, _P6, _P7, _P8 = (1.0 / math.factorial(k) for k in range(2, 9))


@intrinsic
def _int64_bits_as_float64(typingctx, bits):
    """Reinterpret the 64 bits of an int64 as a float64 (an LLVM bitcast, vectorizable)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@nb.njit(inline="always", cache=True)
def _exp_nonpos(d):
    """exp(d) for float64 d <= 0 (also correct for 0 < d < 709), relative error <= 3e-10.

    Returns 0 for d < -708 (including -inf) and NaN for NaN.
    """
    k = np.floor(d * _LOG2E + 0.5)  # a float (math.floor would give an int64)
    r = d - k * _LN2
    p = _P8
    p = p * r + _P7
    p = p * r + _P6
    p = p * r + _P5
    p = p * r + _P4
    p = p * r + _P3
    p = p * r + _P2
    p = p * r + 1.0
    p = p * r + 1.0
    # Clamp before the integer conversion so -inf, NaN and huge |d| never reach it as garbage.
    kc = min(max(k, -1022.0), 1023.0)
    # Through int32: AVX2 converts four float64 to int32 at once, but has no float64 -> int64.
    two_k = _int64_bits_as_float64((np.int64(np.int32(kc)) + 1023) << 52)
    y = p * two_k
    # NaN fails both comparisons and comes back as d (NaN).
    if d >= _EXP_ZERO_BELOW:
        return y
    if d < _EXP_ZERO_BELOW:
        return 0.0
    return d


@nb.njit(inline="always", cache=True)
def _max_skip_nan(a, b):
    return a if a > b else b  # b when a is NaN: the x86 maxps semantics, so it vectorizes


@nb.njit(inline="always", cache=True)
def _row_max(row):
    """Maximum of the row's non-NaN entries as float64 (-inf if there are none).

    Eight independent running maxima let LLVM put them in one vector register without any
    fast-math flag (a single running maximum is a serial chain it does not vectorize).
    """
    c = row.shape[0]
    lo = row.dtype.type(-np.inf)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = lo
    j = 0
    while j + 8 <= c:
        m0 = _max_skip_nan(row[j], m0)
        m1 = _max_skip_nan(row[j + 1], m1)
        m2 = _max_skip_nan(row[j + 2], m2)
        m3 = _max_skip_nan(row[j + 3], m3)
        m4 = _max_skip_nan(row[j + 4], m4)
        m5 = _max_skip_nan(row[j + 5], m5)
        m6 = _max_skip_nan(row[j + 6], m6)
        m7 = _max_skip_nan(row[j + 7], m7)
        j += 8
    m = _max_skip_nan(
        _max_skip_nan(_max_skip_nan(m0, m1), _max_skip_nan(m2, m3)),
        _max_skip_nan(_max_skip_nan(m4, m5), _max_skip_nan(m6, m7)),
    )
    while j < c:
        m = _max_skip_nan(row[j], m)
        j += 1
    return np.float64(m)


@nb.njit(inline="always", cache=True)
def _lse_nonfinite_max(row, m):
    """lse of a row whose maximum over non-NaN entries m is -inf or +inf: m, or NaN if a NaN is in
    the row (also for an empty row, m = -inf). Matches max + log(sum(exp(x - max))) with the
    shift taken as 0 when the max is not finite."""
    for j in range(row.shape[0]):
        if row[j] != row[j]:
            return np.nan
    return m


# ---- one row ---------------------------------------------------------------------------------
# A row's log-sum-exp is returned as two float64 parts, lse = shift + log_s: shift is the row's
# maximum m and log_s = log(sum_j exp(x_j - m)). Keeping them apart lets the loss be formed as
# (m - x_label) + log_s, whose first term is exact: lse - x_label, with lse rounded to float32,
# would lose the loss's low digits whenever the loss is much smaller than |lse|. log_s itself is
# log1p of the sum over the entries below the maximum when exactly one entry attains it, so it is
# accurate relative to its own size even when it is ~1e-9 (a confident row).
# Only these row functions allow reassociation (for the vectorized sum); they are compiled as
# functions of their own, so the flag cannot reorder (m - x_label) + log_s in the callers.


@nb.njit(inline="always", cache=True)
def _finish_log_s(at_max, rest):
    return math.log1p(rest) if at_max == 1.0 else math.log(at_max + rest)


@nb.njit(inline="always", cache=True)
def _nll(shift, log_s, x_label):
    """The loss (shift - x_label) + log_s; NaN for a row holding +inf (shift +inf), whose softmax
    is not defined: PyTorch's log_softmax is NaN across such a row (inf - inf at the +inf entry
    poisons its log-sum-exp), so F.cross_entropy gives NaN whatever the label."""
    return np.nan if shift == np.inf else (shift - x_label) + log_s


@nb.njit(cache=True, fastmath=_SUM_FLAGS)
def _row_lse_parts_f32(row):
    m = _row_max(row)
    if m == -np.inf or m == np.inf:
        return _lse_nonfinite_max(row, m), 0.0
    rest = 0.0  # sum of exp(x_j - m) over the entries below the maximum (NaN lands here)
    at_max = 0.0  # number of entries equal to the maximum, each contributing exp(0) = 1
    for j in range(row.shape[0]):
        d = np.float64(row[j]) - m
        top = d >= 0.0
        rest += 0.0 if top else _exp_nonpos(d)
        at_max += 1.0 if top else 0.0
    return m, _finish_log_s(at_max, rest)


@nb.njit(cache=True, fastmath=_SUM_FLAGS)
def _row_lse_parts_f64(row):
    m = _row_max(row)
    if m == -np.inf or m == np.inf:
        return _lse_nonfinite_max(row, m), 0.0
    rest = 0.0
    at_max = 0.0
    for j in range(row.shape[0]):
        d = row[j] - m
        top = d >= 0.0
        rest += 0.0 if top else math.exp(d)
        at_max += 1.0 if top else 0.0
    return m, _finish_log_s(at_max, rest)


@nb.njit(inline="always", cache=True)
def _zero_grad(keep, a, lse):
    """Whether a row's gradient a * (...) is written as exact zeros: an ignored row (``keep``
    false), or a == 0 with a finite lse, where the product is 0 anyway (the softmax is finite).
    A kept row with a == 0 and lse -inf, +inf or NaN gets the product, NaN where the softmax is
    NaN (0 * NaN), as in PyTorch and the Array-API path."""
    return not keep or (a == 0.0 and math.isfinite(lse))


@nb.njit(inline="always", cache=True)
def _zero_grad_z(keep, a, r, lse):
    """``_zero_grad`` for a row whose gradient also holds the z-loss term r * lse * softmax: exact
    zeros on an ignored row, or where both factors are 0 and lse is finite."""
    return not keep or (a == 0.0 and r == 0.0 and math.isfinite(lse))


@nb.njit(inline="always", cache=True)
def _row_grad_f32(row, dst, label, a, r, keep, shift, log_s, x_label):
    """dst = (a + r * lse) * softmax(row) - a * onehot(label) (exact zeros: ``_zero_grad_z``): the
    gradient of a * (lse - x_label) + (r / 2) * lse^2, the z-loss term only where r != 0, so that
    without it the row is a * (softmax - onehot) to the bit. x_label = row[label] is read before
    dst (which may be row) is written. softmax_j = exp((x_j - shift) - log_s): x_j - shift is
    exact, while x_j - lse, lse rounded at the logits' magnitude, would lose log_s beyond
    |x| ~ 1e16."""
    lse = shift + log_s
    if keep and shift == np.inf:  # a +inf logit: NaN across the row, as in PyTorch (``_nll``)
        for j in range(row.shape[0]):
            dst[j] = np.nan
        return
    if _zero_grad_z(keep, a, r, lse):
        for j in range(row.shape[0]):
            dst[j] = 0.0
        return
    c = a if r == 0.0 else a + r * lse
    for j in range(row.shape[0]):
        dst[j] = c * _exp_nonpos((np.float64(row[j]) - shift) - log_s)
    e = _exp_nonpos((np.float64(x_label) - shift) - log_s)
    dst[label] = a * (e - 1.0) if r == 0.0 else a * (e - 1.0) + (r * lse) * e


@nb.njit(inline="always", cache=True)
def _row_grad_f64(row, dst, label, a, r, keep, shift, log_s, x_label):
    lse = shift + log_s
    if keep and shift == np.inf:  # a +inf logit: NaN across the row, as in PyTorch (``_nll``)
        for j in range(row.shape[0]):
            dst[j] = np.nan
        return
    if _zero_grad_z(keep, a, r, lse):
        for j in range(row.shape[0]):
            dst[j] = 0.0
        return
    c = a if r == 0.0 else a + r * lse
    for j in range(row.shape[0]):
        dst[j] = c * math.exp((row[j] - shift) - log_s)
    e = math.exp((x_label - shift) - log_s)
    dst[label] = a * (e - 1.0) if r == 0.0 else a * (e - 1.0) + (r * lse) * e


# ---- entry points: over the rows, in parallel (prange) or serially -------------------------------
# The serial versions serve small inputs (thread start-up would cost more than the work) and
# processes forked from one that already ran the parallel ones (GNU OpenMP, numba's threading
# layer here, cannot be used again after a fork: the child would be terminated).
# Outputs: lse[i] = shift + log_s, picked[i] = x[i, labels[i]], nll[i] = (shift - picked) + log_s.
# The gradient ones take the row factors ``scale`` (and, class indices, ``z_scale``: the z-loss
# term's) and the flags ``keep`` (bool; false: an ignored row, exact zeros) and write ``out`` (may
# be logits).


@nb.njit(parallel=True, cache=True)
def lse_pick_nll_f32(logits, labels, lse, picked, nll):
    for i in prange(logits.shape[0]):
        shift, log_s = _row_lse_parts_f32(logits[i])
        x_label = np.float64(logits[i, labels[i]])
        lse[i] = shift + log_s
        picked[i] = x_label
        nll[i] = _nll(shift, log_s, x_label)


@nb.njit(cache=True)
def lse_pick_nll_f32_serial(logits, labels, lse, picked, nll):
    for i in range(logits.shape[0]):
        shift, log_s = _row_lse_parts_f32(logits[i])
        x_label = np.float64(logits[i, labels[i]])
        lse[i] = shift + log_s
        picked[i] = x_label
        nll[i] = _nll(shift, log_s, x_label)


@nb.njit(parallel=True, cache=True)
def lse_pick_nll_f64(logits, labels, lse, picked, nll):
    for i in prange(logits.shape[0]):
        shift, log_s = _row_lse_parts_f64(logits[i])
        x_label = logits[i, labels[i]]
        lse[i] = shift + log_s
        picked[i] = x_label
        nll[i] = _nll(shift, log_s, x_label)


@nb.njit(cache=True)
def lse_pick_nll_f64_serial(logits, labels, lse, picked, nll):
    for i in range(logits.shape[0]):
        shift, log_s = _row_lse_parts_f64(logits[i])
        x_label = logits[i, labels[i]]
        lse[i] = shift + log_s
        picked[i] = x_label
        nll[i] = _nll(shift, log_s, x_label)


@nb.njit(parallel=True, cache=True)
def softmax_minus_onehot_f32(logits, labels, scale, z_scale, keep, out, lse, nll):
    for i in prange(logits.shape[0]):
        row = logits[i]
        shift, log_s = _row_lse_parts_f32(row)
        x_label = row[labels[i]]
        lse[i] = shift + log_s
        nll[i] = _nll(shift, log_s, x_label)
        _row_grad_f32(row, out[i], labels[i], scale[i], z_scale[i], keep[i], shift, log_s, x_label)


@nb.njit(cache=True)
def softmax_minus_onehot_f32_serial(logits, labels, scale, z_scale, keep, out, lse, nll):
    for i in range(logits.shape[0]):
        row = logits[i]
        shift, log_s = _row_lse_parts_f32(row)
        x_label = row[labels[i]]
        lse[i] = shift + log_s
        nll[i] = _nll(shift, log_s, x_label)
        _row_grad_f32(row, out[i], labels[i], scale[i], z_scale[i], keep[i], shift, log_s, x_label)


@nb.njit(parallel=True, cache=True)
def softmax_minus_onehot_f64(logits, labels, scale, z_scale, keep, out, lse, nll):
    for i in prange(logits.shape[0]):
        row = logits[i]
        shift, log_s = _row_lse_parts_f64(row)
        x_label = row[labels[i]]
        lse[i] = shift + log_s
        nll[i] = _nll(shift, log_s, x_label)
        _row_grad_f64(row, out[i], labels[i], scale[i], z_scale[i], keep[i], shift, log_s, x_label)


@nb.njit(cache=True)
def softmax_minus_onehot_f64_serial(logits, labels, scale, z_scale, keep, out, lse, nll):
    for i in range(logits.shape[0]):
        row = logits[i]
        shift, log_s = _row_lse_parts_f64(row)
        x_label = row[labels[i]]
        lse[i] = shift + log_s
        nll[i] = _nll(shift, log_s, x_label)
        _row_grad_f64(row, out[i], labels[i], scale[i], z_scale[i], keep[i], shift, log_s, x_label)


# ---- soft (probability) targets ----------------------------------------------------------------
# Row i with target weights t (a distribution in the usual case; any real numbers are taken as
# they are):
#   ce_i = sum_j t_j (lse_i - x_j) = sum_j t_j (shift - x_j) + log_s * sum_j t_j,
# in float64, an entry with t_j = 0 adding nothing (0 log 0 = 0 where x_j = -inf); gradient
#   out_j = a_i (T_i softmax(x_i)_j - t_j),  T_i = sum_j t_j   (exact zeros: ``_zero_grad``).
# A row whose maximum is not finite (all -inf, or a +inf entry) takes crossent's Array-API
# arithmetic instead (shift 0: ``_row_soft_nonfinite``), so both paths agree on such rows too.


def _target_value(row, v):
    """Target entry ``v`` rounded to ``row``'s dtype, as a float64: the value of targets cast to
    the logits' dtype first (float64 targets with float32 logits read in place, no copy)."""
    raise NotImplementedError("numba-only: compiled through its overload")


@overload(_target_value, inline="always")
def _target_value_overload(row, v):
    if row.dtype == types.float32 and v != types.float32:
        return lambda row, v: np.float64(np.float32(v))
    return lambda row, v: np.float64(v)


@nb.njit(cache=True, fastmath=_SUM_FLAGS)
def _row_soft_sums(row, t, shift):
    """(sum_j t_j (shift - x_j) over the t_j != 0, sum_j t_j) in float64."""
    acc = 0.0
    total = 0.0
    for j in range(row.shape[0]):
        tj = _target_value(row, t[j])
        term = tj * (shift - np.float64(row[j]))
        acc += term if tj != 0.0 else 0.0
        total += tj
    return acc, total


@nb.njit(cache=True, error_model="numpy")  # exp(x) / 0 is inf or NaN, as in numpy: no exception
def _row_soft_nonfinite(row, t, dst, a, keep, want_grad):
    """lse and ce of a row whose maximum is not finite, as the Array-API path forms them: shift 0,
    s = sum_j exp(x_j), log q_j = x_j - log s, ce = -sum_j t_j log q_j without the entries where
    t_j = 0 and x_j is infinite (0 log 0 = 0; a NaN x_j keeps its NaN); with ``want_grad``
    dst_j = a (T exp(x_j) / s - t_j), exact zeros only for an ignored row (lse is not finite)."""
    c = row.shape[0]
    s = 0.0
    total = 0.0
    for j in range(c):
        s += math.exp(np.float64(row[j]))
        total += _target_value(row, t[j])
    log_s = np.log(s)
    if log_s == np.inf:  # a +inf logit: NaN loss and gradient, as in PyTorch (``_nll``)
        if want_grad:
            for j in range(c):
                dst[j] = np.nan if keep else 0.0
        return log_s, np.nan
    ce = 0.0
    for j in range(c):
        x = np.float64(row[j])
        tj = _target_value(row, t[j])
        if tj != 0.0 or not math.isinf(x):
            ce -= tj * (x - log_s)
    if want_grad:
        for j in range(c):
            dst[j] = 0.0 if not keep else a * (total * (math.exp(np.float64(row[j])) / s) - _target_value(row, t[j]))
    return log_s, ce


@nb.njit(inline="always", cache=True)
def _soft_row_f32(row, t, dst, a, keep, want_grad):
    shift, log_s = _row_lse_parts_f32(row)
    if not math.isfinite(shift):
        return _row_soft_nonfinite(row, t, dst, a, keep, want_grad)
    acc, total = _row_soft_sums(row, t, shift)
    lse_i = shift + log_s
    if want_grad:
        zero = _zero_grad(keep, a, lse_i)
        for j in range(row.shape[0]):
            dst[j] = 0.0 if zero else a * (total * _exp_nonpos((np.float64(row[j]) - shift) - log_s)
                                               - _target_value(row, t[j]))
    return lse_i, acc + log_s * total


@nb.njit(inline="always", cache=True)
def _soft_row_f64(row, t, dst, a, keep, want_grad):
    shift, log_s = _row_lse_parts_f64(row)
    if not math.isfinite(shift):
        return _row_soft_nonfinite(row, t, dst, a, keep, want_grad)
    acc, total = _row_soft_sums(row, t, shift)
    lse_i = shift + log_s
    if want_grad:
        zero = _zero_grad(keep, a, lse_i)
        for j in range(row.shape[0]):
            dst[j] = 0.0 if zero else a * (total * math.exp((row[j] - shift) - log_s) - _target_value(row, t[j]))
    return lse_i, acc + log_s * total


# Entry points: lse[i], ce[i] for every row; the gradient ones also write out (may be logits), for
# the row factors scale and the flags keep (as above).
# ``unused``: an (N, 0) array standing in for out in the loss-only ones (logits may be read-only).


@nb.njit(parallel=True, cache=True)
def soft_ce_f32(logits, targets, unused, lse, ce):
    for i in prange(logits.shape[0]):
        lse[i], ce[i] = _soft_row_f32(logits[i], targets[i], unused[i], 0.0, True, False)


@nb.njit(cache=True)
def soft_ce_f32_serial(logits, targets, unused, lse, ce):
    for i in range(logits.shape[0]):
        lse[i], ce[i] = _soft_row_f32(logits[i], targets[i], unused[i], 0.0, True, False)


@nb.njit(parallel=True, cache=True)
def soft_ce_f64(logits, targets, unused, lse, ce):
    for i in prange(logits.shape[0]):
        lse[i], ce[i] = _soft_row_f64(logits[i], targets[i], unused[i], 0.0, True, False)


@nb.njit(cache=True)
def soft_ce_f64_serial(logits, targets, unused, lse, ce):
    for i in range(logits.shape[0]):
        lse[i], ce[i] = _soft_row_f64(logits[i], targets[i], unused[i], 0.0, True, False)


@nb.njit(parallel=True, cache=True)
def softmax_minus_targets_f32(logits, targets, scale, keep, out, lse, ce):
    for i in prange(logits.shape[0]):
        lse[i], ce[i] = _soft_row_f32(logits[i], targets[i], out[i], scale[i], keep[i], True)


@nb.njit(cache=True)
def softmax_minus_targets_f32_serial(logits, targets, scale, keep, out, lse, ce):
    for i in range(logits.shape[0]):
        lse[i], ce[i] = _soft_row_f32(logits[i], targets[i], out[i], scale[i], keep[i], True)


@nb.njit(parallel=True, cache=True)
def softmax_minus_targets_f64(logits, targets, scale, keep, out, lse, ce):
    for i in prange(logits.shape[0]):
        lse[i], ce[i] = _soft_row_f64(logits[i], targets[i], out[i], scale[i], keep[i], True)


@nb.njit(cache=True)
def softmax_minus_targets_f64_serial(logits, targets, scale, keep, out, lse, ce):
    for i in range(logits.shape[0]):
        lse[i], ce[i] = _soft_row_f64(logits[i], targets[i], out[i], scale[i], keep[i], True)


# ---- label smoothing (class-index targets) -------------------------------------------------------
# Row i with label y, class weights w (all 1 without), smoothing eps; F = the entries whose logit is
# finite, K = |F|, W = sum_{j in F} w_j and, in float64,
#   S = sum_{j in F} w_j log q_j = sum_{j in F} w_j (x_j - shift) - log_s W.
# The caller forms the loss (1 - eps) w_y nll - eps S / K (crossent's smoothing: eps spread over
# the finite logits). The gradient, for a row factor a (exact zeros: ``_zero_grad``):
#   out_j = a ((1 - eps) w_y (q_j - [j = y]) + eps (W / K q_j - w_j [j in F] / K)).
# A row whose maximum is not finite takes the Array-API arithmetic (shift 0), as for soft targets.


@nb.njit(cache=True, fastmath=_SUM_FLAGS)
def _row_smooth_sums(row, w, shift):
    """(K, W, sum_{j in F} w_j (x_j - shift)) in float64."""
    k = 0.0
    wsum = 0.0
    acc = 0.0
    for j in range(row.shape[0]):
        x = np.float64(row[j])
        finite = math.isfinite(x)
        k += 1.0 if finite else 0.0
        wsum += w[j] if finite else 0.0
        acc += w[j] * (x - shift) if finite else 0.0
    return k, wsum, acc


@nb.njit(cache=True, error_model="numpy")  # exp(x) / 0 is inf or NaN, as in numpy: no exception
def _row_smooth_nonfinite(row, label, w, eps, dst, a, keep, want_grad):
    """(lse, nll, S, K, W) of a row whose maximum is not finite, as the Array-API path forms them:
    shift 0, s = sum_j exp(x_j), log q_j = x_j - log s; with ``want_grad`` the gradient into dst
    (exact zeros only for an ignored row: lse is not finite)."""
    c = row.shape[0]
    s = 0.0
    for j in range(c):
        s += math.exp(np.float64(row[j]))
    log_s = np.log(s)
    k = 0.0
    wsum = 0.0
    acc = 0.0
    for j in range(c):
        x = np.float64(row[j])
        if math.isfinite(x):
            k += 1.0
            wsum += w[j]
            acc += w[j] * (x - log_s)
    nll = log_s - np.float64(row[label])
    k = k if k > 0.0 else 1.0
    if log_s == np.inf:  # a +inf logit: NaN loss and gradient, as in PyTorch (``_nll``)
        if want_grad:
            for j in range(c):
                dst[j] = np.nan if keep else 0.0
        return log_s, np.nan, np.nan, k, wsum
    if want_grad:
        c1 = (1.0 - eps) * w[label]
        for j in range(c):
            x = np.float64(row[j])
            if not keep:
                dst[j] = 0.0
                continue
            q = math.exp(x) / s
            g = c1 * (q - (1.0 if j == label else 0.0)) + eps * (wsum / k * q - (w[j] / k if math.isfinite(x) else 0.0))
            dst[j] = a * g
    return log_s, nll, acc, k, wsum


@nb.njit(inline="always", cache=True)
def _smooth_grad_coefs(w, label, eps, a, k, wsum):
    """(c_q, c_y, c_f): out_j = c_q q_j - c_f w_j [j in F], minus c_y more at j = y."""
    c1 = a * (1.0 - eps) * w[label]
    return c1 + a * eps * wsum / k, c1, a * eps / k


@nb.njit(inline="always", cache=True)
def _smooth_row_f32(row, label, w, eps, dst, a, keep, want_grad):
    shift, log_s = _row_lse_parts_f32(row)
    if not math.isfinite(shift):
        return _row_smooth_nonfinite(row, label, w, eps, dst, a, keep, want_grad)
    x_label = np.float64(row[label])
    k, wsum, acc = _row_smooth_sums(row, w, shift)
    lse_i = shift + log_s
    if want_grad:
        if _zero_grad(keep, a, lse_i):
            for j in range(row.shape[0]):
                dst[j] = 0.0
        else:
            c_q, c_y, c_f = _smooth_grad_coefs(w, label, eps, a, k, wsum)
            f_label = 1.0 if math.isfinite(x_label) else 0.0
            for j in range(row.shape[0]):
                x = np.float64(row[j])
                dst[j] = c_q * _exp_nonpos((x - shift) - log_s) - (c_f * w[j] if math.isfinite(x) else 0.0)
            dst[label] = c_q * _exp_nonpos((x_label - shift) - log_s) - c_y - c_f * w[label] * f_label
    return lse_i, (shift - x_label) + log_s, acc - log_s * wsum, k, wsum


@nb.njit(inline="always", cache=True)
def _smooth_row_f64(row, label, w, eps, dst, a, keep, want_grad):
    shift, log_s = _row_lse_parts_f64(row)
    if not math.isfinite(shift):
        return _row_smooth_nonfinite(row, label, w, eps, dst, a, keep, want_grad)
    x_label = row[label]
    k, wsum, acc = _row_smooth_sums(row, w, shift)
    lse_i = shift + log_s
    if want_grad:
        if _zero_grad(keep, a, lse_i):
            for j in range(row.shape[0]):
                dst[j] = 0.0
        else:
            c_q, c_y, c_f = _smooth_grad_coefs(w, label, eps, a, k, wsum)
            f_label = 1.0 if math.isfinite(x_label) else 0.0
            for j in range(row.shape[0]):
                x = row[j]
                dst[j] = c_q * math.exp((x - shift) - log_s) - (c_f * w[j] if math.isfinite(x) else 0.0)
            dst[label] = c_q * math.exp((x_label - shift) - log_s) - c_y - c_f * w[label] * f_label
    return lse_i, (shift - x_label) + log_s, acc - log_s * wsum, k, wsum


# Entry points: lse, nll, S, K, W for every row; with want_grad also out (may be logits), for the
# row factors scale and the flags keep (as above).


@nb.njit(parallel=True, cache=True)
def smoothed_f32(logits, labels, weight, eps, scale, keep, out, lse, nll, smoothed, count, wsum, want_grad):
    for i in prange(logits.shape[0]):
        lse[i], nll[i], smoothed[i], count[i], wsum[i] = _smooth_row_f32(
            logits[i], labels[i], weight, eps, out[i], scale[i], keep[i], want_grad)


@nb.njit(cache=True)
def smoothed_f32_serial(logits, labels, weight, eps, scale, keep, out, lse, nll, smoothed, count, wsum, want_grad):
    for i in range(logits.shape[0]):
        lse[i], nll[i], smoothed[i], count[i], wsum[i] = _smooth_row_f32(
            logits[i], labels[i], weight, eps, out[i], scale[i], keep[i], want_grad)


@nb.njit(parallel=True, cache=True)
def smoothed_f64(logits, labels, weight, eps, scale, keep, out, lse, nll, smoothed, count, wsum, want_grad):
    for i in prange(logits.shape[0]):
        lse[i], nll[i], smoothed[i], count[i], wsum[i] = _smooth_row_f64(
            logits[i], labels[i], weight, eps, out[i], scale[i], keep[i], want_grad)


@nb.njit(cache=True)
def smoothed_f64_serial(logits, labels, weight, eps, scale, keep, out, lse, nll, smoothed, count, wsum, want_grad):
    for i in range(logits.shape[0]):
        lse[i], nll[i], smoothed[i], count[i], wsum[i] = _smooth_row_f64(
            logits[i], labels[i], weight, eps, out[i], scale[i], keep[i], want_grad)
