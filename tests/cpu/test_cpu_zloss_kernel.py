"""The z-loss term of crossent.cpu.softmax_minus_onehot (``z_scale``) and the core gradient that
uses it: class indices with a z-loss and the gradient run the numba kernel, not the blocked pass.

Oracles: float64 PyTorch autograd of the written-out loss, and crossent's Array-API path (every
numpy fast path off) for the rows where IEEE arithmetic decides (NaN, infinite logits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce
from crossent import cpu
from crossent.cpu import _blocked


def _torch_gradient(x, y, s, r):
    """d/dx of sum_i s_i (lse_i - x_{i,y_i}) + (r_i / 2) lse_i^2, in float64."""
    z = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    lse = torch.logsumexp(z, dim=1)
    nll = F.cross_entropy(z, torch.from_numpy(y), reduction="none")
    total = (torch.from_numpy(s) * nll + torch.from_numpy(r) / 2 * lse * lse).sum()
    total.backward()
    return z.grad.numpy(), lse.detach().numpy(), nll.detach().numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_z_scale_is_the_z_loss_gradient(path, dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((41, 29)) * 5).astype(dtype)
    x[3, ::3] = -np.inf  # masked classes
    y = rng.integers(0, 29, 41)
    y[3] = 1
    s = rng.uniform(0.1, 2.0, 41)
    r = rng.uniform(0.0, 0.2, 41)
    s[5], r[6], s[7], r[7] = 0.0, 0.0, 0.0, 0.0  # only the z-term; only the CE term; neither
    out = np.full_like(x, np.nan)
    lse, nll = cpu.softmax_minus_onehot(x, y, s, out, z_scale=r)
    want, want_lse, want_nll = _torch_gradient(x.astype(np.float64), y, s, r)
    atol = 1e-14 if dtype == np.float64 else 4e-7 * np.abs(want).max()
    np.testing.assert_allclose(out, want, rtol=0, atol=atol)
    assert np.all(out[7] == 0.0)  # s = r = 0 by default: an ignored row, exact zeros
    assert np.any(out[5] != 0.0)  # s = 0 but r > 0: the z-term's gradient
    rtol = 1e-15 if dtype == np.float64 else 1e-7
    np.testing.assert_allclose(lse, want_lse, rtol=rtol)
    np.testing.assert_allclose(nll, want_nll, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_without_z_scale_the_gradient_is_unchanged_to_the_bit(path, dtype):
    """z_scale None, 0 or an array of zeros: the same bits as s (softmax - onehot)."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((23, 13)) * 3).astype(dtype)
    y = rng.integers(0, 13, 23)
    outs = []
    for z_scale in (None, 0.0, np.zeros(23)):
        out = np.empty_like(x)
        cpu.softmax_minus_onehot(x, y, 0.25, out, z_scale=z_scale)
        outs.append(out)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    want, _, _ = _torch_gradient(x.astype(np.float64), y, np.full(23, 0.25), np.zeros(23))
    np.testing.assert_allclose(outs[0], want, rtol=0, atol=1e-7 if dtype == np.float32 else 1e-15)


def test_z_scale_nonfinite_rows_and_keep(path):
    """keep=False rows are exact zeros whatever their logits and factors; a kept row with s = 0
    and r > 0 gets the z-term; rows with a NaN or +inf logit, or all -inf, are NaN as in the
    Array-API arithmetic (inf * 0, 0 / 0); the numba kernels and the numpy fallback agree."""
    inf = np.inf
    x = np.array([
        [np.nan, inf, -inf, 1.0],  # not kept
        [0.0, -inf, 1.0, 2.0],  # a masked class
        [-inf, -inf, -inf, -inf],  # all -inf
        [inf, 0.0, 1.0, 2.0],  # +inf
        [1.0, np.nan, 0.0, 0.0],  # NaN
        [3.0, 3.0, 1.0, 3.0],  # s = 0, r > 0
    ])
    y = np.array([0, 2, 0, 1, 0, 3])
    s = np.array([1.0, 0.5, 0.5, 0.5, 0.5, 0.0])
    r = np.full(6, 0.1)
    keep = np.array([False, True, True, True, True, True])
    out = np.empty_like(x)
    with np.errstate(all="ignore"):
        cpu.softmax_minus_onehot(x, y, s, out, keep=keep, z_scale=r)
    assert np.all(out[0] == 0.0)
    assert np.isnan(out[2:5]).all(axis=1).all()
    want, _, _ = _torch_gradient(x[[1, 5]], y[[1, 5]], s[[1, 5]], r[[1, 5]])
    np.testing.assert_allclose(out[[1, 5]], want, rtol=0, atol=1e-15)
    assert np.all(out[5] != 0.0)


def test_z_scale_argument_errors():
    x = np.zeros((3, 4))
    y = np.array([0, 1, 2])
    out = np.empty_like(x)
    with pytest.raises(ValueError, match=r"z_scale must be a scalar or have shape \(3,\), got \(2,\)"):
        cpu.softmax_minus_onehot(x, y, 1.0, out, z_scale=np.zeros(2))
    with pytest.raises(TypeError, match="z_scale must be a real number or an array of real numbers, got str"):
        cpu.softmax_minus_onehot(x, y, 1.0, out, z_scale="0.1")


@pytest.mark.parametrize("opts", [
    {"z_loss": 1e-2},
    {"z_loss": 0.1, "weight": "w", "sample_weight": "sw", "ignore_index": 2},
    {"z_loss": 1e-3, "ignore_index": 0},
], ids=lambda o: ",".join(o))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_core_z_loss_gradient_runs_the_kernel(monkeypatch, opts, reduction, dtype):
    """ce.softmax_cross_entropy_and_grad with class indices and a z-loss: the numba kernel writes
    the finished gradient (the blocked pass is not called), equal to the Array-API path's and to
    float64 PyTorch's (z-term averaged over the kept rows' sample weights, the CE term over the
    class-weighted ones)."""
    pytest.importorskip("numba")
    if not cpu.available():
        pytest.skip("the numba kernels are switched off in this environment")
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((67, 19)) * 4).astype(dtype)
    y = rng.integers(0, 19, 67)
    kwargs = dict(opts)
    if "weight" in kwargs:
        kwargs["weight"] = rng.uniform(0.5, 1.5, 19).astype(dtype)
        kwargs["sample_weight"] = rng.uniform(0.0, 2.0, 67).astype(dtype)
    if reduction == "none":
        f = ce.softmax_cross_entropy  # no gradient of an unreduced loss
    else:
        f = ce.softmax_cross_entropy_and_grad

    def fail(*args, **kw):
        raise AssertionError("the blocked gradient ran")

    monkeypatch.setattr(_blocked, "gradient", fail)
    got = f(x, y, reduction=reduction, **kwargs)
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "ENABLED", False)
    want = f(x, y, reduction=reduction, **kwargs)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    rtol = 1e-13 if dtype == np.float64 else 2e-6
    for a, b in zip(got, want, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())
    if reduction == "none":
        return
    # float64 PyTorch: the CE term weighted by sample x class weight, the z-term by sample weight.
    z = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = torch.from_numpy(y)
    keep = torch.ones(67, dtype=torch.float64)
    if "ignore_index" in kwargs:
        keep = (yt != kwargs["ignore_index"]).double()
    sw = torch.from_numpy(np.asarray(kwargs.get("sample_weight", np.ones(67)), dtype=np.float64)) * keep
    cw = torch.from_numpy(np.asarray(kwargs.get("weight", np.ones(19)), dtype=np.float64))
    safe = torch.where(keep > 0, yt, 0)
    nll = F.cross_entropy(z, safe, reduction="none")
    lse = torch.logsumexp(z, dim=1)
    ce_w = sw * cw[safe]
    zl = kwargs["z_loss"]
    if reduction == "mean":
        loss = (ce_w * nll).sum() / ce_w.sum() + zl * (sw * lse * lse).sum() / sw.sum()
    else:
        loss = (ce_w * nll).sum() + zl * (sw * lse * lse).sum()
    loss.backward()
    np.testing.assert_allclose(got[0], loss.item(), rtol=rtol)
    np.testing.assert_allclose(got[1], z.grad.numpy(), rtol=0, atol=rtol * z.grad.abs().max().item())
