"""impl="reference": the plain composition of torch ops, used as the test oracle.

It materializes everything (log-softmax of the full logits, float32 at least) and lets autograd
differentiate it. Where PyTorch defines a behaviour it agrees with ``F.cross_entropy`` (tested);
the documented deviations of DESIGN.md are written out with ``torch.where``:

- a mean whose denominator is zero is 0 with a zero gradient;
- label smoothing spreads ``eps`` over the K classes whose logit is finite in that row;
- a zero target mass on a -inf logit contributes 0 (0 log 0 = 0), with a zero gradient (a NaN
  logit under a zero target still gives NaN, as in PyTorch);
- an ignored row contributes 0 whatever its logits are, and in the linear version whatever its
  input row is (it is zeroed before the product, so a NaN there leaves dW and db finite).
"""

from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_softcap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(z / softcap) (Gemma 2); identity when softcap is None."""
    if softcap is None:
        return z
    return softcap * torch.tanh(z / softcap)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 (with zero gradient) where the denominator is 0."""
    nonzero = denominator != 0
    safe = torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, numerator / safe, torch.zeros_like(numerator))


def reference_cross_entropy_2d(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> torch.Tensor:
    """Cross-entropy of logits (M, C) against class indices (M,) or probabilities (M, C).

    Returns (M,) for reduction="none", else a scalar; the dtype is float32 (float64 for
    float64 logits).
    """
    dt = acc_dtype(logits.dtype)
    z = logits.to(dt)
    num_rows, num_classes = z.shape
    w = None if weight is None else weight.to(dt)
    eps = label_smoothing
    soft = target.is_floating_point()

    if soft:
        valid = torch.ones(num_rows, dtype=torch.bool, device=z.device)
    else:
        valid = target != ignore_index
        # An ignored row contributes 0 whatever its logits are (NaN and inf included), to the
        # gradient too: masked before the soft cap, whose derivative is NaN at a NaN logit.
        z = torch.where(valid[:, None], z, torch.zeros_like(z))
    z = apply_softcap(z, softcap)
    logp = torch.log_softmax(z, dim=-1)
    # With no class (C = 0) the z-loss reads an lse of 0, as in core (logsumexp gives -inf).
    lse = torch.logsumexp(z, dim=-1) if z.shape[-1] else torch.zeros(num_rows, dtype=dt, device=z.device)
    finite = torch.isfinite(z)
    num_finite = finite.sum(dim=-1, keepdim=True).to(dt)

    if soft:
        t = target.to(dt)
        if eps > 0.0:
            t = (1.0 - eps) * t + eps * finite.to(dt) / num_finite
        wt = t if w is None else t * w
        # 0 log 0 = 0 where a zero target meets a -inf logit (log q = -inf); a +inf logit leaves
        # its row without a softmax (log q NaN: the row is NaN, zero targets too, as in
        # F.cross_entropy), and a NaN logit keeps its NaN (0 * NaN).
        terms = torch.where((wt == 0) & (z == -math.inf), torch.zeros_like(logp), -wt * logp)
        row = terms.sum(dim=-1)
        ce_denominator = torch.full((), float(num_rows), dtype=dt, device=z.device)
    else:
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        if num_classes == 0:
            # No class to gather: every row is ignored, or its target is out of range (NaN, as
            # the Triton kernels give when values are not validated).
            # (logp's empty row sums keep the loss in the graph, with its empty gradient.)
            nll = logp.sum(dim=-1) + float("nan")
            w_target = torch.ones_like(nll)
        else:
            nll = -logp.gather(1, safe_target[:, None]).squeeze(1)
            w_target = torch.ones_like(nll) if w is None else w[safe_target]
        # eps = 1 gives the target no mass: 0 even on a -inf target logit (0 * inf would be NaN).
        row = (1.0 - eps) * w_target * nll if eps < 1.0 else torch.zeros_like(nll)
        if eps > 0.0:
            wc = torch.ones_like(logp) if w is None else w.expand_as(logp)
            smooth = torch.where(finite, -wc * logp, torch.zeros_like(logp)).sum(dim=-1)
            row = row + eps * smooth / num_finite.squeeze(1)
        row = torch.where(valid, row, torch.zeros_like(row))
        ce_denominator = torch.where(valid, w_target, torch.zeros_like(w_target)).sum()

    z_row = torch.zeros_like(row)
    if z_loss > 0.0:
        z_row = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))

    if reduction == "none":
        return row + z_row
    if reduction == "sum":
        return row.sum() + z_row.sum()
    n_valid = valid.sum().to(dt)
    return safe_divide(row.sum(), ce_denominator) + safe_divide(z_row.sum(), n_valid)


def reference_linear_cross_entropy_2d(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None,
    **options: object,
) -> torch.Tensor:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` (plain F.linear, then the above).

    The input rows of ignored targets are zeroed first: their logits are masked anyway, but
    autograd's ``dW = dz^T input`` would multiply their zero ``dz`` by a NaN or inf there.
    """
    if not target.is_floating_point():
        valid = target != options["ignore_index"]
        input = torch.where(valid[:, None], input, torch.zeros((), dtype=input.dtype, device=input.device))
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    return reference_cross_entropy_2d(logits, target, **options)  # type: ignore[arg-type]
