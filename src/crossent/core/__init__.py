"""The reference layer: cross-entropy and its family in pure Array-API math.

Runs on numpy, torch, jax, cupy and array_api_strict arrays (via ``array_api_compat``); never
imports torch or triton. Every other layer of crossent is tested against this one.
"""

from ._information import cross_entropy, entropy, kl_divergence
from ._probabilities import binary_cross_entropy, log_loss
from ._sigmoid import binary_cross_entropy_with_logits, binary_cross_entropy_with_logits_and_grad
from ._softmax import softmax_cross_entropy, softmax_cross_entropy_and_grad

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_and_grad",
    "cross_entropy",
    "entropy",
    "kl_divergence",
    "log_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_and_grad",
]
