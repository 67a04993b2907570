r"""impl="auto" on the CPU: the compiled kernels of :mod:`crossent.cpu` behind autograd.

For float32/float64 CPU logits with class-index targets and no label smoothing, z-loss or
softcap (the common case), ``crossent.torch.cross_entropy`` runs numba kernels on the tensors'
own memory (``Tensor.numpy()`` shares it, nothing is copied):

- forward: :func:`crossent.cpu.lse_and_nll`, one pass over each row (online log-sum-exp in
  float64, the loss ``(m - z_y) + log sum exp(z - m)`` rounded once), then
  :math:`\ell_i = w_{y_i} \mathrm{nll}_i` on the non-ignored rows, summed in float64;
- backward: :func:`crossent.cpu.softmax_minus_onehot` writes
  :math:`s_i (\mathrm{softmax}(z_i) - \mathrm{onehot}(y_i))` in one more pass, with
  :math:`s_i = w_{y_i} g_i` ("none"), :math:`w_{y_i} g` ("sum") or :math:`w_{y_i} g / \sum w`
  ("mean"; 0 when the denominator is 0, the documented deviation). Ignored rows get exact zeros
  whatever their logits, and ``inplace_backward=True`` writes into the logits' memory.

The results equal impl="chunked" (tested to 1e-12 in float64); only the speed differs: two passes
over the logits in all, where the chunked path makes several through temporaries. Anything else
(bf16/fp16, probability targets, smoothing, z-loss, softcap, no numba) takes impl="chunked".
"""

from __future__ import annotations

import torch

from ._reference import safe_divide


def applies(logits2d: torch.Tensor, soft: bool, label_smoothing: float, z_loss: float,
            softcap: float | None) -> bool:  # fmt: skip
    """Whether ``cross_entropy``'s impl="auto" can take this CPU call to the numba kernels."""
    if soft or label_smoothing or z_loss or softcap is not None:
        return False
    if logits2d.device.type != "cpu" or logits2d.dtype not in (torch.float32, torch.float64):
        return False
    if not logits2d.is_contiguous() or logits2d.numel() == 0:
        return False
    try:
        from crossent import cpu
    except ImportError:
        return False
    return cpu.available()


class CpuFastCrossEntropy(torch.autograd.Function):
    """(M, C) logits and (M,) class indices -> the loss, by crossent.cpu's kernels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits, target, weight, ignore_index, reduction, inplace_backward
    ):
        from crossent import cpu

        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target)).to(torch.int64).contiguous()
        _, nll = cpu.lse_and_nll(logits.detach().numpy(), safe.numpy())
        w_row = valid.to(torch.float64)
        if weight is not None:
            w_row = weight.to(torch.float64)[safe] * w_row
        # where, not a product: an ignored row adds 0 even when its logits are NaN or -inf
        per_row = torch.where(valid, torch.from_numpy(nll).to(torch.float64) * w_row, 0.0)
        denominator = w_row.sum()
        if reduction == "none":
            loss = per_row
        elif reduction == "sum":
            loss = per_row.sum()
        else:
            loss = safe_divide(per_row.sum(), denominator)
        ctx.save_for_backward(logits, safe, w_row, denominator)
        ctx.reduction = reduction
        ctx.inplace_backward = inplace_backward
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        from crossent import cpu

        logits, safe, w_row, denominator = ctx.saved_tensors
        g = grad_output.to(torch.float64)
        scale = w_row * g if ctx.reduction != "mean" else w_row * safe_divide(g, denominator)
        x = logits.detach()
        grad = x if ctx.inplace_backward else torch.empty_like(x)
        x_np = x.numpy()
        out = x_np if ctx.inplace_backward else grad.numpy()  # the same array object: in place
        cpu.softmax_minus_onehot(x_np, safe.numpy(), scale.contiguous().numpy(), out)
        # Gradients for (logits, target, weight, ignore_index, reduction, inplace_backward).
        return grad, None, None, None, None, None
