"""64-bit row offsets: rows that start more than 2**31 elements apart, without 2**31 elements of work.

A kernel that forms ``row * stride`` in int32 wraps as soon as the offset passes 2**31 - 1 (e.g.
8192 x 262144 logits), and reads or writes 2**32 elements away from the row. Running that for
real takes a GPU (test_triton_gpu.py); these tests get the same offsets on the CPU for the price
of a few rows:

* one storage of 2**31 + 2 * S + 4096 float16 elements (8 GiB of address space, which
  ``torch.empty`` maps without touching a page) holds ``as_strided`` views of a few rows at row
  stride ``S = 2**30 + 3`` (odd, below 2**31, so it reaches the kernel as an int32 argument, as
  Triton passes such ints on the GPU too): row 2 begins at element ``2 S = 2**31 + 6``, past int32;
* only those rows are written, plus a sentinel on each side of every row (a kernel must write
  nothing there); resident memory grows by a few MiB, checked (``assert_resident_small``);
* row 0 sits 2**31 elements into the storage, so the address an int32 offset wraps to
  (``2 S - 2**32`` elements from row 0) lies inside the storage, where the tests write zeros
  (the "mirror"): a wrapped read gives a wrong loss and a wrapped write changes the mirror, each
  a clean assertion, not a segmentation fault.

What the interpreter proves. Triton's interpreter (3.9 and 3.6, ``triton/runtime/interpreter.py``)
keeps ``tl.program_id`` as an int32 NumPy array and turns a Python int argument below 2**31 into
int32; int32 arithmetic is NumPy's, which wraps silently (the overflow check that
``sanitize_overflow`` would insert is a ``device_assert``, dropped because its options have
``debug=False``); ``create_addptr`` adds ``offset * element_size`` as uint64, so a wrapped
offset really points 2**32 elements back. Checked by hand on copies of the kernels (not
committed), one int64 widening removed at a time: the row index of the cross-entropy kernel
(one program per row, and persistent), of the backward row scaling, of E and of W in the logits
tile, of W in the dE kernel and of E in the dW kernel, and of both vocab-parallel kernels. Each
made tests here fail with wrong values (row 2's loss became log(C), the loss of the mirror's
zeros), under Triton 3.9 and 3.6; without the leading 2**31 elements the process died of a
segmentation fault instead. So on the paths run here an int32 row offset of a caller's tensor
fails these tests.

What it does not prove: how the compiled GPU code forms addresses below the Triton language
(the language-level types are the same, both go through ``triton.language.semantic``, but
backend lowering is not exercised); the buffers the launchers allocate themselves (fast mode's
stored logits, workspaces, gradients of E and W), which are small here, so their offsets stay
below 2**31; grid limits of real launches. test_triton_gpu.py covers those with N * V > 2**31 on
a GPU. With ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run compiled, in 8 GiB of
GPU memory (the resident-memory check is for the CPU only).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402

from crossent.triton import (  # noqa: E402
    _launchers,
    _vocab_parallel_grad,
    _vocab_parallel_partials,
    cross_entropy,
    linear_cross_entropy,
)

PAD = 2**31  # elements before row 0: where a wrapped int32 offset lands
S = 2**30 + 3  # row stride of the CE / E / partials views: row 2 at 2**31 + 6
S_W = 2**29 + 1  # row stride of a 5-row W: row 4 at 2**31 + 4
SPAN = PAD + 2 * S + 4096
SENTINEL = 1234.0  # exact in float16
RESIDENT_LIMIT = 256 * 2**20  # bytes a test may add to the resident set (the storage is 8 GiB)
IGNORE = -100


def resident_bytes():
    """Resident set size of this process (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module")
def storage(device):
    """One untouched float16 storage of SPAN elements (8 GiB) on ``device``, shared by the module."""
    before = resident_bytes()
    try:
        buf = torch.empty(SPAN, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        pytest.skip(f"could not reserve {SPAN * 2 / 2**30:.1f} GiB of address space on {device}: {e}")
    if device == "cpu" and before is not None:
        grown = resident_bytes() - before
        assert grown < RESIDENT_LIMIT, f"allocating the storage made {grown / 2**20:.0f} MiB resident"
    yield buf
    del buf


@pytest.fixture
def assert_resident_small(device):
    """Call at the end of a test: the test added less than RESIDENT_LIMIT to the resident set."""
    before = resident_bytes()

    def check():
        if device != "cpu" or before is None:
            return
        grown = resident_bytes() - before
        assert grown < RESIDENT_LIMIT, f"the test made {grown / 2**20:.0f} MiB resident (pages touched)"

    return check


class StridedRows:
    """The rows of ``values`` placed in ``storage`` at elements ``PAD + r * stride``, with guards.

    ``view`` is the (rows, cols) ``as_strided`` view, row stride ``stride``, unit column stride.
    Guards: SENTINEL just before and just after every row, and zeros over each "mirror", the
    span (one element wider on each side) where an int32 offset ``r * stride`` would land for
    the rows past 2**31. ``assert_intact`` checks that no kernel wrote to any of them.
    """

    def __init__(self, storage, values, stride):
        n, c = values.shape
        if not (stride < 2**31 <= (n - 1) * stride and PAD + (n - 1) * stride + c < SPAN):
            raise ValueError(f"stride {stride} with {n} rows does not put a row past 2**31 inside the storage")
        self.storage = storage
        guards, self.mirrors = [], []
        for r in range(n):
            start = PAD + r * stride
            guards += [start - 1, start + c]
            if r * stride >= 2**31:
                mirror = start - 2**32  # the element an int32 ``r * stride`` points at
                self.mirrors.append(slice(mirror - 1, mirror + c + 1))
        self.guards = torch.tensor(guards, device=storage.device)
        with torch.no_grad():
            storage[self.guards] = SENTINEL
            for m in self.mirrors:
                storage[m] = 0.0
            self.view = storage.as_strided((n, c), (stride, 1), PAD)
            self.view.copy_(values)

    def assert_intact(self):
        assert bool((self.storage[self.guards] == SENTINEL).all()), "a kernel wrote next to a row"
        for m in self.mirrors:
            assert not bool(self.storage[m].any()), (
                "a kernel wrote where an int32 row offset points (2**32 elements before the row)"
            )


def random_upstream(n, device):
    g = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    return g.to(device)


# -- cross-entropy on logits ---------------------------------------------------------------------

C = 301


def ce_configs():
    """Launch configurations to cover: the default (one program per row, the row in one block),
    a persistent grid (programs loop over rows: 2 programs under the interpreter, 3 rows) and
    streamed rows (several column blocks, two passes)."""
    configs = [""]
    if hasattr(_launchers, "CE_CONFIG_ENV"):
        configs += ["persistent=1", "single_max=128,loop_block=64"]
    return configs


@pytest.mark.parametrize("inplace", [False, True], ids=["grad_buffer", "inplace"])
@pytest.mark.parametrize("config", ce_configs(), ids=lambda c: c or "default")
def test_cross_entropy_rows_past_2_31(ref, device, storage, assert_resident_small, monkeypatch, config, inplace):
    if config:
        monkeypatch.setenv(_launchers.CE_CONFIG_ENV, config)
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(3, C, generator=g) * 3).half()
    target = torch.tensor([7, C - 1, 150])
    rows = StridedRows(storage, values, S)
    x = rows.view.requires_grad_()
    up = random_upstream(3, device)
    loss = cross_entropy(x, target.to(device), reduction="none", label_smoothing=0.1, inplace_backward=inplace)
    loss.backward(up.float())

    truth = values.double().requires_grad_()
    want = ref(truth, target, reduction="none", label_smoothing=0.1)
    want.backward(up.cpu())
    torch.testing.assert_close(loss.detach().cpu().double(), want.detach(), rtol=1e-5, atol=1e-5)
    # float16 gradient: one rounding (relative 2**-11) of a float32 value
    torch.testing.assert_close(x.grad.cpu().double(), truth.grad, rtol=2e-3, atol=1e-5)
    if inplace:  # the gradient was written through the strided view
        torch.testing.assert_close(rows.view.detach().cpu().double(), truth.grad, rtol=2e-3, atol=1e-5)
    else:
        assert torch.equal(rows.view.detach().cpu(), values), "the logits were modified"
    rows.assert_intact()
    assert_resident_small()


def test_cross_entropy_ignored_row_past_2_31_gets_zero_gradient_in_place(device, storage, assert_resident_small):
    values = (torch.randn(3, C, generator=torch.Generator().manual_seed(1)) * 3).half()
    target = torch.tensor([4, 9, IGNORE])
    rows = StridedRows(storage, values, S)
    x = rows.view.requires_grad_()
    loss = cross_entropy(x, target.to(device), inplace_backward=True)
    loss.backward()
    want = torch.nn.functional.cross_entropy(values[:2].double(), target[:2], reduction="sum") / 2
    torch.testing.assert_close(loss.detach().cpu().double(), want, rtol=1e-5, atol=1e-5)
    assert not bool(rows.view[2].any()), "the ignored row's gradient was not written through the view"
    assert bool(rows.view[:2].detach().abs().sum(dim=1).gt(0).all())
    rows.assert_intact()
    assert_resident_small()


# -- fused linear cross-entropy --------------------------------------------------------------------

D, V = 32, 37


def linear_oracle(e, w, target, up):
    """float64 loss ("none") and gradients of E and W for upstream ``up``, on the CPU."""
    e64 = e.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(e64 @ w64.T, target, reduction="none", ignore_index=IGNORE)
    loss.backward(up.cpu())
    return loss.detach(), e64.grad, w64.grad


def assert_linear_close(got, want, loss_tol=1e-4):
    loss, de, dw = got
    want_loss, want_de, want_dw = want
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=loss_tol, atol=loss_tol)
    # float16 gradients; dW sums float16-stored gradient tiles times E (lean and fast modes)
    for name, a, b in (("dE", de, want_de), ("dW", dw, want_dw)):
        err = float((a.cpu().double() - b).abs().max())
        assert err <= 4e-3 * float(b.abs().max()), f"{name}: max error {err}"


#: Linear modes: "lean" with the Triton products (``products=0``: the kernels whose int64 row
#: offsets these tests guard), "lean_cublas" (the default, ``products=1``: torch/cuBLAS products on
#: the strided views, float16 logits as in eager PyTorch, hence the loss tolerance of float16
#: logits) and "fast" (``reduction="none"``: the Triton schedule that stores columns).
LINEAR_MODES = ["lean", "lean_cublas", "fast"]


def linear_mode(monkeypatch, mode):
    """(memory_budget, loss tolerance) of ``mode``; sets the Triton products where it runs them."""
    if mode != "lean_cublas":
        real = _launchers.linear_tiles
        monkeypatch.setattr(_launchers, "linear_tiles", lambda dtype: dataclasses.replace(real(dtype), products=0))
    return (1 << 20 if mode == "fast" else None), (4e-3 if mode == "lean_cublas" else 1e-4)


@pytest.mark.parametrize("mode", LINEAR_MODES)
def test_linear_input_rows_past_2_31(device, storage, assert_resident_small, monkeypatch, mode):
    g = torch.Generator().manual_seed(2)
    e_values = torch.randn(3, D, generator=g).half()
    w = (torch.randn(V, D, generator=g) * 0.5).half()
    target = torch.tensor([3, 20, V - 1])
    rows = StridedRows(storage, e_values, S)
    e = rows.view.requires_grad_()
    wd = w.to(device).requires_grad_()
    up = random_upstream(3, device)
    budget, loss_tol = linear_mode(monkeypatch, mode)
    loss = linear_cross_entropy(e, wd, target.to(device), reduction="none", memory_budget=budget)
    loss.backward(up.float())
    assert_linear_close((loss.detach(), e.grad, wd.grad), linear_oracle(e_values, w, target, up), loss_tol)
    assert torch.equal(rows.view.detach().cpu(), e_values), "the input was modified"
    rows.assert_intact()
    assert_resident_small()


@pytest.mark.parametrize("mode", LINEAR_MODES)
def test_linear_weight_rows_past_2_31(device, storage, assert_resident_small, monkeypatch, mode):
    g = torch.Generator().manual_seed(3)
    e = torch.randn(7, D, generator=g).half()
    w_values = (torch.randn(5, D, generator=g) * 0.5).half()
    target = torch.tensor([4, 0, 4, IGNORE, 2, 4, 1])  # class 4 lives 2**31 + 4 elements into W
    rows = StridedRows(storage, w_values, S_W)
    w = rows.view.requires_grad_()
    ed = e.to(device).requires_grad_()
    up = random_upstream(7, device)
    budget, loss_tol = linear_mode(monkeypatch, mode)
    loss = linear_cross_entropy(ed, w, target.to(device), reduction="none", memory_budget=budget)
    loss.backward(up.float())
    assert_linear_close((loss.detach(), ed.grad, w.grad), linear_oracle(e, w_values, target, up), loss_tol)
    assert torch.equal(rows.view.detach().cpu(), w_values), "the weight was modified"
    rows.assert_intact()
    assert_resident_small()


# -- vocab-parallel partial kernels -----------------------------------------------------------------
# Their launchers keep a caller's row stride (they copy only when the column stride is not 1),
# so a strided slice reaches the kernels as it is.


@pytest.mark.parametrize("block", [None, 128])  # the row in one block, or three steps
def test_vocab_parallel_rows_past_2_31(device, storage, assert_resident_small, block):
    gen = torch.Generator().manual_seed(4)
    values = (torch.randn(3, C, generator=gen) * 3).half()
    column = torch.tensor([5, -1, C - 1])  # the target in this slice (rows 0, 2) or elsewhere
    rows = StridedRows(storage, values, S)
    z = rows.view
    m, s, t, fsum, fcount = _vocab_parallel_partials(z, column.to(device), smoothing=True, block=block)
    x = values.double()
    want_m = x.amax(dim=1)
    torch.testing.assert_close(m.cpu().double(), want_m, rtol=0, atol=0)
    torch.testing.assert_close(s.cpu().double(), torch.exp(x - want_m[:, None]).sum(dim=1), rtol=1e-5, atol=0)
    want_t = torch.where(column >= 0, x.gather(1, column.clamp(min=0)[:, None]).squeeze(1), 0.0)
    torch.testing.assert_close(t.cpu().double(), want_t, rtol=0, atol=0)
    torch.testing.assert_close(fsum.cpu().double(), x.sum(dim=1), rtol=1e-5, atol=1e-3)
    assert fcount.cpu().tolist() == [float(C)] * 3

    valid = torch.tensor([True, True, True])
    lse = torch.logsumexp(x, dim=1) + 0.25  # as if other ranks held more of the vocabulary
    up = random_upstream(3, "cpu")
    count = torch.full((3,), 4.0 * C, dtype=torch.float64)
    eps, z_loss = 0.1, 0.01
    grad = _vocab_parallel_grad(
        z, column.to(device), valid.to(device), lse.float().to(device), up.float().to(device),
        count.float().to(device), label_smoothing=eps, z_loss=z_loss, block=block,
    )
    lse32 = lse.float().double()
    p = torch.exp(x - lse32[:, None]) * (1 + 2 * z_loss * lse32)[:, None]
    p = p - (1 - eps) * torch.nn.functional.one_hot(column.clamp(min=0), C) * (column >= 0)[:, None]
    want_grad = (p - eps / count[:, None]) * up.float().double()[:, None]
    err = (grad.cpu().double() - want_grad).abs()
    assert bool((err <= 1e-7 + 2e-3 * want_grad.abs()).all()), float(err.max())  # float16 gradient
    assert torch.equal(z.cpu(), values), "the logits were modified"
    rows.assert_intact()
    assert_resident_small()


def test_layout_reaches_the_kernels_as_strided(storage):
    """The views above are what the tests claim: row 2 starts 2**31 + 6 elements after row 0,
    and an int32 ``2 * S`` would be negative (the wrap these tests are about)."""
    rows = StridedRows(storage, torch.zeros(3, 8, dtype=torch.float16), S)
    assert rows.view.stride() == (S, 1) and S < 2**31
    assert 2 * S > 2**31 - 1 and (2 * S + 2**31) % 2**32 - 2**31 < 0  # int32(2 S) < 0
    assert rows.view[2].data_ptr() - rows.view[0].data_ptr() == 2 * S * 2
    assert math.log2(storage.numel()) > 32
