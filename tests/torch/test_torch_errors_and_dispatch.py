"""Bad input gives a clear error; impl= dispatch (triton is faked: no GPU here)."""

from __future__ import annotations

import math
import re
import sys
import types

import numpy as np
import pytest
import torch

import crossent.torch as cet
from crossent.torch import functional as cet_functional

X = torch.zeros(4, 5)
Y = torch.tensor([0, 1, 2, 4])
E = torch.zeros(4, 3)
W = torch.zeros(5, 3)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: cet.cross_entropy(X, torch.tensor([0, 1, 5, 2])), ValueError,
         r"target must hold class indices in \[0, 5\) or ignore_index=-100, got 5"),
        (lambda: cet.cross_entropy(X, torch.tensor([0, -1, 2, 2])), ValueError,
         r"got -1"),
        (lambda: cet.linear_cross_entropy(E, W, torch.tensor([0, 9, 1, 1])), ValueError,
         r"class indices in \[0, 5\)"),
        (lambda: cet.cross_entropy(X, Y[:3]), ValueError,
         r"target \(class indices\) must have shape \(4,\) .* got \(3,\)"),
        (lambda: cet.linear_cross_entropy(E, W, Y[:2]), ValueError,
         r"target \(class indices\) must have shape \(4,\)"),
        (lambda: cet.cross_entropy(X, torch.zeros(4, 4)), ValueError,
         r"target \(probabilities\) must have shape \(4, 5\)"),
        (lambda: cet.linear_cross_entropy(torch.zeros(4, 2), W, Y), ValueError,
         r"input's last dimension must equal linear_weight's D=3"),
        (lambda: cet.linear_cross_entropy(E, torch.zeros(5, 3, 1), Y), ValueError,
         r"linear_weight must have shape \(V, D\)"),
        (lambda: cet.linear_cross_entropy(E, W, Y, linear_bias=torch.zeros(4)), ValueError,
         r"linear_bias must have shape \(5,\)"),
        (lambda: cet.linear_cross_entropy(E, W.double(), Y), TypeError,
         r"same dtype"),
        (lambda: cet.cross_entropy(X, Y, torch.ones(4)), ValueError,
         r"weight must be a 1-D tensor with one entry per class \(5\), got shape \(4,\)"),
        (lambda: cet.cross_entropy(X, Y, torch.tensor([1.0, math.nan, 1, 1, 1])), ValueError,
         r"weight must not contain NaN"),
        (lambda: cet.cross_entropy(X, torch.full((4, 5), math.nan)), ValueError,
         r"target must not contain NaN"),
        (lambda: cet.cross_entropy(X, Y, impl="cuda"), ValueError,
         r"impl must be one of \('auto', 'triton', 'chunked', 'reference'\), got 'cuda'"),
        (lambda: cet.linear_cross_entropy(E, W, Y, impl="fast"), ValueError,
         r"impl must be one of"),
        (lambda: cet.cross_entropy(X, Y, softcap=0.0), ValueError,
         r"softcap must be None or a finite float > 0, got 0.0"),
        (lambda: cet.linear_cross_entropy(E, W, Y, softcap=-1.0), ValueError,
         r"softcap must be None or a finite float > 0, got -1.0"),
        (lambda: cet.cross_entropy(X, Y, label_smoothing=1.5), ValueError,
         r"label_smoothing must be in \[0, 1\], got 1.5"),
        (lambda: cet.linear_cross_entropy(E, W, Y, label_smoothing=-0.1), ValueError,
         r"label_smoothing must be in \[0, 1\], got -0.1"),
        (lambda: cet.cross_entropy(X, Y, reduction="avg"), ValueError,
         r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        (lambda: cet.cross_entropy(X, Y, z_loss=-1.0), ValueError, r"z_loss must be"),
        (lambda: cet.linear_cross_entropy(E, W, Y, chunk_size=0), ValueError,
         r"chunk_size must be None or an int >= 1, got 0"),
        (lambda: cet.cross_entropy(Y, Y), TypeError, r"input must be a floating-point tensor"),
        (lambda: cet.cross_entropy(X, Y.bool()), TypeError, r"target must hold int64"),
        (lambda: cet.cross_entropy(torch.tensor(1.0), Y), ValueError, r"class dimension"),
    ],
)
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_validate_false_skips_value_checks_and_true_forces_them():
    # validate=False is the accelerator default (no host sync); on the CPU it can be forced off.
    loss = cet.cross_entropy(X, Y, torch.tensor([1.0, math.nan, 1, 1, 1]), validate=False)
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="got 5"):
        cet.cross_entropy(X, torch.tensor([0, 1, 5, 2]), validate=True)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        cet.cross_entropy(X, Y, impl="triton")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        cet.linear_cross_entropy(E, W, Y, impl="triton")


def test_triton_rejects_probability_targets(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="integer class targets only"):
        cet.cross_entropy(X, torch.full((4, 5), 0.2), impl="triton")


def test_triton_dtype_error_names_the_functionals_argument(monkeypatch):
    """impl="triton" refuses float64 in crossent.torch itself, naming ``input`` (the argument of
    cet.cross_entropy and cet.linear_cross_entropy), before crossent.triton is reached (whose
    own check names its ``logits``)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake = _FakeTriton()
    monkeypatch.setitem(sys.modules, "crossent.triton", fake)
    dtype = torch.float64  # the one floating dtype the kernels do not take
    message = (r"^input must be float32, bfloat16 or float16 for impl='triton' \(float32 "
               rf"accumulation\), got {dtype}; use impl='chunked' or impl='auto' for {dtype}$")
    with pytest.raises(TypeError, match=message):
        cet.cross_entropy(X.to(dtype), Y, impl="triton")
    with pytest.raises(TypeError, match=message):
        cet.linear_cross_entropy(E.to(dtype), W.to(dtype), Y, impl="triton")
    assert fake.calls == []


def test_missing_triton_function_gives_clear_import_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "crossent.triton", types.ModuleType("crossent.triton"))
    with pytest.raises(ImportError, match="impl='triton' needs crossent.triton.cross_entropy"):
        cet.cross_entropy(X, Y, impl="triton")


class _FakeTriton(types.ModuleType):
    """Records the calls the wrapper makes and answers with the reference implementation."""

    def __init__(self):
        super().__init__("crossent.triton")
        self.calls = []

    def cross_entropy(self, logits, target, **kw):
        self.calls.append(("cross_entropy", tuple(logits.shape), tuple(target.shape), dict(kw)))
        kw.pop("inplace_backward")
        return cet.cross_entropy(logits, target, impl="reference", **kw)

    def linear_cross_entropy(self, x, w, target, **kw):
        self.calls.append(("linear_cross_entropy", tuple(x.shape), tuple(target.shape), dict(kw)))
        kw.pop("memory_budget")  # a kernel option: the reference path has no workspace to size
        return cet.linear_cross_entropy(x, w, target, impl="reference", **kw)


def test_triton_dispatch_reshapes_and_passes_options(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake = _FakeTriton()
    monkeypatch.setitem(sys.modules, "crossent.triton", fake)
    x = torch.randn(2, 5, 3)  # (N, C, d1): class dim 1
    y = torch.randint(0, 5, (2, 3))
    got = cet.cross_entropy(x, y, reduction="none", z_loss=0.1, softcap=5.0, impl="triton",
                            inplace_backward=True)
    assert got.shape == (2, 3)
    name, xs, ys, kw = fake.calls[-1]
    assert (name, xs, ys) == ("cross_entropy", (6, 5), (6,))
    assert kw["inplace_backward"] is True and kw["z_loss"] == 0.1 and kw["softcap"] == 5.0
    want = cet.cross_entropy(x, y, reduction="none", z_loss=0.1, softcap=5.0, impl="reference")
    torch.testing.assert_close(got, want)

    h = torch.randn(2, 3, 4)  # (B, T, D)
    w = torch.randn(7, 4)
    t = torch.randint(0, 7, (2, 3))
    got = cet.linear_cross_entropy(h, w, t, reduction="none", impl="triton")
    assert got.shape == (2, 3)
    assert fake.calls[-1][:3] == ("linear_cross_entropy", (6, 4), (6,))


def test_auto_picks_chunked_on_cpu_and_triton_on_cuda(monkeypatch):
    fake = _FakeTriton()
    monkeypatch.setitem(sys.modules, "crossent.triton", fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cet.cross_entropy(torch.randn(4, 5), Y)  # CPU tensors: chunked, even under the interpreter
    assert fake.calls == []
    monkeypatch.setattr(cet_functional._checks, "triton_importable", lambda: True)
    cuda = torch.device("cuda")
    bf16, f64 = torch.bfloat16, torch.float64
    assert cet_functional._resolve_impl("auto", cuda, soft=False, dtype=bf16) == "triton"
    assert cet_functional._resolve_impl("auto", cuda, soft=True, dtype=bf16) == "chunked"
    # The kernels take no float64: auto sends it to chunked instead of failing in the kernel.
    assert cet_functional._resolve_impl("auto", cuda, soft=False, dtype=f64) == "chunked"
    monkeypatch.setattr(cet_functional._checks, "triton_importable", lambda: False)
    assert cet_functional._resolve_impl("auto", cuda, soft=False, dtype=bf16) == "chunked"


def test_memory_budget_is_passed_to_triton_and_refused_elsewhere(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake = _FakeTriton()
    monkeypatch.setitem(sys.modules, "crossent.triton", fake)
    h, w, t = torch.randn(6, 4), torch.randn(7, 4), torch.randint(0, 7, (6,))
    cet.linear_cross_entropy(h, w, t, impl="triton", memory_budget=1 << 20)
    assert fake.calls[-1][3]["memory_budget"] == 1 << 20
    for impl in ("chunked", "reference"):
        with pytest.raises(ValueError, match=rf"memory_budget applies to impl='triton'.* with impl='{impl}'"):
            cet.linear_cross_entropy(h, w, t, impl=impl, memory_budget=1 << 20)


@pytest.mark.parametrize("case", ["plain", "weight_requires_grad", "probabilities"])
def test_auto_ignores_memory_budget_where_it_does_not_pick_triton(case):
    """impl="auto" on CPU tensors (chunked, or reference for class weights that require grad
    and probability targets) ignores a memory_budget instead of refusing it: the loss and
    gradients equal float64 PyTorch's on the materialized logits, as without the budget."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 7, (6,), generator=gen)
    t[2] = -100
    cw = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5
    kw = dict(label_smoothing=0.1)
    if case == "weight_requires_grad":
        kw["weight"] = cw.clone().requires_grad_()
    if case == "probabilities":
        t = torch.softmax(torch.randn(6, 7, generator=gen, dtype=torch.float64), -1)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = cet.linear_cross_entropy(hg, wg, t, impl="auto", memory_budget=1 << 30, **kw)
    loss.backward()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    kr = dict(kw, weight=cw) if "weight" in kw else kw  # PyTorch does not differentiate it
    want = torch.nn.functional.cross_entropy(hr @ wr.T, t, **kr)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wg.grad, wr.grad, rtol=1e-10, atol=1e-12)
    if case == "weight_requires_grad":  # the class weights' gradient: reference's, no budget
        cw_ref = cw.clone().requires_grad_()
        cet.linear_cross_entropy(h, w, t, impl="reference", label_smoothing=0.1, weight=cw_ref).backward()
        assert torch.equal(kw["weight"].grad, cw_ref.grad)


@pytest.mark.parametrize("impl", ["auto", "chunked", "triton"])
@pytest.mark.parametrize("budget", [-1, 1.5, True, "1GiB"])
def test_bad_memory_budget_is_refused_on_every_route(impl, budget, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "crossent.triton", _FakeTriton())
    error = ValueError if budget == -1 and type(budget) is int else TypeError  # TypeError: not an int
    with pytest.raises(error, match=rf"memory_budget must be None or an int >= 0 \(bytes\), got {budget!r}"):
        cet.linear_cross_entropy(E, W, Y, impl=impl, memory_budget=budget)


def test_numpy_integer_memory_budget_reaches_triton_as_an_int(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake = _FakeTriton()
    monkeypatch.setitem(sys.modules, "crossent.triton", fake)
    cet.linear_cross_entropy(E, W, Y, impl="triton", memory_budget=np.int64(4096))
    budget = fake.calls[-1][3]["memory_budget"]
    assert budget == 4096 and type(budget) is int


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nan_check_finds_a_single_nan_anywhere_without_a_mask(dtype):
    """The NaN check reads the minimum (torch's min propagates NaN) instead of an isnan mask of
    the targets' size: one NaN at any position of a strided tensor of every floating dtype is
    found, inf is not NaN, and an empty tensor has none."""
    from crossent.torch import _checks

    base = torch.rand(37, 11, dtype=dtype).T  # not contiguous
    assert not _checks.has_nan(base)
    for i, j in np.ndindex(*base.shape):
        t = base.clone()
        t[i, j] = math.nan
        assert _checks.has_nan(t), (i, j)
    assert not _checks.has_nan(torch.tensor([math.inf, -math.inf], dtype=dtype))
    assert not _checks.has_nan(torch.empty(0, 5, dtype=dtype))
    probs = torch.full((3, 4), 0.25, dtype=dtype)
    probs[2, 3] = math.nan
    with pytest.raises(ValueError, match="target must not contain NaN"):
        cet.cross_entropy(torch.zeros(3, 4, dtype=dtype), probs)


@pytest.mark.parametrize("validate", ["no", 0, 1, np.bool_(False), torch.tensor(True)], ids=repr)
def test_validate_must_be_a_bool(validate):
    """Review (linear) 3: validate was read with bool(), so validate="no" turned the checks on."""
    x = torch.randn(4, 5)
    calls = [
        lambda: cet.cross_entropy(x, Y, validate=validate),
        lambda: cet.linear_cross_entropy(x, torch.randn(7, 5), Y, validate=validate),
        lambda: cet.binary_cross_entropy_with_logits(x, torch.rand(4, 5), validate=validate),
        lambda: cet.kl_div(x, torch.rand(4, 5), reduction="batchmean", validate=validate),
        lambda: cet.CrossEntropyLoss(validate=validate)(x, Y),
    ]
    message = "^validate must be None, True or False, got " + re.escape(repr(validate)) + "$"
    for call in calls:
        with pytest.raises(TypeError, match=message):
            call()


def test_module_reprs_show_every_option():
    """Review (linear) 4: two heads that behave differently (chunk_size, validate, bias) printed
    the same."""
    heads = [cet.LinearCrossEntropyLoss(8, 5), cet.LinearCrossEntropyLoss(8, 5, bias=True),
             cet.LinearCrossEntropyLoss(8, 5, chunk_size=4), cet.LinearCrossEntropyLoss(8, 5, validate=False)]
    assert len({repr(h) for h in heads}) == len(heads)
    assert "bias=True" in repr(heads[1]) and "chunk_size=4" in repr(heads[2]) and "validate=False" in repr(heads[3])
    losses = [cet.CrossEntropyLoss(), cet.CrossEntropyLoss(validate=True), cet.CrossEntropyLoss(inplace_backward=True)]
    assert len({repr(m) for m in losses}) == len(losses)
