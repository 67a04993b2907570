"""Triton kernels (layer 1 of 4: kernel / launcher / autograd.Function / functional).

Every kernel here works in float32 whatever the storage dtype of its inputs, and indexes rows with
int64 (``row.to(tl.int64) * stride``): a row offset ``row * stride`` overflows int32 as soon as
``rows * classes > 2**31`` (e.g. 32768 x 128256 logits), so every pointer that multiplies a row
index by a stride does so after widening to int64. Column offsets inside one row stay int32
(one row holds fewer than 2**31 elements).

Notation shared by all kernels (one row ``i`` of logits, target class ``t``):

* ``x_j``: the logit after the optional softcap, ``x = cap * tanh(raw / cap)`` (Gemma 2);
* ``lse = log sum_j exp(x_j)``, computed with the online (running-max) softmax of
  Milakov & Gimelshein, "Online normalizer calculation for softmax", arXiv:1805.02867;
* ``fin_j = [x_j != -inf]``: classes with a finite logit; label smoothing spreads its mass
  ``eps`` over the ``K = sum_j fin_j`` finite classes (crossent's documented deviation from PyTorch,
  which uses all C classes and returns inf when a logit is -inf);
* class weights ``w_j`` (1 without ``weight``), ``S_w = sum_j fin_j w_j``,
  ``S_wd = sum_j fin_j w_j (x_j - m)`` with ``m`` the row max (kept relative to the running
  max, see ``_rebase``);
* per-row loss (F.cross_entropy's label-smoothing formula, with the finite-class rule)::

      CE_i = (1 - eps) w_t (lse - x_t) + (eps / K) (S_w log s - S_wd)     (lse = m + log s)
      Z_i  = z_loss * lse**2                          (PaLM's z-loss, not class-weighted)
      loss_i = ce_scale * CE_i + z_scale * Z_i

  where ``ce_scale``/``z_scale`` are 1 for "sum"/"none" and ``1 / sum_i w_{t_i}`` /
  ``1 / #non-ignored rows`` for "mean" (0 when that denominator is 0): the kernels take the
  reciprocals of the two sums (``_mean_scales``), which the launcher leaves on the device, so
  no kernel ever waits for the host;
* its gradient with respect to ``x_j`` (``p_j = exp(x_j - lse)``, evaluated as
  ``exp((x_j - m) - log s)`` so that no rounding of ``lse`` enters; likewise
  ``lse - x_t = (m - x_t) + log s``)::

      dloss_i/dx_j = A_i p_j - B_i [j == t] - C_i w_j fin_j
      A_i = ce_scale ((1 - eps) w_t + (eps / K) S_w) + z_scale * 2 z_loss lse
      B_i = ce_scale (1 - eps) w_t,   C_i = ce_scale eps / K

  and, with a softcap, times ``dx/draw = 1 - (x / cap)**2``. Ignored rows have loss 0 and
  gradient 0; a non-ignored target outside ``[0, C)`` gives a NaN loss (the GPU path does not
  validate targets, as that would need a host sync).

``INTERPRETER`` (constexpr, set only under ``TRITON_INTERPRET=1``) works around two gaps of
Triton's NumPy interpreter so that it computes what the GPU computes: its ``tl.dot`` mishandles
bfloat16, so bf16 operands are converted to float32 first (exact: every bf16 product is exact in
float32); and its float32 -> bfloat16 conversion truncates, so ``_cast`` rounds to nearest even
first, as the GPU's conversion does.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """``x.to(dtype)``; under the interpreter, float32 -> bfloat16 rounds to nearest even like the
    GPU (add 0x7FFF plus the lowest kept bit, then drop the low 16 bits; inf and NaN stay)."""
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tanh(y):
    """tanh(y) in float32 from exp only (``tl`` has no stable tanh across Triton 3.6-3.9).

    For |y| >= 1/8: sign(y) (1 - e) / (1 + e) with e = exp(-2|y|) <= 1 (no overflow; -inf -> -1).
    For |y| < 1/8 the odd Taylor series to y**7 (truncation < 2e-9 relative) avoids the
    cancellation in 1 - e.
    """
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(y < 0.0, -big, big)
    y2 = y * y
    small = y * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 - y2 * 0.05396825396825397)))
    return tl.where(a < 0.125, small, big)


@triton.jit
def _online_update(m, s, x, axis: tl.constexpr):
    """One step of the online softmax normalizer (arXiv:1805.02867) along ``axis`` of ``x``.

    ``m`` is the running max, ``s`` the running sum of exp(x - m). A block whose values are all
    -inf (masked lanes, -inf logits) leaves both unchanged: the shift ``m_safe`` is 0 when the new
    max is -inf, so no ``-inf - (-inf)`` NaN appears. NaN logits propagate into ``s``.
    """
    m_new = tl.maximum(m, tl.max(x, axis=axis))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if axis == 0:
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
    else:
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, s


@triton.jit
def _rebase(sum_w, sum_wd, m_old, m_new):
    """Move ``sum_wd = sum_j w_j (x_j - m_old)`` onto a new reference max ``m_new``.

    Label smoothing needs ``sum_j w_j (lse - x_j) = S_w log s - sum_j w_j (x_j - m)``; keeping the
    sum relative to the running max (as the online softmax keeps s) avoids the cancellation of
    ``lse * S_w - sum_j w_j x_j`` when the logits are large (1e4 in float32: ulp 1e-3 per term).
    ``m_old = -inf`` means nothing finite was summed yet (``sum_w = 0``): no shift, no NaN.
    """
    m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return sum_wd + sum_w * tl.where(m_old == float("-inf"), 0.0, m_old - m_new_safe)


# --------------------------------------------------------------------------------------------
# Cross-entropy on materialized logits: one program per row, two passes over the row.
# --------------------------------------------------------------------------------------------


@triton.jit
def _ce_load_block(x_row, cols, mask, cap, HAS_SOFTCAP: tl.constexpr):
    """float32 logits of one block (masked lanes -inf) and their tanh (softcap derivative)."""
    x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    th = x
    if HAS_SOFTCAP:
        th = _tanh(x / cap)
        x = tl.where(mask, cap * th, float("-inf"))
    return x, th


@triton.jit
def _ce_class_weight(weight_ptr, cols, mask, HAS_WEIGHT: tl.constexpr):
    """Class weights of one block (1 without weights), 0 on masked lanes."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    return w


@triton.jit
def _ce_grad_block(x, th, w, cols, target, m, log_s, a_coef, b_coef, c_coef,
                   HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``A p - B [j==t] - C w fin`` for one block, times ``1 - th**2`` with a softcap.

    ``p = exp((x - m) - log s)``: ``x - m`` is exact, whereas ``x - lse`` would carry the rounding
    of ``lse`` (an ulp of the logits' magnitude) into every probability.
    """
    g = a_coef * tl.exp((x - m) - log_s) - tl.where(cols == target, b_coef, 0.0)
    if HAS_SMOOTHING:
        g -= tl.where(x != float("-inf"), c_coef * w, 0.0)
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    return g


@triton.jit
def _mean_scales(n_valid_ptr, total_weight_ptr, MEAN: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """(ce_scale, z_scale), float32 scalars. "mean" (``MEAN``): 1 / sum_i w_{t_i} (loaded from
    ``total_weight_ptr``; with no class weights it is the row count) and 1 / #non-ignored rows
    (``n_valid_ptr``, any numeric dtype), each correctly rounded, and 0 for a zero denominator
    (every row ignored, or zero weights: no term to scale). Otherwise ("sum", "none") 1 and 1,
    and neither pointer is read."""
    ce_scale = tl.full([], 1.0, tl.float32)
    z_scale = tl.full([], 1.0, tl.float32)
    if MEAN:
        n = tl.load(n_valid_ptr).to(tl.float32)
        z_scale = tl.where(n != 0.0, tl.math.div_rn(ce_scale, tl.where(n != 0.0, n, 1.0)), 0.0)
        if HAS_WEIGHT:
            d = tl.load(total_weight_ptr).to(tl.float32)
            ce_scale = tl.where(d != 0.0, tl.math.div_rn(ce_scale, tl.where(d != 0.0, d, 1.0)), 0.0)
        else:
            ce_scale = z_scale
    return ce_scale, z_scale


@triton.jit
def _ce_forward_kernel(
    logits_ptr,
    stride_logits,
    grad_ptr,
    stride_grad,
    target_ptr,
    weight_ptr,
    n_valid_ptr,
    total_weight_ptr,
    loss_ptr,
    n_rows,
    n_cols,
    ignore_index,
    eps,
    z_loss,
    cap,
    MEAN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    PERSISTENT: tl.constexpr,
    REVERSE: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Loss of one row and (optionally) its gradient, in one launch (forward writes the gradient).

    ``SINGLE_BLOCK`` (the row fits one BLOCK): the row is loaded once and kept in registers; the
    statistics and the gradient come from that copy, so the logits are read exactly once.
    Otherwise pass 1 streams the row in BLOCK steps (online max/sum-exp, and for label smoothing
    K, S_w, S_wd) and pass 2 (``WRITE_GRAD``) streams it again, last block first when ``REVERSE``
    (the blocks pass 1 read most recently are the likeliest to be in L2; each gradient element
    depends only on its own logit and the row's statistics, so the order changes no bit); the
    second read hits L2 when few enough rows are in flight (the launcher picks big programs for
    long rows, or a persistent grid).
    Grid: ``(n_rows,)``, one row per program; with ``PERSISTENT`` any number P of programs, program
    p handling rows p, p + P, ... (each row still entirely by one program: same arithmetic).
    The gradient written is ``A p - B [j==t] - C w fin`` (times the softcap derivative) for an
    upstream gradient of 1; backward then only scales it. ``grad_ptr`` may equal ``logits_ptr``
    (in-place gradient): every element is read before the same program overwrites it.

    Pointers: ``logits_ptr`` (M, C) any float dtype, row stride ``stride_logits``, unit column
    stride; ``grad_ptr`` (M, C) same dtype, row stride ``stride_grad``; ``target_ptr`` (M,) int64;
    ``weight_ptr`` (C,) class weights (unused without ``HAS_WEIGHT``); ``n_valid_ptr`` and
    ``total_weight_ptr`` the denominators of "mean" (``MEAN``; see ``_mean_scales``);
    ``loss_ptr`` (M,) float32 output, ``loss_i`` above.
    Scalars: ``n_rows`` = M, ``n_cols`` = C, ``ignore_index``, ``eps`` (label smoothing),
    ``z_loss``, ``cap``.
    Constexprs: the ``HAS_*`` switches compile out unused terms; ``BLOCK`` columns per step.
    Overflow: ``row`` is widened to int64 before ``row * stride``.
    """
    if PERSISTENT:
        for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            # int64 row (``row`` may be a Python int under the interpreter: no ``.to`` there)
            _ce_row(
                tl.full([], 0, tl.int64) + row, logits_ptr, stride_logits, grad_ptr, stride_grad, target_ptr,
                weight_ptr, n_valid_ptr, total_weight_ptr, loss_ptr, n_cols, ignore_index, eps, z_loss, cap,
                MEAN, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP, WRITE_GRAD, SINGLE_BLOCK, REVERSE,
                INTERPRETER, BLOCK,
            )
    else:
        _ce_row(
            tl.program_id(0).to(tl.int64), logits_ptr, stride_logits, grad_ptr, stride_grad,
            target_ptr, weight_ptr, n_valid_ptr, total_weight_ptr, loss_ptr, n_cols, ignore_index, eps, z_loss,
            cap, MEAN, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP, WRITE_GRAD, SINGLE_BLOCK, REVERSE,
            INTERPRETER, BLOCK,
        )


@triton.jit
def _ce_row(
    row, logits_ptr, stride_logits, grad_ptr, stride_grad, target_ptr, weight_ptr, n_valid_ptr,
    total_weight_ptr, loss_ptr, n_cols, ignore_index, eps, z_loss, cap,
    MEAN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    REVERSE: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The work of ``_ce_forward_kernel`` for one row (``row`` int64); arguments as there."""
    x_row = logits_ptr + row * stride_logits
    g_row = grad_ptr + row * stride_grad
    target = tl.load(target_ptr + row)
    cols0 = tl.arange(0, BLOCK)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK], dtype=tl.float32).to(grad_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                tl.store(g_row + cols, zero, mask=cols < n_cols)
    else:
        ce_scale, z_scale = _mean_scales(n_valid_ptr, total_weight_ptr, MEAN, HAS_WEIGHT)
        target_ok = (target >= 0) & (target < n_cols)
        t_safe = tl.where(target_ok, target, 0)
        x_t = tl.load(x_row + t_safe).to(tl.float32)
        if HAS_SOFTCAP:
            x_t = cap * _tanh(x_t / cap)
        w_t = 1.0
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t_safe).to(tl.float32)

        if SINGLE_BLOCK:
            mask = cols0 < n_cols
            x, th = _ce_load_block(x_row, cols0, mask, cap, HAS_SOFTCAP)
            m, s = _online_update(
                tl.full([], float("-inf"), tl.float32), tl.zeros([], dtype=tl.float32), x, 0
            )
            if HAS_SMOOTHING:
                w = _ce_class_weight(weight_ptr, cols0, mask, HAS_WEIGHT)
                fin = x != float("-inf")
                m_safe = tl.where(m == float("-inf"), 0.0, m)
                sum_w = tl.sum(tl.where(fin, w, 0.0), axis=0)
                sum_wd = tl.sum(tl.where(fin, w * (x - m_safe), 0.0), axis=0)
                n_fin = tl.sum(fin.to(tl.float32), axis=0)
        else:
            m = tl.full([], float("-inf"), tl.float32)
            s = tl.zeros([], dtype=tl.float32)
            sum_w = tl.zeros([], dtype=tl.float32)
            sum_wd = tl.zeros([], dtype=tl.float32)
            n_fin = tl.zeros([], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                mask = cols < n_cols
                xb, _ = _ce_load_block(x_row, cols, mask, cap, HAS_SOFTCAP)
                m_prev = m
                m, s = _online_update(m, s, xb, 0)
                if HAS_SMOOTHING:
                    wb = _ce_class_weight(weight_ptr, cols, mask, HAS_WEIGHT)
                    fin = xb != float("-inf")
                    m_safe = tl.where(m == float("-inf"), 0.0, m)
                    sum_wd = _rebase(sum_w, sum_wd, m_prev, m)
                    sum_wd += tl.sum(tl.where(fin, wb * (xb - m_safe), 0.0), axis=0)
                    sum_w += tl.sum(tl.where(fin, wb, 0.0), axis=0)
                    n_fin += tl.sum(fin.to(tl.float32), axis=0)
        log_s = tl.log(s)
        lse = m + log_s

        # not lse - x_t: see _ce_grad_block. eps = 1 gives the target no mass: 0 even on a -inf
        # target logit (0 * inf would be NaN).
        ce = (1.0 - eps) * w_t * tl.where(eps < 1.0, (m - x_t) + log_s, 0.0)
        a_coef = ce_scale * (1.0 - eps) * w_t
        c_coef = 0.0
        if HAS_SMOOTHING:
            k_inv = tl.where(n_fin > 0.0, 1.0 / n_fin, 0.0)
            ce += eps * k_inv * (sum_w * log_s - sum_wd)
            a_coef += ce_scale * eps * k_inv * sum_w
            c_coef = ce_scale * eps * k_inv
        loss = ce_scale * ce
        if HAS_Z_LOSS:
            loss += z_scale * z_loss * lse * lse
            a_coef += z_scale * 2.0 * z_loss * lse
        b_coef = ce_scale * (1.0 - eps) * w_t
        nan = float("nan")
        loss = tl.where(target_ok, loss, nan)
        tl.store(loss_ptr + row, loss)

        if WRITE_GRAD:
            a_coef = tl.where(target_ok, a_coef, nan)
            if SINGLE_BLOCK:
                if not HAS_SMOOTHING:
                    w = x  # unused by _ce_grad_block without smoothing
                g = _ce_grad_block(x, th, w, cols0, target, m, log_s, a_coef, b_coef, c_coef,
                                   HAS_SMOOTHING, HAS_SOFTCAP)
                tl.store(g_row + cols0, _cast(g, grad_ptr.dtype.element_ty, INTERPRETER), mask=mask)
            else:
                n_blocks = tl.cdiv(n_cols, BLOCK)
                for i in range(0, n_blocks):
                    if REVERSE:
                        cols = (n_blocks - 1 - i) * BLOCK + cols0
                    else:
                        cols = i * BLOCK + cols0
                    mask = cols < n_cols
                    xb, th = _ce_load_block(x_row, cols, mask, cap, HAS_SOFTCAP)
                    wb = xb
                    if HAS_SMOOTHING:
                        wb = _ce_class_weight(weight_ptr, cols, mask, HAS_WEIGHT)
                    g = _ce_grad_block(xb, th, wb, cols, target, m, log_s, a_coef, b_coef, c_coef,
                                       HAS_SMOOTHING, HAS_SOFTCAP)
                    tl.store(g_row + cols, _cast(g, grad_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _scale_rows_kernel(grad_ptr, stride_grad, scale_ptr, stride_scale, target_ptr, ignore_index, n_cols,
                       SKIP_IGNORED: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK: tl.constexpr):
    """In-place ``grad[row, :] *= scale[row * stride_scale]`` (stride 0: one scalar for all rows).

    A row whose scale is exactly 1 is skipped without touching memory: with ``loss.backward()``
    on a mean or sum the upstream gradient is 1, and this check (done on the device) saves a full
    read and write of the gradient without a host sync. With ``SKIP_IGNORED`` a row whose target
    is ``ignore_index`` is skipped too: its gradient (0, written by the forward) stays exactly 0
    whatever the upstream gradient is (0 * NaN and 0 * inf would be NaN), as in F.cross_entropy.
    Pointers: ``grad_ptr`` (M, n_cols), row stride ``stride_grad``, unit column stride;
    ``scale_ptr`` any float dtype; ``target_ptr`` (M,) integer targets (read only with
    ``SKIP_IGNORED``). Overflow: ``row`` widened to int64.
    """
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    todo = scale != 1.0
    if SKIP_IGNORED:
        todo = todo & (tl.load(target_ptr + row) != ignore_index)
    if todo:
        g_row = grad_ptr + row * stride_grad
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + cols, _cast(g * scale, grad_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _scatter_rows_kernel(src_ptr, rows_ptr, n_src, out_ptr, n_rows, n_cols, INTERPRETER: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[rows[i], :] = src[i, :]`` (cast to ``out``'s dtype) for ``i < n_src``, and
    ``out[rows[i], :] = 0`` for ``n_src <= i < n_rows``.

    ``rows`` (n_rows,) int64 is a permutation of the rows of ``out`` (the linear launcher's
    compaction: non-ignored rows first), so every row of ``out`` is written exactly once, with no
    temporary. Grid (row blocks, column blocks). ``src_ptr`` (n_src, n_cols) and ``out_ptr``
    (n_rows, n_cols) contiguous, any float dtypes (the lean backward's float32 dE' accumulator,
    the fast schedule's dE' in the input dtype). Overflow: offsets int64.
    """
    i = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < n_cols
    row_mask = i < n_rows
    dest = tl.load(rows_ptr + i, mask=row_mask, other=0).to(tl.int64)
    x = tl.load(src_ptr + i[:, None] * n_cols + d[None, :], mask=(i < n_src)[:, None] & d_mask[None, :],
                other=0.0)
    tl.store(out_ptr + dest[:, None] * n_cols + d[None, :], _cast(x, out_ptr.dtype.element_ty, INTERPRETER),
             mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _gather_rows_kernel(src_ptr, stride_src, rows_ptr, n_valid_ptr, out_ptr, n_rows, n_cols,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[i, :] = src[rows[i], :]`` for ``i < n_valid``, and ``out[i, :] = 0`` for
    ``n_valid <= i < n_rows``: the non-ignored rows gathered in the compacted order, the ignored
    ones (past ``n_valid``) zero whatever ``src`` holds there (NaN hidden states of padding), so
    that a product over a chunk that still holds some of them (the "fast" row schedule's first
    chunk) multiplies zeros. The rows past ``n_valid`` are not read.

    Grid (row blocks, column blocks). ``src_ptr`` (>= max(rows) + 1, n_cols), row stride
    ``stride_src``, unit column stride; ``rows_ptr`` (n_rows,) int64; ``n_valid_ptr`` int64 scalar
    on the device (no host sync); ``out_ptr`` (n_rows, n_cols) contiguous, dtype of ``src``.
    Overflow: row offsets int64.
    """
    i = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < n_cols
    row_mask = i < n_rows
    n_valid = tl.load(n_valid_ptr)
    read = row_mask & (i < n_valid)
    src = tl.load(rows_ptr + i, mask=read, other=0).to(tl.int64)
    x = tl.load(src_ptr + src[:, None] * stride_src + d[None, :], mask=read[:, None] & d_mask[None, :], other=0.0)
    tl.store(out_ptr + i[:, None] * n_cols + d[None, :], x, mask=row_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------
# Fused linear cross-entropy: logits tiles x = E W^T + b computed with tl.dot, never stored
# in full. Rows are visited through ``rows_ptr``: the indices of the non-ignored rows first (in
# their original order), ``n_valid`` of them (read on the device); programs whose row block lies
# past ``n_valid`` return at once, so ignored rows cost no matmul and no host sync is needed.
# --------------------------------------------------------------------------------------------


@triton.jit
def _program_tile(GROUP_M: tl.constexpr):
    """(row block, column block) of this program on a 2-D grid (row blocks, column blocks).

    ``GROUP_M`` = 0: axis 0 is the row block, axis 1 the column block. Programs are launched
    axis 0 fastest, so those in flight then share one or two column blocks but span every row
    block: all of E (N x D: 38 MB at N 8192, D 2304; 67 MB at D 4096, more than an H100's 50 MB L2)
    is re-read for each column block. ``GROUP_M`` > 0 renumbers them so that consecutive programs
    cover GROUP_M row blocks times every column block (the last group may have fewer row blocks):
    in flight, a few row blocks of E and the columns' W tiles, an L2-sized working set. Only
    which program computes which tile changes, never how: results are bit-identical.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUP_M > 0:
        n_m = tl.num_programs(0)
        per_group = GROUP_M * tl.num_programs(1)
        pid = pid_n * n_m + pid_m
        first_m = (pid // per_group) * GROUP_M
        size = tl.minimum(n_m - first_m, GROUP_M)
        local = pid % per_group
        pid_m = first_m + local % size
        pid_n = local // size
    return pid_m, pid_n


@triton.jit
def _logits_tile(
    e_ptr,
    stride_em,
    w_ptr,
    stride_wv,
    bias_ptr,
    rows,
    row_mask,
    cols,
    col_mask,
    n_dim,
    cap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 tile ``x[rows, cols] = softcap(E[rows] @ W[cols]^T + b[cols])`` (BLOCK_M, BLOCK_V).

    E and W have unit stride along D (the launcher copies them otherwise): the compiler then
    knows each thread's loads are contiguous, which lets it vectorize them and software-pipeline
    the K loop with asynchronous copies (checked in the sm_90 compile output: cp.async, 3 stages).

    ``rows`` are int64 row indices of E (gathered), ``cols`` int32 vocabulary indices; masked
    entries are computed from zeros. The K loop runs over ``n_dim`` in steps of BLOCK_K with a
    float32 accumulator. Returns ``(x, th)``, ``th = tanh(.)`` for the softcap derivative (equal
    to ``x`` without a softcap).
    """
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, n_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_dim
        a = tl.load(
            e_ptr + rows[:, None] * stride_em + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + cols64[None, :] * stride_wv + ks[:, None],
            mask=col_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return _bias_softcap(acc, bias_ptr, cols, col_mask, cap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _logits_tile_tma(
    e_desc,
    w_desc,
    bias_ptr,
    row0,
    col0,
    cols,
    col_mask,
    n_dim,
    cap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``_logits_tile`` for rows ``row0 .. row0 + BLOCK_M - 1`` of a contiguous E (the launcher's
    compacted copy) and columns ``cols`` (``col0`` = ``cols[0]``), both operands read through
    tensor descriptors (Hopper's TMA: one bulk copy per operand tile and K step into shared
    memory, no per-thread address arithmetic). Rows and columns past the tensors' ends, and D past
    ``n_dim``, are filled with zeros by the copy itself. ``e_desc`` (M', D) with block
    (BLOCK_M, BLOCK_K); ``w_desc`` (V, D) with block (BLOCK_V, BLOCK_K)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, n_dim, BLOCK_K):
        a = e_desc.load([row0, k0])
        b = w_desc.load([col0, k0])
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return _bias_softcap(acc, bias_ptr, cols, col_mask, cap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _bias_softcap(acc, bias_ptr, cols, col_mask, cap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(x, th)`` of a float32 product tile: ``x = softcap(acc + b[cols])``, ``th`` its tanh (the
    softcap's derivative needs it), equal to ``x`` without a softcap."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    th = acc
    if HAS_SOFTCAP:
        th = _tanh(acc / cap)
        acc = cap * th
    return acc, th


@triton.jit
def _grad_tile(
    x,
    th,
    cols,
    col_mask,
    target,
    m,
    log_s,
    a_coef,
    b_coef,
    c_coef,
    weight_ptr,
    cap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Gradient tile ``A p - B [j==t] - C w fin`` (times ``1 - th**2`` with a softcap), float32.

    ``x`` (BM, BV) softcapped logits, ``th`` their tanh, ``target``, the row max ``m``,
    ``log_s`` (lse = m + log_s) and the coefficients (BM,). Masked columns give 0 (their ``x``
    is forced to -inf). ``p = exp((x - m) - log_s)`` keeps ``x - m`` exact.
    """
    x = tl.where(col_mask[None, :], x, float("-inf"))
    p = tl.exp((x - m[:, None]) - log_s[:, None])
    g = a_coef[:, None] * p - tl.where(cols[None, :] == target[:, None], b_coef[:, None], 0.0)
    if HAS_SMOOTHING:
        w = tl.where(col_mask, 1.0, 0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        g -= tl.where(x != float("-inf"), c_coef[:, None] * w[None, :], 0.0)
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    return g


@triton.jit
def _lce_forward_kernel(
    e_ptr,
    stride_em,
    w_ptr,
    stride_wv,
    bias_ptr,
    rows_ptr,
    n_valid_ptr,
    target_ptr,
    weight_ptr,
    partial_ptr,
    store_ptr,
    stride_store,
    n_store,
    n_rows,
    n_vocab,
    n_dim,
    tiles_per_split,
    cap,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """Per-row softmax statistics of one vocabulary split: grid (row blocks, splits).

    Program (pid_m, pid_s) takes compacted rows ``pid_m*BLOCK_M + [0, BLOCK_M)`` and the
    vocabulary tiles ``[pid_s*tiles_per_split, (pid_s+1)*tiles_per_split)``; for each tile it
    computes the logits with tl.dot (float32 accumulator) and folds them into running
    (max, sum-exp) (online softmax, arXiv:1805.02867), the target logit (from the one tile that
    holds it), and for label smoothing (K, S_w, S_wd). The six per-row partials go to
    ``partial_ptr`` float32 [6, n_splits, n_rows] (q * n_splits + pid_s) * n_rows + r; the combine
    kernel reduces them in split order (deterministic). With ``STORE_LOGITS`` the softcapped
    logits of columns < ``n_store`` are also written to ``store_ptr`` (n_rows, n_store), row
    stride ``stride_store``, in compacted row order ("fast" mode: backward reuses them).

    Pointers: ``e_ptr`` (M, D) row stride ``stride_em``; ``w_ptr`` (V, D) row stride
    ``stride_wv`` (both with unit column stride, see ``_logits_tile``); ``bias_ptr`` (V,);
    ``rows_ptr`` (M,) int64 compacted row indices;
    ``n_valid_ptr`` int64 scalar (number of non-ignored rows); ``target_ptr`` (M,) int64;
    ``weight_ptr`` (V,) class weights. Overflow: row indices and row offsets are int64.
    ``GROUP_M``: program order (``_program_tile``; groups of row blocks times every split), which
    changes no result. ``TMA``: ``e_ptr`` and ``w_ptr`` are tensor descriptors instead
    (``_logits_tile_tma``), ``e_ptr`` of the compacted rows (row r is compacted row r).
    """
    pid_m, pid_s = _program_tile(GROUP_M)
    n_splits = tl.num_programs(1)
    n_valid = tl.load(n_valid_ptr)
    if pid_m * BLOCK_M < n_valid:
        r, row_mask, rows = _compacted_rows(pid_m * BLOCK_M, n_valid, rows_ptr, BLOCK_M)
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)

        m, s, x_t, n_fin, sum_w, sum_wd = _empty_stats(BLOCK_M)
        n_tiles = tl.cdiv(n_vocab, BLOCK_V)
        tile_lo = pid_s * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
        for tile in range(tile_lo, tile_hi):
            cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = cols < n_vocab
            if TMA:
                x, th = _logits_tile_tma(
                    e_ptr, w_ptr, bias_ptr, pid_m * BLOCK_M, tile * BLOCK_V, cols, col_mask, n_dim, cap,
                    HAS_BIAS, HAS_SOFTCAP, INTERPRETER, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
                )
            else:
                x, th = _logits_tile(
                    e_ptr, stride_em, w_ptr, stride_wv, bias_ptr,
                    rows, row_mask, cols, col_mask, n_dim, cap,
                    HAS_BIAS, HAS_SOFTCAP, INTERPRETER, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
                )
            if STORE_LOGITS:
                if tile * BLOCK_V < n_store:
                    st_ptr = store_ptr + r.to(tl.int64)[:, None] * stride_store + cols[None, :]
                    st_mask = row_mask[:, None] & (cols < n_store)[None, :]
                    tl.store(st_ptr, _cast(x, store_ptr.dtype.element_ty, INTERPRETER), mask=st_mask)
            m, s, x_t, n_fin, sum_w, sum_wd = _fold_tile(
                x, cols, col_mask, target, m, s, x_t, n_fin, sum_w, sum_wd, weight_ptr,
                HAS_WEIGHT, HAS_SMOOTHING,
            )
        base = partial_ptr + pid_s.to(tl.int64) * n_rows + r
        plane = tl.cast(n_splits, tl.int64) * n_rows  # tl.cast: n_splits == 1 arrives as a constant
        tl.store(base, m, mask=row_mask)
        tl.store(base + plane, s, mask=row_mask)
        tl.store(base + 2 * plane, x_t, mask=row_mask)
        tl.store(base + 3 * plane, n_fin, mask=row_mask)
        tl.store(base + 4 * plane, sum_w, mask=row_mask)
        tl.store(base + 5 * plane, sum_wd, mask=row_mask)


@triton.jit
def _compacted_rows(start, n_valid, rows_ptr, BLOCK: tl.constexpr):
    """Compacted positions ``r = start .. start + BLOCK - 1`` (valid rows first: see the
    launcher's stable sort), ``row_mask = r < n_valid``, and each position's original row
    ``rows[r]`` as int64 (0 where masked)."""
    r = start + tl.arange(0, BLOCK)
    row_mask = r < n_valid
    rows = tl.load(rows_ptr + r, mask=row_mask, other=0).to(tl.int64)
    return r, row_mask, rows


@triton.jit
def _empty_stats(BLOCK_M: tl.constexpr):
    """The per-row statistics of ``_fold_tile`` before any column: (m, s, x_t, n_fin, sum_w,
    sum_wd) = (-inf, 0, 0, 0, 0, 0), float32 (BLOCK_M,) each."""
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    return tl.full([BLOCK_M], float("-inf"), tl.float32), zero, zero, zero, zero, zero


@triton.jit
def _fold_tile(x, cols, col_mask, target, m, s, x_t, n_fin, sum_w, sum_wd, weight_ptr,
               HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """Fold a float32 tile ``x`` (BM, BV) of softcapped logits (columns ``cols``, valid where
    ``col_mask``) into the per-row statistics: running max ``m`` and sum-exp ``s`` (online
    softmax), the target logit ``x_t``, and for label smoothing the number of finite logits
    ``n_fin``, ``sum_w = sum_j w_j`` and ``sum_wd = sum_j w_j (x_j - m)`` (see ``_rebase``)."""
    x = tl.where(col_mask[None, :], x, float("-inf"))
    x_t += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
    m_prev = m
    m, s = _online_update(m, s, x, 1)
    if HAS_SMOOTHING:
        fin = x != float("-inf")
        w = tl.where(col_mask, 1.0, 0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        n_fin += tl.sum(fin.to(tl.float32), axis=1)
        sum_wd = _rebase(sum_w, sum_wd, m_prev, m)
        sum_wd += tl.sum(tl.where(fin, w[None, :] * (x - m_safe[:, None]), 0.0), axis=1)
        sum_w += tl.sum(tl.where(fin, w[None, :], 0.0), axis=1)
    return m, s, x_t, n_fin, sum_w, sum_wd


@triton.jit
def _lce_stats_kernel(
    x_ptr,
    stride_x,
    rows_ptr,
    n_valid_ptr,
    target_ptr,
    weight_ptr,
    stats_ptr,
    col_start,
    n_chunk,
    n_rows,
    n_vocab,
    cap,
    FIRST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Fold one vocabulary chunk of materialized logits into the running per-row statistics.

    The forward of the "lean" schedule with cuBLAS products (``_launchers.linear_forward``):
    ``x_ptr`` (n_rows, >= n_chunk) holds ``E W_c^T + b_c`` for vocabulary columns
    [col_start, col_start + n_chunk), rows in their own order, row stride ``stride_x``, before the
    softcap (applied here). Grid (compacted row blocks,): program p takes compacted rows
    ``p*BLOCK_M + [0, BLOCK_M)`` (row ``rows[r]`` of ``x``), skips those past ``n_valid``, loads
    their statistics from ``stats_ptr`` float32 [6, n_rows] (compacted order, the layout of a
    single split of ``_lce_forward_kernel``'s partials; not with ``FIRST``), folds the chunk in
    BLOCK_V-column steps (``_fold_tile``) and stores them back. Called chunk after chunk in
    column order, this is the forward kernel's column loop with the logits read, not computed:
    ``_lce_combine_kernel`` with one split turns the result into the loss and coefficients.
    Overflow: row offsets are int64.
    """
    pid_m = tl.program_id(0)
    n_valid = tl.load(n_valid_ptr)
    if pid_m * BLOCK_M < n_valid:
        r, row_mask, rows = _compacted_rows(pid_m * BLOCK_M, n_valid, rows_ptr, BLOCK_M)
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
        if FIRST:
            m, s, x_t, n_fin, sum_w, sum_wd = _empty_stats(BLOCK_M)
        else:
            m = tl.load(stats_ptr + r, mask=row_mask, other=float("-inf"))
            s = tl.load(stats_ptr + n_rows + r, mask=row_mask, other=0.0)
            x_t = tl.load(stats_ptr + 2 * n_rows + r, mask=row_mask, other=0.0)
            n_fin = tl.load(stats_ptr + 3 * n_rows + r, mask=row_mask, other=0.0)
            sum_w = tl.load(stats_ptr + 4 * n_rows + r, mask=row_mask, other=0.0)
            sum_wd = tl.load(stats_ptr + 5 * n_rows + r, mask=row_mask, other=0.0)
        for j0 in range(0, n_chunk, BLOCK_V):
            j = j0 + tl.arange(0, BLOCK_V)
            col_mask = (j < n_chunk) & (col_start + j < n_vocab)
            # Lanes past the chunk get column -1, so that no target of a later chunk matches them.
            cols = tl.where(col_mask, col_start + j, -1)
            x = tl.load(x_ptr + rows[:, None] * stride_x + j[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = cap * _tanh(x / cap)
            m, s, x_t, n_fin, sum_w, sum_wd = _fold_tile(
                x, cols, col_mask, target, m, s, x_t, n_fin, sum_w, sum_wd, weight_ptr,
                HAS_WEIGHT, HAS_SMOOTHING,
            )
        tl.store(stats_ptr + r, m, mask=row_mask)
        tl.store(stats_ptr + n_rows + r, s, mask=row_mask)
        tl.store(stats_ptr + 2 * n_rows + r, x_t, mask=row_mask)
        tl.store(stats_ptr + 3 * n_rows + r, n_fin, mask=row_mask)
        tl.store(stats_ptr + 4 * n_rows + r, sum_w, mask=row_mask)
        tl.store(stats_ptr + 5 * n_rows + r, sum_wd, mask=row_mask)


@triton.jit
def _lce_combine_kernel(
    partial_ptr,
    rows_ptr,
    n_valid_ptr,
    target_ptr,
    weight_ptr,
    total_weight_ptr,
    loss_ptr,
    coef_ptr,
    n_rows,
    n_splits,
    n_vocab,
    eps,
    z_loss,
    MEAN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Reduce the split partials in split order to lse, the row loss and the gradient coefficients.

    Grid (row blocks,). Writes ``loss_ptr[rows[r]]`` (original row order; the caller zeroes the
    buffer so ignored rows read 0) and ``coef_ptr`` float32 [5, n_rows] = (m, log s, A, B, C) in
    compacted order r. Pointers as in ``_lce_forward_kernel``; for "mean" (``MEAN``) the
    denominators are ``n_valid_ptr`` and ``total_weight_ptr`` (``_mean_scales``).
    """
    pid_m = tl.program_id(0)
    n_valid = tl.load(n_valid_ptr)
    if pid_m * BLOCK_M < n_valid:
        r, row_mask, rows = _compacted_rows(pid_m * BLOCK_M, n_valid, rows_ptr, BLOCK_M)
        target = tl.load(target_ptr + rows, mask=row_mask, other=0)
        m, s, x_t, n_fin, sum_w, sum_wd = _empty_stats(BLOCK_M)
        plane = tl.cast(n_splits, tl.int64) * n_rows  # tl.cast: n_splits == 1 arrives as a constant
        for split in range(0, n_splits):
            base = partial_ptr + split * n_rows + r
            m_k = tl.load(base, mask=row_mask, other=float("-inf"))
            s_k = tl.load(base + plane, mask=row_mask, other=0.0)
            m_new = tl.maximum(m, m_k)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + s_k * tl.exp(m_k - m_safe)
            x_t += tl.load(base + 2 * plane, mask=row_mask, other=0.0)
            if HAS_SMOOTHING:
                n_fin += tl.load(base + 3 * plane, mask=row_mask, other=0.0)
                sum_w_k = tl.load(base + 4 * plane, mask=row_mask, other=0.0)
                sum_wd_k = tl.load(base + 5 * plane, mask=row_mask, other=0.0)
                sum_wd = _rebase(sum_w, sum_wd, m, m_new) + _rebase(sum_w_k, sum_wd_k, m_k, m_new)
                sum_w += sum_w_k
            m = m_new
        log_s = tl.log(tl.where(row_mask, s, 1.0))  # masked lanes: no log(0)
        lse = m + log_s
        ce_scale, z_scale = _mean_scales(n_valid_ptr, total_weight_ptr, MEAN, HAS_WEIGHT)
        target_ok = (target >= 0) & (target < n_vocab)
        w_t = tl.full([BLOCK_M], 1.0, tl.float32)
        if HAS_WEIGHT:
            t_safe = tl.where(target_ok, target, 0)
            w_t = tl.load(weight_ptr + t_safe, mask=row_mask, other=0.0).to(tl.float32)
        ce = (1.0 - eps) * w_t * tl.where(eps < 1.0, (m - x_t) + log_s, 0.0)  # as in _ce_row
        a_coef = ce_scale * (1.0 - eps) * w_t
        c_coef = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_SMOOTHING:
            k_inv = tl.where(n_fin > 0.0, 1.0 / n_fin, 0.0)
            ce += eps * k_inv * (sum_w * log_s - sum_wd)
            a_coef += ce_scale * eps * k_inv * sum_w
            c_coef = ce_scale * eps * k_inv
        loss = ce_scale * ce
        if HAS_Z_LOSS:
            loss += z_scale * z_loss * lse * lse
            a_coef += z_scale * 2.0 * z_loss * lse
        b_coef = ce_scale * (1.0 - eps) * w_t
        loss = tl.where(target_ok, loss, float("nan"))
        a_coef = tl.where(target_ok, a_coef, float("nan"))
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        tl.store(coef_ptr + r, tl.where(row_mask, m, 0.0), mask=row_mask)
        tl.store(coef_ptr + n_rows + r, log_s, mask=row_mask)
        tl.store(coef_ptr + 2 * n_rows + r, a_coef, mask=row_mask)
        tl.store(coef_ptr + 3 * n_rows + r, b_coef, mask=row_mask)
        tl.store(coef_ptr + 4 * n_rows + r, c_coef, mask=row_mask)


@triton.jit
def _lce_grad_tile_kernel(
    e_ptr,
    stride_em,
    w_ptr,
    stride_wv,
    bias_ptr,
    rows_ptr,
    n_valid_ptr,
    target_ptr,
    weight_ptr,
    coef_ptr,
    g_ptr,
    stride_g,
    col_start,
    n_chunk,
    n_rows,
    n_vocab,
    n_dim,
    cap,
    FROM_LOGITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    RAW_LOGITS: tl.constexpr = False,
    TMA: tl.constexpr = False,
):
    """Gradient of the logits for vocabulary columns [col_start, col_start + n_chunk).

    Grid (row blocks, column blocks of the chunk). ``g_ptr`` (n_rows, >= n_chunk), row stride
    ``stride_g``, compacted row order, column j holds vocabulary column col_start + j, for an
    upstream gradient of 1. Without ``FROM_LOGITS`` ("lean") the logits tile is recomputed with
    tl.dot; with it ("fast") ``g_ptr`` already holds the softcapped logits written by the
    forward kernel and is overwritten in place. Rows past ``n_valid`` are skipped (their entries
    are never read). ``coef_ptr`` float32 [5, n_rows] (m, log s, A, B, C) from the combine kernel.
    ``GROUP_M``: program order (``_program_tile``), bit-identical results for any value.
    ``RAW_LOGITS`` (with ``FROM_LOGITS``): ``g_ptr`` holds the logits before the softcap (a
    cuBLAS product, see ``_launchers.linear_backward_products``), which is applied here.
    ``TMA`` (without ``FROM_LOGITS``): ``e_ptr`` and ``w_ptr`` are tensor descriptors, ``e_ptr``
    of the compacted rows (``_logits_tile_tma``).
    """
    pid_m, pid_v = _program_tile(GROUP_M)
    n_valid = tl.load(n_valid_ptr)
    if pid_m * BLOCK_M < n_valid:
        r, row_mask, rows = _compacted_rows(pid_m * BLOCK_M, n_valid, rows_ptr, BLOCK_M)
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
        j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = col_start + j
        col_mask = (j < n_chunk) & (cols < n_vocab)
        tile_ptr = g_ptr + r.to(tl.int64)[:, None] * stride_g + j[None, :]
        tile_mask = row_mask[:, None] & col_mask[None, :]
        if FROM_LOGITS:
            x = tl.load(tile_ptr, mask=tile_mask, other=0.0).to(tl.float32)
            th = x
            if HAS_SOFTCAP:
                if RAW_LOGITS:
                    th = _tanh(x / cap)
                    x = cap * th
                else:
                    th = x / cap
        elif TMA:
            x, th = _logits_tile_tma(
                e_ptr, w_ptr, bias_ptr, pid_m * BLOCK_M, col_start + pid_v * BLOCK_V, cols, col_mask, n_dim, cap,
                HAS_BIAS, HAS_SOFTCAP, INTERPRETER, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
            )
        else:
            x, th = _logits_tile(
                e_ptr, stride_em, w_ptr, stride_wv, bias_ptr,
                rows, row_mask, cols, col_mask, n_dim, cap,
                HAS_BIAS, HAS_SOFTCAP, INTERPRETER, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
            )
        m = tl.load(coef_ptr + r, mask=row_mask, other=0.0)
        log_s = tl.load(coef_ptr + n_rows + r, mask=row_mask, other=0.0)
        a_coef = tl.load(coef_ptr + 2 * n_rows + r, mask=row_mask, other=0.0)
        b_coef = tl.load(coef_ptr + 3 * n_rows + r, mask=row_mask, other=0.0)
        c_coef = tl.load(coef_ptr + 4 * n_rows + r, mask=row_mask, other=0.0)
        g = _grad_tile(
            x, th, cols, col_mask, target, m, log_s, a_coef, b_coef, c_coef, weight_ptr, cap,
            HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
        )
        tl.store(tile_ptr, _cast(g, g_ptr.dtype.element_ty, INTERPRETER), mask=tile_mask)


@triton.jit
def _lce_grad_input_kernel(
    g_ptr,
    stride_g,
    w_ptr,
    stride_wv,
    rows_ptr,
    n_valid_ptr,
    gout_ptr,
    stride_gout,
    acc_ptr,
    out_ptr,
    col_start,
    n_chunk,
    n_dim,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dE[rows] += g_out[rows] * G_chunk @ W[col_start : col_start + n_chunk]  (one chunk).

    Grid (D blocks, row blocks). ``G_chunk`` at ``g_ptr`` (compacted rows, row stride
    ``stride_g``). Each program owns a (BLOCK_M, BLOCK_D) block of dE and runs its K loop over
    the chunk's columns with a float32 register accumulator, then adds the previous chunks' sum
    from ``acc_ptr`` (float32 (M, D) contiguous, original row order; not read when ``FIRST``).
    Chunks run in a fixed order and every dE element is owned by one program per launch: no
    atomics, deterministic. When ``LAST`` the total is cast and written to ``out_ptr``
    (dtype of E, (M, D) contiguous, rows of ignored targets zeroed by the caller), else to
    ``acc_ptr``. ``gout_ptr``: upstream gradient, per row (stride 1, "none") or one scalar
    (stride 0). Overflow: row indices int64.
    """
    # D blocks vary fastest: programs running together share one block of G rows (read once
    # into L2) and sweep the chunk of W (chunk x D, L2-sized) instead of re-reading G per D block.
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    if pid_m * BLOCK_M < n_valid:
        r, row_mask, rows = _compacted_rows(pid_m * BLOCK_M, n_valid, rows_ptr, BLOCK_M)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < n_dim
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        r64 = r.to(tl.int64)
        for k0 in range(0, n_chunk, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < n_chunk
            g = tl.load(
                g_ptr + r64[:, None] * stride_g + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + (col_start + ks).to(tl.int64)[:, None] * stride_wv + d[None, :],
                mask=k_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if INTERPRETER:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
        scale = tl.load(gout_ptr + rows * stride_gout, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
        offs = rows[:, None] * n_dim + d[None, :]
        mask = row_mask[:, None] & d_mask[None, :]
        if not FIRST:
            acc += tl.load(acc_ptr + offs, mask=mask, other=0.0)
        if LAST:
            tl.store(out_ptr + offs, _cast(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)
        else:
            tl.store(acc_ptr + offs, acc, mask=mask)


@triton.jit
def _lce_grad_weight_kernel(
    g_ptr,
    stride_g,
    e_ptr,
    stride_em,
    rows_ptr,
    n_valid_ptr,
    gout_ptr,
    stride_gout,
    dw_ptr,
    db_ptr,
    col_start,
    n_chunk,
    n_dim,
    PER_ROW_SCALE: tl.constexpr,
    HAS_WEIGHT_GRAD: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dW[col_start + v] = sum_r g_out[rows[r]] G[r, v] E[rows[r]]  (and db = sum_r g_out G[r, v]).

    Grid (D blocks, column blocks of the chunk). Each program owns a (BLOCK_V, BLOCK_D) block of
    dW and runs its K loop over the ``n_valid`` compacted rows (a bound read on the device, so
    ignored rows are never multiplied), float32 register accumulator, one store: deterministic.
    ``dw_ptr`` (V, D) contiguous, dtype of W; ``db_ptr`` (V,) dtype of the bias, written by the
    ``pid_d == 0`` programs (``HAS_WEIGHT_GRAD`` / ``HAS_BIAS_GRAD`` select what is computed; for
    the bias alone the launcher uses a single D block). ``PER_ROW_SCALE``: the upstream gradient is per row ("none") and
    scales G's rows before the product; otherwise the scalar scales the result.
    """
    # D blocks vary fastest: programs running together share one column slab of G.
    pid_d = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    j_mask = j < n_chunk
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < n_dim
    acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in range(0, n_valid, BLOCK_K):
        r, row_mask, rows = _compacted_rows(r0, n_valid, rows_ptr, BLOCK_K)
        g = tl.load(
            g_ptr + r.to(tl.int64)[:, None] * stride_g + j[None, :],
            mask=row_mask[:, None] & j_mask[None, :],
            other=0.0,
        )
        if PER_ROW_SCALE:
            scale = tl.load(gout_ptr + rows * stride_gout, mask=row_mask, other=0.0).to(tl.float32)
            g = _cast(g.to(tl.float32) * scale[:, None], g_ptr.dtype.element_ty, INTERPRETER)
        if HAS_BIAS_GRAD:
            acc_b += tl.sum(g.to(tl.float32), axis=0)
        if HAS_WEIGHT_GRAD:
            e = tl.load(
                e_ptr + rows[:, None] * stride_em + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if INTERPRETER:
                g = g.to(tl.float32)
                e = e.to(tl.float32)
            acc = tl.dot(tl.trans(g), e, acc, input_precision=DOT_PRECISION)
    if not PER_ROW_SCALE:
        # With no row kept, dW and db are 0 whatever the upstream scalar (not 0 * NaN).
        scale = tl.where(n_valid > 0, tl.load(gout_ptr).to(tl.float32), 0.0)
        acc = acc * scale
        acc_b = acc_b * scale
    cols = (col_start + j).to(tl.int64)
    if HAS_WEIGHT_GRAD:
        tl.store(
            dw_ptr + cols[:, None] * n_dim + d[None, :],
            _cast(acc, dw_ptr.dtype.element_ty, INTERPRETER),
            mask=j_mask[:, None] & d_mask[None, :],
        )
    if HAS_BIAS_GRAD:
        if pid_d == 0:
            tl.store(db_ptr + cols, _cast(acc_b, db_ptr.dtype.element_ty, INTERPRETER), mask=j_mask)
