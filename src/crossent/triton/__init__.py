"""Triton GPU kernels for cross-entropy (layer 4 of 4: the functional entry points).

Imported lazily by ``crossent.torch`` for ``impl="triton"``; depends only on torch, triton and
``crossent._autograd`` (torch only).
On CPU tensors the kernels run through Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before triton was imported (that is how the test suite runs them without a GPU).
"""

from __future__ import annotations

import numbers

import torch

from ._functions import CrossEntropyFunction, LinearCrossEntropyFunction
from ._launchers import python_scalars as _python_scalars

# Private: the local math of crossent.distributed.vocab_parallel_cross_entropy (its collectives
# stay there); see _partials.
from ._partials import vocab_parallel_grad as _vocab_parallel_grad  # noqa: F401
from ._partials import vocab_parallel_partials as _vocab_parallel_partials  # noqa: F401

__all__ = ["cross_entropy", "linear_cross_entropy"]


def _refuse_weight_grad(weight):
    """The kernels treat class weights as constants: refuse one that wants a gradient rather
    than leave its ``.grad`` silently unset (crossent.torch's impl="reference" differentiates it)."""
    if isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "crossent.triton does not differentiate class weights, and weight requires grad; pass "
            "weight.detach(), or use crossent.torch's impl='reference'"
        )


def cross_entropy(
    logits,
    target,
    /,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    inplace_backward=False,
):
    r"""Cross-entropy of integer targets on materialized logits, with a fused gradient.

    For row :math:`i` with target :math:`t`, :math:`x = c \tanh(\mathrm{logits}/c)` when
    ``softcap=c`` (else the logits), :math:`\ell = \log\sum_j e^{x_j}`, class weights :math:`w`
    and the :math:`K` classes whose :math:`x_j` is finite:

    .. math::
        L_i = (1-\varepsilon) w_t (\ell - x_t)
              + \frac{\varepsilon}{K} \sum_{j: x_j > -\infty} w_j (\ell - x_j)
              + z\,\ell^2

    ``"mean"`` divides the first two terms by :math:`\sum_i w_{t_i}` and the z-loss term by the
    number of non-ignored rows (a zero denominator gives 0); ``"sum"`` adds; ``"none"`` returns
    :math:`L_i` (0 on ignored rows). The forward kernel writes the gradient too (online softmax,
    arXiv:1805.02867), so backward only scales it; ``inplace_backward=True`` writes it into
    ``logits`` itself (their values are destroyed), saving an (M, C) buffer. An ignored row's
    loss and gradient are 0 whatever its logits and its upstream gradient (NaN and inf included).

    Args:
        logits: (M, C) float32, bfloat16 or float16 on CUDA (classes last, unit column stride
            preferred; other layouts are copied).
        target: (M,) integer class indices in [0, C) or ``ignore_index``.
        weight: optional (C,) class weights.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in ``crossent.torch``.
        inplace_backward: write the gradient into ``logits`` (opt-in).

    Returns:
        float32 loss: a scalar, or (M,) for ``reduction="none"``.

    First-order autograd only: the logits are not kept for backward (the gradient is computed in
    the forward), so a backward with ``create_graph=True`` raises a RuntimeError itself, at the
    first backward (``crossent.torch``'s impl="chunked" raises only at a second backward through
    the gradient). ``torch.func`` transforms are not supported either (use ``crossent.torch``'s
    impl="reference" for both). With ``inplace_backward=True`` the
    logits' autograd version is bumped, so an op that saved them for its backward raises
    autograd's in-place error.

    Example (the textbook case: true class 2 of 3, predictions [0.1, 0.8, 0.1] and [0.7, 0.2, 0.1]):

    >>> import torch
    >>> from crossent.triton import cross_entropy
    >>> logits = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]).log()
    >>> cross_entropy(logits, torch.tensor([1, 1]), reduction="none").round(decimals=4)
    tensor([0.2231, 1.6094])
    """
    label_smoothing, z_loss, softcap, ignore_index = _python_scalars(label_smoothing, z_loss, softcap, ignore_index)
    _refuse_weight_grad(weight)
    return CrossEntropyFunction.apply(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        inplace_backward, torch.is_grad_enabled(),
    )


def linear_cross_entropy(
    input,  # noqa: A002 - torch.nn.functional.linear_cross_entropy's name
    linear_weight,
    target,
    /,
    *,
    linear_bias=None,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    memory_budget=None,
):
    r"""``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the logits.

    Same loss as :func:`cross_entropy` on :math:`X = E W^\top + b`, where :math:`E` is ``input``
    (``(..., D)``) and :math:`W` is ``linear_weight`` ``(V, D)``. The forward keeps only per-row
    statistics (max, sum-exp, target logit, smoothing sums) of the logits; the backward
    recomputes them, forms :math:`G = \partial L/\partial X` and accumulates
    :math:`\partial L/\partial E = G W` in float32 and :math:`\partial L/\partial W = G^\top E`.
    Both go vocabulary chunk by chunk, in a fixed order (deterministic, no atomics).
    By default (``LinearTiles.products=1``) every product is a cuBLAS call on a chunk of logits
    held in the workspace, rounded to the input dtype as eager PyTorch's logits are, with Triton
    kernels for the statistics and for G in between. The products take only the non-ignored
    rows, except the forward's first ``FORWARD_CHUNKS_BEFORE_COUNT`` (4) chunks: their number
    reaches the host without a sync that drains the GPU. The forward queues its copy into pinned
    memory behind an event, queues those chunks over every row, then waits on that event, which
    the GPU passes before them, so it still has them to run (``_launchers.HostCount``; under
    CUDA graph capture there is no wait and every row goes through, ignored ones with G = 0).
    Other schedules, set by ``products=`` in ``CROSSENT_TRITON_LINEAR_TILES`` (see
    ``_launchers.LinearTiles``): 2 keeps that backward after the fused Triton forward, whose
    logits tiles never leave registers and which skips the ignored rows on the device; 3 also
    recomputes the backward's logits in the Triton gradient-tile kernel before cuBLAS dE and dW;
    0 runs every product as a Triton kernel (``tl.dot``), logits in float32 registers, ignored
    rows skipped on the device: 1.21x / 1.28x the default's time on an H100 before the default
    skipped ignored rows (bf16, 8192 x 2304 x 256000 / 8192 x 4096 x 128256).

    Memory: by default ("lean") nothing of size M x V is held beyond a workspace of at most
    ``LEAN_WORKSPACE_BYTES`` (56 MiB) plus a float32 (M, D) accumulator: the forward's chunks
    take the accumulator's bytes too (it does not exist yet), and the backward's first chunks
    live in the part of the dW output not written yet (``LinearTiles.wide_forward``,
    ``scratch_dw``; ``_launchers.lean_backward_chunks``). ``memory_budget``
    (bytes, "fast") trades memory for speed. With a "mean" or "sum" reduction and room for at
    least ``ROW_SCHEDULE_MIN_ROWS`` (256) rows of logits, the row schedule runs: the forward
    computes, a chunk of rows at a time, the logits with cuBLAS, their gradient in place with the
    CE kernel, and both gradient products with cuBLAS (three products in all, none recomputed;
    backward only scales; dW is summed over the chunks in the weights' dtype, one rounding per
    chunk). With more than one chunk of rows the non-ignored rows go first (gathered: N x D
    elements beyond the budget) and, once the first chunk is queued, the host waits for their
    count as the lean backward does, so that the chunks stop at the last of them. Otherwise
    (``"none"``, smaller budgets) the forward keeps the logits' gradient of as many vocabulary
    columns as fit, which are then not recomputed, and its Triton kernels skip the ignored rows
    on the device. ``CROSSENT_TRITON_LINEAR_HOST_COUNT=0`` turns the waits off: ignored rows then
    go through the cuBLAS products with G = 0 (their input rows zeroed in a copy). On every path
    an ignored row contributes 0 whatever its input and its upstream gradient (NaN and inf
    included): dW and db are those of the other rows, dE is 0 on it.

    Args:
        input: (..., D) float32, bfloat16 or float16.
        linear_weight: (V, D), dtype of ``input``.
        target: (...) integer class indices (shape of ``input`` without its last axis).
        linear_bias: optional (V,).
        weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`cross_entropy`.
        memory_budget: None ("lean") or bytes of workspace allowed ("fast").

    Returns:
        float32 loss: a scalar, or the shape of ``target`` for ``reduction="none"``.

    First-order autograd only. By default, and with a ``memory_budget`` that keeps vocabulary
    columns, the inputs are kept for backward: a ``create_graph=True`` backward returns the
    gradients, and a second backward through them raises a RuntimeError. On the row schedule the
    gradients are computed in the forward and no input is kept: the ``create_graph=True``
    backward itself raises. ``torch.func`` transforms are not supported (use ``crossent.torch``'s
    impl="reference" for second-order gradients and transforms).

    Example (class 1 of 3 scored by an identity head):

    >>> import torch
    >>> from crossent.triton import linear_cross_entropy
    >>> x = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]).log()
    >>> linear_cross_entropy(x, torch.eye(3), torch.tensor([1, 1]), reduction="none").round(decimals=4)
    tensor([0.2231, 1.6094])
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.ndim < 1 or tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target must have the shape of input without its last axis "
            f"{tuple(input.shape[:-1])}, got {tuple(target.shape)}"
        )
    flat_input = input.reshape(-1, input.shape[-1]) if input.ndim != 2 else input
    label_smoothing, z_loss, softcap, ignore_index = _python_scalars(label_smoothing, z_loss, softcap, ignore_index)
    _refuse_weight_grad(weight)
    if isinstance(memory_budget, numbers.Integral) and not isinstance(memory_budget, bool):
        memory_budget = int(memory_budget)  # NumPy integers too
    loss = LinearCrossEntropyFunction.apply(
        flat_input, linear_weight, target.reshape(-1), linear_bias, weight, ignore_index,
        reduction, label_smoothing, z_loss, softcap, memory_budget, torch.is_grad_enabled(),
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss
