"""Partition arithmetic of a vocabulary split across ranks: pure functions, no communication.

Rank ``r`` of ``W`` ranks holds the contiguous global classes ``[offsets[r], offsets[r] + sizes[r])``,
ranks in order, so

.. math::

    \\mathrm{offsets}_r = \\sum_{q<r} \\mathrm{sizes}_q, \\qquad V = \\sum_q \\mathrm{sizes}_q .

The vocabulary-parallel losses all-gather ``sizes`` from the group and call :func:`vocab_offsets`;
:func:`split_vocab` is the usual near-even split a caller uses to cut a weight matrix.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

__all__ = ["split_vocab", "vocab_offsets"]


def _as_count(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= {minimum}, got the bool {value!r}")
    try:
        count = operator.index(value)  # accepts int, numpy and torch integer scalars
    except TypeError:
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}") from None
    if count < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {count}")
    return count


def vocab_offsets(sizes: Sequence[int], /) -> tuple[list[int], int]:
    """Start of each rank's vocabulary slice and the global vocabulary size.

    ``offsets[r] = sizes[0] + ... + sizes[r - 1]`` and ``V = sizes[0] + ... + sizes[W - 1]``: rank
    ``r`` holds global classes ``offsets[r] <= c < offsets[r] + sizes[r]``. Slices may be uneven and
    may be empty (a rank with no classes).

    Args:
        sizes: the local vocabulary size of every rank, in rank order, ``[W]``; at least one rank.

    Returns:
        ``(offsets, V)``: ``offsets`` is a list of ``W`` ints, ``V`` an int.

    Raises:
        ValueError: ``sizes`` is empty or holds a negative size.
        TypeError: a size is not an integer.

    >>> vocab_offsets([4, 3, 3])
    ([0, 4, 7], 10)
    >>> vocab_offsets([5, 0, 2])
    ([0, 5, 5], 7)
    """
    counts = [_as_count(size, f"sizes[{rank}]") for rank, size in enumerate(sizes)]
    if not counts:
        raise ValueError("sizes must hold the slice size of at least one rank, got an empty sequence")
    offsets = []
    total = 0
    for count in counts:
        offsets.append(total)
        total += count
    return offsets, total


def split_vocab(vocab_size: int, world_size: int, /) -> list[int]:
    """Near-even contiguous split of ``vocab_size`` classes over ``world_size`` ranks.

    The first ``vocab_size % world_size`` ranks get ``ceil(vocab_size / world_size)`` classes, the
    others ``floor(vocab_size / world_size)``; the sizes sum to ``vocab_size``.

    Args:
        vocab_size: ``V >= 0``.
        world_size: ``W >= 1``.

    Returns:
        list of ``W`` slice sizes, in rank order.

    >>> split_vocab(10, 3)
    [4, 3, 3]
    >>> split_vocab(2, 3)
    [1, 1, 0]
    """
    total = _as_count(vocab_size, "vocab_size")
    ranks = _as_count(world_size, "world_size", minimum=1)
    base, extra = divmod(total, ranks)
    return [base + 1 if rank < extra else base for rank in range(ranks)]
