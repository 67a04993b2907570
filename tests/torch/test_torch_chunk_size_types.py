"""``chunk_size`` of crossent.torch.linear_cross_entropy takes an int as the other integer options
do (``memory_budget``, ``ignore_index``) and as PyTorch takes integer options: a Python or NumPy
integer or a 0-d integer tensor (it refused np.int64(8) with "must be None or an int >= 1");
bool, floats and tensors of other shapes or dtypes are refused by name. The chunked path gets
the Python int; values and gradients against PyTorch 2.13's F.linear_cross_entropy."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet
import crossent.torch.functional as cet_functional

TOL = dict(rtol=1e-10, atol=1e-12)


def _case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(19, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 9, (19,), generator=gen)
    y[::5] = -100
    return h, w, y


@pytest.fixture
def block_rows(monkeypatch):
    """The chunk_size the chunked path was given, per call (type and value)."""
    seen = []
    real = cet_functional.rows_per_block

    def spy(num_rows, num_classes, chunk_size, device=None):
        seen.append(chunk_size)
        return real(num_rows, num_classes, chunk_size, device)

    monkeypatch.setattr(cet_functional, "rows_per_block", spy)
    return seen


GOOD = [8, np.int64(8), np.int32(8), np.uint8(8), torch.tensor(8), torch.tensor(8, dtype=torch.int32)]


@pytest.mark.parametrize("impl", ["auto", "chunked"])
@pytest.mark.parametrize("chunk_size", GOOD, ids=repr)
def test_integer_chunk_sizes_are_accepted_as_python_ints(block_rows, impl, chunk_size):
    h, w, y = _case()
    hx, ht = h.clone().requires_grad_(), h.clone().requires_grad_()
    ours = cet.linear_cross_entropy(hx, w, y, impl=impl, chunk_size=chunk_size)
    assert block_rows == [8] and type(block_rows[0]) is int
    theirs = F.linear_cross_entropy(ht, w, y)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, hx)[0], torch.autograd.grad(theirs, ht)[0], **TOL)
    head = cet.LinearCrossEntropyLoss(6, 9, impl=impl, chunk_size=chunk_size, dtype=torch.float64)
    with torch.no_grad():
        head.linear.weight.copy_(w)
    torch.testing.assert_close(head(h, y), theirs, **TOL)
    assert block_rows[-1] == 8 and type(block_rows[-1]) is int


BAD = [0, -3, np.int64(0), torch.tensor(0), True, np.bool_(True), 8.0, np.float64(8.0), torch.tensor(8.0),
       torch.tensor([8]), torch.tensor(True), "8"]


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference", "triton"])
@pytest.mark.parametrize("chunk_size", BAD, ids=repr)
def test_other_chunk_sizes_are_refused_by_name(impl, chunk_size):
    h, w, y = _case()
    with pytest.raises(ValueError, match="^chunk_size must be None or an int >= 1, got ") as info:
        cet.linear_cross_entropy(h, w, y, impl=impl, chunk_size=chunk_size)
    assert str(info.value).endswith(repr(chunk_size))
    with pytest.raises(ValueError, match="^chunk_size must be None or an int >= 1"):
        cet.LinearCrossEntropyLoss(6, 9, impl=impl, chunk_size=chunk_size, dtype=torch.float64)(h, y)


@pytest.mark.parametrize("chunk_size", [np.int64(8), torch.tensor(8)], ids=repr)
def test_refusal_by_an_impl_without_row_blocks_names_the_int(chunk_size):
    h, w, y = _case()
    with pytest.raises(ValueError, match=r"^chunk_size applies to impl='chunked' \(rows per block\), got "
                                         r"chunk_size=8 with impl='reference'$"):
        cet.linear_cross_entropy(h, w, y, impl="reference", chunk_size=chunk_size)


class _FakeTriton:
    """Stands in for crossent.triton: records the memory_budget it is given."""

    def __init__(self):
        self.budgets = []

    def linear_cross_entropy(self, x, w, t, **kw):
        self.budgets.append(kw["memory_budget"])
        return (x @ w.T).logsumexp(-1).sum()


@pytest.mark.parametrize("budget", [4096, np.int64(4096), torch.tensor(4096)], ids=repr)
def test_memory_budget_takes_the_same_integers(monkeypatch, budget):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake = _FakeTriton()
    monkeypatch.setitem(sys.modules, "crossent.triton", fake)
    h, w, y = _case()
    cet.linear_cross_entropy(h.float(), w.float(), y, impl="triton", memory_budget=budget)
    assert fake.budgets == [4096] and type(fake.budgets[0]) is int
    with pytest.raises(ValueError, match=r"^memory_budget must be None or an int >= 0 \(bytes\), got "):
        cet.linear_cross_entropy(h.float(), w.float(), y, impl="triton", memory_budget=torch.tensor(4096.0))
