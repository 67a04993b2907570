"""Partition arithmetic (pure): offsets from slice sizes, and the near-even split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crossent.distributed import split_vocab, vocab_offsets


@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=64))
def test_offsets_are_the_exclusive_prefix_sums(sizes):
    offsets, total = vocab_offsets(sizes)
    assert offsets == [0, *itertools.accumulate(sizes)][:-1]
    assert total == sum(sizes)
    # the slices tile [0, V) in rank order: every class has exactly one owner
    owners = np.repeat(np.arange(len(sizes)), sizes)
    for rank, (start, size) in enumerate(zip(offsets, sizes, strict=True)):
        assert (owners[start : start + size] == rank).all()


def test_offsets_accept_integer_scalars_of_numpy_and_torch():
    torch = pytest.importorskip("torch")
    assert vocab_offsets([np.int64(3), torch.tensor(2)]) == ([0, 3], 5)


@pytest.mark.parametrize(
    ("sizes", "error", "match"),
    [
        ([], ValueError, "at least one rank"),
        ([3, -1], ValueError, r"sizes\[1\] must be an integer >= 0, got -1"),
        ([3, 2.5], TypeError, r"sizes\[1\] must be an integer >= 0, got float"),
        ([True, 2], TypeError, r"sizes\[0\] must be an integer >= 0, got the bool"),
    ],
)
def test_offsets_reject_bad_sizes(sizes, error, match):
    with pytest.raises(error, match=match):
        vocab_offsets(sizes)


@given(st.integers(min_value=0, max_value=10**7), st.integers(min_value=1, max_value=300))
def test_split_is_near_even_contiguous_and_complete(vocab, world):
    sizes = split_vocab(vocab, world)
    assert len(sizes) == world and sum(sizes) == vocab
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger slices come first


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((10, 0), ValueError, "world_size must be an integer >= 1, got 0"),
        # every world_size message states the real minimum, 1 (the negative and non-integer ones said >= 0)
        ((10, -1), ValueError, "world_size must be an integer >= 1, got -1"),
        ((10, 2.0), TypeError, "world_size must be an integer >= 1, got float"),
        ((10, True), TypeError, "world_size must be an integer >= 1, got the bool True"),
        ((-1, 2), ValueError, "vocab_size must be an integer >= 0, got -1"),
        ((10.0, 2), TypeError, "vocab_size must be an integer >= 0, got float"),
    ],
)
def test_split_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        split_vocab(*args)
