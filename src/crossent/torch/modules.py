"""nn.Module wrappers of the functional losses."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as _F

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


def _loss_options_repr(module: nn.Module) -> str:
    """The loss options both modules print in ``extra_repr``."""
    return (
        f"reduction={module.reduction}, ignore_index={module.ignore_index}, "
        f"label_smoothing={module.label_smoothing}, z_loss={module.z_loss}, "
        f"softcap={module.softcap}, impl={module.impl!r}, validate={module.validate}"
    )


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` with z-loss, softcap and ``impl``.

    Same constructor order as PyTorch's (``weight, size_average, ignore_index, reduce,
    reduction, label_smoothing``); the class weight is a buffer named ``weight``. See
    :func:`crossent.torch.cross_entropy` for the formula and the options.

    >>> import torch, crossent.torch as cet
    >>> loss_fn = cet.CrossEntropyLoss(label_smoothing=0.1)
    >>> logits = torch.tensor([[2.0, 0.5, -1.0]])
    >>> bool(torch.isclose(loss_fn(logits, torch.tensor([0])),
    ...      torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, torch.tensor([0]))))
    True
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        impl: str = "auto",
        inplace_backward: bool = False,
        validate: bool | None = None,
    ) -> None:
        super().__init__()
        reduction = _F._legacy_reduction(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.impl = impl
        self.inplace_backward = inplace_backward
        self.validate = validate

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """:func:`crossent.torch.cross_entropy` of ``input`` (logits, classes on dim 1, or dim 0
        for an unbatched ``(C,)``) against ``target`` with this module's options."""
        return _F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            impl=self.impl,
            inplace_backward=self.inplace_backward,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return _loss_options_repr(self) + f", inplace_backward={self.inplace_backward}"


class LinearCrossEntropyLoss(nn.Module):
    """Output projection plus cross-entropy, never holding the logits.

    It owns ``self.linear``, an ``nn.Linear(in_features, num_classes, bias=bias)``, and
    ``forward(input, target)`` returns :func:`crossent.torch.linear_cross_entropy` of ``input``
    through that layer. The class weight is a buffer named ``weight``.

    Compared with ``torch.nn.LinearCrossEntropyLoss`` of PyTorch 2.13 (checked against its
    signature): the same positional ``in_features, num_classes`` and keyword ``bias, device,
    dtype, reduction, weight, ignore_index, label_smoothing``, the same ``state_dict`` keys
    (``linear.weight``, ``linear.bias``, ``weight``); ``ignore_index`` defaults to -100, and
    ``None`` (torch's default) means -100 as in torch. It differs in that:

    - there is no ``out_features=`` (torch's K-dimensional output) and no ``options=``
      (``LinearCrossEntropyOptions``, torch's chunking switch): passing them is a TypeError;
    - it adds ``z_loss``, ``softcap``, ``impl``, ``chunk_size`` (rows per block for
      impl="chunked") and ``validate``; the fused GPU path's ``memory_budget`` is an argument of
      :func:`crossent.torch.linear_cross_entropy` only;
    - ``input`` may have any leading shape ``(*, D)``, e.g. ``(B, T, D)`` (torch 2.13 takes
      ``(D,)`` or ``(N, D)`` only), with a target of shape ``(*)`` or probabilities ``(*, V)``;
    - the documented deviations of :func:`crossent.torch.cross_entropy` apply (a mean over no
      rows is 0; smoothing over the finite logits; float32 loss for bf16/fp16 input);
    - ``torch.func`` transforms (``grad``, ``vmap``, ...) need ``impl="reference"``.

    >>> import torch, crossent.torch as cet
    >>> _ = torch.manual_seed(0)
    >>> head = cet.LinearCrossEntropyLoss(8, 5, bias=True)
    >>> x, y = torch.randn(4, 8), torch.tensor([0, 4, 2, 1])
    >>> plain = torch.nn.functional.cross_entropy(head.linear(x), y)
    >>> bool(torch.allclose(head(x, y), plain))
    True
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        impl: str = "auto",
        chunk_size: int | None = None,
        validate: bool | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.in_features = in_features
        self.num_classes = num_classes
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.impl = impl
        self.chunk_size = chunk_size
        self.validate = validate

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """:func:`crossent.torch.linear_cross_entropy` of hidden states ``input`` ``(*, D)``
        through this module's ``linear`` layer, against ``target`` ``(*)`` (class indices) or
        ``(*, V)`` (probabilities), with this module's options."""
        return _F.linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            impl=self.impl,
            chunk_size=self.chunk_size,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, " + _loss_options_repr(self)
            + f", chunk_size={self.chunk_size}"
        )
