"""Vocabulary-parallel cross-entropy over ``torch.distributed`` (NCCL on GPUs, gloo on the CPU).

Each rank holds a contiguous slice of the vocabulary, in rank order (uneven slices allowed); the
losses equal the single-process loss and gradients without gathering the logits. The
communication schedule is drawn in :mod:`crossent.distributed.vocab_parallel`; the partition
arithmetic lives in :mod:`crossent.distributed.partition`.
"""

from .partition import split_vocab, vocab_offsets
from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__all__ = [
    "split_vocab",
    "vocab_offsets",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
