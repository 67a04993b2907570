"""``chunk_size`` of crossent.torch.linear_cross_entropy: used by impl="chunked" (and by "auto"
where it picks "chunked"), refused with a ValueError by an explicit impl="triton" or "reference"
(which have no row blocks), ignored by "auto" where it picks another implementation, as
``memory_budget`` is. Values against PyTorch 2.13's F.linear_cross_entropy (the oracle)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent.torch as cet
import crossent.torch.functional as cet_functional


def _case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(23, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 11, (23,), generator=gen)
    y[::4] = -100
    return h, w, y


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1 << 20])
def test_explicit_impl_without_row_blocks_refuses_chunk_size(impl, chunk_size):
    h, w, y = _case()
    with pytest.raises(ValueError, match=(
        rf"^chunk_size applies to impl='chunked' \(rows per block\), got chunk_size={chunk_size} "
        rf"with impl='{impl}'$"
    )):
        cet.linear_cross_entropy(h, w, y, impl=impl, chunk_size=chunk_size)
    head = cet.LinearCrossEntropyLoss(6, 11, impl=impl, chunk_size=chunk_size, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_size applies to impl='chunked'"):
        head(h, y)


def test_refused_chunk_size_is_still_type_checked_first():
    h, w, y = _case()
    with pytest.raises(ValueError, match=r"^chunk_size must be None or an int >= 1, got 0$"):
        cet.linear_cross_entropy(h, w, y, impl="reference", chunk_size=0)


@pytest.fixture
def block_rows(monkeypatch):
    """The rows per block the chunked path was given, per call."""
    seen = []
    real = cet_functional.rows_per_block

    def spy(num_rows, num_classes, chunk_size, device=None):
        rows = real(num_rows, num_classes, chunk_size, device)
        seen.append(rows)
        return rows

    monkeypatch.setattr(cet_functional, "rows_per_block", spy)
    return seen


@pytest.mark.parametrize("impl", ["auto", "chunked"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_chunked_and_auto_on_the_cpu_use_chunk_size(block_rows, impl, reduction):
    h, w, y = _case(1)
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    ht, wt = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = cet.linear_cross_entropy(hx, wx, y, impl=impl, chunk_size=5, reduction=reduction)
    assert block_rows == [5]
    theirs = F.linear_cross_entropy(ht, wt, y, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    g = torch.ones_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (hx, wx), g), torch.autograd.grad(theirs, (ht, wt), g),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_auto_ignores_chunk_size_where_it_picks_reference(block_rows):
    """Probability targets that require grad: "auto" takes "reference" (the one implementation
    that differentiates them) and ignores chunk_size, as it ignores memory_budget there."""
    h, w, _ = _case(2)
    t = torch.softmax(torch.randn(23, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 1)
    t_ours, t_theirs = t.clone().requires_grad_(), t.clone().requires_grad_()
    ours = cet.linear_cross_entropy(h, w, t_ours, impl="auto", chunk_size=3)
    assert block_rows == []  # no chunked call
    theirs = F.linear_cross_entropy(h, w, t_theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, t_ours)
    (g_theirs,) = torch.autograd.grad(theirs, t_theirs)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="chunk_size applies to impl='chunked'.*impl='reference'"):
        cet.linear_cross_entropy(h, w, t_ours, impl="reference", chunk_size=3)


def test_auto_ignores_chunk_size_where_it_picks_triton(monkeypatch):
    """On CUDA "auto" picks "triton" (faked here: the dispatch is what is tested) and does not
    hand it chunk_size, which the kernels have no use for."""
    h, w, y = _case(4)
    calls = []

    def fake_triton(x2d, linear_weight, target2d, **kwargs):
        calls.append(sorted(kwargs))
        return torch.zeros((), dtype=x2d.dtype)

    monkeypatch.setattr(cet_functional, "_resolve_impl", lambda impl, *a: "triton" if impl == "auto" else impl)
    monkeypatch.setattr(cet_functional, "_triton_function", lambda name: fake_triton)
    cet.linear_cross_entropy(h.float(), w.float(), y, impl="auto", chunk_size=7)
    assert calls and "chunk_size" not in calls[0]


# ---- the types chunk_size takes --------------------------------------------------------------
# chunk_size takes an int as the other integer options do (memory_budget, ignore_index) and as
# PyTorch takes integer options: a Python or NumPy integer or a 0-d integer tensor (it refused
# np.int64(8) with "must be None or an int >= 1"); bool, floats and tensors of other shapes or
# dtypes are refused by name. The chunked path gets the Python int.

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture
def given_chunk_sizes(monkeypatch):
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
def test_integer_chunk_sizes_are_accepted_as_python_ints(given_chunk_sizes, impl, chunk_size):
    h, w, y = _case()
    hx, ht = h.clone().requires_grad_(), h.clone().requires_grad_()
    ours = cet.linear_cross_entropy(hx, w, y, impl=impl, chunk_size=chunk_size)
    assert given_chunk_sizes == [8] and type(given_chunk_sizes[0]) is int
    theirs = F.linear_cross_entropy(ht, w, y)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, hx)[0], torch.autograd.grad(theirs, ht)[0], **TOL)
    head = cet.LinearCrossEntropyLoss(6, 11, impl=impl, chunk_size=chunk_size, dtype=torch.float64)
    with torch.no_grad():
        head.linear.weight.copy_(w)
    torch.testing.assert_close(head(h, y), theirs, **TOL)
    assert given_chunk_sizes[-1] == 8 and type(given_chunk_sizes[-1]) is int


BELOW_ONE = [0, -3, np.int64(0), torch.tensor(0)]
NOT_INTS = [True, np.bool_(True), 8.0, np.float64(8.0), torch.tensor(8.0), torch.tensor([8]), torch.tensor(True), "8"]


@pytest.mark.parametrize("impl", ["auto", "chunked", "reference", "triton"])
@pytest.mark.parametrize("chunk_size", BELOW_ONE + NOT_INTS, ids=repr)
def test_other_chunk_sizes_are_refused_by_name(impl, chunk_size):
    """An int below 1 is a ValueError; anything else not an int, a TypeError, as other options
    of the wrong type (review: True was a ValueError saying "an int >= 1, got True")."""
    h, w, y = _case()
    error = ValueError if any(chunk_size is bad for bad in BELOW_ONE) else TypeError
    with pytest.raises(error, match="^chunk_size must be None or an int >= 1, got ") as info:
        cet.linear_cross_entropy(h, w, y, impl=impl, chunk_size=chunk_size)
    assert type(info.value) is error and str(info.value).endswith(repr(chunk_size))
    with pytest.raises(error, match="^chunk_size must be None or an int >= 1"):
        cet.LinearCrossEntropyLoss(6, 11, impl=impl, chunk_size=chunk_size, dtype=torch.float64)(h, y)


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
    with pytest.raises(TypeError, match=r"^memory_budget must be None or an int >= 0 \(bytes\), got "):
        cet.linear_cross_entropy(h.float(), w.float(), y, impl="triton", memory_budget=torch.tensor(4096.0))
