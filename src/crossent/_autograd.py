"""``first_order_only``: ``@once_differentiable`` that also refuses ``create_graph=True``.

The fused paths' backward passes (numba kernels, chunked formulas, Triton kernels) compute the
gradient from saved tensors outside autograd, so that gradient has no graph of its own.
``torch.autograd.function.once_differentiable`` raises on a double backward only when the
upstream gradient requires grad; with ``torch.autograd.grad(loss, x, create_graph=True)`` it does
not (the upstream gradient is a constant 1), and a gradient penalty or Hessian-vector product
then silently drops the loss's Hessian. Here any backward run with ``create_graph=True`` (grad mode
on inside backward) returns gradients whose own backward raises a ``RuntimeError`` that says why
and what to use instead. The error node hangs off the tensors the Function saved (its inputs,
where it saves them), so ``torch.autograd.grad(gradient, inputs)`` reaches it too; where nothing
differentiable is saved (the linear loss's precomputed gradients, the Triton CE kernel's), only a
backward through the gradient itself meets it, and ``torch.autograd.grad`` reports the inputs as
unused, as torch's ``once_differentiable`` does.
"""

from __future__ import annotations

import functools

import torch

#: What gives second-order gradients in crossent.torch, for the error a double backward raises.
USE_REFERENCE = "use impl='reference' for gradient penalties, Hessian-vector products and the like"


class _SecondOrderError(torch.autograd.Function):
    """Identity on a gradient, whose backward raises ``message``. ``anchors``: the tensors the
    loss was computed from (those its Function saved), so that the error is on the path from the
    gradient to them and ``torch.autograd.grad(gradient, inputs)`` reaches it."""

    @staticmethod
    def forward(ctx, message: str, grad: torch.Tensor, *anchors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.message = message
        return grad.detach()  # shares the memory, not an autograd view (in-place accumulation works)

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):  # type: ignore[override]
        raise RuntimeError(ctx.message)


def _anchors(ctx) -> list[torch.Tensor]:
    """The saved tensors that require grad (the loss's differentiable inputs, where saved)."""
    try:
        saved = ctx.saved_tensors
    except RuntimeError:  # already freed
        return []
    return [t for t in saved if isinstance(t, torch.Tensor) and t.requires_grad]


def first_order_only(what: str, instead: str):
    """Decorate an ``autograd.Function.backward`` that is not itself differentiable.

    ``what`` names the loss path in the error, ``instead`` says what gives second-order
    gradients.
    """
    message = (
        f"{what} cannot be differentiated twice: its backward computes the gradient outside "
        f"autograd, so the gradient of a create_graph=True backward has no graph; {instead}"
    )

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            create_graph = torch.is_grad_enabled()  # the engine sets grad mode to create_graph
            anchors = _anchors(ctx) if create_graph else []
            if create_graph and len(anchors) < sum(map(bool, ctx.needs_input_grad)):
                # Some differentiable input is not saved (a gradient computed in the forward, the
                # logits of the Triton kernel, which saving would keep alive): the error node could
                # not reach it, and torch.autograd.grad(penalty, [that input, ...]) would silently
                # drop the loss's curvature. create_graph=True asks for that curvature: refuse now.
                raise RuntimeError(message)
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not create_graph:
                return grads
            single = not isinstance(grads, tuple)
            wrapped = tuple(
                _SecondOrderError.apply(message, g.detach().requires_grad_(), *anchors)
                if isinstance(g, torch.Tensor) and g.is_floating_point()
                else g
                for g in ((grads,) if single else grads)
            )
            return wrapped[0] if single else wrapped

        return wrapper

    return decorate
