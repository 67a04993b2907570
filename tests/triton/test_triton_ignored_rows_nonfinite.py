"""An ignored row contributes 0 whatever its inputs (DESIGN.md, Semantics), on every Triton path.

The same cases as tests/torch/test_torch_ignored_rows_nonfinite.py, for crossent.triton's
``cross_entropy`` and ``linear_cross_entropy``: a NaN or inf upstream gradient on the ignored rows
(``reduction="none"``, e.g. a per-sequence normalisation of padded sequences of length 0), a
non-finite scalar upstream gradient ("mean"/"sum"), and NaN/inf logits or hidden states on the
ignored rows (a fully masked attention row). Expected: the loss and gradients of the problem with
the ignored rows sliced out (float64 PyTorch, ``reference`` in conftest.py), and exactly 0 on the
ignored rows of the logits' / input's gradient.

Linear paths (``PATHS``): the lean default (cuBLAS products on the rows counted on the host), the
same without the count (CUDA graph capture, or CROSSENT_TRITON_LINEAR_HOST_COUNT=0: every row
through the products), the Triton-kernel products (``LinearTiles.products=0``), the Triton
recompute backward (``products=3``), the "fast" schedule that stores vocabulary columns
("none" with a memory_budget), and the "fast" row schedule ("mean"/"sum" with a memory_budget)
with one chunk of rows, several chunks with the count, and several without it. Small odd shapes
(13 x 8 x 37) keep the interpreter fast.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402

from crossent.triton import _launchers, cross_entropy, linear_cross_entropy  # noqa: E402

N, D, V = 13, 8, 37
IGNORE = -100
NAN, INF = float("nan"), float("inf")
#: 6 of 13 rows kept: with 7-row chunks the row schedule's first (compacted) chunk holds an
#: ignored row too.
IGNORED = [1, 3, 4, 7, 8, 10, 12]


def make(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (N,), generator=g)
    target[IGNORED] = IGNORE
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    return tuple(t.to(device) for t in (x, w, b, target, cw))


def poison(t, target):
    """``t`` with NaN, +inf and -inf on the rows of ignored targets: whole rows and single entries."""
    t = t.clone()
    ignored = (target == IGNORE).nonzero().flatten().tolist()
    t[ignored[0]] = NAN
    t[ignored[1], 0] = INF
    t[ignored[2], -1] = -INF
    t[ignored[3]] = INF
    t[ignored[4], 1] = NAN
    return t


OPTIONS = {
    "plain": {},
    "all": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
}


def options(name, cw, dtype):
    opts = dict(OPTIONS[name])
    if opts.pop("weight", False):
        opts["weight"] = cw.to(dtype)
    return opts


def bad_upstream(reduction, bad, keep, device):
    """The upstream gradient: ``bad`` on the ignored rows ("none", random elsewhere) or the
    scalar ``bad`` ("mean"/"sum")."""
    if reduction != "none":
        return torch.tensor(bad, device=device)
    g = torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    return torch.where(keep.cpu(), g, bad).to(device)


def exactly_zero(t):
    return torch.equal(t, torch.zeros_like(t))


# ------------------------------------------------------------------------------------------------
# cross_entropy on materialized logits.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["single", "streamed"])
def ce_layout(request, monkeypatch):
    """Rows held in registers (one block) or streamed in 16-column steps (3 per row)."""
    if request.param == "streamed":
        monkeypatch.setattr(_launchers, "SINGLE_BLOCK_MAX", 16)
        monkeypatch.setattr(_launchers, "LOOP_BLOCK", 16)
    return request.param


def ce_grad(logits, target, upstream, inplace, **opts):
    x = logits.detach().clone().requires_grad_()
    leaf = x
    if inplace:
        x = x * 1.0  # a non-leaf: the kernel writes the gradient into these logits
    loss = cross_entropy(x, target, inplace_backward=inplace, **opts)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_ce_nonfinite_upstream_on_ignored_rows(ref, ce_layout, bad, inplace, name, device):
    """reduction="none": NaN/inf/-inf upstream on the ignored rows only gives them a zero
    gradient and leaves every other row as F.cross_entropy's."""
    x, w, _, target, cw = make(device)
    logits = x @ w.T * 3.0
    keep = target != IGNORE
    up = bad_upstream("none", bad, keep, device)
    opts = options(name, cw, torch.float32)
    loss, grad = ce_grad(logits.float(), target, up, inplace, reduction="none", **opts)
    ld = logits.clone().requires_grad_()
    want = ref(ld, target, reduction="none", **options(name, cw, torch.float64))
    want.backward(torch.where(keep, up, 0.0))
    assert exactly_zero(grad[~keep])
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ld.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("inplace", [False, True])
def test_ce_nonfinite_scalar_upstream(ce_layout, bad, reduction, inplace, device):
    """A NaN/inf scalar upstream gradient: the ignored rows' gradient stays exactly 0 (as in
    F.cross_entropy), every other row's is non-finite."""
    x, w, _, target, cw = make(device)
    keep = target != IGNORE
    opts = options("all", cw, torch.float32)
    _, grad = ce_grad((x @ w.T).float(), target, torch.tensor(bad, device=device), inplace,
                      reduction=reduction, **opts)
    assert exactly_zero(grad[~keep])
    assert not torch.isfinite(grad[keep]).any()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_ce_nonfinite_logits_on_ignored_rows(ref, ce_layout, reduction, inplace, name, device):
    """NaN/inf logits on the ignored rows (and, for "none", a NaN upstream there too): the loss
    and gradient of the problem without those rows, 0 on them."""
    x, w, _, target, cw = make(device)
    keep = target != IGNORE
    logits = poison(x @ w.T, target)
    up = bad_upstream(reduction, NAN, keep, device) if reduction == "none" else torch.tensor(1.7, device=device)
    opts = options(name, cw, torch.float32)
    loss, grad = ce_grad(logits.float(), target, up, inplace, reduction=reduction, **opts)
    kept = logits[keep].clone().requires_grad_()
    want = ref(kept, target[keep], reduction=reduction, **options(name, cw, torch.float64))
    want.backward(up[keep] if reduction == "none" else up.double())
    assert exactly_zero(grad[~keep])
    if reduction == "none":
        assert exactly_zero(loss[~keep])
        loss = loss[keep]
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad[keep].double(), kept.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# linear_cross_entropy: every schedule.
# ------------------------------------------------------------------------------------------------

#: path -> the reductions it serves (the row schedule takes "mean"/"sum" only; "none" with a
#: memory_budget keeps the Triton schedule that stores vocabulary columns).
PATHS = {
    "lean": ("none", "mean", "sum"),
    "lean-no-count": ("none", "mean", "sum"),
    "lean-triton": ("none", "mean", "sum"),
    "lean-recompute": ("none", "mean"),
    "fast-columns": ("none",),
    "rows-one-chunk": ("mean", "sum"),
    "rows-chunks": ("mean", "sum"),
    "rows-chunks-no-count": ("mean", "sum"),
}
ROWS = 7  # rows per chunk of the row schedule's "chunks" paths: 13 rows in chunks of 7 and 6


def path_cases(reductions=("none", "mean", "sum")):
    return [(p, r) for p, rs in PATHS.items() for r in rs if r in reductions]


def set_path(path, monkeypatch):
    """Select ``path`` (see PATHS); returns the memory_budget to pass."""
    if path in ("lean-triton", "lean-recompute"):
        products = 0 if path == "lean-triton" else 3
        real = _launchers.linear_tiles
        monkeypatch.setattr(_launchers, "linear_tiles",
                            lambda dtype: dataclasses.replace(real(dtype), products=products))
    if path.endswith("no-count"):
        monkeypatch.setenv(_launchers.HOST_COUNT_ENV, "0")
    if path == "fast-columns":
        return N * V * 4  # every column's gradient stored
    if path == "rows-one-chunk":
        return 1 << 30
    if path.startswith("rows-chunks"):
        monkeypatch.setattr(_launchers, "ROW_SCHEDULE_MIN_ROWS", 4)
        return ROWS * V * 4
    return None


def spy_schedule(path, monkeypatch):
    """Record which schedule ran: the row schedule's chunk size, or the plan's stored columns."""
    seen = {}
    plan_rows, plan_linear = _launchers.plan_rows, _launchers.plan_linear

    def rows_spy(*args):
        seen["rows"] = plan_rows(*args)
        return seen["rows"]

    def linear_spy(*args):
        plan = plan_linear(*args)
        seen["store"], seen["products"] = plan.n_store, plan.tiles.products
        return plan

    monkeypatch.setattr(_launchers, "plan_rows", rows_spy)
    monkeypatch.setattr(_launchers, "plan_linear", linear_spy)
    return seen


def check_schedule(path, seen):
    expected_rows = {"rows-one-chunk": N, "rows-chunks": ROWS, "rows-chunks-no-count": ROWS}.get(path, 0)
    assert seen.get("rows", 0) == expected_rows
    if not expected_rows:
        assert seen["store"] == (V if path == "fast-columns" else 0)
        assert seen["products"] == {"lean-triton": 0, "lean-recompute": 3}.get(path, 1)


def linear_grads(x, w, b, target, upstream, **opts):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], **opts)
    loss.backward(upstream.to(loss.dtype))
    return (loss.detach(), *(leaf.grad for leaf in leaves))


def oracle(ref, x, w, b, target, upstream, reduction, **opts):
    """float64 loss and gradients of ``x @ w.T + b`` (the rows given) by plain PyTorch."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    loss = ref(leaves[0] @ leaves[1].T + leaves[2], target, reduction=reduction, **opts)
    loss.backward(upstream)
    return (loss.detach(), *(leaf.grad for leaf in leaves))


def assert_close_all(got, want, names=("loss", "input", "weight", "bias")):
    """float32 against float64; on CUDA (cuBLAS' own summation order) the absolute tolerance is
    1e-5 of the largest entry, as in test_triton_linear_cross_entropy.assert_matches."""
    for name, a, e in zip(names, got, want, strict=True):
        atol = max(1e-6, 1e-5 * float(e.abs().max())) if a.is_cuda and e.numel() else 1e-6
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("path", [p for p, _ in path_cases(("none",))])
def test_linear_nonfinite_upstream_on_ignored_rows(ref, monkeypatch, path, bad, device):
    """reduction="none", NaN/inf/-inf upstream on the ignored rows only: every gradient equals
    that of F.cross_entropy (whose logits' gradient is 0 there), dx exactly 0 on those rows."""
    x, w, b, target, cw = make(device)
    keep = target != IGNORE
    budget = set_path(path, monkeypatch)
    seen = spy_schedule(path, monkeypatch)
    up = bad_upstream("none", bad, keep, device)
    opts = options("all", cw, torch.float32)
    got = linear_grads(x.float(), w.float(), b.float(), target, up, reduction="none", memory_budget=budget, **opts)
    check_schedule(path, seen)
    want = oracle(ref, x, w, b, target, torch.where(keep, up, 0.0), "none", **options("all", cw, torch.float64))
    assert exactly_zero(got[1][~keep])
    assert_close_all(got, want)


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize(("path", "reduction"), path_cases(("mean", "sum")))
def test_linear_nonfinite_scalar_upstream(monkeypatch, path, reduction, bad, device):
    """A NaN/inf scalar upstream gradient: dx stays exactly 0 on the ignored rows; every other
    gradient entry is non-finite (as F.cross_entropy's composition gives)."""
    x, w, b, target, cw = make(device)
    keep = target != IGNORE
    budget = set_path(path, monkeypatch)
    seen = spy_schedule(path, monkeypatch)
    opts = options("all", cw, torch.float32)
    _, dx, dw, db = linear_grads(x.float(), w.float(), b.float(), target, torch.tensor(bad, device=device),
                                 reduction=reduction, memory_budget=budget, **opts)
    check_schedule(path, seen)
    assert exactly_zero(dx[~keep])
    assert not torch.isfinite(dx[keep]).any()
    assert not torch.isfinite(dw).any() and not torch.isfinite(db).any()


@pytest.mark.parametrize(("path", "reduction"), path_cases())
@pytest.mark.parametrize("name", list(OPTIONS))
def test_linear_nonfinite_hidden_states_on_ignored_rows(ref, monkeypatch, path, reduction, name, device):
    """NaN/inf/-inf hidden states on the ignored rows: the loss and the gradients of the problem
    without those rows (dW and db finite), dx exactly 0 on them."""
    x, w, b, target, cw = make(device)
    keep = target != IGNORE
    xp = poison(x, target)
    budget = set_path(path, monkeypatch)
    seen = spy_schedule(path, monkeypatch)
    up = bad_upstream("none", 0.0, keep, device) if reduction == "none" else torch.tensor(1.7, device=device)
    got = linear_grads(xp.float(), w.float(), b.float(), target, up, reduction=reduction, memory_budget=budget,
                       **options(name, cw, torch.float32))
    check_schedule(path, seen)
    want = oracle(ref, x[keep], w, b, target[keep], up[keep] if reduction == "none" else up.double(), reduction,
                  **options(name, cw, torch.float64))
    loss, dx, dw, db = got
    assert exactly_zero(dx[~keep])
    if reduction == "none":
        assert exactly_zero(loss[~keep])
        loss = loss[keep]
    assert_close_all((loss, dx[keep], dw, db), want)


@pytest.mark.parametrize("path", [p for p, _ in path_cases(("none",))])
def test_linear_nonfinite_hidden_states_and_upstream_on_ignored_rows(ref, monkeypatch, path, device):
    """Both at once, as padding gives them: NaN/inf hidden states and a NaN upstream gradient on
    the ignored rows ("none")."""
    x, w, b, target, cw = make(device)
    keep = target != IGNORE
    budget = set_path(path, monkeypatch)
    up = bad_upstream("none", NAN, keep, device)
    got = linear_grads(poison(x, target).float(), w.float(), b.float(), target, up, reduction="none",
                       memory_budget=budget, **options("all", cw, torch.float32))
    want = oracle(ref, x[keep], w, b, target[keep], up[keep], "none", **options("all", cw, torch.float64))
    loss, dx, dw, db = got
    assert exactly_zero(dx[~keep]) and exactly_zero(loss[~keep])
    assert_close_all((loss[keep], dx[keep], dw, db), want)


@pytest.mark.parametrize("need", ["input", "weight", "bias"])
@pytest.mark.parametrize("path", ["lean-no-count", "rows-one-chunk", "rows-chunks-no-count"])
def test_linear_nonfinite_hidden_states_one_gradient_wanted(ref, monkeypatch, path, need, device):
    """One gradient wanted at a time, where the ignored rows of the input go through the cuBLAS
    products (no row count on the host): the masked copy of the input has no dE buffer to live in
    when dE is not wanted."""
    x, w, b, target, _ = make(device)
    keep = target != IGNORE
    budget = set_path(path, monkeypatch)
    xf, wf, bf = poison(x, target).float(), w.float(), b.float()
    leaf = {"input": xf, "weight": wf, "bias": bf}[need].requires_grad_()
    linear_cross_entropy(xf, wf, target, linear_bias=bf, reduction="sum", memory_budget=budget).backward()
    want = oracle(ref, x[keep], w, b, target[keep], torch.tensor(1.0, dtype=torch.float64), "sum")
    if need == "input":
        assert exactly_zero(leaf.grad[~keep])
        torch.testing.assert_close(leaf.grad[keep].double(), want[1], rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(leaf.grad.double(), want[2 if need == "weight" else 3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize(("path", "reduction"), path_cases(("mean", "sum")))
def test_linear_all_rows_ignored_nonfinite_scalar_upstream_gives_zero_gradients(monkeypatch, path, reduction, bad,
                                                                                  device):
    """Every row ignored and a NaN/inf scalar upstream gradient: the loss is 0 and every gradient
    exactly 0, dW and db included (they sum over no row), as F.cross_entropy's composition gives
    (not 0 * NaN)."""
    x, w, b, target, cw = make(device)
    target = torch.full_like(target, IGNORE)
    budget = set_path(path, monkeypatch)
    opts = options("all", cw, torch.float32)
    loss, dx, dw, db = linear_grads(x.float(), w.float(), b.float(), target, torch.tensor(bad, device=device),
                                    reduction=reduction, memory_budget=budget, **opts)
    assert loss.item() == 0.0
    assert exactly_zero(dx) and exactly_zero(dw) and exactly_zero(db)
