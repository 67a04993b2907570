"""autograd.Functions (layer 3 of 4) over the launchers in ``_launchers``."""

from __future__ import annotations

import functools

import torch

from . import _launchers as L

# What gives second-order gradients, for the error a double backward raises.
_USE_REFERENCE = (
    "use crossent.torch's impl='reference' for gradient penalties, Hessian-vector products and "
    "the like"
)


class _SecondOrderError(torch.autograd.Function):
    """Identity on a gradient, whose backward raises ``message``; ``anchors`` (the Function's
    saved inputs) put it on the path from the gradient to them."""

    @staticmethod
    def forward(ctx, message, grad, *anchors):
        ctx.message = message
        return grad.detach()  # shares the memory, not an autograd view (in-place accumulation works)

    @staticmethod
    def backward(ctx, _grad):
        raise RuntimeError(ctx.message)


def _first_order_only(what):
    """``@once_differentiable`` that also refuses ``create_graph=True``.

    torch's decorator raises on a double backward only when the upstream gradient requires grad;
    ``torch.autograd.grad(loss, x, create_graph=True)`` passes a constant 1, and a gradient
    penalty would silently lose the loss's Hessian. Any backward run with create_graph=True
    (grad mode on inside backward) returns gradients whose own backward raises. (The same helper
    as ``crossent.torch._autograd.first_order_only``, which this layer may not import.)
    """
    message = (
        f"{what} cannot be differentiated twice: its backward computes the gradient in Triton "
        f"kernels, so the gradient of a create_graph=True backward has no graph; {_USE_REFERENCE}"
    )

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            create_graph = torch.is_grad_enabled()  # the engine sets grad mode to create_graph
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not create_graph:
                return grads
            try:
                anchors = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
            except RuntimeError:  # already freed
                anchors = []
            return tuple(
                _SecondOrderError.apply(message, g.detach().requires_grad_(), *anchors)
                if isinstance(g, torch.Tensor) and g.is_floating_point() else g
                for g in grads
            )

        return wrapper

    return decorate


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
        ctx.consumed = False
        ctx.mark_non_differentiable(target)
        return out.loss

    @staticmethod
    @_first_order_only("crossent.triton.cross_entropy")
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError(
                "crossent.triton.cross_entropy scales its stored gradient in place: backward "
                "through the same graph twice (retain_graph=True) is not supported; recompute "
                "the loss, or use impl='chunked'"
            )
        ctx.consumed = True
        grad = L.scale_rows_(ctx.grad, grad_output)
        ctx.grad = None
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
    @_first_order_only("crossent.triton.linear_cross_entropy")
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
            d_inp, d_w, d_b = L.scale_grads_(grads, grad_output)
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
