"""The per-rank kernels of vocab-parallel cross-entropy (crossent.triton._partials), one process.

``_vocab_parallel_partials`` must give, per row of a slice of logits, the statistics that
crossent.distributed all-reduces (row max, sum of exp relative to it, the target logit when the
target is in the slice, the sum and count of finite logits); ``_vocab_parallel_grad`` the slice's
gradient from the global lse. Both are checked against the same quantities written out in float64
PyTorch, on odd shapes, with the target inside and outside the slice, -inf and NaN entries, and
with several column blocks per row. Runs on the ``device`` of conftest.py: CPU tensors through
Triton's interpreter (TRITON_INTERPRET=1, as ``make test`` sets it), or CUDA tensors with the kernels
compiled (TRITON_INTERPRET=0 on a GPU machine); skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("triton") is None:
    pytest.skip("torch and triton are needed for the Triton kernel tests", allow_module_level=True)

import torch  # noqa: E402

from crossent.triton import _vocab_parallel_grad, _vocab_parallel_partials  # noqa: E402


def make_problem(rows, cols, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
    # global vocabulary of 3 * cols, this slice at offset cols: about a third of targets inside
    target = torch.randint(0, 3 * cols, (rows,), generator=gen)
    offset = cols
    target[0], target[1], target[2] = offset, offset + cols - 1, offset - 1  # edges, one outside
    target[5] = -100
    z[3, 7] = -math.inf
    z[6, : cols // 2] = -math.inf
    z[8] = -math.inf  # a whole row masked here (its classes live on other ranks)
    local = target - offset
    owned = (target != -100) & (local >= 0) & (local < cols)
    column = torch.where(owned, local, torch.full_like(local, -1))
    return z.to(device), target.to(device), column.to(device), owned.to(device)


def expected_partials(z, column):
    x = z.double()
    m = x.amax(dim=1)
    shift = torch.where(m == -math.inf, torch.zeros_like(m), m)
    s = torch.exp(x - shift[:, None]).sum(dim=1)
    picked = x.gather(1, column.clamp(min=0)[:, None]).squeeze(1)
    t = torch.where(column >= 0, picked, torch.zeros_like(picked))
    finite = torch.isfinite(x)
    return m, s, t, torch.where(finite, x, torch.zeros_like(x)).sum(dim=1), finite.sum(dim=1).double()


def assert_close(actual, expected, what, rtol, atol):
    assert actual.dtype == torch.float32, f"{what}: {actual.dtype}"
    actual = actual.double()
    same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
    ok = same | ((actual - expected).abs() <= atol + rtol * expected.abs())
    assert bool(ok.all()), f"{what}: {actual[~ok]} vs {expected[~ok]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [None, 256])  # one block per row (2048 lanes), or five steps
def test_partials_match_torch(dtype, block, device):
    z, _, column, _ = make_problem(37, 1031, dtype, seed=1, device=device)
    z[9, 11] = math.nan
    m, s, t, fsum, fcount = _vocab_parallel_partials(z, column, smoothing=True, block=block)
    em, es, et, efsum, efcount = expected_partials(z, column)
    assert_close(m, em, "row max", 0, 0)  # a max of exactly representable values is exact
    assert_close(t, et, "target logit", 0, 0)
    assert_close(fcount, efcount, "finite count", 0, 0)
    assert_close(s, es, "sum of exp", 1e-5, 0)
    assert_close(fsum, efsum, "finite sum", 1e-5, 1e-3)  # float32 sum of ~1000 values of |z| ~ 3
    assert math.isnan(m[9]) and math.isnan(s[9]), "a NaN logit propagates into m and s"
    assert m[8] == -math.inf and s[8] == 0 and fcount[8] == 0, "an all -inf row: no NaN"
    assert int((column >= 0).sum()) >= 3 and int((column < 0).sum()) >= 3, "targets inside and outside"

    m2, s2, t2, no_sum, no_count = _vocab_parallel_partials(z, column, smoothing=False, block=block)
    assert no_sum is None and no_count is None
    assert torch.equal(m2.nan_to_num(), m.nan_to_num()) and torch.equal(t2, t)
    assert torch.equal(s2.nan_to_num(), s.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps, z_loss", [(0.0, 0.0), (0.2, 0.03)])
def test_grad_matches_torch(dtype, eps, z_loss, device):
    z, target, column, owned = make_problem(37, 1031, dtype, seed=2, device=device)
    valid = target != -100
    z[5] = math.nan  # an ignored row: gradient 0 whatever its logits
    gen = torch.Generator().manual_seed(3)
    x = z.double()
    lse = torch.logsumexp(x, dim=1) + torch.rand(37, generator=gen, dtype=torch.float64).to(device)  # other ranks
    lse[8] = torch.rand((), generator=gen, dtype=torch.float64).item()  # all -inf here, finite globally
    count = torch.isfinite(x).sum(dim=1).double() + 2000  # K over all ranks
    g = torch.randn(37, generator=gen, dtype=torch.float64).to(device) * valid
    grad = _vocab_parallel_grad(
        z, column, valid, lse.float(), g.float(), count.float(), label_smoothing=eps, z_loss=z_loss, block=256
    )
    assert grad.dtype == dtype and grad.shape == z.shape
    lse = lse.float().double()  # the kernel reads float32
    p = torch.exp(x - lse[:, None]) * (1 + 2 * z_loss * lse)[:, None]
    p = p - (1 - eps) * torch.nn.functional.one_hot(column.clamp(min=0), 1031) * owned[:, None]
    p = p - torch.where(torch.isfinite(x), eps / count.float().double()[:, None], 0.0)
    expected = torch.where(valid[:, None], p * g.float().double()[:, None], 0.0)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the stored gradient
    err = (grad.double() - expected).abs()
    assert bool((err <= 1e-7 + tol * expected.abs()).all()), float(err.max())
    assert not bool(grad[5].any()) and not bool(grad[~valid].any())
    assert bool((grad[torch.isinf(z) & valid[:, None]] == 0).all()), "zero gradient on -inf logits"


def test_empty_slice_and_no_rows(device):
    column = torch.full((4,), -1, device=device)
    m, s, t, fsum, fcount = _vocab_parallel_partials(torch.zeros(4, 0, device=device), column, smoothing=True)
    assert bool((m == -math.inf).all()) and not bool(s.any() or t.any() or fsum.any() or fcount.any())
    ones = torch.ones(4, device=device)
    grad = _vocab_parallel_grad(
        torch.zeros(4, 0, device=device), column, ones.bool(), torch.zeros(4, device=device), ones, ones,
        label_smoothing=0.1, z_loss=0.0,
    )
    assert grad.shape == (4, 0)
    m, *_ = _vocab_parallel_partials(torch.zeros(0, 5, dtype=torch.bfloat16, device=device), column[:0],
                                     smoothing=False)
    assert m.shape == (0,)


def test_rejects_float64(device):
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        _vocab_parallel_partials(torch.zeros(2, 3, dtype=torch.float64, device=device), torch.zeros(2, device=device),
                                 smoothing=False)
