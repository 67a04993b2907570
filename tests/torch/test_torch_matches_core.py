"""crossent.torch agrees with crossent.core (the spec) on the documented deviations too."""

from __future__ import annotations

import math

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
