r"""Vocabulary-parallel cross-entropy over ``torch.distributed``: the logits never get gathered.

Each of the ``W`` ranks of a process group holds a contiguous slice of the vocabulary (rank order,
uneven or empty slices allowed): either its columns of the logits, ``local_logits[..., V_r]``, or
its rows of the output layer, ``local_weight[V_r, D]`` (and ``local_bias[V_r]``), with the input
``x[..., D]`` replicated. Targets are global class indices, the same on every rank. Every rank gets
the same loss, equal to the single-process loss on the concatenated logits, and the gradient of
its own slice.

Communication schedule (``N`` rows = ``target.numel()``, ``W`` ranks, per rank; ``validate``
decides step 0, see "Validation" below)::

    step  on every rank r (local, no N x V)                collective           values per rank
    ----  ---------------------------------------------    ------------------   ----------------
    0     validate=True: the flag validated=1, V_r, N,      all_gather int64     17 W (not per row)
          target.ndim and shape, D, dtype, options,         (once per call)      host read 1
          min/max of the target, whether backward
          all-reduces, local argument errors -> the same
          table on every rank: every rank checks it and
          raises the same error together
          offset_r = V_0 + ... + V_{r-1}   (partition.vocab_offsets, pure)
    0     validate=False: the same table, holding only      all_gather int64     17 W (not per row)
          V_r and validated=0; offset_r and V summed on                          no host read
          the device, targets shifted on the device
    0b    validate=True only: the targets themselves        all_reduce MIN of    2N int64
          (N agrees by now): [y, ~y] (~y = -1 - y) -> per   stacked [y, ~y]      host read 2:
          position min_r y and max_r y; unequal somewhere   (W > 1 and N > 0)    one bool
          <=> the targets differ: the same flag everywhere
    forward
    1     for each chunk c of the slice (columns c0:c1):
            z = local_logits[:, c0:c1]          (logits version)
            z = softcap(x @ W[c0:c1]^T + b)     (linear version, never N x V_r at once)
          online over the chunks, per row i:
            m_r = max_j z_ij,  s_r = sum_j exp(z_ij - m_r)
            t_r = z_{i, y_i}  if offset_r <= y_i < offset_r + V_r, else 0
            S_r = sum_{j: z_ij finite} z_ij,  K_r = #{j: z_ij finite}   (label_smoothing > 0 only)
    2     m = max_r m_r                                     all_reduce MAX       N
    3     s_r <- s_r * exp(m_r - m)                         all_reduce SUM of    2N  (4N with
          [s, t, S, K] = sum_r [s_r, t_r, S_r, K_r]         stacked [s,t(,S,K)]  label_smoothing)
    4     lse = m + log s  (validate=False: NaN on a row whose target is outside [0, V))
          loss_i = (1 - eps)(lse - t) + eps (lse - S / K) + z_loss lse^2   (0 on ignored rows)
    backward (g_i = d loss / d loss_i: grad_output, / #non-ignored rows for "mean", 0 if ignored)
    5     dz_ij = g_i (p_ij (1 + 2 z_loss lse_i) - (1 - eps)[j = y_i] - eps [z_ij finite] / K_i),
          p_ij = exp(z_ij - lse_i);  logits version: grad = dz, no communication
          linear version: recompute each chunk, dz <- dz (1 - tanh^2) under softcap,
            dW[c0:c1] = dz^T x (ignored rows of x zeroed),  db[c0:c1] = sum_i dz,
            dx_r += dz W[c0:c1]
    6     dx = sum_r dx_r                                   all_reduce SUM       N D (linear only)

So the loss costs three collectives per call without validation (one all-gather of ``17 W`` int64,
then O(N) floats twice) and four with it (the table, and step 0b's 2N int64, which is more data
than the loss's own 3N floats: 16N bytes against 12N in float32); none is O(N V). The linear version adds
one all-reduce of the input gradient in backward (each rank's ``x`` is replicated, so its gradient
is the sum of every slice's contribution; every rank gets that sum).

Local math: in the logits version, steps 1 and 5 run in crossent.triton's kernels (one pass over
the slice each; ``crossent.triton._partials``) for float32/bfloat16/float16 logits on CUDA when
triton imports, and in the PyTorch chunks above otherwise (float64, CPU); see ``_TRITON``. The
collectives and steps 2-4 are the same code on both paths. Neither path needs ``offset_r`` on the
host: the kernels take each row's column in this slice (or -1), computed on the device.

Validation (``validate=``; DESIGN.md: checks that need a device-to-host sync are opt-in on GPU hot
paths). ``None``, the default, is True for CPU tensors, where reading the table costs no sync, and
False on CUDA. Every rank must pass the same ``validate`` (it decides which collectives run).
Step 0's all-gather has the same size in both modes and carries the flag: where it differs, the
ranks that validate raise a ValueError naming ``validate``; those that do not cannot be told
without a host read and wait in their next collective until the group's timeout (or fail there
when the validating processes leave the group).

- ``validate=True``: every argument check, local or across ranks (slice shapes that disagree with
  the input, rows, target shapes, feature sizes, options or whether backward all-reduces that
  differ between ranks, a target differing between ranks or outside ``[0, V)``), goes through the
  table of step 0 or the reduced targets of step 0b, which are the same on every rank, so all
  ranks raise the same exception together instead of some of them waiting in a collective. The
  values of the tensors other than the target are not compared: an ``input`` that differs
  between ranks in the linear version (it should be replicated) or an upstream gradient that
  differs in backward goes through unchecked and gives wrong results. That
  costs two reads to the host per call, both before any loss work is queued (on CUDA each waits
  for the device to drain; the table's upload is a blocking host-to-device copy as well). Step 0b
  needs its own read: its all-reduce can only be issued once step 0's table has shown that every
  rank has the same number of rows (a collective of mismatched sizes hangs or fails), and only its
  result tells whether the targets agree; a checksum in the table would need no second read but
  lets different targets through (a linear one made [0, 1] and [2, 0] agree).
- ``validate=False``: no host read and no host-to-device copy in forward or backward (the slice
  size enters the device through ``fill_``, a fill kernel; tested on the CPU by counting
  ``item``/``bool``/``tolist``/``torch.tensor`` calls, and by a GPU test under
  ``torch.cuda.set_sync_debug_mode("error")`` not yet run on one), and the same collectives on
  every rank whatever its data (no branch on ``V_r``, ``N`` or the targets). Nothing is compared
  across ranks: arguments that differ between ranks give wrong results or a collective that hangs
  until the group's timeout (a rank whose forward runs under ``torch.no_grad()`` while the others
  backpropagate leaves the linear version's input-gradient all-reduce waiting). An argument error
  that a rank can see on its own (a type, a shape, an option out of range) raises on that rank
  before any collective; when every rank passes the same bad argument they all raise, otherwise
  the others wait. A target outside ``[0, V)`` cannot raise without a host read: its row's loss
  and gradients become NaN (so does a "mean" or "sum"), which training loops watch for.

A rank that never calls at all makes the others wait until the process group's timeout
(``init_process_group(timeout=...)``) in either mode.

Semantics follow crossent's contract (``DESIGN.md``): ``mean`` divides by the number of non-ignored
rows and is 0 with zero gradients when there are none; label smoothing gives ``eps / K`` to each
of the ``K`` classes whose (softcapped) logit is finite in that row, ``K`` counted over all ranks;
``z_loss * lse^2`` is added per non-ignored row; softcap ``c tanh(logits / c)`` comes first;
bfloat16/float16 inputs accumulate and return float32 losses. NaN logits propagate; an ignored row
contributes 0 whatever its logits (or, in the linear version, its input row: a NaN there leaves
every gradient finite). Apart from validation (above), everything stays on the device, so the
same code runs on NCCL without a host sync.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from crossent._autograd import first_order_only
from crossent.torch._checks import check_ignore_index, real_option

from .partition import vocab_offsets

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

# Elements (rows x columns) of one chunk of logits: each float32 temporary of a chunk is 32 MiB.
# Read at every call, so tests may lower it to exercise many chunks on small shapes.
_CHUNK_ELEMENTS = 1 << 23

_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_EXCEPTIONS = (ValueError, TypeError)  # codes 1, 2 of the "problem" field
_MESSAGE_BYTES = 512  # per rank, for a local error message sent to the other ranks

# Fields of the step-0 table, one int64 each; floats travel as their IEEE bits.
_FIELDS = (
    "validated",  # 1 on a rank that validates; 0 in the table of validate=False (see _device_offsets)
    "problem",  # 0: none, 1: ValueError, 2: TypeError in this rank's own arguments
    "vocab",  # V_r
    "rows",  # N
    "target_ndim",
    "target_shape",  # target.shape packed into one int64 (8 bytes of BLAKE2b), see _shape_key
    "features",  # D (linear version), else 0
    "dtype",  # index in _FLOAT_DTYPES
    "target_min",  # over non-ignored targets; INT64_MAX if none
    "target_max",  # over non-ignored targets; INT64_MIN if none
    "ignore_index",
    "reduction",
    "label_smoothing",
    "z_loss",
    "softcap",
    "has_bias",
    "input_grad",  # linear version: whether backward will all-reduce x's gradient (step 6):
    # x.requires_grad under grad mode, what ctx.needs_input_grad[0] will say
)
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
_SHARED = {  # fields every rank must agree on, with the words an error uses
    "rows": "the number of rows (target.numel())",
    "target_ndim": "target.ndim",
    "target_shape": "target.shape",
    "features": "the feature size D of the input",
    "dtype": "the dtype of the logits / input",
    "ignore_index": "ignore_index",
    "reduction": "reduction",
    "label_smoothing": "label_smoothing",
    "z_loss": "z_loss",
    "softcap": "softcap",
    "has_bias": "whether local_bias is given",
    "input_grad": "whether input needs a gradient (input.requires_grad under grad mode)",
}


def _shape_key(shape) -> int:
    """``shape`` as one int64: 8 bytes of BLAKE2b over its sizes (equal shapes, equal keys; two
    different shapes of the same size and ndim collide with probability 2^-64)."""
    packed = struct.pack(f"<{len(shape)}q", *shape)
    return struct.unpack("<q", hashlib.blake2b(packed, digest_size=8).digest())[0]


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value) + 0.0))[0]  # + 0.0: -0.0 -> 0.0


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


@dataclass(frozen=True)
class _Plan:
    """Everything a forward/backward needs besides the tensors (one autograd argument)."""

    group: Any
    validated: bool
    offset: int | torch.Tensor  # offset_r: an int when validated, else a 0-d int64 device tensor
    vocab: int | torch.Tensor  # V, the global vocabulary size: likewise
    vocab_local: int
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    chunk: int  # columns per chunk
    target_shape: torch.Size


#: Local math of the logits version (step 1 and step 5) through crossent.triton's kernels: "auto"
#: uses them for float32/bfloat16/float16 logits on CUDA when triton imports; "off" never. CPU
#: tensors take them only under Triton's interpreter (TRITON_INTERPRET=1) and when asked for, by
#: this switch set to "interpret" or by CROSSENT_VOCAB_PARALLEL_TRITON=1 (how the tests run them).
#: Read at every call. The collectives and the row arithmetic of steps 2-4 are the same either way.
_TRITON = "auto"
_TRITON_ENV = "CROSSENT_VOCAB_PARALLEL_TRITON"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_local(logits: torch.Tensor):
    """crossent.triton (imported lazily) when it should compute this rank's local math, else None."""
    if _TRITON == "off" or logits.dtype not in _TRITON_DTYPES:
        return None
    if logits.device.type == "cpu":
        asked = _TRITON == "interpret" or os.environ.get(_TRITON_ENV) == "1"
        if not (asked and os.environ.get("TRITON_INTERPRET") == "1"):
            return None
    elif not logits.is_cuda:
        return None
    try:
        import crossent.triton as triton_ops
        from crossent.triton._launchers import interpreted
    except ImportError:
        return None
    if logits.device.type == "cpu" and not interpreted():
        return None  # triton was imported before TRITON_INTERPRET=1: its kernels target a GPU
    return triton_ops


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_columns(rows: int, vocab_local: int) -> int:
    return max(1, min(max(vocab_local, 1), _CHUNK_ELEMENTS // max(rows, 1)))


def _softcapped(lin: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(c tanh(lin / c), tanh(lin / c))``, or ``(lin, None)`` without softcap."""
    if softcap is None:
        return lin, None
    th = torch.tanh(lin / softcap)
    return softcap * th, th


class _RowStats:
    """Per-row running statistics of this rank's slice (step 1), then their global values (2-4)."""

    def __init__(self, target_local: torch.Tensor, owned: torch.Tensor, dtype, smoothing: bool):
        rows = target_local.shape[0]
        device = target_local.device
        self.target_local = target_local  # y_i - offset_r (any value where not owned)
        self.owned = owned  # row not ignored and y_i in this rank's slice
        self.m = torch.full((rows,), -math.inf, dtype=dtype, device=device)
        self.s = torch.zeros(rows, dtype=dtype, device=device)
        self.t = torch.zeros(rows, dtype=dtype, device=device)
        self.smoothing = smoothing
        if smoothing:
            self.finite_sum = torch.zeros(rows, dtype=dtype, device=device)
            self.finite_count = torch.zeros(rows, dtype=dtype, device=device)

    def set_partials(self, m, s, t, finite_sum, finite_count) -> None:
        """Take step 1's statistics of the whole slice at once (the Triton path)."""
        self.m, self.s, self.t = m, s, t
        if self.smoothing:
            self.finite_sum, self.finite_count = finite_sum, finite_count

    def update(self, z: torch.Tensor, col0: int) -> None:
        """Fold the columns ``col0 : col0 + z.shape[1]`` of this slice's logits ``z`` in."""
        m_new = torch.maximum(self.m, z.amax(dim=1))  # NaN propagates
        shift = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        self.s = self.s * torch.exp(self.m - shift) + torch.exp(z - shift[:, None]).sum(dim=1)
        self.m = m_new
        in_chunk, index = _chunk_target(self.target_local, self.owned, col0, z.shape[1])
        picked = z.gather(1, index[:, None]).squeeze(1)
        self.t = self.t + torch.where(in_chunk, picked, torch.zeros_like(picked))
        if self.smoothing:
            finite = torch.isfinite(z)
            self.finite_sum = self.finite_sum + torch.where(finite, z, torch.zeros_like(z)).sum(dim=1)
            self.finite_count = self.finite_count + finite.sum(dim=1, dtype=z.dtype)

    def reduce(self, group) -> tuple[torch.Tensor, ...]:
        """Steps 2-3: global ``lse, t, S, K`` per row (``S, K`` are None without smoothing)."""
        m = self.m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shift = torch.where(m == -math.inf, torch.zeros_like(m), m)
        parts = [self.s * torch.exp(self.m - shift), self.t]
        if self.smoothing:
            parts += [self.finite_sum, self.finite_count]
        stacked = torch.stack(parts)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        lse = shift + torch.log(stacked[0])
        if self.smoothing:
            return lse, stacked[1], stacked[2], stacked[3]
        return lse, stacked[1], None, None


def _target_rows(plan: _Plan, target: torch.Tensor):
    """``(valid, target_local, owned)``: row not ignored; ``y_i - offset_r``; row not ignored and
    ``y_i`` in this rank's slice. Device arithmetic only (``plan.offset`` may be a device tensor)."""
    valid = target != plan.ignore_index
    target_local = target - plan.offset
    owned = valid & (target_local >= 0) & (target_local < plan.vocab_local)
    return valid, target_local, owned


def _poison_unknown(plan: _Plan, target, valid, lse):
    """Without validation, a non-ignored target outside ``[0, V)`` (no rank owns it) cannot raise
    without a host read: its row's ``lse`` becomes NaN, so its loss and gradients are NaN (and so
    is a "mean" or "sum"). Validated calls have raised already: nothing to do."""
    if plan.validated:
        return lse
    unknown = valid & ((target < 0) | (target >= plan.vocab))
    return torch.where(unknown, torch.full_like(lse, math.nan), lse)


def _chunk_target(target_local, owned, col0: int, width: int):
    """Rows whose target lies in columns ``col0 : col0 + width`` and its index in the chunk."""
    shifted = target_local - col0
    in_chunk = owned & (shifted >= 0) & (shifted < width)
    index = torch.where(in_chunk, shifted, torch.zeros_like(shifted))
    return in_chunk, index


def _row_losses(plan: _Plan, valid, lse, t, finite_sum, finite_count):
    """Step 4: per-row loss, 0 on ignored rows."""
    eps = plan.label_smoothing
    row = lse - t
    if eps > 0.0:
        # eps = 1 gives the target no mass: 0 even on a -inf target logit (0 * inf would be NaN).
        target_part = (1.0 - eps) * row if eps < 1.0 else torch.zeros_like(row)
        row = target_part + eps * (lse - finite_sum / finite_count)
    if plan.z_loss > 0.0:
        row = row + plan.z_loss * lse * lse
    return torch.where(valid, row, torch.zeros_like(row))


def _reduce(plan: _Plan, row: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    if plan.reduction == "none":
        return row.reshape(plan.target_shape)
    total = row.sum()
    return total / denominator if plan.reduction == "mean" else total


def _row_coefficients(plan: _Plan, grad_output, valid, denominator):
    """``g_i``: d(returned loss)/d(loss_i) times the incoming gradient, 0 on ignored rows."""
    if plan.reduction == "none":
        g = grad_output.reshape(-1)
    elif plan.reduction == "sum":
        g = grad_output.expand(valid.shape[0])
    else:
        g = (grad_output / denominator).expand(valid.shape[0])
    return torch.where(valid, g, torch.zeros_like(g))


def _logits_grad(plan: _Plan, z, col0, saved, g, th=None):
    """Step 5: d loss / d z for the columns ``col0 : col0 + z.shape[1]`` (accumulation dtype);
    with ``th = tanh(u / c)`` of a softcap, d loss / d u (the logits before the cap). Ignored
    rows are selected to 0 last, so nothing non-finite there (a NaN ``th``) gets through."""
    target_local, owned, valid, lse, finite_count = saved
    eps = plan.label_smoothing
    p = torch.exp(z - lse[:, None])
    if plan.z_loss > 0.0:
        p = p * (1.0 + 2.0 * plan.z_loss * lse)[:, None]
    in_chunk, index = _chunk_target(target_local, owned, col0, z.shape[1])
    p.scatter_add_(1, index[:, None], (-(1.0 - eps) * in_chunk.to(p.dtype))[:, None])
    if eps > 0.0:
        share = (eps / finite_count)[:, None]
        p = p - torch.where(torch.isfinite(z), share, torch.zeros_like(share))
    dz = p * g[:, None]
    if th is not None:
        dz = dz * (1.0 - th * th)  # d softcap(u) / du = 1 - tanh(u / c)^2
    return torch.where(valid[:, None], dz, torch.zeros_like(dz))


def _denominator(valid: torch.Tensor, dtype) -> torch.Tensor:
    """Number of non-ignored rows, at least 1 (a mean over no rows is 0)."""
    return valid.sum().clamp(min=1).to(dtype)


# What gives second-order gradients, for the error a double backward raises.
_SECOND_ORDER = (
    "gather the logits and use crossent.torch.cross_entropy(..., impl='reference') for gradient "
    "penalties, Hessian-vector products and the like"
)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, plan: _Plan):  # logits [N, V_r], target [N]
        acc = _acc_dtype(logits.dtype)
        valid, target_local, owned = _target_rows(plan, target)
        stats = _RowStats(target_local, owned, acc, plan.label_smoothing > 0.0)
        triton_ops = _triton_local(logits)
        if triton_ops is not None:
            column = torch.where(owned, target_local, torch.full_like(target_local, -1))
            stats.set_partials(*triton_ops._vocab_parallel_partials(logits, column, smoothing=stats.smoothing))
        else:
            for col0 in range(0, plan.vocab_local, plan.chunk):
                stats.update(logits[:, col0 : col0 + plan.chunk].to(acc), col0)
        lse, t, finite_sum, finite_count = stats.reduce(plan.group)
        lse = _poison_unknown(plan, target, valid, lse)
        denominator = _denominator(valid, acc)
        row = _row_losses(plan, valid, lse, t, finite_sum, finite_count)
        ctx.plan = plan
        ctx.triton_ops = triton_ops
        ctx.save_for_backward(logits, target_local, owned, valid, lse, finite_count, denominator)
        return _reduce(plan, row, denominator)

    @staticmethod
    @first_order_only("vocab_parallel_cross_entropy", _SECOND_ORDER)
    def backward(ctx, grad_output):
        plan: _Plan = ctx.plan
        logits, target_local, owned, valid, lse, finite_count, denominator = ctx.saved_tensors
        acc = lse.dtype
        g = _row_coefficients(plan, grad_output.to(acc), valid, denominator)
        if ctx.triton_ops is not None:
            column = torch.where(owned, target_local, torch.full_like(target_local, -1))
            grad = ctx.triton_ops._vocab_parallel_grad(
                logits, column, valid, lse, g, finite_count,
                label_smoothing=plan.label_smoothing, z_loss=plan.z_loss,
            )
            return grad, None, None  # logits; target and plan take no gradient
        saved = (target_local, owned, valid, lse, finite_count)
        grad = torch.empty_like(logits)
        for col0 in range(0, plan.vocab_local, plan.chunk):
            z = logits[:, col0 : col0 + plan.chunk].to(acc)
            grad[:, col0 : col0 + plan.chunk] = _logits_grad(plan, z, col0, saved, g)
        return grad, None, None  # logits; target and plan take no gradient


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, plan: _Plan):  # x [N, D], weight [V_r, D], bias [V_r]
        acc = _acc_dtype(x.dtype)
        valid, target_local, owned = _target_rows(plan, target)
        stats = _RowStats(target_local, owned, acc, plan.label_smoothing > 0.0)
        for col0 in range(0, plan.vocab_local, plan.chunk):
            z, _ = _softcapped(_linear_chunk(x, weight, bias, col0, plan.chunk).to(acc), plan.softcap)
            stats.update(z, col0)
        lse, t, finite_sum, finite_count = stats.reduce(plan.group)
        lse = _poison_unknown(plan, target, valid, lse)
        denominator = _denominator(valid, acc)
        row = _row_losses(plan, valid, lse, t, finite_sum, finite_count)
        ctx.plan = plan
        ctx.autocast = _autocast_state(x.device.type)  # backward recomputes the logits under it
        ctx.save_for_backward(x, weight, bias, target_local, owned, valid, lse, finite_count, denominator)
        return _reduce(plan, row, denominator)

    @staticmethod
    @first_order_only("vocab_parallel_linear_cross_entropy", _SECOND_ORDER)
    def backward(ctx, grad_output):
        plan: _Plan = ctx.plan
        x, weight, bias, target_local, owned, valid, lse, finite_count, denominator = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        g = _row_coefficients(plan, grad_output.to(acc), valid, denominator)
        saved = (target_local, owned, valid, lse, finite_count)
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b and bias is not None else None
        if grad_w is not None:
            # Ignored rows of x zeroed for dW = dz^T x: their dz is 0, but 0 * NaN is NaN (a NaN
            # hidden state on a padded row would otherwise poison every entry of dW).
            x_w = torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        device_type = x.device.type
        for col0 in range(0, plan.vocab_local, plan.chunk):
            cols = slice(col0, col0 + plan.chunk)
            # The logits exactly as forward computed them (under its autocast state: bfloat16
            # products under torch.autocast), so that p = exp(z - lse) sums to 1 and the gradient
            # is that of the returned loss; the gradient products below run without autocast,
            # in the dtypes chosen here, whatever autocast state backward is called under.
            with _autocast_as(device_type, ctx.autocast):
                lin = _linear_chunk(x, weight, bias, col0, plan.chunk)
            with _autocast_as(device_type, (False, None)):
                z, th = _softcapped(lin.to(acc), plan.softcap)
                dz = _logits_grad(plan, z, col0, saved, g, th)
                if grad_b is not None:
                    grad_b[cols] = dz.sum(dim=0).to(grad_b.dtype)
                dz = dz.to(x.dtype)
                if grad_w is not None:
                    grad_w[cols] = dz.T @ x_w
                if grad_x is not None:
                    grad_x += _matmul_in(acc, dz, weight[cols])
        if grad_x is not None:
            # x is replicated on every rank: its gradient sums the contributions of all slices
            # (step 6). Every rank of the group takes this branch: with validation, step 0 has
            # checked that torch.is_grad_enabled() and input.requires_grad (what needs_input_grad
            # says) agree across ranks; without, the caller must make sure they do.
            dist.all_reduce(grad_x, op=dist.ReduceOp.SUM, group=plan.group)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None  # x, weight, bias; target and plan take none


#: Whether ``torch.mm(..., out_dtype=)`` (float32 output of bfloat16/float16 products on CUDA)
#: works here; None until first tried.
_MM_OUT_DTYPE: bool | None = None


def _matmul_in(acc: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` summed and returned in ``acc``, so that the input gradient, a sum over chunks,
    is rounded once at the end rather than once per chunk.

    Low-precision CUDA products take ``torch.mm(out_dtype=float32)`` (the tensor cores still
    accumulate in float32; only the output rounding is skipped; checked on an H100 with PyTorch
    2.11, tests/distributed/test_distributed_nccl_cuda.py) where this PyTorch has it, else
    the plain product rounded to the input dtype (one rounding per chunk). On the CPU the operands
    are upcast: exact, and no slower there.
    """
    global _MM_OUT_DTYPE
    if a.dtype == acc:
        return a @ b
    if a.is_cuda:
        if _MM_OUT_DTYPE is not False:
            try:
                out = torch.mm(a, b, out_dtype=acc)
                _MM_OUT_DTYPE = True
                return out
            except (TypeError, NotImplementedError):  # no out_dtype argument / no kernel for it
                # (not RuntimeError: an out-of-memory error must surface, not switch paths)
                _MM_OUT_DTYPE = False
        return (a @ b).to(acc)
    return a.to(acc) @ b.to(acc)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """``(enabled, dtype)`` of ``torch.autocast`` for ``device_type`` now (what
    ``torch.amp.custom_fwd`` records for its backward)."""
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_as(device_type: str, state: tuple[bool, torch.dtype | None]):
    """``torch.autocast`` entered in a recorded state (``torch.amp.custom_bwd`` does this for a
    whole backward); ``(False, None)`` turns it off."""
    enabled, dtype = state
    if not enabled:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype, enabled=True)


def _linear_chunk(x, weight, bias, col0: int, width: int) -> torch.Tensor:
    """Logits of the columns ``col0 : col0 + width`` of this slice: in the input dtype, or in
    autocast's dtype where ``torch.autocast`` is on (forward, and backward's recompute under the
    state forward recorded)."""
    w = weight[col0 : col0 + width]
    if bias is None:
        return x @ w.T
    return torch.addmm(bias[col0 : col0 + width], x, w.T)


# ----------------------------------------------------------------------------------------------
# Step 0: validation and partition, collectively.


def _group_of(group, fn: str):
    if not dist.is_available():
        raise RuntimeError(f"{fn}: torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{fn}: no default process group; call torch.distributed.init_process_group first "
            "(group=None means the default group)"
        )
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(f"{fn}: group must contain this process (rank {dist.get_rank()}), it does not")
    return group


def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap, problems):
    """Check the scalar options into ``problems``; return (ignore_index, label_smoothing, z_loss,
    softcap) as Python int/floats (the values given, where a check failed)."""
    try:
        # crossent.torch's check, so the two give the same errors: a TypeError for bool, floats
        # and other non-integers, and a ValueError naming the int64 range for a value outside it
        # (2**70 was a bare OverflowError from the step-0 table, 2**63 a ValueError "Overflow
        # when unpacking long long" there, or with validate=False silently matched no target).
        ignore_index = check_ignore_index(ignore_index)
    except (TypeError, ValueError) as exc:
        problems.append((type(exc), str(exc)))
    if reduction not in _REDUCTIONS:
        problems.append((ValueError, f"reduction must be one of {_REDUCTIONS}, got {reduction!r}"))
    checked = []
    for name, value, low, high in (
        ("label_smoothing", label_smoothing, 0.0, 1.0),
        ("z_loss", z_loss, 0.0, math.inf),
    ):
        real = real_option(value)
        if real is None:
            problems.append((TypeError, f"{name} must be a float, got {type(value).__name__}"))
        elif not (low <= real <= high and math.isfinite(real)):
            bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f"finite and >= {low:g}"
            problems.append((ValueError, f"{name} must be {bounds}, got {real}"))
        checked.append(value if real is None else real)
    if softcap is not None:
        real = real_option(softcap)
        if real is None:
            problems.append((TypeError, f"softcap must be None or a float, got {type(softcap).__name__}"))
        elif not (math.isfinite(real) and real > 0):
            problems.append((ValueError, f"softcap must be None or a finite float > 0, got {real}"))
        else:
            softcap = real
    return ignore_index, checked[0], checked[1], softcap


def _check_tensor(value, name: str, problems, *, floating: bool) -> bool:
    if not isinstance(value, torch.Tensor):
        problems.append((TypeError, f"{name} must be a torch.Tensor, got {type(value).__name__}"))
        return False
    if floating and value.dtype not in _FLOAT_DTYPES:
        problems.append((TypeError, f"{name} must be float64, float32, float16 or bfloat16, got {value.dtype}"))
        return False
    if not floating and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        problems.append((TypeError, f"{name} must hold integer class indices, got {value.dtype}"))
        return False
    return True


def _target_summary(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[min, max]`` of the non-ignored targets, on the target's device (no host sync)."""
    flat = target.reshape(-1).to(torch.int64)
    valid = flat != ignore_index
    if flat.numel() == 0:
        low = torch.tensor(_INT64_MAX, device=flat.device)
        high = torch.tensor(_INT64_MIN, device=flat.device)
    else:
        low = torch.where(valid, flat, torch.full_like(flat, _INT64_MAX)).min()
        high = torch.where(valid, flat, torch.full_like(flat, _INT64_MIN)).max()
    return torch.stack([low, high])


def _check_same_target(fn: str, group, target: torch.Tensor) -> None:
    """Step 0b: every rank must hold the same targets, compared exactly; ValueError on every rank.

    One all-reduce MIN of ``[y, ~y]`` (int64, 2N per rank; ``~y = -1 - y`` reverses the order of
    int64 without overflow, so ``~min(~y) = max y``) gives every rank the same elementwise
    minimum and maximum over the ranks, ignore_index values included: the targets agree iff the
    two are equal everywhere. The flag comes from the reduced values only, so every rank reads
    the same one. Called once the table has shown that the ranks have the same number of rows
    (the collective needs equal sizes); skipped, on every rank alike, for one rank or no rows.
    """
    flat = target.reshape(-1).to(torch.int64)
    if dist.get_world_size(group) == 1 or flat.numel() == 0:
        return
    both = torch.stack([flat, torch.bitwise_not(flat)])
    dist.all_reduce(both, op=dist.ReduceOp.MIN, group=group)
    low, high = both[0], torch.bitwise_not(both[1])
    differs = low != high
    if bool(differs.any()):  # the second (and last) host read of the call
        first = int(differs.nonzero()[0, 0])  # the error path only
        raise ValueError(
            f"{fn}: the target must be the same on every rank of the group, got "
            f"{int(differs.sum())} of {flat.numel()} positions that differ (the first at flat "
            f"index {first}: values from {int(low[first])} to {int(high[first])} across the "
            "ranks) (raised on every rank)"
        )


def _exchange(fn: str, group, device, problems, fields: dict[str, int], summary, shape) -> list[dict]:
    """Step 0: all-gather every rank's table; raise the same error on every rank if any.
    ``shape``: this rank's ``target.shape`` (the table holds only its key), for the message."""
    world = dist.get_world_size(group)
    local = torch.tensor([fields[name] for name in _FIELDS], dtype=torch.int64)
    local = local.to(device)
    if summary is not None:
        at = _FIELDS.index("target_min")
        local[at : at + 2] = summary.to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = [dict(zip(_FIELDS, row, strict=True)) for row in torch.stack(gathered).tolist()]

    if not all(row["validated"] for row in table):
        # Checked first: the other fields of a rank without validation are zeros. That rank
        # reads nothing back (no host read with validate=False), so it cannot be told: it goes on
        # to its next collective, which waits until the group's timeout or until these ranks'
        # processes leave the group.
        flags = [bool(row["validated"]) for row in table]
        raise ValueError(
            f"{fn}: validate must be the same on every rank of the group, got {flags} in rank "
            "order (None counts as True for CPU tensors, False for CUDA ones) (raised on the "
            "ranks with validate=True; those with validate=False cannot be told without a host "
            "read and wait in their next collective until the group's timeout)"
        )

    if any(row["problem"] for row in table):  # every rank sees the same table: all enter here
        text = "; ".join(message for _, message in problems).encode()[:_MESSAGE_BYTES]
        buffer = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
        buffer[: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        messages = [torch.empty_like(buffer).to(device) for _ in range(world)]
        dist.all_gather(messages, buffer.to(device), group=group)
        reports = []
        for rank, (row, message) in enumerate(zip(table, messages, strict=True)):
            if row["problem"]:
                raw = bytes(message.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
                reports.append((row["problem"], f"rank {rank}: {raw}"))
        kind = _EXCEPTIONS[reports[0][0] - 1]
        raise kind(f"{fn}: " + "; ".join(text for _, text in reports) + " (raised on every rank)")

    for name, words in _SHARED.items():
        values = [row[name] for row in table]
        if len(set(values)) > 1 and name == "target_shape":
            ranks: dict[int, list[int]] = {}
            for rank, value in enumerate(values):
                ranks.setdefault(value, []).append(rank)
            raise ValueError(
                f"{fn}: {words} must be the same on every rank of the group, got {len(ranks)} "
                f"different shapes (ranks grouped by shape: {list(ranks.values())}; this rank's is "
                f"{tuple(shape)}) (raised on every rank)"
            )
        if len(set(values)) > 1:
            if name in ("label_smoothing", "z_loss"):
                values = [_bits_float(v) for v in values]
            elif name == "softcap":
                values = [None if v == 0 else _bits_float(v) for v in values]
            elif name == "reduction":
                values = [_REDUCTIONS[v] for v in values]
            elif name == "dtype":
                values = [str(_FLOAT_DTYPES[v]) for v in values]
            raise ValueError(
                f"{fn}: {words} must be the same on every rank of the group, got {values} in rank "
                "order (raised on every rank)"
            )
    return table


def _make_plan(
    fn: str,
    group,
    *,
    validated: bool,
    device,
    problems,
    fields: dict[str, int],
    summary,
    target,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
) -> _Plan:
    """Step 0 (and 0b): the slice offset of this rank, after the checks that ``validated`` asks for.

    Validated: the table of every rank (host read 1), the targets' range against ``V``, the
    targets' agreement (step 0b, host read 2); every rank raises together. Not validated: an
    argument error of this rank raises here, before any collective; otherwise only the slice sizes
    are all-gathered, into a device tensor, and ``offset_r`` and ``V`` stay on the device."""
    if validated:
        table = _exchange(fn, group, device, problems, fields, summary, getattr(target, "shape", ()))
        offset, vocab = _offset_from_table(fn, group, table, ignore_index)
        _check_same_target(fn, group, target)
    else:
        if problems:
            kind = problems[0][0]
            text = "; ".join(message for _, message in problems)
            raise kind(
                f"{fn}: rank {dist.get_rank(group)}: {text} (validate=False: raised on this rank "
                "only; the other ranks are not told)"
            )
        offset, vocab = _device_offsets(group, fields["vocab"], device)
    vocab_local = fields["vocab"]
    return _Plan(
        group=group,
        validated=validated,
        offset=offset,
        vocab=vocab,
        vocab_local=vocab_local,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        chunk=_chunk_columns(fields["rows"], vocab_local),
        target_shape=target.shape,
    )


def _offset_from_table(fn: str, group, table, ignore_index) -> tuple[int, int]:
    """``(offset_r, V)`` from the step-0 table; ValueError (on every rank) for a target outside
    ``[0, V)`` on any rank."""
    sizes = [row["vocab"] for row in table]
    offsets, vocab = vocab_offsets(sizes)
    low = min(row["target_min"] for row in table)
    high = max(row["target_max"] for row in table)
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"{fn}: target must hold ignore_index ({ignore_index}) or global class indices in "
            f"[0, {vocab}) (V = sum of the slice sizes {sizes} in rank order), got {bad} "
            "(raised on every rank)"
        )
    return offsets[dist.get_rank(group)], vocab


def _device_offsets(group, vocab_local: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 0 without validation: ``(offset_r, V)`` as 0-d int64 tensors on ``device``, from an
    all-gather of the slice sizes. It gathers a table of the validated size (``len(_FIELDS)``
    int64 per rank) holding only ``V_r`` and ``validated = 0``: a collective of the same size as
    a validating rank's, so a ``validate`` that differs across ranks reaches the validating ranks
    as that flag (they raise, see ``_exchange``) rather than as mismatched gloo buffers (which
    aborted the process). Nothing goes through the host: the table is zeros and one fill kernel
    (no host-to-device copy), and the sums of ``partition.vocab_offsets`` are computed on the
    device."""
    local = torch.zeros(len(_FIELDS), dtype=torch.int64, device=device)
    local[_FIELDS.index("vocab")].fill_(vocab_local)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    sizes = torch.stack(gathered)[:, _FIELDS.index("vocab")]
    return sizes[: dist.get_rank(group)].sum(), sizes.sum()


def _validation(validate, problems, *values) -> bool:
    """``validate`` resolved: None is True for CPU tensors (the checks read nothing that is not
    already on the host) and False on any other device (CUDA: they would cost host syncs). The
    device is that of the first tensor among ``values`` (True without one: the checks report it)."""
    if validate is None:
        for value in values:
            if isinstance(value, torch.Tensor):
                return value.device.type == "cpu"
        return True
    if not isinstance(validate, bool):
        problems.append((TypeError, f"validate must be None, True or False, got {validate!r}"))
        return True  # through the table: every rank with this argument raises together
    return validate


def _base_fields(ignore_index, reduction, label_smoothing, z_loss, softcap, problems) -> dict:
    fields = dict.fromkeys(_FIELDS, 0)
    fields["validated"] = 1  # what the table of a validating rank says (_exchange's tables only)
    fields["target_min"], fields["target_max"] = _INT64_MAX, _INT64_MIN
    if problems:
        return fields
    fields["ignore_index"] = ignore_index
    fields["reduction"] = _REDUCTIONS.index(reduction)
    fields["label_smoothing"] = _float_bits(label_smoothing)
    fields["z_loss"] = _float_bits(z_loss)
    fields["softcap"] = 0 if softcap is None else _float_bits(softcap)
    return fields


def _finish_fields(fields, problems) -> None:
    if problems:
        fields["problem"] = _EXCEPTIONS.index(problems[0][0]) + 1


def _device_of(group, *values) -> torch.device:
    """Where the step-0 table travels: the data's device; without a tensor argument (an error on
    this rank), the device the group's backend talks through, so the error still reaches all."""
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    validate: bool | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of logits split by vocabulary across the ranks of ``group``.

    With ``z = concat_r(local_logits_r)`` the logits over the global vocabulary of ``V`` classes,
    per non-ignored row ``i`` (target ``y_i``, ``\epsilon`` = ``label_smoothing``, ``K_i`` = the
    number of classes with a finite logit in the row):

    .. math::

        \ell_i = (1-\epsilon)\,(\mathrm{lse}_i - z_{i,y_i})
                 + \epsilon\,\Big(\mathrm{lse}_i - \frac{1}{K_i}\sum_{j:\,z_{ij}\ \mathrm{finite}} z_{ij}\Big)
                 + \lambda_z\,\mathrm{lse}_i^2,
        \qquad \mathrm{lse}_i = \log\sum_{j<V} e^{z_{ij}}

    and ``ℓ_i = 0`` on rows whose target is ``ignore_index``. ``reduction="mean"`` divides the sum
    by the number of non-ignored rows (0, with zero gradients, when there are none). The logits are
    never gathered: the module docstring draws the communication (three collectives, O(N) values;
    four with validation).

    Args:
        local_logits: this rank's slice of the logits, ``[..., V_r]``; rank ``r`` holds the global
            classes ``[V_0 + ... + V_{r-1}, V_0 + ... + V_r)``. Slices may be uneven.
        target: global class indices ``[...]`` (the leading shape of ``local_logits``), integer
            dtype, identical on every rank; ``ignore_index`` marks rows that do not count.
        group: the process group over which the vocabulary is split; None is the default group.
        ignore_index: target value whose rows contribute 0.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (shape of ``target``).
        label_smoothing: ``eps`` in [0, 1]; mass ``eps / K_i`` on each finite-logit class.
        z_loss: ``λ_z >= 0``, adds ``λ_z lse^2`` per non-ignored row (PaLM).
        validate: check the arguments across the ranks (shapes, dtypes, options, the targets)
            so that every rank raises the same error together (two host reads per call); the
            upstream gradient of backward is not compared (every rank must pass the same, see
            Returns). None: True for CPU tensors, False on CUDA (no host read: nothing is
            compared across ranks, an error in a rank's own arguments raises on that rank before
            any collective, a target outside ``[0, V)`` gives NaN on its row). The same on every
            rank: where it differs, the ranks that validate raise a ValueError naming it and the
            others wait until the group's timeout. The module docstring details both.

    Returns:
        the loss, identical on every rank: a scalar, or ``target.shape`` for ``"none"``; float32
        for bfloat16/float16 logits. Backward gives this rank ``d loss / d local_logits`` and needs
        no communication (every rank must backpropagate the same upstream gradient).

    Raises:
        ValueError, TypeError: with validation, on every rank of the group together, for a bad
            argument on any rank, a target outside ``[0, V)`` other than ``ignore_index``, or
            shapes (``target.shape`` included), targets or options that differ across ranks;
            without validation, on a rank whose own arguments are bad (a type, a shape, an option),
            before any collective.
        RuntimeError: on a second backward through a gradient taken with ``create_graph=True``
            (the backward is computed outside autograd: no second-order gradients). ``torch.func``
            transforms (``grad``, ``vmap``) are not supported either.

    Example (a group of one process; with ``torchrun`` each rank passes its own slice):

    >>> import os, tempfile, torch, torch.distributed as dist
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    >>> logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    >>> vocab_parallel_cross_entropy(logits, torch.tensor([1, 0]))
    tensor(0.6691, dtype=torch.float64)
    >>> torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0]))
    tensor(0.6691, dtype=torch.float64)
    >>> dist.destroy_process_group()

    References:
        Shoeybi et al., Megatron-LM (2019), arXiv:1909.08053, section 3 (vocabulary-parallel
        cross-entropy); Chowdhery et al., PaLM (2022), arXiv:2204.02311 (z-loss).
    """
    fn = "vocab_parallel_cross_entropy"
    group = _group_of(group, fn)
    problems: list[tuple[type, str]] = []
    validated = _validation(validate, problems, local_logits, target)
    ignore_index, label_smoothing, z_loss, _ = _check_options(
        ignore_index, reduction, label_smoothing, z_loss, None, problems
    )
    fields = _base_fields(ignore_index, reduction, label_smoothing, z_loss, None, problems)
    summary = None
    ok = _check_tensor(local_logits, "local_logits", problems, floating=True)
    ok = _check_tensor(target, "target", problems, floating=False) and ok
    if ok:
        if local_logits.ndim == 0:
            problems.append((ValueError, "local_logits must have a class dimension [..., V_r], got a 0-d tensor"))
        elif tuple(local_logits.shape[:-1]) != tuple(target.shape):
            problems.append(
                (
                    ValueError,
                    f"target must have the leading shape of local_logits "
                    f"{tuple(local_logits.shape[:-1])}, got {tuple(target.shape)}",
                )
            )
        elif target.device != local_logits.device:
            problems.append(
                (
                    ValueError,
                    f"target must be on the device of local_logits ({local_logits.device}), got {target.device}",
                )
            )
    if ok and not problems:
        fields["vocab"] = local_logits.shape[-1]
        fields["rows"] = target.numel()
        fields["target_ndim"] = target.ndim
        fields["target_shape"] = _shape_key(target.shape)
        fields["dtype"] = _FLOAT_DTYPES.index(local_logits.dtype)
        if validated:
            summary = _target_summary(target, ignore_index)
    _finish_fields(fields, problems)
    plan = _make_plan(
        fn,
        group,
        validated=validated,
        device=_device_of(group, local_logits, target),
        problems=problems,
        fields=fields,
        summary=summary,
        target=target,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=None,
    )
    rows = fields["rows"]
    logits2d = local_logits.reshape(rows, plan.vocab_local)
    return _VocabParallelCrossEntropy.apply(logits2d, target.reshape(rows).to(torch.int64), plan)


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    local_bias: torch.Tensor | None = None,
    group=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of ``input @ W.T + b`` with the output layer ``W`` split by vocabulary rows.

    Equals :func:`vocab_parallel_cross_entropy` of ``z = softcap(input @ local_weight.T +
    local_bias)`` on each rank, with ``softcap(u) = c \tanh(u / c)`` when ``softcap=c`` is given,
    without ever holding this rank's ``N x V_r`` logits: they are computed in chunks of columns
    and recomputed chunk by chunk in backward. ``input`` is replicated on every rank; its gradient
    is all-reduced over the group in backward, so every rank gets the full ``d loss / d input``.
    ``local_weight`` and ``local_bias`` get the gradient of their own slice.

    Args:
        input: ``[..., D]``, the same on every rank.
        local_weight: this rank's rows of the output layer, ``[V_r, D]``, rank order, uneven allowed.
        target: global class indices ``[...]`` (the leading shape of ``input``), same on every rank.
        local_bias: this rank's slice of the bias ``[V_r]``, or None (on every rank).
        group: the process group over which the vocabulary is split; None is the default group.
        ignore_index, reduction, label_smoothing, z_loss: as :func:`vocab_parallel_cross_entropy`
            (``lse`` and the smoothing use the softcapped logits).
        softcap: None, or ``c > 0``: logits become ``c tanh(logits / c)`` first (Gemma 2).
        validate: as :func:`vocab_parallel_cross_entropy`. The values of ``input`` (which should
            be replicated) and of the upstream gradient in backward are not compared across the
            ranks: an ``input`` that differs between ranks gives wrong results, unreported.

    Returns:
        the loss, identical on every rank: a scalar, or ``target.shape`` for ``"none"``.

    Raises:
        ValueError, TypeError: as :func:`vocab_parallel_cross_entropy`, also when
            ``local_weight``/``local_bias`` disagree with ``input`` or with each other, or (with
            validation) when whether ``input`` needs a gradient (``input.requires_grad`` under
            grad mode) differs across ranks: backward all-reduces its gradient, which needs every
            rank. Without validation, such a difference hangs that all-reduce until the group's
            timeout.
        RuntimeError: on a second backward through a gradient taken with ``create_graph=True``,
            as :func:`vocab_parallel_cross_entropy` (no ``torch.func`` transforms either).

    >>> import os, tempfile, torch, torch.distributed as dist
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    >>> x = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    >>> vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 2]))
    tensor(0.4813, dtype=torch.float64)
    >>> torch.nn.functional.cross_entropy(x @ w.T, torch.tensor([0, 2]))
    tensor(0.4813, dtype=torch.float64)
    >>> dist.destroy_process_group()
    """
    fn = "vocab_parallel_linear_cross_entropy"
    group = _group_of(group, fn)
    problems: list[tuple[type, str]] = []
    validated = _validation(validate, problems, input, local_weight, target)
    ignore_index, label_smoothing, z_loss, softcap = _check_options(
        ignore_index, reduction, label_smoothing, z_loss, softcap, problems
    )
    fields = _base_fields(ignore_index, reduction, label_smoothing, z_loss, softcap, problems)
    summary = None
    ok = _check_tensor(input, "input", problems, floating=True)
    ok = _check_tensor(local_weight, "local_weight", problems, floating=True) and ok
    ok = _check_tensor(target, "target", problems, floating=False) and ok
    if local_bias is not None:
        ok = _check_tensor(local_bias, "local_bias", problems, floating=True) and ok
    if ok:
        _check_linear_shapes(input, local_weight, target, local_bias, problems)
    if ok and not problems:
        fields["vocab"] = local_weight.shape[0]
        fields["rows"] = target.numel()
        fields["target_ndim"] = target.ndim
        fields["target_shape"] = _shape_key(target.shape)
        fields["features"] = input.shape[-1]
        fields["dtype"] = _FLOAT_DTYPES.index(input.dtype)
        fields["has_bias"] = int(local_bias is not None)
        # what ctx.needs_input_grad[0] will be: backward all-reduces x's gradient exactly then
        fields["input_grad"] = int(torch.is_grad_enabled() and input.requires_grad)
        if validated:
            summary = _target_summary(target, ignore_index)
    _finish_fields(fields, problems)
    plan = _make_plan(
        fn,
        group,
        validated=validated,
        device=_device_of(group, input, local_weight, target),
        problems=problems,
        fields=fields,
        summary=summary,
        target=target,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    rows = fields["rows"]
    x2d = input.reshape(rows, input.shape[-1])
    flat_target = target.reshape(rows).to(torch.int64)
    return _VocabParallelLinearCrossEntropy.apply(x2d, local_weight, local_bias, flat_target, plan)


def _check_linear_shapes(input, local_weight, target, local_bias, problems) -> None:
    if input.ndim == 0:
        problems.append((ValueError, "input must have a feature dimension [..., D], got a 0-d tensor"))
        return
    features = input.shape[-1]
    if tuple(input.shape[:-1]) != tuple(target.shape):
        problems.append(
            (
                ValueError,
                f"target must have the leading shape of input {tuple(input.shape[:-1])}, got {tuple(target.shape)}",
            )
        )
    if local_weight.ndim != 2 or local_weight.shape[1] != features:
        problems.append(
            (
                ValueError,
                f"local_weight must have shape (V_r, D) with D = input.shape[-1] = {features}, "
                f"got {tuple(local_weight.shape)}",
            )
        )
    elif local_bias is not None and tuple(local_bias.shape) != (local_weight.shape[0],):
        problems.append(
            (
                ValueError,
                f"local_bias must have shape (V_r,) = ({local_weight.shape[0]},) to match "
                f"local_weight, got {tuple(local_bias.shape)}",
            )
        )
    tensors = {"input": input, "local_weight": local_weight, "target": target}
    if local_bias is not None:
        tensors["local_bias"] = local_bias
    devices = {name: value.device for name, value in tensors.items()}
    if len(set(devices.values())) > 1:
        problems.append((ValueError, f"all tensors must be on one device, got {devices}"))
    dtypes = {name: value.dtype for name, value in tensors.items() if name != "target"}
    if len(set(dtypes.values())) > 1:
        problems.append((TypeError, f"input, local_weight and local_bias must share a dtype, got {dtypes}"))
