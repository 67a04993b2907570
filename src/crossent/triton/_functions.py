"""autograd.Functions (layer 3 of 4) over the launchers in ``_launchers``."""

from __future__ import annotations

import torch

from .._autograd import first_order_only
from . import _launchers as L

# What gives second-order gradients, for the error a double backward raises.
_USE_REFERENCE = "use crossent.torch's impl='reference' for gradient penalties, Hessian-vector products and the like"


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy on logits; the forward kernel also writes d loss / d logits (upstream 1)."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, inplace_backward, grad_enabled):
        # needs_input_grad ignores torch.no_grad(); grad_enabled is taken outside forward.
        write_grad = bool(grad_enabled and ctx.needs_input_grad[0])
        out = L.cross_entropy_forward(
            logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
            inplace_backward, write_grad,
        )
        if inplace_backward and out.grad is not None and out.grad.data_ptr() == logits.data_ptr():
            # The kernel overwrote the logits with their gradient, behind autograd's back: bump
            # their version so that an op which saved them (exp, sigmoid, ...) raises autograd's
            # in-place error instead of reading the gradient as its output.
            torch.autograd.graph.increment_version(logits)
        ctx.grad = out.grad
        # The checked (int64) targets: backward leaves the ignored rows' zero gradient as it is.
        ctx.target, ctx.ignore_index = out.target, ignore_index
        ctx.consumed = False
        ctx.mark_non_differentiable(target)
        return out.loss

    @staticmethod
    @first_order_only("crossent.triton.cross_entropy", _USE_REFERENCE)
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError(
                "crossent.triton.cross_entropy scales its stored gradient in place: backward "
                "through the same graph twice (retain_graph=True) is not supported; recompute "
                "the loss, or use impl='chunked'"
            )
        ctx.consumed = True
        grad = L.scale_rows_(ctx.grad, grad_output, ctx.target, ctx.ignore_index)
        ctx.grad = ctx.target = None
        # One entry per forward argument: logits, then target, weight, ignore_index, reduction,
        # label_smoothing, z_loss, softcap, inplace_backward, grad_enabled (none differentiable).
        return grad, None, None, None, None, None, None, None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Fused linear cross-entropy: statistics in forward, gradient tiles recomputed in backward."""

    @staticmethod
    def forward(ctx, inp, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, memory_budget, grad_enabled):
        needs = ctx.needs_input_grad
        wanted = (bool(grad_enabled and needs[0]), bool(grad_enabled and needs[1]),
                  bool(grad_enabled and needs[3] and linear_bias is not None))
        need_grad = any(wanted)
        ctx.mark_non_differentiable(target)
        ctx.rows = None
        args = L.check_linear(
            inp, linear_weight, target, linear_bias, weight, ignore_index, reduction,
            label_smoothing, z_loss, softcap, memory_budget,
        )
        rows = L.plan_rows(inp.shape[0], linear_weight.shape[0], inp.dtype, memory_budget, reduction, need_grad)
        if rows:
            # "fast" row schedule: the gradients are computed now; backward only scales them.
            out = L.linear_rows_forward(*args, ignore_index, reduction, label_smoothing, z_loss, softcap,
                                        rows, wanted)
            ctx.rows = out
            return out.loss
        fwd = L.linear_forward(*args, ignore_index, reduction, label_smoothing, z_loss, softcap,
                               memory_budget, need_grad)
        # Saved as the kernels read them (unit stride along D), with autograd's version checks.
        ctx.save_for_backward(*fwd.operands)
        fwd.operands = None
        ctx.fwd = fwd
        ctx.options = (label_smoothing, softcap)
        return fwd.loss

    @staticmethod
    @first_order_only("crossent.triton.linear_cross_entropy", _USE_REFERENCE)
    def backward(ctx, grad_output):
        if ctx.rows is not None:
            if ctx.rows.grads is None:
                raise RuntimeError(
                    "crossent.triton.linear_cross_entropy (memory_budget, row schedule) scales its "
                    "stored gradients in place: backward through the same graph twice "
                    "(retain_graph=True) is not supported; recompute the loss"
                )
            # Handed on without another reference kept here, so autograd can take them as they are.
            grads, ctx.rows.grads = ctx.rows.grads, None
            d_inp, d_w, d_b = L.scale_grads_(grads, grad_output, ctx.rows.target, ctx.rows.ignore_index,
                                           ctx.rows.any_kept)
            return d_inp, d_w, None, d_b, None, None, None, None, None, None, None, None
        inp, linear_weight, linear_bias = ctx.saved_tensors
        label_smoothing, softcap = ctx.options
        needs = ctx.needs_input_grad
        d_inp, d_w, d_b = L.linear_backward(
            ctx.fwd, grad_output, inp, linear_weight, linear_bias, label_smoothing, softcap,
            bool(needs[0]), bool(needs[1]), bool(needs[3]) and linear_bias is not None,
        )
        # One entry per forward argument: input, linear_weight, target, linear_bias, then
        # weight, ignore_index, reduction, label_smoothing, z_loss, softcap, memory_budget,
        # grad_enabled (class weights are treated as constants, as the other crossent paths do).
        return d_inp, d_w, None, d_b, None, None, None, None, None, None, None, None
