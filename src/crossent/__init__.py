"""crossent: cross-entropy done properly, from the textbook definition to an LLM's loss head.

``import crossent as ce`` gives the core API (any Array-API array: numpy, torch, jax, cupy).
The PyTorch layer is ``crossent.torch``, the GPU kernels ``crossent.triton``, vocabulary-parallel
losses ``crossent.distributed`` and streaming metrics ``crossent.metrics``; each is imported on
demand, so ``import crossent`` stays light (numpy and array-api-compat only).
"""

from .core import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_and_grad,
    cross_entropy,
    entropy,
    kl_divergence,
    log_loss,
    softmax_cross_entropy,
    softmax_cross_entropy_and_grad,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
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
