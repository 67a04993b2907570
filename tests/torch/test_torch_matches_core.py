"""crossent.torch agrees with crossent.core (the spec) on the documented deviations too."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import crossent as ce
import crossent.torch as cet

CASES = {
    "minus-inf-logits-smoothing": dict(label_smoothing=0.3),
    "z-loss-softcap-weights": dict(z_loss=0.05, softcap=2.0, weighted=True, label_smoothing=0.1),
    "all-ignored": dict(all_ignored=True, z_loss=0.1),
    "soft-targets-zero-mass-on-minus-inf": dict(soft=True, label_smoothing=0.2, weighted=True),
}


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_layer_equals_core(impl, reduction, case):
    opts = dict(CASES[case])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(11, 6)) * 2
    x[:, 4] = -math.inf
    x[2, 1] = -math.inf
    weight = rng.uniform(0.2, 2.0, size=6) if opts.pop("weighted", False) else None
    if opts.pop("soft", False):
        t = rng.uniform(size=(11, 6))
        t[np.isinf(x)] = 0.0
        t /= t.sum(1, keepdims=True)
        target_t = torch.from_numpy(t)
        target_np = t
        ignore = {}
    else:
        y = rng.integers(0, 4, size=11)
        y[y == 1] = 0
        y[::5] = -100
        if opts.pop("all_ignored", False):
            y[:] = -100
        target_t, target_np = torch.from_numpy(y), y
        ignore = dict(ignore_index=-100)
    core = ce.softmax_cross_entropy(
        x, target_np, weight=weight, reduction=reduction, **ignore, **opts
    )
    ours = cet.cross_entropy(
        torch.from_numpy(x), target_t, None if weight is None else torch.from_numpy(weight),
        reduction=reduction, impl=impl, **opts,
    )
    np.testing.assert_allclose(ours.numpy(), np.asarray(core), rtol=1e-10, atol=1e-12)


# The interpreter (NumPy) warns on the IEEE events the kernels rely on (tests/triton/conftest.py).
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
def test_full_smoothing_gives_a_minus_inf_target_no_mass(impl):
    # label_smoothing=1 leaves the target no probability: a target on a -inf logit then
    # contributes 0 (DESIGN: a zero target on a -inf logit contributes 0), not 0 * inf = NaN.
    if impl == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
    x = np.array([[0.5, -1.0, -math.inf, 2.0], [0.1, 0.2, 0.3, -math.inf]])
    y = np.array([2, 0])
    expected = ce.softmax_cross_entropy(x, y, label_smoothing=1.0, reduction="none")
    finite = x[0, [0, 1, 3]]  # row 0 by hand: the mean of lse - x_j over its 3 finite logits
    lse = math.log(np.exp(finite).sum())
    assert expected[0] == pytest.approx(np.mean(lse - finite), rel=1e-12)
    dtype = torch.float32 if impl == "triton" else torch.float64
    logits = torch.tensor(x, dtype=dtype, requires_grad=True)
    loss = cet.cross_entropy(logits, torch.from_numpy(y), label_smoothing=1.0, reduction="none", impl=impl)
    torch.testing.assert_close(loss.double(), torch.from_numpy(expected), rtol=1e-6 if impl == "triton" else 1e-12,
                               atol=0)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[torch.isinf(logits)] == 0).all()
    # The linear head: the -inf logit comes from the bias.
    head = torch.eye(4, dtype=dtype)
    bias = torch.tensor([0.0, 0.0, -math.inf, 0.0], dtype=dtype)
    hidden = torch.tensor(x[:1].clip(-5, 5), dtype=dtype)
    hidden[0, 2] = 0.0
    lin = cet.linear_cross_entropy(hidden, head, torch.tensor([2]), linear_bias=bias, label_smoothing=1.0,
                                   reduction="sum", impl=impl)
    assert float(lin) == pytest.approx(float(expected[0]), rel=1e-6)
