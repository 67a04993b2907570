"""crossent.triton.linear_cross_entropy against float64 PyTorch, on the ``device`` of conftest.py
(CPU tensors under TRITON_INTERPRET=1, or CUDA tensors with the kernels compiled).

The oracle is the loss of ``x @ W.T + b`` written out in float64 (``reference`` in conftest.py),
differentiated by autograd. Shapes: N = 61 rows, D = 32, V = 1031 classes (odd, not multiples of
any tile). Each fwd+bwd is about six kernel launches; the interpreter makes them slow, so the
option grid is crossed with the reductions only where a reduction changes the code path.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402
import triton  # noqa: E402

from crossent.triton import _launchers, cross_entropy, linear_cross_entropy  # noqa: E402

N, D, V = 61, 32, 1031
IGNORE = -100


def make(device, n=N, d=D, v=V, seed=0, ignore_every=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(v, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        target[3::ignore_every] = IGNORE  # 10% ignored, scattered
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    return tuple(t.to(device) for t in (x, w, b, target, cw))


def upstream(loss):
    if loss.ndim:
        g = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return g.to(device=loss.device, dtype=loss.dtype)
    return torch.tensor(1.7, dtype=loss.dtype, device=loss.device)


def run_triton(x, w, b, target, **opts):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = linear_cross_entropy(x, w, target, linear_bias=b, **opts)
    loss.backward(upstream(loss))
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def run_reference(ref, x, w, b, target, **opts):
    x = x.detach().double().clone().requires_grad_()
    w = w.detach().double().clone().requires_grad_()
    b = None if b is None else b.detach().double().clone().requires_grad_()
    opts = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    opts.pop("memory_budget", None)
    logits = x @ w.T if b is None else x @ w.T + b
    loss = ref(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), **opts)
    if loss.ndim:
        loss = loss.reshape(target.shape)
    loss.backward(upstream(loss))
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def assert_matches(got, want, rtol=1e-5, atol=1e-6):
    """float32 results against float64. On CUDA the products run in cuBLAS (float32, its own
    summation order and split-K): an element that is a near-cancelling sum (e.g. dW of a target
    class, p - 1 against p) can then be off by more than 1e-6 (measured on an H100: 2.1e-6 in dW
    with reduction="sum"), so there the absolute tolerance is 1e-5 of the tensor's largest entry."""
    loss, dx, dw, db = got
    loss_w, dx_w, dw_w, db_w = want
    assert loss.dtype == torch.float32 and loss.shape == loss_w.shape

    def close(value, reference):
        if reference is None:  # a gradient not asked for (want passes None): none may come
            assert value is None
            return
        tol = atol
        if value.is_cuda and reference.numel():
            tol = max(atol, 1e-5 * float(reference.abs().max()))
        torch.testing.assert_close(value.double(), reference, rtol=rtol, atol=tol)

    close(loss, loss_w)
    close(dx, dx_w)
    close(dw, dw_w)
    close(db, db_w)


CASES = [
    # (options, reduction, bias)
    ({}, "mean", False),
    ({}, "sum", True),
    ({}, "none", True),
    ({"weight": True}, "mean", True),
    ({"label_smoothing": 0.1}, "mean", True),
    ({"label_smoothing": 0.2, "weight": True}, "none", False),
    ({"z_loss": 1e-2}, "mean", True),
    ({"softcap": 3.0}, "mean", True),
    ({"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}, "mean", True),
    ({"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}, "sum", True),
]


@pytest.mark.parametrize(("opts", "reduction", "bias"), CASES, ids=lambda v: str(v).replace(" ", ""))
def test_float32_matches_float64_pytorch(ref, opts, reduction, bias, device):
    x, w, b, target, cw = make(device)
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = cw.float()
    b = b if bias else None
    got = run_triton(x.float(), w.float(), None if b is None else b.float(), target,
                     reduction=reduction, **opts)
    want = run_reference(ref, x.float(), w.float(), b if b is None else b.float(), target,
                         reduction=reduction, **opts)
    assert_matches(got, want)


ALL = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}


def triton_products(monkeypatch, products=0):
    """The lean schedule's products by the Triton kernels (``LinearTiles.products=0``), or the
    forward only (2), or the forward and the backward's recompute (3)."""
    real = _launchers.linear_tiles
    monkeypatch.setattr(_launchers, "linear_tiles",
                        lambda dtype: dataclasses.replace(real(dtype), products=products))


@pytest.mark.parametrize("mode", ["lean_chunks", "lean_chunks_triton", "lean_chunks_triton_forward",
                                  "lean_chunks_triton_recompute", "fast_all", "fast_part", "small_tiles",
                                  "small_tiles_triton"])
def test_schedules(ref, monkeypatch, mode, device):
    """Every schedule gives the same answer: several lean chunks (backward products by cuBLAS, or
    by the Triton kernels), all or part of the vocabulary kept by the forward ("fast"), and tiles
    small enough for many row blocks and splits."""
    x, w, b, target, cw = make(device)
    opts = dict(ALL, weight=cw.float())
    elt = 4
    if mode.startswith("lean_chunks"):
        monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 256 * elt)  # 256 columns
    elif mode == "fast_all":
        opts["memory_budget"] = N * V * elt
    elif mode == "fast_part":
        monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 256 * elt)
        opts["memory_budget"] = N * 600 * elt  # 256 columns kept + one 256-column chunk
    else:
        small = _launchers.LinearTiles(16, 32, 16, 16, 4, 2, 64)
        monkeypatch.setattr(_launchers, "linear_tiles", lambda dtype: small)
    if mode.endswith("_triton"):
        triton_products(monkeypatch)
    elif mode.endswith("_triton_forward"):
        triton_products(monkeypatch, 2)
    elif mode.endswith("_triton_recompute"):
        triton_products(monkeypatch, 3)
    plan = _launchers.plan_linear(N, V, D, torch.float32, opts.get("memory_budget"), True)
    expected = {"triton": 0, "forward": 2, "recompute": 3}.get(mode.rsplit("_", 1)[-1], 1)
    assert plan.tiles.products == expected
    expected_store = {"fast_all": V, "fast_part": 256}.get(mode, 0)
    assert plan.n_store == expected_store
    got = run_triton(x.float(), w.float(), b.float(), target, reduction="none", **opts)
    want = run_reference(ref, x.float(), w.float(), b.float(), target, reduction="none", **opts)
    assert_matches(got, want)


@pytest.mark.parametrize("products", ["cublas", "triton", "triton_recompute"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_naive_torch(ref, monkeypatch, dtype, products, device):
    """Errors against float64 on the same rounded inputs <= naive low-precision torch's + tol."""
    if products != "cublas":
        triton_products(monkeypatch, 0 if products == "triton" else 3)
    x, w, b, target, cw = make(device)
    xl, wl, bl = x.to(dtype), w.to(dtype), b.to(dtype)
    opts = dict(ALL, weight=cw.float())
    assert_no_worse_than_naive(ref, run_triton(xl, wl, bl, target, **opts), xl, wl, bl, target, cw, opts)


def assert_no_worse_than_naive(ref, got, xl, wl, bl, target, cw, opts):
    """``got`` (loss, dE, dW, db) from low-precision inputs: each error against float64 on the
    same rounded inputs <= naive low-precision torch's + a tolerance. Naive: the same torch ops in
    the low precision (logits in that dtype, as eager bf16 training), same upstream gradient."""
    dtype = xl.dtype
    truth = run_reference(ref, xl, wl, bl, target, **opts)
    xn, wn, bn = (t.detach().clone().requires_grad_() for t in (xl, wl, bl))
    naive = ref(xn @ wn.T + bn, target, **{**opts, "weight": cw.to(dtype)})
    naive.backward(upstream(naive).to(dtype))
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for ours, mine_naive, true in zip(got, (naive.detach(), xn.grad, wn.grad, bn.grad), truth, strict=True):
        err = (ours.double() - true).abs().max()
        naive_err = (mine_naive.double() - true).abs().max()
        assert err <= naive_err + tol * true.abs().max()


def test_three_dim_input_and_none_shape(ref, device):
    x, w, b, target, _ = make(device)
    x3, t3 = x[:60].reshape(4, 15, D), target[:60].reshape(4, 15)
    got = run_triton(x3.float(), w.float(), None, t3, reduction="none", z_loss=1e-2)
    want = run_reference(ref, x3.float(), w.float(), None, t3, reduction="none", z_loss=1e-2)
    assert got[0].shape == (4, 15) and got[1].shape == (4, 15, D)
    assert_matches(got, want)


def test_partial_requires_grad(ref, device):
    x, w, b, target, _ = make(device)
    want = run_reference(ref, x.float(), w.float(), b.float(), target)
    wf = w.float().requires_grad_()
    linear_cross_entropy(x.float(), wf, target, linear_bias=b.float()).backward(torch.tensor(1.7, device=device))
    torch.testing.assert_close(wf.grad.double(), want[2], rtol=1e-5, atol=1e-6)
    xf = x.float().requires_grad_()
    bf = b.float().requires_grad_()
    linear_cross_entropy(xf, w.float(), target, linear_bias=bf).backward(torch.tensor(1.7, device=device))
    torch.testing.assert_close(xf.grad.double(), want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bf.grad.double(), want[3], rtol=1e-5, atol=1e-6)


def test_all_ignored_mean_is_zero_with_zero_grads(device):
    x, w, b, target, _ = make(device, n=9)
    target = torch.full_like(target, IGNORE)
    loss, dx, dw, db = run_triton(x.float(), w.float(), b.float(), target, label_smoothing=0.1,
                                  z_loss=1e-2)
    assert loss.item() == 0.0
    for g in (dx, dw, db):
        assert torch.count_nonzero(g) == 0


def test_ignored_rows_equal_dropping_them(device):
    """Ignoring a row is the same as slicing it out (sum reduction), gradients included."""
    x, w, b, target, _ = make(device)
    keep = target != IGNORE
    a = run_triton(x.float(), w.float(), b.float(), target, reduction="sum")
    s = run_triton(x.float()[keep], w.float(), b.float(), target[keep], reduction="sum")
    torch.testing.assert_close(a[0], s[0], rtol=1e-6, atol=1e-5)
    assert torch.count_nonzero(a[1][~keep]) == 0
    torch.testing.assert_close(a[1][keep], s[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a[2], s[2], rtol=1e-5, atol=1e-6)


class ProductShapes:
    """``with ProductShapes() as seen: ...``: the operand shapes of every matrix product run
    inside (aten mm/addmm/bmm and their variants), as ``seen.shapes`` [(a.shape, b.shape), ...]."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        shapes = self.shapes = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if "mm" in name:
                    mats = [a for a in args if isinstance(a, torch.Tensor) and a.ndim == 2]
                    shapes.append(tuple(tuple(a.shape) for a in mats[-2:]))
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def no_host_count(monkeypatch):
    """The forward hands the backward no row count, as under CUDA graph capture."""
    monkeypatch.setattr(_launchers.HostCount, "start", classmethod(lambda cls, n: None))


@pytest.mark.parametrize("count", ["host", "capture", "env"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_products_take_only_the_non_ignored_rows(ref, monkeypatch, count, reduction, device):
    """The lean default's backward runs its cuBLAS products (X = E' W_c^T, dE' += G W_c,
    dW_c = G^T E') on the non-ignored rows E' only; the forward's take every row. Without a
    count on the host (CUDA graph capture, or CROSSENT_TRITON_LINEAR_HOST_COUNT=0) every row goes
    through: the same answer."""
    x, w, b, target, cw = make(device)
    n_valid = int((target != IGNORE).sum())
    assert n_valid == 55  # rows 3, 13, ..., 53 ignored
    if count == "capture":
        no_host_count(monkeypatch)
    elif count == "env":
        monkeypatch.setenv(_launchers.HOST_COUNT_ENV, "0")
    opts = dict(ALL, weight=cw.float(), reduction=reduction)
    xf, wf, bf = (t.float().requires_grad_() for t in (x, w, b))
    with ProductShapes() as forward:
        loss = linear_cross_entropy(xf, wf, target, linear_bias=bf, **opts)
    with ProductShapes() as backward:
        loss.backward(upstream(loss))
    assert forward.shapes and all(a[0] == N for a, _ in forward.shapes)
    rows = n_valid if count == "host" else N
    assert len(backward.shapes) == 3  # one chunk: logits, dE, dW
    for a, bm in backward.shapes:
        assert rows in a and (N not in a + bm or rows == N)
    got = (loss.detach(), xf.grad, wf.grad, bf.grad)
    assert_matches(got, run_reference(ref, x.float(), w.float(), b.float(), target, **opts))
    assert torch.count_nonzero(xf.grad[target == IGNORE]) == 0


@pytest.mark.parametrize("need", ["input", "weight", "bias"])
def test_backward_compacted_rows_partial_grads(ref, monkeypatch, need, device):
    """One gradient wanted at a time through the compacted backward (five 256-column chunks):
    without dE the gathered rows get a buffer of their own."""
    monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 256 * 4)
    x, w, b, target, _ = make(device)
    want = run_reference(ref, x.float(), w.float(), b.float(), target, reduction="sum")
    xf, wf, bf = x.float(), w.float(), b.float()
    leaf = {"input": xf, "weight": wf, "bias": bf}[need].requires_grad_()
    loss = linear_cross_entropy(xf, wf, target, linear_bias=bf, reduction="sum")
    loss.backward(upstream(loss))
    expected = {"input": want[1], "weight": want[2], "bias": want[3]}[need]
    torch.testing.assert_close(leaf.grad.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_rows_kernel(dtype, device):
    """``out[rows[i]] = src[i]`` for i < n_src, 0 for the other rows of the permutation."""
    g = torch.Generator().manual_seed(5)
    n_rows, n_cols, n_src = 37, 133, 29
    rows = torch.randperm(n_rows, generator=g).to(device)
    src = torch.randn(n_src, n_cols, generator=g).to(device)
    out = torch.full((n_rows, n_cols), 7.0, dtype=dtype, device=device)
    _launchers.K._scatter_rows_kernel[(triton.cdiv(n_rows, 16), triton.cdiv(n_cols, 64))](
        src, rows, n_src, out, n_rows, n_cols,
        INTERPRETER=_launchers.interpreted(), BLOCK_M=16, BLOCK_D=64,
    )
    want = torch.zeros(n_rows, n_cols, dtype=dtype, device=device)
    want[rows[:n_src]] = src.to(dtype)
    assert torch.equal(out, want)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_valid", [29, 0, 37])
def test_gather_rows_kernel(dtype, n_valid, device):
    """``out[i] = src[rows[i]]`` for i < n_valid (read on the device), 0 for the other rows even
    where ``src`` holds NaN or inf there; a strided ``src`` (a column slice)."""
    g = torch.Generator().manual_seed(6)
    n_rows, n_cols = 37, 133
    rows = torch.randperm(n_rows, generator=g).to(device)
    src = torch.randn(n_rows, n_cols + 3, generator=g).to(device=device, dtype=dtype)[:, 1 : n_cols + 1]
    src[rows[n_valid:]] = float("nan")
    if n_valid < n_rows:
        src[rows[-1], 0] = float("inf")
    out = _launchers._gather_rows(src, rows, torch.tensor(n_valid, device=device))
    want = torch.zeros(n_rows, n_cols, dtype=dtype, device=device)
    want[:n_valid] = src[rows[:n_valid]]
    assert out.is_contiguous() and torch.equal(out, want)

def test_deterministic(device):
    x, w, b, target, cw = make(device)
    opts = dict(ALL, weight=cw.float())
    first = run_triton(x.float(), w.float(), b.float(), target, **opts)
    second = run_triton(x.float(), w.float(), b.float(), target, **opts)
    for u, v in zip(first, second, strict=True):
        assert torch.equal(u, v)


def test_no_grad_mode_stores_nothing(monkeypatch, device):
    x, w, b, target, _ = make(device)
    calls = []
    real = _launchers.plan_linear

    def spy(*args):
        plan = real(*args)
        calls.append(plan.n_store)
        return plan

    monkeypatch.setattr(_launchers, "plan_linear", spy)
    wf = w.float().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(x.float(), wf, target, memory_budget=1 << 30)
    assert calls == [0] and not loss.requires_grad


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"memory_budget": -1}, ValueError, "memory_budget"),
        ({"reduction": "mean "}, ValueError, "reduction"),
        ({"linear_bias": torch.zeros(3)}, ValueError, "linear_bias"),
        ({"weight": torch.ones(3)}, ValueError, "weight"),
        ({"softcap": -2.0}, ValueError, "softcap"),
    ],
)
def test_bad_options(change, error, match, device):
    x, w, _, target, _ = make(device, n=3, v=7, ignore_every=0)
    change = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in change.items()}
    with pytest.raises(error, match=match):
        linear_cross_entropy(x.float(), w.float(), target, **change)


def test_bad_data(device):
    x, w, _, target, _ = make(device, n=3, v=7, ignore_every=0)
    with pytest.raises(TypeError, match="linear_weight"):
        linear_cross_entropy(x.float(), w, target)
    with pytest.raises(ValueError, match="linear_weight"):
        linear_cross_entropy(x.float(), w.float()[:, :5], target)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(x.float(), w.float(), target[:2])
    bad = target.clone()
    bad[0] = 7
    if device == "cpu":
        with pytest.raises(ValueError, match=r"target\[0\] = 7"):
            linear_cross_entropy(x.float(), w.float(), bad)
    else:
        # CUDA targets are not checked by value (that would need a host sync): NaN loss instead.
        loss = linear_cross_entropy(x.float(), w.float(), bad, reduction="none")
        assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()


@pytest.mark.parametrize(("dtype", "label", "ignore_index"), [
    (torch.uint8, 156, -100),    # -100 wraps to 156 in uint8
    (torch.int16, 4464, 70000),  # 70000 wraps to 4464 in int16
])
def test_narrow_targets_are_checked_after_widening(ref, dtype, label, ignore_index, interpreter):
    """As for crossent.triton.cross_entropy: the value check compares int64 targets, so a label
    equal to the wrapped ``ignore_index`` is refused (it gave a NaN loss), and valid narrow
    targets equal their int64 loss."""
    x, w, b, _, _ = make(interpreter, n=3, v=50, ignore_every=0)
    bad = torch.tensor([1, label, 2], dtype=dtype)
    with pytest.raises(ValueError, match=rf"target must be in \[0, 50\) or ignore_index={ignore_index}; "
                                         rf"target\[1\] = {label}"):
        linear_cross_entropy(x.float(), w.float(), bad, ignore_index=ignore_index)
    good = torch.tensor([1, 49, 2], dtype=dtype)
    got = run_triton(x.float(), w.float(), b.float(), good, ignore_index=ignore_index, reduction="none")
    want = run_reference(ref, x.float(), w.float(), b.float(), good.long(), ignore_index=ignore_index,
                         reduction="none")
    assert_matches(got, want)


def test_strided_input_and_weight(ref, device):
    """E as a column slice of a wider buffer, W as the transpose of a (D, V) matrix (tied head)."""
    x, w, b, target, _ = make(device)
    want = run_reference(ref, x.float(), w.float(), b.float(), target, label_smoothing=0.1)
    wide = torch.zeros(N, D + 7, device=device)
    wide[:, 5 : 5 + D] = x.float()
    wide.requires_grad_()
    w_t = w.float().t().contiguous().requires_grad_()  # (D, V)
    bf = b.float().requires_grad_()
    loss = linear_cross_entropy(wide[:, 5 : 5 + D], w_t.t(), target, linear_bias=bf,
                                label_smoothing=0.1)
    loss.backward(torch.tensor(1.7, device=device))
    got = (loss.detach(), wide.grad[:, 5 : 5 + D], w_t.grad.t(), bf.grad)
    assert_matches(got, want)


# ------------------------------------------------------------------------------------------------
# The "fast" row schedule (a memory_budget holding whole rows of logits): cuBLAS products around
# the CE kernel. ROW_SCHEDULE_MIN_ROWS is lowered so that a budget of 16 rows gives 4 chunks
# (16, 15, 15, 15): every cross-chunk sum (dW, the bias gradient, the loss) is exercised.
# ------------------------------------------------------------------------------------------------

ROWS = 16  # rows per chunk in these tests: 4 chunks of N = 61


@pytest.fixture
def chunked(monkeypatch):
    """Row schedule on, ROWS rows per chunk (float32); records every planned chunk size."""
    monkeypatch.setattr(_launchers, "ROW_SCHEDULE_MIN_ROWS", 8)
    planned = []
    real = _launchers.plan_rows

    def spy(*args):
        planned.append(real(*args))
        return planned[-1]

    monkeypatch.setattr(_launchers, "plan_rows", spy)
    return planned


def budget(rows, elt=4):
    return rows * V * elt


@pytest.mark.parametrize(("opts", "reduction", "bias"), [c for c in CASES if c[1] != "none"],
                         ids=lambda v: str(v).replace(" ", ""))
def test_row_schedule_matches_float64(ref, chunked, opts, reduction, bias, device):
    x, w, b, target, cw = make(device)
    opts = dict(opts, memory_budget=budget(ROWS))
    if opts.pop("weight", False):
        opts["weight"] = cw.float()
    b = b.float() if bias else None
    got = run_triton(x.float(), w.float(), b, target, reduction=reduction, **opts)
    want = run_reference(ref, x.float(), w.float(), b, target, reduction=reduction, **opts)
    assert chunked == [16]  # 61 rows in 4 chunks of at most 16
    assert_matches(got, want)


def test_rows_unit_upstream_and_three_dim_input(ref, chunked, device):
    """loss.backward() (upstream 1: the gradients are handed on unscaled) on (B, T, D) input."""
    x, w, b, target, _ = make(device)
    x3, t3 = x[:60].reshape(4, 15, D).float(), target[:60].reshape(4, 15)
    xg, wg = x3.clone().requires_grad_(), w.float().clone().requires_grad_()
    loss = linear_cross_entropy(xg, wg, t3, z_loss=1e-2, memory_budget=budget(ROWS))
    loss.backward()
    xr, wr = x3.double().requires_grad_(), w.double().requires_grad_()
    want = ref((xr @ wr.T).reshape(-1, V), t3.reshape(-1), z_loss=1e-2)
    want.backward()
    assert chunked == [15]  # 60 rows, at most 16 a chunk: 4 chunks of 15
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wg.grad.double(), wr.grad, rtol=1e-5, atol=1e-6)


def test_reduction_none_keeps_the_triton_schedule(chunked, device):
    """A per-row upstream gradient arrives after dW has summed the rows: "none" stores columns."""
    x, w, b, target, _ = make(device)
    run_triton(x.float(), w.float(), None, target, reduction="none", memory_budget=budget(ROWS))
    assert chunked == [0]


def test_rows_partial_requires_grad(ref, chunked, device):
    x, w, b, target, _ = make(device)
    want = run_reference(ref, x.float(), w.float(), b.float(), target)
    up = torch.tensor(1.7, device=device)
    wf = w.float().requires_grad_()
    linear_cross_entropy(x.float(), wf, target, linear_bias=b.float(), memory_budget=budget(ROWS)).backward(up)
    torch.testing.assert_close(wf.grad.double(), want[2], rtol=1e-5, atol=1e-6)
    xf, bf = x.float().requires_grad_(), b.float().requires_grad_()
    linear_cross_entropy(xf, w.float(), target, linear_bias=bf, memory_budget=budget(ROWS)).backward(up)
    torch.testing.assert_close(xf.grad.double(), want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bf.grad.double(), want[3], rtol=1e-5, atol=1e-6)


def test_rows_gradients_are_handed_on_without_a_copy(monkeypatch, chunked, device):
    """The leaves' .grad are the very buffers the forward filled (no N x D or V x D copy)."""
    seen = []
    real = _launchers.scale_grads_

    def spy(grads, grad_output, *args):
        out = real(grads, grad_output, *args)
        seen.append([g.data_ptr() for g in out if g is not None])
        return out

    monkeypatch.setattr(_launchers, "scale_grads_", spy)
    x, w, _, target, _ = make(device)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    linear_cross_entropy(xf, wf, target, memory_budget=budget(ROWS)).backward()
    assert seen == [[xf.grad.data_ptr(), wf.grad.data_ptr()]]


def test_rows_ignored_rows_get_zero_gradient_and_all_ignored_is_zero(chunked, device):
    x, w, b, target, _ = make(device)
    _, dx, _, _ = run_triton(x.float(), w.float(), b.float(), target, memory_budget=budget(ROWS))
    assert torch.count_nonzero(dx[target == IGNORE]) == 0
    loss, dx, dw, db = run_triton(x.float(), w.float(), b.float(), torch.full_like(target, IGNORE),
                                  label_smoothing=0.1, z_loss=1e-2, memory_budget=budget(ROWS))
    assert loss.item() == 0.0
    for g in (dx, dw, db):
        assert torch.count_nonzero(g) == 0


def test_rows_backward_twice_is_refused(chunked, device):
    x, w, _, target, _ = make(device)
    wf = w.float().requires_grad_()
    loss = linear_cross_entropy(x.float(), wf, target, memory_budget=budget(ROWS))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_rows_deterministic(chunked, device):
    x, w, b, target, cw = make(device)
    opts = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, weight=cw.float(), memory_budget=budget(ROWS))
    first = run_triton(x.float(), w.float(), b.float(), target, **opts)
    second = run_triton(x.float(), w.float(), b.float(), target, **opts)
    for u, v in zip(first, second, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_low_precision_no_worse_than_naive_torch(ref, chunked, dtype, device):
    """4 chunks round dW 4 times in ``dtype``: errors against float64 on the same rounded
    inputs stay within the naive low-precision torch error + the tolerance of the Triton path."""
    x, w, b, target, cw = make(device)
    xl, wl, bl = x.to(dtype), w.to(dtype), b.to(dtype)
    opts = dict(ALL, weight=cw.float())
    got = run_triton(xl, wl, bl, target, memory_budget=budget(ROWS, elt=2), **opts)
    assert chunked == [16]
    assert_no_worse_than_naive(ref, got, xl, wl, bl, target, cw, opts)


def test_plan_rows():
    f32 = torch.float32
    row = V * 4
    # Even chunks: 3 rows fit, 8 rows -> 3 chunks of at most 3.
    assert _launchers.plan_rows(8192, V, f32, 3000 * row, "mean", True) == 2731
    assert _launchers.plan_rows(N, V, f32, N * row, "sum", True) == N  # every row at once
    assert _launchers.plan_rows(N, V, f32, 10 * N * row, "mean", True) == N
    # Not applicable: no budget, no gradient, "none", fewer rows than ROW_SCHEDULE_MIN_ROWS.
    assert _launchers.plan_rows(N, V, f32, None, "mean", True) == 0
    assert _launchers.plan_rows(N, V, f32, N * row, "mean", False) == 0
    assert _launchers.plan_rows(N, V, f32, N * row, "none", True) == 0
    assert _launchers.plan_rows(8192, V, f32, 255 * row, "mean", True) == 0
    assert _launchers.plan_rows(8192, V, f32, 256 * row, "mean", True) == 256
    # bfloat16 rows are half the bytes.
    assert _launchers.plan_rows(N, V, torch.bfloat16, 30 * V * 2, "mean", True) == 0
    assert _launchers.plan_rows(100, V, torch.bfloat16, 50 * V * 2, "mean", True) == 0
    assert _launchers.plan_rows(300, V, torch.bfloat16, 256 * V * 2, "mean", True) == 150


@pytest.mark.parametrize("count", ["host", "capture", "env"])
@pytest.mark.parametrize("valid_rows", [55, 6])
def test_rows_products_stop_at_the_last_non_ignored_row(ref, chunked, monkeypatch, count, valid_rows, device):
    """With the row count on the host, the chunks run over the non-ignored rows first and stop
    after the last (the first chunk is queued before the count is read, so it is whole); without
    it (CUDA graph capture, CROSSENT_TRITON_LINEAR_HOST_COUNT=0) every row goes through. The
    same answer either way, ignored rows with a zero gradient."""
    x, w, b, target, cw = make(device)
    if valid_rows == 6:
        target[torch.arange(N, device=device) % 12 != 0] = IGNORE  # rows 0, 12, 24, 36, 48, 60
    assert int((target != IGNORE).sum()) == valid_rows
    if count == "capture":
        no_host_count(monkeypatch)
    elif count == "env":
        monkeypatch.setenv(_launchers.HOST_COUNT_ENV, "0")
    opts = dict(ALL, weight=cw.float(), memory_budget=budget(ROWS))
    with ProductShapes() as seen:
        got = run_triton(x.float(), w.float(), b.float(), target, **opts)
    logits_rows = [a[0] for a, bm in seen.shapes if bm == (D, V)]  # E_r W^T (+ b) per chunk
    if count == "host":
        assert logits_rows == ([16, 16, 16, 7] if valid_rows == 55 else [16])
    else:
        assert logits_rows == [16, 16, 16, 13]
    assert_matches(got, run_reference(ref, x.float(), w.float(), b.float(), target, **opts))
    assert torch.count_nonzero(got[1][target == IGNORE]) == 0


@pytest.mark.parametrize(("schedule", "waits"), [
    ("lean", ["forward", "backward"]),           # products=1, 5 chunks: both passes wait
    ("lean_no_grad", ["forward"]),               # under torch.no_grad too
    ("lean_one_chunk", ["backward"]),            # a forward of one chunk needs no count
    ("lean_products2", ["backward"]),            # the fused Triton forward skips rows on the device
    ("lean_products0", []),                      # every product in Triton: nothing on the host
    ("rows", ["forward"]),                       # the row schedule, 4 chunks of rows
    ("rows_one_chunk", []),                      # one chunk of rows: no count needed
    ("store", []),                               # a budget that keeps vocabulary columns
])
@pytest.mark.parametrize("env", ["1", "0"])
def test_which_linear_paths_wait_for_the_host_count(chunked, monkeypatch, schedule, waits, env, device):
    """The _launchers module docstring's account of host waits: ``HostCount.get`` (the one wait
    for the GPU) runs where listed, and never with CROSSENT_TRITON_LINEAR_HOST_COUNT=0, nor in
    crossent.triton.cross_entropy."""
    monkeypatch.setenv(_launchers.HOST_COUNT_ENV, env)
    phase = ["forward"]
    seen = []
    real_get = _launchers.HostCount.get

    def spy(self):
        seen.append(phase[0])
        return real_get(self)

    monkeypatch.setattr(_launchers.HostCount, "get", spy)
    x, w, b, target, _ = make(device)
    opts = {}
    if schedule != "lean_one_chunk":  # five 256-column chunks, the count read after two
        monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 256 * 4)
        monkeypatch.setattr(_launchers, "FORWARD_CHUNKS_BEFORE_COUNT", 2)
    if schedule == "lean_products2":
        triton_products(monkeypatch, 2)
    elif schedule == "lean_products0":
        triton_products(monkeypatch, 0)
    elif schedule == "rows":
        opts["memory_budget"] = budget(ROWS)
    elif schedule == "rows_one_chunk":
        opts["memory_budget"] = budget(N)
    elif schedule == "store":
        opts["memory_budget"] = budget(N)
        opts["reduction"] = "none"  # no row schedule: the forward keeps the logits' gradient
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    if schedule == "lean_no_grad":
        with torch.no_grad():
            linear_cross_entropy(xf, wf, target, **opts)
    else:
        loss = linear_cross_entropy(xf, wf, target, **opts)
        phase[0] = "backward"
        loss.backward(upstream(loss))
    assert sorted(set(seen)) == (sorted(waits) if env == "1" else [])
    seen.clear()
    logits = x.float() @ w.float().T
    cross_entropy(logits.requires_grad_(), target).backward()
    assert seen == []


@pytest.mark.parametrize("count", ["host", "env"])
@pytest.mark.parametrize("valid_rows", [55, 0])
def test_lean_forward_chunks_after_the_count_take_the_non_ignored_rows(ref, monkeypatch, count, valid_rows, device):
    """Five 256-column chunks, the count read after two (FORWARD_CHUNKS_BEFORE_COUNT): the other
    three chunks' products take the non-ignored rows only (none at all when every row is
    ignored); without a count every chunk takes every row. The same answer either way."""
    monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 256 * 4)
    monkeypatch.setattr(_launchers, "FORWARD_CHUNKS_BEFORE_COUNT", 2)
    if count == "env":
        monkeypatch.setenv(_launchers.HOST_COUNT_ENV, "0")
    x, w, b, target, cw = make(device)
    if valid_rows == 0:
        target = torch.full_like(target, IGNORE)
    opts = dict(ALL, weight=cw.float())
    xf, wf, bf = (t.float().requires_grad_() for t in (x, w, b))
    with ProductShapes() as forward:
        loss = linear_cross_entropy(xf, wf, target, linear_bias=bf, **opts)
    rows = [a[0] for a, _ in forward.shapes]
    if count == "env":
        assert rows == [N] * 5
    else:
        assert rows == [N, N] + [valid_rows] * 3 if valid_rows else rows == [N, N]
    loss.backward(upstream(loss))
    got = (loss.detach(), xf.grad, wf.grad, bf.grad)
    if valid_rows == 0:  # the documented deviation: a mean over no row is 0 (PyTorch: NaN)
        assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in got[1:])
    else:
        assert_matches(got, run_reference(ref, x.float(), w.float(), b.float(), target, **opts))


@pytest.mark.parametrize("count", ["host", "capture"])
@pytest.mark.parametrize("ignore_every", [10, 0])
def test_triton_recompute_backward(ref, monkeypatch, count, ignore_every, device):
    """``products=3``: G from the Triton kernel that recomputes the logits, dE and dW by cuBLAS on
    the non-ignored rows (product shapes checked); without the count (capture) it is the default
    backward (cuBLAS logits); with no ignored row the compacted order is the rows' own."""
    triton_products(monkeypatch, 3)
    monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 512 * 4)  # 3 chunks
    if count == "capture":
        no_host_count(monkeypatch)
    x, w, b, target, cw = make(device, ignore_every=ignore_every)
    rows = int((target != IGNORE).sum()) if count == "host" else N
    opts = dict(ALL, weight=cw.float(), reduction="none")
    xf, wf, bf = (t.float().requires_grad_() for t in (x, w, b))
    loss = linear_cross_entropy(xf, wf, target, linear_bias=bf, **opts)
    with ProductShapes() as backward:
        loss.backward(upstream(loss))
    logits = [a for a, bm in backward.shapes if bm[0] == D]  # E' W_c^T: only when not fused
    assert len(logits) == (0 if count == "host" else 3)
    assert all(rows in a for a, _ in backward.shapes)
    got = (loss.detach(), xf.grad, wf.grad, bf.grad)
    assert_matches(got, run_reference(ref, x.float(), w.float(), b.float(), target, **opts))


def test_compacted_backward_takes_wider_chunks(ref, monkeypatch, device):
    """The backward's workspace holds the same bytes for the 55 non-ignored rows as the forward's
    for all 61: 384-column chunks (3 steps over V = 1031) instead of 256 (5 steps)."""
    monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", 55 * 384 * 4)
    assert _launchers.plan_linear(N, V, D, torch.float32, None, True).chunk == 256
    x, w, b, target, cw = make(device)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    opts = dict(ALL, weight=cw.float(), reduction="sum")
    loss = linear_cross_entropy(xf, wf, target, **opts)
    with ProductShapes() as backward:
        loss.backward(upstream(loss))
    assert [bm[1] for a, bm in backward.shapes if bm[0] == D] == [384, 384, 263]  # E' W_c^T per chunk
    got = (loss.detach(), xf.grad, wf.grad, None)
    assert_matches(got, run_reference(ref, x.float(), w.float(), None, target, **opts))


def with_tiles(monkeypatch, **fields):
    """The default tiles with ``fields`` replaced, for every dtype."""
    real = _launchers.linear_tiles
    monkeypatch.setattr(_launchers, "linear_tiles", lambda dtype: dataclasses.replace(real(dtype), **fields))


@pytest.mark.parametrize("m, v, d, elt", [(7373, 256000, 2304, 2), (7373, 128256, 4096, 2), (8192, 128256, 4096, 4),
                                          (55, 1031, 32, 4), (1, 1000, 64, 2), (5000, 50000, 16, 2),
                                          (3, 7, 5, 4)])
def test_lean_backward_chunks_plan(m, v, d, elt):
    """The backward's steps cover the vocabulary in column order; those kept in dW come first,
    are multiples of block_v no narrower than the workspace's steps, and read a buffer inside
    dW's storage, 16-byte aligned and past the rows they write; the others are the workspace's
    ``lean_chunk`` columns. Without the scratch (dW not wanted, or scratch_dw=0): workspace steps
    only. The step counts at the DESIGN shapes are the ones LinearTiles.scratch_dw states."""
    t = _launchers.linear_tiles(torch.bfloat16 if elt == 2 else torch.float32)
    dtype = torch.bfloat16 if elt == 2 else torch.float32
    regular = _launchers.lean_chunk(m, v, elt, t)
    chunks = _launchers.lean_backward_chunks(m, v, d, elt, t, True)
    assert chunks[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[-1][0] + chunks[-1][1] == v
    assert [c[2] for c in chunks] == sorted((c[2] for c in chunks), reverse=True)
    d_w = torch.empty(v, d, dtype=dtype, device="meta")
    for start, width, in_dw in chunks:
        if in_dw:
            assert width % t.block_v == 0 and width >= regular
            buf = _launchers._dw_scratch(d_w, m, width)
            offset = buf.storage_offset()
            assert buf.numel() == m * width and offset + m * width <= v * d
            assert offset * elt % 16 == 0 and offset >= (start + width) * d
        else:
            assert width == min(regular, v - start)
    plain = _launchers.lean_backward_chunks(m, v, d, elt, t, False)
    assert plain == [(s, min(regular, v - s), False) for s in range(0, v, regular)]
    design = {(7373, 256000, 2304, 2): (15, 65), (7373, 128256, 4096, 2): (9, 33)}
    if (m, v, d, elt) in design:
        assert (len(chunks), len(plain)) == design[(m, v, d, elt)]


@pytest.mark.parametrize("case", ["host", "capture", "recompute", "weight_frozen", "scratch_off"])
def test_backward_steps_in_the_weight_gradient(ref, monkeypatch, case, device):
    """Workspace steps of 128 columns (LEAN_WORKSPACE_BYTES = N*128*4): the first four backward
    steps keep their logits chunk in the unwritten part of the dW output (256, 256, 128, 128
    columns), the last three take the workspace (128, 128, 7): every option, against float64.
    The same with every row (no count, as under capture) and with the Triton recompute
    (products=3). Without dW (the weight frozen), or with scratch_dw=0: nine workspace steps."""
    monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 128 * 4)
    if case == "capture":
        no_host_count(monkeypatch)
    elif case == "recompute":
        triton_products(monkeypatch, 3)
    elif case == "scratch_off":
        with_tiles(monkeypatch, scratch_dw=0)
    x, w, b, target, cw = make(device)
    rows = N if case == "capture" else int((target != IGNORE).sum())
    opts = dict(ALL, weight=cw.float(), reduction="none")
    xf, wf, bf = (t.float().requires_grad_(case != "weight_frozen" or t is not w) for t in (x, w, b))
    loss = linear_cross_entropy(xf, wf, target, linear_bias=bf, **opts)
    with ProductShapes() as backward:
        loss.backward(upstream(loss))
    widths = [a[1] for a, bm in backward.shapes if a[0] == rows and bm == (a[1], D)]  # dE' += G_c W_c
    if case in ("weight_frozen", "scratch_off"):
        assert widths == [128] * 8 + [7]
    else:
        assert widths == [256, 256, 128, 128, 128, 128, 7]
    tiles = _launchers.linear_tiles(torch.float32)
    scratch = case not in ("weight_frozen", "scratch_off")
    assert widths == [c[1] for c in _launchers.lean_backward_chunks(rows, V, D, 4, tiles, scratch)]
    want = run_reference(ref, x.float(), w.float(), b.float(), target, **opts)
    if case == "weight_frozen":
        want = (*want[:2], None, want[3])
    assert_matches((loss.detach(), xf.grad, wf.grad, bf.grad), want)


@pytest.mark.parametrize("wide", [1, 0])
def test_lean_forward_takes_the_accumulators_bytes(ref, monkeypatch, wide, device):
    """bf16, D = 128, LEAN_WORKSPACE_BYTES = N*256*2 (256 columns of N rows). With wide_forward
    the forward adds N*D*(4 - 2) bytes (the float32 dE accumulator's, less the gathered rows'):
    384-column chunks, for all rows and then (the count read after one chunk) for the 55
    non-ignored rows; without it 256-column chunks. float32 gets no more (4 - 4 = 0). Both no
    worse than naive bf16 torch."""
    d = 128
    monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 256 * 2)
    monkeypatch.setattr(_launchers, "FORWARD_CHUNKS_BEFORE_COUNT", 1)
    with_tiles(monkeypatch, wide_forward=wide)
    t = _launchers.linear_tiles(torch.bfloat16)
    assert _launchers.lean_forward_bytes(N, d, 4, t) == N * 256 * 2
    assert _launchers.lean_forward_bytes(N, d, 2, t) == N * (256 + wide * d) * 2
    x, w, b, target, cw = make(device, d=d)
    xl, wl, bl = x.bfloat16(), w.bfloat16(), b.bfloat16()
    opts = dict(ALL, weight=cw.float())
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (xl, wl, bl))
    with ProductShapes() as forward:
        loss = linear_cross_entropy(xg, wg, target, linear_bias=bg, **opts)
    fwd = [(a[0], bm[1]) for a, bm in forward.shapes]  # E W_c^T (+ b_c) per chunk
    if wide:
        assert fwd == [(N, 384), (55, 384), (55, 263)]
    else:
        assert fwd == [(N, 256), (55, 256), (55, 256), (55, 256), (55, 7)]
    loss.backward(upstream(loss))
    got = (loss.detach(), xg.grad, wg.grad, bg.grad)
    assert_no_worse_than_naive(ref, got, xl, wl, bl, target, cw, opts)


@pytest.mark.parametrize("mode", ["lean_products0", "lean_products2", "lean_products3", "fast_part"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma(ref, monkeypatch, mode, dtype, device):
    """``LinearTiles.tma``: the fused forward kernel (and with ``products=3`` the backward's
    recompute) reads E (in the compacted order) and W through tensor descriptors; the same answer
    as float64 (bf16: no worse than naive bf16 torch). Rows of D = 32 are 16-byte aligned; D = 36
    in bf16 (72 bytes) is not, and falls back to the pointers."""
    real = _launchers.linear_tiles
    products = {"lean_products0": 0, "lean_products3": 3}.get(mode, 2)
    monkeypatch.setattr(_launchers, "linear_tiles",
                        lambda dt: dataclasses.replace(real(dt), products=products, tma=1))
    seen = []
    real_operands = _launchers._tma_operands

    def spy(*args):
        out = real_operands(*args)
        seen.append(out[0] is not args[0])
        return out

    monkeypatch.setattr(_launchers, "_tma_operands", spy)
    opts = dict(ALL, weight=None, reduction="none")
    if mode == "fast_part":
        monkeypatch.setattr(_launchers, "LEAN_WORKSPACE_BYTES", N * 256 * 4)
        opts["memory_budget"] = N * 600 * dtype.itemsize  # 256 columns kept + one 256-column chunk
    for d in (D, 36):
        x, w, b, target, cw = make(device, d=d)
        opts["weight"] = cw.float()
        xl, wl, bl = x.to(dtype), w.to(dtype), b.to(dtype)
        got = run_triton(xl, wl, bl, target, **opts)
        if dtype == torch.float32:
            assert_matches(got, run_reference(ref, xl, wl, bl, target, **opts))
        else:
            naive_opts = {k: v for k, v in opts.items() if k != "memory_budget"}
            assert_no_worse_than_naive(ref, got, xl, wl, bl, target, cw, naive_opts)
    aligned36 = dtype == torch.float32  # 36 * 4 bytes are aligned, 36 * 2 are not
    assert seen == ([True, True, aligned36, aligned36] if products == 3 else [True, aligned36])  # forward, backward


def test_host_count_variable_is_checked(monkeypatch, device):
    x, w, _, target, _ = make(device, n=5, v=7)
    monkeypatch.setenv(_launchers.HOST_COUNT_ENV, "off")
    with pytest.raises(ValueError, match="CROSSENT_TRITON_LINEAR_HOST_COUNT must be 0 .* got 'off'"):
        linear_cross_entropy(x.float(), w.float().requires_grad_(), target)
