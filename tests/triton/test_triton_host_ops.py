"""What the host does around the CE kernel: which torch ops a call launches besides it.

A synced timing of one call on a GPU includes every small kernel the host launches before the
cross-entropy kernel (each one also costs the host a launch). These tests pin that list, with the
Triton kernels replaced by launch recorders (benchmarks/bench_host_overhead.py, which also times
the host path) and the CPU-only value checks left out, as on CUDA: "mean" without class weights
needs its two denominators' ops (``ne``, ``sum``), "sum" and "none" none, then one ``sum`` of the
row losses (not for "none"). ``ones_like`` is autograd's upstream gradient of ``backward()``.
"""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import bench_host_overhead as B  # noqa: E402

import crossent.torch as cet  # noqa: E402
import crossent.triton as ctr  # noqa: E402


def _ops(call, reduction="mean", **kwargs):
    x = torch.randn(7, 33, requires_grad=True)
    t = torch.tensor([0, 5, -100, 32, 1, -100, 9])
    with B.stubbed_ce_kernels() as launches, B.KernelOps() as ops:
        loss = call(x, t, reduction=reduction, **kwargs)
        loss.backward(torch.ones_like(loss))
    return ops.names, len(launches)


@pytest.mark.parametrize(("reduction", "expected"), [
    ("mean", ["ne", "sum", "sum", "ones_like"]),
    ("sum", ["sum", "ones_like"]),
    ("none", ["ones_like"]),
])
def test_ce_launches_only_the_denominators_and_the_loss_sum(reduction, expected):
    names, launches = _ops(ctr.cross_entropy, reduction)
    assert names == expected
    assert launches == 2  # the forward kernel, then backward's row scaling


def test_in_place_and_public_entry_launch_the_same_ops(monkeypatch):
    assert _ops(ctr.cross_entropy, inplace_backward=True) == (["ne", "sum", "sum", "ones_like"], 2)
    # crossent.torch takes impl="triton" on CPU tensors only under the interpreter's flag (set
    # here also on a GPU machine's compiled run; the kernels are stubbed either way).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _ops(cet.cross_entropy, impl="triton", validate=False) == (["ne", "sum", "sum", "ones_like"], 2)


def test_class_weights_add_the_weighted_denominator_only():
    names, _ = _ops(ctr.cross_entropy, weight=torch.rand(33) + 0.5)
    assert names[:2] == ["ne", "sum"] and names[-2:] == ["sum", "ones_like"]
    assert set(names[2:-2]) <= {"clamp", "index", "scalar_tensor", "where", "sum"}


def test_stubs_are_removed_and_values_still_checked_after(interpreter):
    with pytest.raises(ValueError, match=r"target must be in \[0, 33\)"):
        with B.stubbed_ce_kernels():
            pass
        ctr.cross_entropy(torch.randn(2, 33), torch.tensor([0, 40]))


def test_kernel_ops_counts_no_allocation_or_views():
    with B.KernelOps() as ops:
        a = torch.empty(3, 4)
        a.view(12).detach()
        a.fill_(1.0)
    assert ops.names == ["fill_"]


def test_benchmark_script_runs(capsys):
    assert B.main(["--calls", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| crossent.triton, mean | " in out and "4: ne, sum, sum, ones_like | 2 |" in out
    assert f", crossent {B.crossent_revision()}, " in out  # the revision as the GPU scripts state it


@pytest.mark.parametrize("tiles", ["", "wide_forward=0,scratch_dw=0", "products=3"])
def test_linear_launch_count(monkeypatch, tiles):
    """``--linear``'s counter on a small lean call (61 x 32 x 1031 bf16, 10% ignored, 128-column
    workspace steps: block_v, the least there is): one product per forward step (the Triton
    forward for products=3: none), three per backward step (logits, dE, dW; two with products=3,
    whose logits are the Triton gradient tile's), the steps being those of
    ``lean_backward_chunks``; Triton launches: a statistics kernel per forward step, then the
    combine kernel, a gradient tile per backward step and the scatter of dE; products=3: its
    forward kernel instead of the statistics kernels."""
    from crossent.triton import _launchers as L

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(L, "LEAN_WORKSPACE_BYTES", N_LIN * 64 * 2)
    ops, products, triton_launches = B.linear_launches(torch, (N_LIN, D_LIN, V_LIN), tiles, ignored=0.1, seed=3)
    g = torch.Generator().manual_seed(3)
    torch.randint(0, V_LIN, (N_LIN,), generator=g)
    m = int((torch.rand(N_LIN, generator=g) >= 0.1).sum())  # the targets linear_launches ignores
    forward, backward, products3 = _lean_steps(L, tiles, m)
    if products3:
        assert (products, triton_launches) == (2 * backward, 1 + 1 + backward + 1)
        return
    assert products == forward + 3 * backward
    assert triton_launches == forward + 1 + backward + 1
    assert ops > products


N_LIN, D_LIN, V_LIN = 61, 32, 1031


def _lean_steps(L, tiles, m):
    """(forward steps, backward steps, products=3?) of a lean bf16 call on N_LIN x D_LIN x V_LIN
    with ``m`` non-ignored rows under ``CROSSENT_TRITON_LINEAR_TILES=tiles``."""
    n, d, v = N_LIN, D_LIN, V_LIN
    t = L.parse_linear_tiles(tiles, L.linear_tiles(torch.bfloat16)) if tiles else L.linear_tiles(torch.bfloat16)
    backward = len(L.lean_backward_chunks(m, v, d, 2, t, bool(t.scratch_dw)))
    first, rest = L.lean_forward_chunks(n, m, v, d, 2, t)
    before = min(L.FORWARD_CHUNKS_BEFORE_COUNT * first, v)
    forward = -(-before // first) + -(-(v - before) // rest)
    return forward, backward, t.products == 3


@pytest.mark.parametrize("tiles", ["", "wide_forward=0,scratch_dw=0"])
def test_on_cuda_the_lean_products_are_the_planned_steps(cuda_device, monkeypatch, tiles):
    """On a GPU (compiled kernels, cuBLAS): the lean call runs one matrix product per forward step
    and three per backward step (the float32 dE accumulation being one ``addmm``), the steps of
    the CPU plan: the schedule counted on the CPU is the one the GPU runs."""
    from crossent.triton import _launchers as L

    monkeypatch.setattr(L, "LEAN_WORKSPACE_BYTES", N_LIN * 64 * 2)
    monkeypatch.setenv("CROSSENT_TRITON_LINEAR_TILES", tiles)
    g = torch.Generator().manual_seed(3)
    e = torch.randn(N_LIN, D_LIN, generator=g).to(cuda_device, torch.bfloat16).requires_grad_()
    w = torch.randn(V_LIN, D_LIN, generator=g).to(cuda_device, torch.bfloat16).requires_grad_()
    t = torch.randint(0, V_LIN, (N_LIN,), generator=g)
    t[::10] = -100
    ctr.linear_cross_entropy(e, w, t.to(cuda_device)).backward()  # compiles the kernels first
    e.grad = w.grad = None
    with B.KernelOps() as ops:
        ctr.linear_cross_entropy(e, w, t.to(cuda_device)).backward()
    forward, backward, _ = _lean_steps(L, tiles, int((t != -100).sum()))
    assert (forward, backward) == ((9, 7) if tiles == "" else (9, 9))  # 4 of the 7 in dW
    assert sum(name in B.PRODUCTS for name in ops.names) == forward + 3 * backward


def test_on_cuda_the_same_ops_surround_the_compiled_kernels(cuda_device):
    """On a GPU (compiled kernels, no stubs): the CE call launches the same torch ops, i.e.
    nothing but the denominators' ``ne``, ``sum`` and the loss's ``sum`` besides its kernels."""
    x = torch.randn(7, 33, device=cuda_device, requires_grad=True)
    t = torch.tensor([0, 5, -100, 32, 1, -100, 9], device=cuda_device)
    ctr.cross_entropy(x, t).backward()  # compiles the kernels first
    x.grad = None
    with B.KernelOps() as ops:
        loss = ctr.cross_entropy(x, t)
        loss.backward(torch.ones_like(loss))
    assert ops.names == ["ne", "sum", "sum", "ones_like"]
