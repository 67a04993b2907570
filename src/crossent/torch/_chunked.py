"""impl="chunked": pure-PyTorch cross-entropy that works on the logits block by block.

The rows are processed in blocks of ``rows_per_block`` rows (default: blocks of N * V / 16 logits,
clamped to [2**16, DEFAULT_BLOCK_ELEMENTS = 4 Mi elements = 16 MiB in float32], 32 Mi on GPUs where
launch overhead dominates small blocks), so the float32 temporaries stay a few blocks whatever N
is. For the fused linear cross-entropy the logits block ``E_b @ W.T + b`` is computed, consumed
and dropped: the N x V logits never exist.

Per row i with (softcapped) logits z, lse = logsumexp(z), p = softmax(z), class weights w
(all ones when absent), smoothing eps and K = number of finite logits in the row:

    integer target y:  loss_i = (1 - eps) w_y (lse - z_y) + eps / K * sum_{c finite} w_c (lse - z_c)
    probabilities t:   loss_i = sum_c w_c t'_c (lse - z_c),  t' = (1 - eps) t + eps / K [z_c finite]
    z-loss:            + z_loss * lse^2

and with row coefficients a_i (reduction and upstream gradient) and b_i (the z-loss share):

    d loss / d z_c = a_i (p_c S_i - T_ic) + 2 b_i lse_i p_c,
    S_i = sum_c T_ic,  T_ic = (1 - eps) w_y [c = y] + eps / K w_c [z_c finite]   (or w_c t'_c)

softcap chains with d/dx [s tanh(x/s)] = 1 - (z/s)^2 on the capped z.

Gradients: for "mean"/"sum" the linear version computes dE, dW, db during the forward pass
(their upstream gradient is one scalar, applied in backward), 6NDV flops in all; for "none" it
keeps lse per row and recomputes the logits blocks in backward (8NDV). The logits version saves
lse per row and writes the gradient in backward.

Ignored rows: on the CPU the non-ignored rows are gathered first and the ignored rows cost
nothing (``nonzero`` needs the count on the host, free on the CPU). On other devices that would
be a device-to-host sync, so every row is processed and ignored rows get zero coefficients.

No ``.item()`` or other host syncs run in forward or backward on accelerator tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._autograd import USE_REFERENCE, first_order_only
from ._reference import acc_dtype, safe_divide

DEFAULT_BLOCK_ELEMENTS = 1 << 22
#: The cap on accelerators: each block costs a few dozen kernel launches (~10 us of host time
#: each), so 4 Mi-element blocks left an H100 idle most of the time (8192 x 32000 bf16 fwd+bwd:
#: 31.9 ms against F.cross_entropy's 1.5 ms); 32 Mi elements (128 MiB per float32 temporary)
#: bring that case to 11.2 ms (measured, crossent bench on an H100): still launch-bound, which
#: is why impl="auto" takes the Triton kernels on CUDA; chunked remains the fallback there.
ACCELERATOR_BLOCK_ELEMENTS = 1 << 25
# Gather the non-ignored rows first on the CPU (free there); tests switch it off to run the
# all-rows path that accelerator tensors take.
COMPACT_IGNORED_ROWS_ON_CPU = True


def rows_per_block(num_rows: int, num_classes: int, chunk_size: int | None,
                   device: torch.device | None = None) -> int:  # fmt: skip
    """Rows per block: ``chunk_size`` if given, else blocks of about N * V / 16 logits, at least
    2**16 and at most DEFAULT_BLOCK_ELEMENTS on the CPU (so the float32 temporaries, a few blocks,
    stay a small fraction of the N x V logits and below a few times 16 MiB), or at most
    ACCELERATOR_BLOCK_ELEMENTS on other devices (launch overhead; still at most N * V / 16)."""
    if chunk_size is not None:
        return chunk_size
    cap = DEFAULT_BLOCK_ELEMENTS
    if device is not None and device.type != "cpu":
        cap = max(cap, ACCELERATOR_BLOCK_ELEMENTS)
    elements = min(max((num_rows * num_classes) // 16, 1 << 16), cap)
    return max(1, elements // max(num_classes, 1))


class _Rows:
    """What the loss needs per row before any logit is seen (targets, weights, denominators)."""

    def __init__(
        self,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        num_rows: int,
        dt: torch.dtype,
        device: torch.device,
    ) -> None:
        self.soft = target.is_floating_point()
        if self.soft:
            self.valid = None
            self.valid_f = torch.ones(num_rows, dtype=dt, device=device)
            self.ce_denominator = torch.full((), float(num_rows), dtype=dt, device=device)
            self.n_valid = self.ce_denominator
            self.safe_target = None
            self.w_target = None
            self.rows = None
            return
        valid = target != ignore_index
        self.valid = valid
        self.valid_f = valid.to(dt)
        self.safe_target = torch.where(valid, target, torch.zeros_like(target))
        if weight is None:
            self.w_target = self.valid_f
        else:
            self.w_target = weight.to(dt)[self.safe_target] * self.valid_f
        self.ce_denominator = self.w_target.sum()
        self.n_valid = self.valid_f.sum()
        self.rows = None
        if device.type == "cpu" and COMPACT_IGNORED_ROWS_ON_CPU:
            rows = valid.nonzero().squeeze(1)
            if rows.numel() < num_rows:
                self.rows = rows

    def blocks(self, num_rows: int, step: int):
        """Yield (row selector, row index tensor or None) per block of processed rows."""
        if self.rows is None:
            for start in range(0, num_rows, step):
                yield slice(start, min(start + step, num_rows)), None
        else:
            for start in range(0, self.rows.numel(), step):
                idx = self.rows[start : start + step]
                yield idx, idx

    def coefficients(
        self, reduction: str, z_loss: float, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row coefficients (a, b) of the gradient formula, upstream gradient included.

        Ignored rows get exactly 0, selected rather than multiplied by 0: a NaN or inf upstream
        gradient there (``loss / seq_len`` with ``seq_len = 0`` on a padded sequence) must not
        reach the gradient, as in ``F.cross_entropy``.
        """
        g = grad_output.to(self.valid_f.dtype)
        if reduction == "mean":
            a = safe_divide(g, self.ce_denominator)
            b = safe_divide(z_loss * g, self.n_valid)
        else:
            a, b = g, z_loss * g
        return self.on_valid_rows(a), self.on_valid_rows(b)

    def on_valid_rows(self, c: torch.Tensor) -> torch.Tensor:
        """``c`` (a scalar or one value per row) as one value per row, 0 on the ignored rows."""
        if self.valid is None:
            return self.valid_f * c  # probability targets: no row is ignored
        return torch.where(self.valid, c, torch.zeros((), dtype=c.dtype, device=c.device))


def _rows_with_classes(shape: tuple[int, int]) -> int:
    """The rows to process of logits of ``shape`` (M, C): none when C = 0 (every row's loss, lse
    and gradient stay 0, as in core; a block would reduce over an empty class axis)."""
    return shape[0] if shape[1] else 0


def _take(tensor: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    return tensor[sel] if isinstance(sel, slice) else tensor.index_select(0, sel)


def _put(
    dest: torch.Tensor, sel: slice | torch.Tensor, idx: torch.Tensor | None, block: torch.Tensor
) -> None:
    """Write a block's rows into ``dest`` at the rows ``_Rows.blocks`` yielded (sel, idx) for."""
    if idx is None:
        dest[sel] = block
    else:
        dest.index_copy_(0, idx, block.to(dest.dtype))


def _capped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return z
    return torch.tanh(z / softcap).mul_(softcap)


# Below this many elements torch.softmax's parallel launch costs more than it saves (measured
# 10x slower than the unfused ops on 23 x 7 blocks with 2 busy threads).
_FUSED_SOFTMAX_MIN_ELEMENTS = 1 << 16


def _softmax(z: torch.Tensor) -> torch.Tensor:
    if z.numel() >= _FUSED_SOFTMAX_MIN_ELEMENTS:
        return torch.softmax(z, dim=-1)
    return _softmax_and_lse(z)[0]


def _softmax_and_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last axis and logsumexp per row."""
    if z.numel() >= _FUSED_SOFTMAX_MIN_ELEMENTS:
        # One fused, row-local pass; lse = z_k - log p_k at the row's most likely class k
        # (p_k >= 1/C, so the log is well conditioned) saves a second sweep over the row.
        p = torch.softmax(z, dim=-1)
        p_max, k = p.max(dim=-1, keepdim=True)
        return p, (z.gather(1, k) - p_max.log()).squeeze(1)
    m = z.amax(dim=-1, keepdim=True)
    # Only an all -inf row's max becomes 0; a +inf max stays, so that row's lse, loss and
    # gradient are NaN, as in PyTorch and in the fused branch above (0 gave an inf loss).
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    p = (z - m).exp_()
    s = p.sum(dim=-1, keepdim=True)
    return p.div_(s), (m + s.log()).squeeze(1)


def _block_forward(
    z: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    soft: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lse (r,), cross-entropy per row (r,) without z-loss, and softmax p (r, C)."""
    p, lse = _softmax_and_lse(z)
    if soft:
        t = _soft_target(z, target, weight, eps)
        diff = lse[:, None] - z
        # 0 log 0 = 0 where a zero target meets a -inf logit; a row holding +inf is NaN (its lse
        # is NaN: zero targets too, as in F.cross_entropy), and a NaN logit keeps its NaN.
        ce = torch.where((t == 0) & (z == -math.inf), torch.zeros_like(diff), t * diff).sum(dim=-1)
        return lse, ce, p
    z_y = z.gather(1, target[:, None]).squeeze(1)
    w_y = torch.ones_like(lse) if weight is None else weight[target]
    # eps = 1 gives the target no mass: 0 even on a -inf target logit (0 * inf would be NaN).
    ce = (1.0 - eps) * w_y * (lse - z_y) if eps < 1.0 else torch.zeros_like(lse)
    if eps > 0.0:
        finite = torch.isfinite(z)
        k = finite.sum(dim=-1).to(z.dtype)
        zf = torch.where(finite, z, torch.zeros_like(z))
        if weight is None:
            w_sum, wz = k, zf.sum(dim=-1)
        else:
            w_sum, wz = finite.to(z.dtype) @ weight, zf @ weight
        ce = ce + eps / k * (lse * w_sum - wz)
    return lse, ce, p


def _soft_target(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """w_c t'_c for a block of probability targets, smoothing over finite logits."""
    t = target.to(z.dtype)
    if eps > 0.0:
        finite = torch.isfinite(z)
        k = finite.sum(dim=-1, keepdim=True).to(z.dtype)
        t = (1.0 - eps) * t + finite.to(z.dtype) * (eps / k)
    return t if weight is None else t * weight


def _block_grad(
    p: torch.Tensor,
    z: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    soft: bool,
    a: torch.Tensor,
    b: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    """d loss / d raw logits for one block, written over ``p`` (and ``z`` is consumed)."""
    if soft:
        t = _soft_target(z, target, weight, eps)
        coef = a * t.sum(dim=-1) + 2.0 * b * lse
        grad = p.mul_(coef[:, None]).sub_(a[:, None] * t)
    else:
        w_y = torch.ones_like(lse) if weight is None else weight[target]
        s = (1.0 - eps) * w_y
        if eps > 0.0:
            finite = torch.isfinite(z)
            k = finite.sum(dim=-1).to(z.dtype)
            wf = finite.to(z.dtype) if weight is None else torch.where(finite, weight, 0.0)
            s = s + eps / k * wf.sum(dim=-1)
        grad = p.mul_((a * s + 2.0 * b * lse)[:, None])
        grad.scatter_add_(1, target[:, None], (-(1.0 - eps) * a * w_y)[:, None])
        if eps > 0.0:
            grad.sub_(wf.mul_((a * eps / k)[:, None]))
    if softcap is not None:
        grad.mul_(z.div_(softcap).square_().neg_().add_(1.0))
    return grad


def _zero_ignored_rows(z: torch.Tensor, rows: _Rows, sel: slice | torch.Tensor) -> torch.Tensor:
    """On the all-rows path, a block's ignored rows (of the logits, or of the linear version's
    input) become zeros so NaN/inf there cannot leak into a gradient; the CPU path has gathered
    the non-ignored rows already."""
    if rows.valid is None or rows.rows is not None:
        return z
    keep = _take(rows.valid, sel)
    return torch.where(keep[:, None], z, torch.zeros_like(z))


def _prepare_block(
    raw: torch.Tensor,
    target: torch.Tensor,
    rows: _Rows,
    sel: slice | torch.Tensor,
    dt: torch.dtype,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's logits as the loss sees them (``dt``, softcapped, ignored rows zeroed on the
    all-rows path) and its targets (class indices with ignored ones replaced by 0)."""
    z = _zero_ignored_rows(_capped(raw.to(dt), softcap), rows, sel)
    return z, _take(target if rows.soft else rows.safe_target, sel)


def _reduce(
    ce: torch.Tensor, lse: torch.Tensor, z_loss: float, rows: _Rows, reduction: str
) -> torch.Tensor:
    # z_loss == 0 adds nothing, not 0 * lse^2 (NaN where a row's logits are all -inf).
    zl = z_loss * lse * lse if z_loss > 0.0 else torch.zeros_like(ce)
    if reduction == "none":
        return (ce + zl) * rows.valid_f
    if reduction == "sum":
        return (ce + zl).mul(rows.valid_f).sum()
    return safe_divide((ce * rows.valid_f).sum(), rows.ce_denominator) + safe_divide(
        (zl * rows.valid_f).sum(), rows.n_valid
    )


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of materialized logits (M, C), in row blocks, float32 accumulation."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
        block_rows: int,
        inplace_backward: bool,
    ) -> torch.Tensor:
        num_rows, _ = logits.shape
        dt = acc_dtype(logits.dtype)
        w = None if weight is None else weight.to(dt)
        rows = _Rows(target, weight, ignore_index, num_rows, dt, logits.device)
        lse_all = torch.zeros(num_rows, dtype=dt, device=logits.device)
        ce_all = torch.zeros(num_rows, dtype=dt, device=logits.device)
        for sel, idx in rows.blocks(_rows_with_classes(logits.shape), block_rows):
            z, t = _prepare_block(_take(logits, sel), target, rows, sel, dt, softcap)
            lse, ce, _ = _block_forward(z, t, w, label_smoothing, rows.soft)
            _put(lse_all, sel, idx, lse)
            _put(ce_all, sel, idx, ce)
        ctx.save_for_backward(logits, target, weight, lse_all)
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, block_rows)
        ctx.inplace_backward = inplace_backward
        return _reduce(ce_all, lse_all, z_loss, rows, reduction)

    @staticmethod
    @first_order_only("cross_entropy (impl='chunked' or 'auto')", USE_REFERENCE)
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        logits, target, weight, lse_all = ctx.saved_tensors
        ignore_index, reduction, eps, z_loss, softcap, block_rows = ctx.options
        num_rows, _ = logits.shape
        dt = lse_all.dtype
        w = None if weight is None else weight.to(dt)
        rows = _Rows(target, weight, ignore_index, num_rows, dt, logits.device)
        a_all, b_all = rows.coefficients(reduction, z_loss, grad_output)
        if ctx.inplace_backward:
            grad = logits.detach()
            if rows.rows is not None:
                grad.index_fill_(0, (~rows.valid).nonzero().squeeze(1), 0.0)
        else:
            grad = torch.zeros_like(logits)
        for sel, idx in rows.blocks(_rows_with_classes(logits.shape), block_rows):
            z, t = _prepare_block(_take(logits, sel), target, rows, sel, dt, softcap)
            lse = _take(lse_all, sel)
            p = _softmax(z)
            g = _block_grad(
                p, z, lse, t, w, eps, rows.soft, _take(a_all, sel), _take(b_all, sel), softcap
            )
            _put(grad, sel, idx, g)
        # One gradient per forward argument: logits; then None for target, weight, ignore_index,
        # reduction, label_smoothing, z_loss, softcap, block_rows, inplace_backward.
        return grad, None, None, None, None, None, None, None, None, None


def _matmul_low_precision(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad (r, V) @ weight (V, D) in weight's dtype, returned in grad's dtype.

    For bfloat16/float16 weights, each row of grad is divided by its largest magnitude before the
    cast (values of a mean's gradient can lie below float16's range) and scaled back after the
    matmul; the product itself accumulates in float32 inside the matmul.
    """
    if weight.dtype == grad.dtype:
        return grad @ weight
    scale = grad.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((grad / scale).to(weight.dtype) @ weight).to(grad.dtype).mul_(scale)


def _linear_pass(
    x: torch.Tensor,
    lin_w: torch.Tensor,
    lin_b: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    rows: _Rows,
    options: tuple,
    coefficients: tuple[torch.Tensor, torch.Tensor] | None,
    lse_saved: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
):
    """One sweep over row blocks: losses (forward) and/or gradients (given coefficients)."""
    _, _, eps, _, softcap, block_rows = options
    num_rows = x.shape[0]
    dt = acc_dtype(x.dtype)
    w = None if weight is None else weight.to(dt)
    want_loss = lse_saved is None
    lse_all = torch.zeros(num_rows, dtype=dt, device=x.device) if want_loss else lse_saved
    ce_all = torch.zeros(num_rows, dtype=dt, device=x.device) if want_loss else None
    need_x, need_w, need_b = needs if coefficients is not None else (False, False, False)
    grad_x = torch.zeros(x.shape, dtype=dt, device=x.device) if need_x else None
    grad_w = torch.zeros(lin_w.shape, dtype=dt, device=x.device) if need_w else None
    grad_b = (
        torch.zeros(lin_w.shape[0], dtype=dt, device=x.device)
        if need_b and lin_b is not None
        else None
    )
    for sel, idx in rows.blocks(_rows_with_classes((num_rows, lin_w.shape[0])), block_rows):
        # Ignored rows of the input zeroed (all-rows path): dW = G^T x and db would take
        # 0 * NaN from a NaN hidden state there (a fully masked attention row in the padding).
        xb = _zero_ignored_rows(_take(x, sel), rows, sel)
        z, t = _prepare_block(F.linear(xb, lin_w, lin_b), target, rows, sel, dt, softcap)
        if want_loss:
            lse, ce, p = _block_forward(z, t, w, eps, rows.soft)
            _put(lse_all, sel, idx, lse)
            _put(ce_all, sel, idx, ce)
        else:
            lse = _take(lse_all, sel)
            p = _softmax(z)
        if coefficients is None:
            continue
        a, b = (_take(c, sel) for c in coefficients)
        g = _block_grad(p, z, lse, t, w, eps, rows.soft, a, b, softcap)
        if grad_x is not None:
            _put(grad_x, sel, idx, _matmul_low_precision(g, lin_w))
        if grad_w is not None:
            grad_w.addmm_(g.T, xb.to(dt))
        if grad_b is not None:
            grad_b.add_(g.sum(dim=0))
    return lse_all, ce_all, (grad_x, grad_w, grad_b)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``x @ W.T + b`` for x (M, D), W (V, D), in row blocks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        lin_w: torch.Tensor,
        lin_b: torch.Tensor | None,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
        block_rows: int,
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        num_rows = x.shape[0]
        dt = acc_dtype(x.dtype)
        rows = _Rows(target, weight, ignore_index, num_rows, dt, x.device)
        options = (ignore_index, reduction, label_smoothing, z_loss, softcap, block_rows)
        precompute = reduction != "none" and any(needs)
        coefficients = None
        if precompute:
            coefficients = rows.coefficients(
                reduction, z_loss, torch.ones((), dtype=dt, device=x.device)
            )
        lse, ce, grads = _linear_pass(
            x, lin_w, lin_b, target, weight, rows, options, coefficients, None, needs
        )
        ctx.precompute = precompute
        ctx.options = options
        ctx.needs = needs
        ctx.dtypes = (x.dtype, lin_w.dtype, None if lin_b is None else lin_b.dtype)
        if precompute:
            ctx.save_for_backward(*grads, rows.valid)
        else:
            ctx.save_for_backward(x, lin_w, lin_b, target, weight, lse)
        return _reduce(ce, lse, z_loss, rows, reduction)

    @staticmethod
    @first_order_only("linear_cross_entropy (impl='chunked' or 'auto')", USE_REFERENCE)
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        if ctx.precompute:
            grad_x, grad_w, grad_b, valid = ctx.saved_tensors
            g = grad_output
            if grad_x is not None and valid is not None:
                # Per row, 0 on ignored rows: a NaN or inf upstream scalar leaves their input
                # gradient 0 (as F.cross_entropy does), one pass over dx as the plain product.
                g_x = torch.where(valid, g.to(grad_x.dtype), 0.0)[:, None]
            else:
                g_x = g
            # dW and db sum over the kept rows: with none kept they are 0 whatever the upstream
            # scalar (as F.cross_entropy gives), not 0 * NaN.
            g_w = g if valid is None else torch.where(valid.any(), g, 0.0)
            out = tuple(
                None if gr is None else (gr * s.to(gr.dtype)).to(d)
                for gr, s, d in zip((grad_x, grad_w, grad_b), (g_x, g_w, g_w), ctx.dtypes, strict=True)
            )
        else:
            x, lin_w, lin_b, target, weight, lse = ctx.saved_tensors
            ignore_index, reduction, _, z_loss, _, _ = ctx.options
            rows = _Rows(target, weight, ignore_index, x.shape[0], lse.dtype, x.device)
            coefficients = rows.coefficients(reduction, z_loss, grad_output)
            _, _, grads = _linear_pass(
                x, lin_w, lin_b, target, weight, rows, ctx.options, coefficients, lse, ctx.needs
            )
            out = tuple(
                None if gr is None else gr.to(d) for gr, d in zip(grads, ctx.dtypes, strict=True)
            )
        # Gradients for x, lin_w, lin_b; then None for target, weight, ignore_index, reduction,
        # label_smoothing, z_loss, softcap, block_rows, needs.
        return (*out, None, None, None, None, None, None, None, None, None)
