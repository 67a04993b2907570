"""PyTorch layer of crossent: drop-in losses with autograd and a fused linear cross-entropy.

>>> import torch, crossent.torch as cet
>>> logits = torch.tensor([[0.1, 0.8, 0.1]]).log()     # predicted probabilities
>>> round(cet.cross_entropy(logits, torch.tensor([1])).item(), 4)   # -ln 0.8
0.2231
"""

from .functional import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    kl_div,
    linear_cross_entropy,
)
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "kl_div",
    "linear_cross_entropy",
]
