"""``first_order_only``: ``@once_differentiable`` that also refuses ``create_graph=True``.

The fused paths' backward passes (numba kernels, chunked formulas, Triton kernels) compute the
gradient from saved tensors outside autograd, so that gradient has no graph of its own.
``torch.autograd.function.once_differentiable`` raises on a double backward only when the
upstream gradient requires grad; with ``torch.autograd.grad(loss, x, create_graph=True)`` it does
not (the upstream gradient is a constant 1), and a gradient penalty or Hessian-vector product
then silently drops the loss's Hessian. ``first_order_only`` never returns such a gradient. A
backward run with ``create_graph=True`` (grad mode on inside backward) either

- raises a ``RuntimeError`` itself, at that backward, when some input that needs a gradient is
  not among the Function's saved tensors (a gradient computed in the forward: the chunked linear
  loss with a "mean" or "sum" reduction, the Triton CE kernel, whose logits are not kept, the
  Triton linear row schedule): an error node could not reach that input, and
  ``torch.autograd.grad(penalty, [that input])`` would silently give no curvature; or
- otherwise (every differentiable input saved) returns the gradients through an identity node
  whose backward raises the ``RuntimeError``, hung off those saved inputs, so that a backward
  through the gradient, ``torch.autograd.grad(gradient, inputs)`` included, meets the error
  instead of reporting the inputs as unused.

Either error says why and what gives second-order gradients instead (``instead``; in
crossent.torch: impl="reference"). A backward without ``create_graph`` runs the wrapped
backward under ``torch.no_grad()`` and returns its gradients unchanged.
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
