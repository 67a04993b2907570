"""``chunk_size`` of crossent.torch.linear_cross_entropy: used by impl="chunked" (and by "auto"
where it picks "chunked"), refused with a ValueError by an explicit impl="triton" or "reference"
(which have no row blocks), ignored by "auto" where it picks another implementation, as
``memory_budget`` is. Values against PyTorch 2.13's F.linear_cross_entropy (the oracle)."""

from __future__ import annotations

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
