r"""Per-rank partial statistics of vocabulary-parallel cross-entropy (kernels and launchers).

``crossent.distributed.vocab_parallel_cross_entropy`` holds this rank's columns of the logits,
``z`` (M, V_r), and needs per row, before its all-reduces (its module docstring, step 1)::

    m_i = max_j z_ij,   s_i = sum_j exp(z_ij - m_i)          (online softmax, arXiv:1805.02867)
    t_i = z_{i, c_i}   if c_i >= 0 (the global target lies in this slice, at local column c_i)
    S_i = sum_{j: z_ij finite} z_ij,   K_i = #{j: z_ij finite}   (label smoothing only)

and, in backward, given the global ``lse_i``, ``K_i`` and the upstream row factor ``g_i``::

    dz_ij = [valid_i] g_i (exp(z_ij - lse_i) (1 + 2 z_loss lse_i) - (1 - eps)[j = c_i]
                           - eps [z_ij finite] / K_i)

The same arithmetic as the PyTorch chunks of ``crossent.distributed.vocab_parallel`` (``S`` is a
plain sum of the logits, as there), in float32 whatever the storage dtype, each row read once per
pass. Only local math lives here: the collectives stay in ``crossent.distributed``. This module
imports neither ``crossent.torch`` nor ``crossent.distributed``.

Overflow: rows are widened to int64 before ``row * stride``; columns of one row stay int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._kernels import _cast, _online_update
from ._launchers import _check_runnable, interpreted, next_pow2

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Columns per step of the one-program-per-row kernels below: a row of at most this many columns
#: is one block (read once); longer rows loop. 4096 float32 lanes over 8 warps is 16 registers a
#: thread per live block, well below spilling.
MAX_BLOCK = 4096


@triton.jit
def _vp_partials_kernel(
    logits_ptr,
    stride_logits,
    col_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    fsum_ptr,
    fcount_ptr,
    n_cols,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``i`` of this rank's slice: ``m_i, s_i, t_i`` and (``HAS_SMOOTHING``) ``S_i, K_i``.

    Pointers: ``logits_ptr`` (M, n_cols) float32/bf16/fp16, row stride ``stride_logits``, unit
    column stride; ``col_ptr`` (M,) int64 local target column, -1 where the target is not in this
    slice (or the row is ignored); outputs (M,) float32 ``m_ptr, s_ptr, t_ptr, fsum_ptr,
    fcount_ptr`` (the last two written only with ``HAS_SMOOTHING``).
    Constexprs: ``BLOCK`` columns per step. NaN logits propagate into ``s`` (and ``m`` where the
    max propagates it); a row of -inf gives ``m = -inf, s = 0`` with no NaN.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_logits
    cols0 = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    fsum = tl.zeros([], dtype=tl.float32)
    fcount = tl.zeros([], dtype=tl.float32)
    has_nan = tl.zeros([], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + cols0
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m, s = _online_update(m, s, x, 0)
        has_nan += tl.sum((x != x).to(tl.int32), axis=0)
        if HAS_SMOOTHING:
            finite = (x == x) & (tl.abs(x) != float("inf"))
            fsum += tl.sum(tl.where(finite, x, 0.0), axis=0)
            fcount += tl.sum(finite.to(tl.float32), axis=0)
    m = tl.where(has_nan > 0, float("nan"), m)  # torch.amax propagates NaN; tl.max need not
    col = tl.load(col_ptr + row)
    owned = col >= 0
    t = tl.load(x_row + tl.where(owned, col, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(t_ptr + row, tl.where(owned, t, 0.0))
    if HAS_SMOOTHING:
        tl.store(fsum_ptr + row, fsum)
        tl.store(fcount_ptr + row, fcount)


@triton.jit
def _vp_grad_kernel(
    logits_ptr,
    stride_logits,
    grad_ptr,
    stride_grad,
    col_ptr,
    valid_ptr,
    lse_ptr,
    g_ptr,
    fcount_ptr,
    n_cols,
    eps,
    z_loss,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``i`` of ``d loss / d z`` on this rank's slice (formula in the module docstring).

    Pointers: ``logits_ptr`` (M, n_cols) float32/bf16/fp16, row stride ``stride_logits``;
    ``grad_ptr`` (M, n_cols) dtype of the logits, row stride ``stride_grad``, both unit column
    stride; ``col_ptr`` (M,) int64 local target column or -1; ``valid_ptr`` (M,) int8, 0 on
    ignored rows (their gradient is 0 whatever their logits, NaN included); ``lse_ptr``,
    ``g_ptr``, ``fcount_ptr`` (M,) float32: global ``lse``, upstream row factor ``g``, global
    ``K`` (read only with ``HAS_SMOOTHING``). Scalars ``eps`` (label smoothing), ``z_loss``.
    Constexprs: ``HAS_*`` compile out unused terms, ``INTERPRETER`` rounds bf16 stores like the
    GPU (``_kernels._cast``), ``BLOCK`` columns per step.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_logits
    g_row = grad_ptr + row * stride_grad
    cols0 = tl.arange(0, BLOCK)
    valid = tl.load(valid_ptr + row) != 0
    if valid:
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        col = tl.load(col_ptr + row)
        scale = 1.0
        if HAS_Z_LOSS:
            scale = 1.0 + 2.0 * z_loss * lse
        share = 0.0
        if HAS_SMOOTHING:
            share = eps / tl.load(fcount_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            if HAS_Z_LOSS:
                p = p * scale
            p = p - tl.where(cols == col, 1.0 - eps, 0.0)
            if HAS_SMOOTHING:
                finite = (x == x) & (tl.abs(x) != float("inf"))
                p = p - tl.where(finite, share, 0.0)
            tl.store(g_row + cols, _cast(p * g, grad_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    else:
        zero = tl.zeros([BLOCK], dtype=tl.float32).to(grad_ptr.dtype.element_ty)
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            tl.store(g_row + cols, zero, mask=cols < n_cols)


def _block(n_cols: int, block: int | None) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row when it fits MAX_BLOCK, else MAX_BLOCK-column steps."""
    if block is None:
        block = min(next_pow2(max(n_cols, 16)), MAX_BLOCK)
    return block, 4 if block <= 1024 else 8


def _operands(logits, local_target):
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOAT_DTYPES or logits.ndim != 2:
        raise TypeError(
            f"logits must be a 2-D float32, bfloat16 or float16 tensor, got "
            f"{getattr(logits, 'dtype', type(logits).__name__)} of shape {tuple(getattr(logits, 'shape', ()))}"
        )
    _check_runnable(logits.device)
    rows = logits.shape[0]
    if tuple(local_target.shape) != (rows,):
        raise ValueError(f"local_target must have shape ({rows},), got {tuple(local_target.shape)}")
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    return x, local_target.to(device=logits.device, dtype=torch.int64).contiguous()


def vocab_parallel_partials(logits, local_target, *, smoothing, block=None):
    """This rank's per-row statistics ``(m, s, t, S, K)``, float32 (M,) each (``S, K`` None
    without ``smoothing``).

    ``logits`` (M, V_r) float32/bf16/fp16; ``local_target`` (M,) integer: the target's column in
    this slice, or -1 where the target is elsewhere or the row is ignored. ``block`` overrides
    the columns per step (tests use it to force several steps per row).
    """
    x, col = _operands(logits, local_target)
    rows, n_cols = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    m = torch.full((rows,), float("-inf"), **f32)
    s, t = torch.zeros(rows, **f32), torch.zeros(rows, **f32)
    fsum = torch.zeros(rows, **f32) if smoothing else None
    fcount = torch.zeros(rows, **f32) if smoothing else None
    if rows and n_cols:
        block, warps = _block(n_cols, block)
        _vp_partials_kernel[(rows,)](
            x, x.stride(0), col, m, s, t,
            fsum if smoothing else m, fcount if smoothing else m,  # unused without smoothing
            n_cols, HAS_SMOOTHING=bool(smoothing), BLOCK=block, num_warps=warps,
        )
    return m, s, t, fsum, fcount


def vocab_parallel_grad(logits, local_target, valid, lse, g, finite_count, *, label_smoothing, z_loss,
                        block=None):
    """``d loss / d logits`` of this rank's slice, in the dtype of ``logits`` (contiguous).

    ``valid`` (M,) bool (False on ignored rows); ``lse``, ``g`` (M,) global log-sum-exp and
    upstream row factor; ``finite_count`` (M,) global ``K`` (or None without label smoothing);
    other arguments as :func:`vocab_parallel_partials`.
    """
    x, col = _operands(logits, local_target)
    rows, n_cols = x.shape
    grad = torch.empty((rows, n_cols), dtype=x.dtype, device=x.device)
    if rows and n_cols:
        smoothing = label_smoothing > 0.0
        f32 = dict(dtype=torch.float32, device=x.device)
        lse32 = lse.to(**f32).contiguous()
        block, warps = _block(n_cols, block)
        _vp_grad_kernel[(rows,)](
            x, x.stride(0), grad, grad.stride(0), col, valid.to(device=x.device, dtype=torch.int8).contiguous(),
            lse32, g.to(**f32).contiguous(),
            finite_count.to(**f32).contiguous() if smoothing else lse32,  # unused without smoothing
            n_cols, float(label_smoothing), float(z_loss),
            HAS_SMOOTHING=smoothing, HAS_Z_LOSS=z_loss > 0.0, INTERPRETER=interpreted(),
            BLOCK=block, num_warps=warps,
        )
    return grad
