"""Per-call configuration overrides of the Triton kernels (for benchmark sweeps).

``CROSSENT_TRITON_CE_CONFIG`` and ``CROSSENT_TRITON_LINEAR_TILES`` are parsed at every call; bad
values raise errors naming the variable, what was expected and what came. A non-default config
must give the oracle's answer (float64 PyTorch) on the ``device`` fixture's device (the
interpreter on CPU, or compiled on CUDA), and knobs that only move work between programs (CE:
persistent grid, reverse second pass; linear: grouped program order) must give bit-identical
results.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from crossent.triton import _launchers as L  # noqa: E402
from crossent.triton import cross_entropy, linear_cross_entropy  # noqa: E402

DEFAULT_TILES = L.LinearTiles(128, 128, 64, 128, 8, 3, 1024)


# ------------------------------------------------------------------------------------------------
# Parsing and validation (no kernel runs).
# ------------------------------------------------------------------------------------------------


def test_linear_tiles_positional_and_keyed():
    t = L.parse_linear_tiles("128,256,64,128,8,4", DEFAULT_TILES)
    assert t == L.LinearTiles(128, 256, 64, 128, 8, 4, 1024, 0, 0)
    t = L.parse_linear_tiles(" group_m=8 , chunk=2816 ", DEFAULT_TILES)
    assert t == dataclass_replace(DEFAULT_TILES, group_m=8, chunk=2816)
    t = L.parse_linear_tiles("64,128,32,64,4,2,programs=512,group_m=4", DEFAULT_TILES)
    assert (t.block_m, t.block_v, t.block_k, t.block_d, t.num_warps, t.num_stages) == (64, 128, 32, 64, 4, 2)
    assert (t.programs, t.group_m, t.chunk) == (512, 4, 0)
    t = L.parse_linear_tiles("wide_forward=0,scratch_dw=0", DEFAULT_TILES)
    assert t == dataclass_replace(DEFAULT_TILES, wide_forward=0, scratch_dw=0)
    assert (DEFAULT_TILES.wide_forward, DEFAULT_TILES.scratch_dw) == (1, 1)  # the defaults


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("128,128,64", r"must start with 6 comma-separated integers.*got '128,128,64'"),
        ("128,128,64,128,8,3,4", r"must start with 6"),
        ("block_m=128,128,128,64,128,8,3", r"must start with 6"),
        ("128,96,64,128,8,3", r"block_v must be a power of two in \[16, 512\], got 96"),
        ("128,128,8,128,8,3", r"block_k must be a power of two in \[16, 256\], got 8"),
        ("128,128,64,128,6,3", r"num_warps must be a power of two in \[1, 32\], got 6"),
        ("128,128,64,128,8,0", r"num_stages must be an integer in \[1, 8\], got 0"),
        ("group_m=-1", r"group_m must be an integer in \[0, 65536\], got -1"),
        ("chunk=100", r"chunk must be 0 or a multiple of block_v=128, got 100"),
        ("block_m=abc", r"block_m must be an integer, got 'abc'"),
        ("warps=8", r"unknown key 'warps'.*known keys: block_m"),
        ("group_m=2,group_m=4", r"group_m given twice"),
        ("stats_m=3", r"stats_m must be a power of two in \[2, 256\], got 3"),
        ("stats_v=8", r"stats_v must be a power of two in \[16, 8192\], got 8"),
        ("grad_v=8", r"grad_v must be 0 or a power of two in \[16, 8192\], got 8"),
        ("grad_warps=3", r"grad_warps must be 0 or a power of two <= 32, got 3"),
        ("tma=2", r"tma must be an integer in \[0, 1\], got 2"),
        ("wide_forward=2", r"wide_forward must be an integer in \[0, 1\], got 2"),
        ("scratch_dw=-1", r"scratch_dw must be an integer in \[0, 1\], got -1"),
    ],
)
def test_linear_tiles_errors_name_the_variable(text, match):
    with pytest.raises(ValueError, match=match) as info:
        L.parse_linear_tiles(text, DEFAULT_TILES)
    assert str(info.value).startswith("CROSSENT_TRITON_LINEAR_TILES")


def test_ce_config_parse():
    c = L.parse_ce_config("loop_block=4096,loop_warps=8,persistent=2,reverse=0,single_max=16384,single_warps=8")
    assert c == L.CEConfig(single_max=16384, loop_block=4096, loop_warps=8, single_warps=8, persistent=2,
                           reverse=0)
    assert L.parse_ce_config("") == L.CEConfig()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("8192", r"must be comma-separated key=value items \(keys: single_max, .*got '8192'"),
        ("loop_block=3000", r"loop_block must be a power of two in \[16, 65536\], got 3000"),
        ("reverse=2", r"reverse must be an integer in \[0, 1\], got 2"),
        ("single_warps=3", r"single_warps must be 0 or a power of two <= 32, got 3"),
        ("persistent=x", r"persistent must be an integer, got 'x'"),
        ("block=8192", r"unknown key 'block'"),
    ],
)
def test_ce_config_errors_name_the_variable(text, match):
    with pytest.raises(ValueError, match=match) as info:
        L.parse_ce_config(text)
    assert str(info.value).startswith("CROSSENT_TRITON_CE_CONFIG")


def test_overrides_are_read_at_call_time(monkeypatch):
    monkeypatch.delenv(L.LINEAR_TILES_ENV, raising=False)
    monkeypatch.delenv(L.CE_CONFIG_ENV, raising=False)
    default = L.plan_linear(100, 5000, 64, torch.bfloat16, None, True)
    assert default.tiles == L.linear_tiles(torch.bfloat16) and default.chunk == 5120
    assert L.ce_config() == L.CEConfig()
    assert L._row_block(128256) == (L.LOOP_BLOCK, 16, False)
    monkeypatch.setenv(L.LINEAR_TILES_ENV, "64,256,32,64,4,4,chunk=512,group_m=2")
    plan = L.plan_linear(100, 5000, 64, torch.bfloat16, None, True)
    assert (plan.tiles.block_m, plan.tiles.block_v, plan.tiles.num_stages, plan.chunk) == (64, 256, 4, 512)
    monkeypatch.setenv(L.CE_CONFIG_ENV, "loop_block=4096,loop_warps=8,single_max=16384")
    assert L._row_block(128256) == (4096, 8, False)
    assert L._row_block(32000) == (4096, 8, False)  # 32768 > single_max: streamed
    assert L._row_block(16000) == (16384, 16, True)


def test_a_bad_override_fails_the_call(monkeypatch, device):
    monkeypatch.setenv(L.CE_CONFIG_ENV, "loop_block=3000")
    with pytest.raises(ValueError, match="CROSSENT_TRITON_CE_CONFIG: loop_block must be a power of two"):
        cross_entropy(torch.zeros(2, 3, device=device), torch.zeros(2, dtype=torch.int64, device=device))
    monkeypatch.setenv(L.LINEAR_TILES_ENV, "128,128,64,128,8")
    with pytest.raises(ValueError, match="CROSSENT_TRITON_LINEAR_TILES must start with 6"):
        linear_cross_entropy(torch.zeros(2, 16, device=device), torch.zeros(5, 16, device=device),
                             torch.zeros(2, dtype=torch.int64, device=device))


# ------------------------------------------------------------------------------------------------
# Non-default configs run correctly (interpreter).
# ------------------------------------------------------------------------------------------------


def _ce_run(logits, target, **opts):
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, reduction="none", **opts)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=x.device))
    return loss.detach(), x.grad


def test_ce_configs_match_oracle_and_each_other(monkeypatch, ref, device):
    """Streamed rows (C = 203 in 32-column steps: 7 blocks, the last partial) with the second pass
    forward and reversed, one program per row and a persistent grid (2 programs under the
    interpreter, looping over 9 rows; k x SMs programs on CUDA, over 3 x 132 + 5 rows): the
    oracle's answer, and the same bits every time."""
    n = 9 if device == "cpu" else 3 * L._sm_count(torch.device(device)) + 5
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(n, 203, generator=gen) * 3).to(device)
    target = torch.randint(0, 203, (n,), generator=gen).to(device)
    target[4] = -100
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    want_x = logits.double().requires_grad_()
    want = ref(want_x, target, reduction="none", **opts)
    want.backward(torch.linspace(0.5, 1.5, want.numel(), device=device).double())
    results = {}
    for text in ("single_max=32,loop_block=32,reverse=0", "single_max=32,loop_block=32,reverse=1",
                 "single_max=32,loop_block=32,persistent=1", "single_max=32,loop_block=32,persistent=3,reverse=0"):
        monkeypatch.setenv(L.CE_CONFIG_ENV, text)
        assert not L._row_block(203, True, True)[2]
        results[text] = _ce_run(logits, target, **opts)
        torch.testing.assert_close(results[text][0].double(), want.detach(), rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(results[text][1].double(), want_x.grad, rtol=1e-5, atol=1e-8)
    first = next(iter(results.values()))
    for loss, grad in results.values():
        assert torch.equal(loss, first[0]) and torch.equal(grad, first[1])
    # single-block rows under a persistent grid: same bits as one program per row
    monkeypatch.setenv(L.CE_CONFIG_ENV, "single_warps=2")
    single = _ce_run(logits, target)
    monkeypatch.setenv(L.CE_CONFIG_ENV, "persistent=2,single_warps=2")
    persistent = _ce_run(logits, target)
    assert torch.equal(single[0], persistent[0]) and torch.equal(single[1], persistent[1])


def _linear_runs(monkeypatch, device, seed, configs, check_plan=None, **kwargs):
    """Loss and gradients of ``linear_cross_entropy`` (37 x 24 inputs, 150 classes, every 7th row
    ignored, ``kwargs`` as options) under each CROSSENT_TRITON_LINEAR_TILES value of ``configs``,
    each checked against float64 PyTorch; ``check_plan(config, plan)`` may check the plan."""
    gen = torch.Generator().manual_seed(seed)
    n, d, v = 37, 24, 150
    x = torch.randn(n, d, generator=gen).to(device)
    w = (torch.randn(v, d, generator=gen) * 0.5).to(device)
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    target[::7] = -100
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    want = F.cross_entropy(xr @ wr.T, target, **kwargs)
    want.backward()
    got = {}
    for config in configs:
        monkeypatch.setenv(L.LINEAR_TILES_ENV, config)
        if check_plan is not None:
            check_plan(config, L.plan_linear(n, v, d, torch.float32, None, True))
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(xg, wg, target, **kwargs)
        loss.backward()
        got[config] = (loss.detach(), xg.grad, wg.grad)
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(wg.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    return got


def test_linear_tiles_override_matches_oracle_and_group_order_is_bitwise(monkeypatch, device):
    """Small tiles with several row blocks, splits and lean chunks; grouped program order (2 row
    blocks per group, the last group partial, in the forward and the gradient tile) gives the
    same bits as the plain order."""
    configs = [f"16,32,16,16,4,2,programs=8,chunk=64,group_m={group}" for group in (0, 2)]

    def check_plan(config, plan):
        assert (plan.chunk, plan.n_splits, plan.tiles.group_m) == (64, 3, int(config[-1]))

    got = _linear_runs(monkeypatch, device, 5, configs, check_plan)
    for a, b in zip(got[configs[0]], got[configs[1]], strict=True):
        assert torch.equal(a, b)


def test_elementwise_tiles_of_the_products_path(monkeypatch, device):
    """The tiles of the kernels between the cuBLAS products (``products=1``): a gradient tile of
    its own size gives the same bits as the default (elementwise work); other stats tiles (rows,
    columns per step, warps: the split of a step's sum-exp may change) give the oracle's answer."""
    base = "16,32,16,16,4,2,chunk=64,products=1"
    configs = [base + extra for extra in ("", ",grad_m=8,grad_v=64,grad_warps=2", ",stats_m=4",
                                          ",stats_v=16,stats_warps=2")]
    got = _linear_runs(monkeypatch, device, 6, configs, label_smoothing=0.1)
    for a, b in zip(got[configs[0]], got[configs[1]], strict=True):
        assert torch.equal(a, b)
