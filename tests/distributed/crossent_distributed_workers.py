"""Code that runs inside the spawned ranks of tests/distributed (gloo on the CPU).

The parent test puts this folder on sys.path so that torch.multiprocessing's spawned children can
import this module by name. Every rank builds the same global float64 problem from a seed, keeps
its slice, and compares the vocab-parallel loss and gradients with a single-process float64 oracle
written with plain PyTorch (F.cross_entropy on the full logits, x @ W.T + b, z-loss and softcap
written out). Each check function returns how many comparisons it made; the entry point writes
that count to a file the parent reads, so a check that silently skipped everything fails.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

RTOL = 1e-10
ATOL = 1e-12
GROUP_TIMEOUT_S = 30  # bounded waits: a collective that cannot complete fails after this


def entry(rank: int, world: int, store: str, out_dir: str, checks: list) -> None:
    """torch.multiprocessing target: join the gloo group, run the check functions in order.

    ``checks`` is a list of ``(function name, args)``; the rank writes ``{name: count}`` to
    ``out_dir/rank-<rank>.json`` after each check, so the parent sees how far every rank got.
    """
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )
    report = {}
    try:
        for name, args in checks:
            report[name] = globals()[name](rank, world, *args)
            with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as handle:
                json.dump(report, handle)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# problem and oracle


def slice_bounds(sizes, rank):
    """[lo, hi) of rank's slice, written out independently of crossent.distributed.partition."""
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def make_targets(gen, shape, vocab, ignore):
    """Targets in [0, vocab); ``ignore`` None, -100 (rows set to it) or a class index c (rows
    holding c are ignored, plus a few set to c)."""
    target = torch.randint(0, vocab, shape, generator=gen)
    if ignore is not None:
        mask = torch.rand(shape, generator=gen) < 0.3
        target = torch.where(mask, torch.full_like(target, ignore), target)
    return target


def oracle_rows(z, target, *, ignore_index, eps, zl):
    """Per-row float64 loss on the full logits z [N, V]: F.cross_entropy + z_loss written out."""
    ce = F.cross_entropy(z, target, ignore_index=ignore_index, reduction="none", label_smoothing=eps)
    valid = target != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    return ce + torch.where(valid, zl * lse * lse, torch.zeros_like(lse))


def oracle_reduce(rows, target, *, ignore_index, reduction, shape):
    if reduction == "none":
        return rows.reshape(shape)
    if reduction == "sum":
        return rows.sum()
    count = int((target != ignore_index).sum())
    return rows.sum() / count if count else rows.sum() * 0.0  # documented deviation: 0, not NaN


def oracle_backward(logits, target, grad_out, *, ignore_index, eps, zl, reduction):
    """The float64 oracle's loss of the full logits ``[*shape, V]`` (reduced as asked), after its
    backward against ``grad_out`` has filled the gradients of the leaves behind ``logits``."""
    shape = target.shape
    rows = oracle_rows(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                       eps=eps, zl=zl)
    expected = oracle_reduce(rows, target, ignore_index=ignore_index, reduction=reduction, shape=shape)
    (expected * grad_out).sum().backward()
    return expected


def close(actual, expected, what, *, rtol=RTOL, atol=ATOL):
    """|actual - expected| <= atol + rtol |expected| elementwise, NaN where expected is NaN.

    Written out because torch.testing.assert_close imports DTensor (and sympy, 5 s) once a
    process group exists.
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.detach(), expected.detach()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN at other places\n{actual}\n{expected}"
    same = actual == expected  # equal infinities
    ok = same | ((actual - expected).abs() <= atol + rtol * expected.abs()) | nan
    if not bool(ok.all()):
        err = torch.where(ok, torch.zeros_like(actual), (actual - expected).abs()).max().item()
        raise AssertionError(f"{what}: max abs error {err:.3e} beyond rtol {rtol}, atol {atol}")


def upstream(reduction, shape, gen):
    if reduction == "none":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    return torch.tensor(0.7, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# the grid of options


def check_grid(rank, world, sizes, all_heads=True):
    """Both functions, every option combination, float64, against the oracle to 1e-10.

    ``all_heads``: every (bias, softcap) head of the linear version for every option case;
    otherwise the cases cycle through the heads (each head still meets every reduction): with
    more ranks than cores every collective costs a scheduler time slice.
    """
    import crossent.distributed.vocab_parallel as vp
    from crossent.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    vocab = sum(sizes)
    lo, hi = slice_bounds(sizes, rank)
    shape, features = (3, 5), 6
    default_chunk = vp._CHUNK_ELEMENTS
    reductions = ("mean", "sum", "none")
    ignores = (None, -100, 3)
    epsilons = (0.0, 0.2)
    z_losses = (0.0, 0.03)
    heads = ((False, None), (True, None), (False, 3.0), (True, 3.0))
    checks = 0
    for case, (reduction, ignore, eps, zl) in enumerate(itertools.product(reductions, ignores, epsilons, z_losses)):
        gen = torch.Generator().manual_seed(1000 + case)
        ignore_index = -100 if ignore is None else ignore
        target = make_targets(gen, shape, vocab, ignore)
        grad_out = upstream(reduction, shape, gen)
        # odd cases: 3 columns per chunk (many chunks, a ragged last one); even: one chunk
        vp._CHUNK_ELEMENTS = 15 * 3 if case % 2 else default_chunk
        opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=eps, z_loss=zl)
        what = f"rank {rank} sizes {sizes} {opts}"

        # logits version
        z = torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * 2.0
        z_full = z.clone().requires_grad_()
        rows = oracle_rows(z_full.reshape(-1, vocab), target.reshape(-1), ignore_index=ignore_index, eps=eps, zl=zl)
        expected = oracle_reduce(rows, target, ignore_index=ignore_index, reduction=reduction, shape=shape)
        (expected * grad_out).sum().backward()
        z_local = z[..., lo:hi].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(z_local, target, **opts)
        close(loss, expected.detach(), f"logits loss, {what}")
        if zl == 0.0 and reduction != "none" and bool((target != ignore_index).any()):
            direct = F.cross_entropy(
                z.reshape(-1, vocab),
                target.reshape(-1),
                ignore_index=ignore_index,
                reduction=reduction,
                label_smoothing=eps,
            )
            close(loss, direct, f"logits loss vs F.cross_entropy, {what}")
            checks += 1
        (loss * grad_out).sum().backward()
        close(z_local.grad, z_full.grad[..., lo:hi], f"logits grad, {what}")
        checks += 2

        # linear version
        for has_bias, softcap in heads if all_heads else heads[case % 4 : case % 4 + 1]:
            x = torch.randn(*shape, features, generator=gen, dtype=torch.float64)
            w = torch.randn(vocab, features, generator=gen, dtype=torch.float64)
            b = torch.randn(vocab, generator=gen, dtype=torch.float64) if has_bias else None
            x_full, w_full = x.clone().requires_grad_(), w.clone().requires_grad_()
            b_full = b.clone().requires_grad_() if has_bias else None
            logits = x_full @ w_full.T + (b_full if has_bias else 0.0)
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            rows = oracle_rows(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=ignore_index, eps=eps, zl=zl)
            expected = oracle_reduce(rows, target, ignore_index=ignore_index, reduction=reduction, shape=shape)
            (expected * grad_out).sum().backward()
            x_local = x.clone().requires_grad_()
            w_local = w[lo:hi].clone().requires_grad_()
            b_local = b[lo:hi].clone().requires_grad_() if has_bias else None
            loss = vocab_parallel_linear_cross_entropy(
                x_local, w_local, target, local_bias=b_local, softcap=softcap, **opts
            )
            label = f"linear bias={has_bias} softcap={softcap}, {what}"
            close(loss, expected.detach(), f"loss, {label}")
            (loss * grad_out).sum().backward()
            close(x_local.grad, x_full.grad, f"input grad, {label}")
            close(w_local.grad, w_full.grad[lo:hi], f"weight grad, {label}")
            checks += 3
            if has_bias:
                close(b_local.grad, b_full.grad[lo:hi], f"bias grad, {label}")
                checks += 1
    vp._CHUNK_ELEMENTS = default_chunk
    return checks


# ------------------------------------------------------------------------------------------------
# documented deviations and edge cases


def written_out_rows(z, target, *, ignore_index, eps, zl):
    """DESIGN.md's formula on full float64 logits: smoothing eps/K over the K finite classes."""
    valid = target != ignore_index
    z = torch.where(valid[:, None], z, torch.zeros_like(z))  # ignored rows: 0 whatever the logits
    lse = torch.logsumexp(z, dim=-1)
    finite = torch.isfinite(z)
    count = finite.sum(dim=-1).to(z.dtype)
    finite_sum = torch.where(finite, z, torch.zeros_like(z)).sum(dim=-1)
    picked = z.gather(1, torch.where(valid, target, 0)[:, None]).squeeze(1)
    row = (1 - eps) * (lse - picked) + eps * (lse - finite_sum / count) + zl * lse * lse
    return torch.where(valid, row, torch.zeros_like(row))


def check_special(rank, world, sizes):
    """-inf masks with label smoothing (K over all ranks), zero denominators, empty batch, NaN,
    bfloat16, unbatched input, int32 targets; ``sizes`` holds an empty slice."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    vocab = sum(sizes)
    lo, hi = slice_bounds(sizes, rank)
    gen = torch.Generator().manual_seed(7)
    checks = 0
    rows = 6

    # 1. masked classes: row 0 has every class of the first non-empty slice at -inf but its
    #    target, row 1 a scattered mask, row 4 is ignored and entirely -inf (contributes 0)
    z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    first = next(r for r in range(world) if sizes[r])
    f_lo, f_hi = slice_bounds(sizes, first)
    target[0] = f_hi if f_hi < vocab else f_lo
    z[0, f_lo:f_hi] = -math.inf
    z[0, target[0]] = 0.5
    mask = torch.rand(rows, vocab, generator=gen) < 0.4
    mask[:, :] &= torch.arange(rows)[:, None] == 1
    mask[1, target[1]] = False
    z[mask] = -math.inf
    target[4] = -100
    z[4] = -math.inf
    for reduction, eps, zl in (("none", 0.25, 0.01), ("mean", 0.25, 0.0), ("sum", 1.0, 0.02)):
        z_full = z.clone().requires_grad_()
        expected_rows = written_out_rows(z_full, target, ignore_index=-100, eps=eps, zl=zl)
        expected = oracle_reduce(expected_rows, target, ignore_index=-100, reduction=reduction, shape=(rows,))
        grad_out = upstream(reduction, (rows,), gen)
        (expected * grad_out).sum().backward()
        z_local = z[:, lo:hi].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(z_local, target, reduction=reduction, label_smoothing=eps, z_loss=zl)
        (loss * grad_out).sum().backward()
        what = f"masked classes rank {rank} {reduction} eps={eps}"
        close(loss, expected.detach(), f"loss, {what}")
        close(z_local.grad, z_full.grad[:, lo:hi], f"grad, {what}")
        assert bool(torch.isfinite(loss).all()), what
        assert bool((z_local.grad[torch.isinf(z[:, lo:hi])] == 0).all()), f"grad on -inf, {what}"
        checks += 4

    # 1b. the same through the linear version: a -inf bias masks classes
    x = torch.randn(rows, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64)
    target_b = torch.randint(0, vocab, (rows,), generator=gen)
    masked = torch.rand(vocab, generator=gen) < 0.3
    masked[target_b] = False
    b[masked] = -math.inf
    x_full, w_full, b_full = (t.clone().requires_grad_() for t in (x, w, b))
    expected = written_out_rows(x_full @ w_full.T + b_full, target_b, ignore_index=-100, eps=0.1, zl=0.01).mean()
    expected.backward()
    x_l, w_l, b_l = x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), b[lo:hi].clone()
    b_l.requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(x_l, w_l, target_b, local_bias=b_l, label_smoothing=0.1, z_loss=0.01)
    loss.backward()
    close(loss, expected.detach(), "linear masked loss")
    close(x_l.grad, x_full.grad, "linear masked input grad")
    close(w_l.grad, w_full.grad[lo:hi], "linear masked weight grad")
    close(b_l.grad, b_full.grad[lo:hi], "linear masked bias grad")
    checks += 4

    # 2. a -inf target logit gives +inf for that row only
    z2 = torch.randn(3, vocab, generator=gen, dtype=torch.float64)
    t2 = torch.tensor([1, 2, 0]) % vocab
    z2[1, t2[1]] = -math.inf
    loss = vocab_parallel_cross_entropy(z2[:, lo:hi].clone(), t2, reduction="none")
    expected = F.cross_entropy(z2, t2, reduction="none")
    assert loss[1].item() == math.inf, loss
    close(loss, expected, "-inf target logit")
    checks += 2

    # 3. mean over no counted rows is 0 with zero gradients (PyTorch: NaN); sum is 0 too
    z3 = torch.randn(4, vocab, generator=gen, dtype=torch.float64)
    t3 = torch.full((4,), -100)
    for reduction in ("mean", "sum"):
        z_local = z3[:, lo:hi].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(z_local, t3, reduction=reduction, label_smoothing=0.1, z_loss=0.1)
        loss.backward()
        assert loss.item() == 0.0 and not bool(z_local.grad.any()), (reduction, loss)
        x_l, w_l = x[:4].clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
        b_l = torch.zeros(hi - lo, dtype=torch.float64, requires_grad=True)
        loss = vocab_parallel_linear_cross_entropy(
            x_l, w_l, t3, local_bias=b_l, reduction=reduction, softcap=2.0, z_loss=0.1
        )
        loss.backward()
        assert loss.item() == 0.0, (reduction, loss)
        assert not (x_l.grad.any() or w_l.grad.any() or b_l.grad.any()), reduction
        checks += 2

    # 4. empty batch
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        z_local = torch.zeros(0, hi - lo, dtype=torch.float64, requires_grad=True)
        loss = vocab_parallel_cross_entropy(z_local, torch.zeros(0, dtype=torch.int64), reduction=reduction)
        assert loss.shape == shape and not bool(loss.any()), (reduction, loss)
        loss.sum().backward()
        assert z_local.grad.shape == (0, hi - lo)
        x_l = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
        w_l = w[lo:hi].clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(x_l, w_l, torch.zeros(0, dtype=torch.int64), reduction=reduction)
        loss.sum().backward()
        assert loss.shape == shape and not bool(w_l.grad.any()), (reduction, loss)
        checks += 2

    # 5. NaN: an ignored row contributes 0 whatever its logits; elsewhere NaN propagates
    z5 = torch.randn(5, vocab, generator=gen, dtype=torch.float64)
    t5 = torch.randint(0, vocab, (5,), generator=gen)
    t5[2] = -100
    z5[2, :] = math.nan
    z_local = z5[:, lo:hi].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(z_local, t5, label_smoothing=0.2, z_loss=0.01)
    loss.backward()
    keep = torch.tensor([0, 1, 3, 4])
    z_kept = z5[keep].clone().requires_grad_()
    expected = oracle_rows(z_kept, t5[keep], ignore_index=-100, eps=0.2, zl=0.01).mean()
    expected.backward()
    close(loss, expected.detach(), "NaN on an ignored row: loss")
    close(z_local.grad[keep], z_kept.grad[:, lo:hi], "NaN on an ignored row: grad")
    assert not bool(z_local.grad[2].any())
    z5[0, 0] = math.nan  # a counted row with a NaN logit
    assert math.isnan(vocab_parallel_cross_entropy(z5[:, lo:hi].clone(), t5).item())
    checks += 4

    # 6. bfloat16: float32 loss, error of float32 accumulation only
    z6 = (torch.randn(9, vocab, generator=gen) * 3).to(torch.bfloat16)
    t6 = torch.randint(0, vocab, (9,), generator=gen)
    z_local = z6[:, lo:hi].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(z_local, t6, label_smoothing=0.1, z_loss=0.01)
    loss.backward()
    z_ref = z6.double().requires_grad_()
    expected = oracle_rows(z_ref, t6, ignore_index=-100, eps=0.1, zl=0.01).mean()
    expected.backward()
    assert loss.dtype == torch.float32 and z_local.grad.dtype == torch.bfloat16
    close(loss, expected.float(), "bf16 loss", rtol=1e-5, atol=1e-6)
    close(z_local.grad.double(), z_ref.grad[:, lo:hi], "bf16 grad", rtol=1e-2, atol=1e-4)
    x6 = torch.randn(9, 4, generator=gen).to(torch.bfloat16)
    w6 = torch.randn(vocab, 4, generator=gen).to(torch.bfloat16)
    loss = vocab_parallel_linear_cross_entropy(x6, w6[lo:hi].clone(), t6, softcap=5.0)
    logits = (x6 @ w6.T).double()  # the logits as the bfloat16 product rounds them
    expected = F.cross_entropy(5.0 * torch.tanh(logits / 5.0), t6)
    assert loss.dtype == torch.float32
    close(loss, expected.float(), "bf16 linear loss", rtol=1e-5, atol=1e-6)
    checks += 4

    # 6b. bfloat16 gradients of the linear version, over many chunks per rank: the input gradient
    #     sums the chunks in float32 and is rounded once, so its error against the float64 truth
    #     is no larger than a single-process bfloat16 autograd's (one rounding of G @ W)
    import crossent.distributed.vocab_parallel as vp

    gen_b = torch.Generator().manual_seed(11)
    xb = torch.randn(64, 16, generator=gen_b).to(torch.bfloat16)
    wb = (torch.randn(vocab, 16, generator=gen_b) / 4).to(torch.bfloat16)
    tb = torch.randint(0, vocab, (64,), generator=gen_b)

    def grads_of(fn, x, w):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(x, w).backward()
        return x.grad.double(), w.grad.double()

    truth_x, truth_w = grads_of(lambda x, w: F.cross_entropy(x @ w.T, tb), xb.double(), wb.double())
    eager_x, eager_w = grads_of(lambda x, w: F.cross_entropy((x @ w.T).float(), tb), xb, wb)
    default_chunk = vp._CHUNK_ELEMENTS
    vp._CHUNK_ELEMENTS = 64 * 2  # two columns per chunk
    try:
        ours_x, ours_w = grads_of(lambda x, w: vocab_parallel_linear_cross_entropy(x, w, tb), xb, wb[lo:hi])
    finally:
        vp._CHUNK_ELEMENTS = default_chunk

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(ours_x, truth_x) <= 1.05 * rel(eager_x, truth_x) + 1e-6, (rel(ours_x, truth_x), rel(eager_x, truth_x))
    if hi > lo:
        assert rel(ours_w, truth_w[lo:hi]) <= 1.05 * rel(eager_w[lo:hi], truth_w[lo:hi]) + 1e-6
    checks += 2

    # 7. unbatched logits [V_r] with a 0-d target; int32 targets
    z7 = torch.randn(vocab, generator=gen, dtype=torch.float64)
    t7 = torch.tensor(vocab - 1, dtype=torch.int32)
    loss = vocab_parallel_cross_entropy(z7[lo:hi].clone(), t7, reduction="none")
    assert loss.shape == ()
    close(loss, F.cross_entropy(z7, t7.long(), reduction="none"), "unbatched")
    checks += 1
    return checks


# ------------------------------------------------------------------------------------------------
# faults: every rank raises the same error, nobody waits


def expect_error(kind, pattern, call):
    try:
        call()
    except kind as err:
        message = str(err)
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
        assert "raised on every rank" in message, message
        return 1
    raise AssertionError(f"expected {kind.__name__} matching {pattern!r}, nothing was raised")


def check_faults(rank, world, sizes):
    """Bad or mismatched arguments on one rank or all: the same exception on every rank."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy as vpce,
    )
    from crossent.distributed import (
        vocab_parallel_linear_cross_entropy as vplce,
    )

    vocab = sum(sizes)
    lo, hi = slice_bounds(sizes, rank)
    last = world - 1
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, vocab, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, 6, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (5,), generator=gen)
    zl, wl = z[:, lo:hi], w[lo:hi]
    faults = [
        # a target outside the global vocabulary (the slices are too small for it)
        (
            ValueError,
            rf"in \[0, {vocab}\).*{re.escape(str(list(sizes)))}.*got {vocab}",
            lambda: vpce(zl, torch.where(target == target[0], vocab, target)),
        ),
        (ValueError, r"got -7", lambda: vplce(x, wl, torch.cat([target[:4], torch.tensor([-7])]))),
        # a rank whose slice disagrees with the input
        (
            ValueError,
            rf"rank {last}: local_weight must have shape \(V_r, D\)",
            lambda: vplce(x, torch.randn(hi - lo, 7, dtype=torch.float64) if rank == last else wl, target),
        ),
        (
            ValueError,
            rf"rank {last}: local_bias must have shape",
            lambda: vplce(x, wl, target, local_bias=torch.zeros(hi - lo + (rank == last), dtype=torch.float64)),
        ),
        (ValueError, r"rank 0: target must have the leading shape", lambda: vpce(zl[:4] if rank == 0 else zl, target)),
        # shapes that are consistent on each rank but differ between ranks
        (
            ValueError,
            r"feature size D .* same on every rank of the group, got \[6, 7",
            lambda: vplce(
                torch.randn(5, 6 + rank, dtype=torch.float64),
                torch.randn(hi - lo, 6 + rank, dtype=torch.float64),
                target,
            ),
        ),
        (ValueError, r"number of rows", lambda: vpce(zl[: 5 - (rank == last)], target[: 5 - (rank == last)])),
        (ValueError, r"the target .* same on every rank", lambda: vpce(zl, (target + rank) % vocab)),
        (ValueError, r"dtype of the logits", lambda: vpce(zl.float() if rank == last else zl, target)),
        (ValueError, r"input.requires_grad", lambda: vplce(x.clone().requires_grad_(rank == 0), wl, target)),
        # options: bad on one rank, or differing between ranks
        (
            ValueError,
            r"rank 0: reduction must be one of",
            lambda: vpce(zl, target, reduction="avg" if rank == 0 else "mean"),
        ),
        (
            ValueError,
            r"label_smoothing must be the same on every rank of the group, got \[0.0, 0.1",
            lambda: vpce(zl, target, label_smoothing=0.1 * rank),
        ),
        (ValueError, r"softcap must be the same", lambda: vplce(x, wl, target, softcap=None if rank == 0 else 2.0)),
        (
            ValueError,
            rf"rank {last}: label_smoothing must be in \[0, 1\], got 1.5",
            lambda: vpce(zl, target, label_smoothing=1.5 if rank == last else 0.0),
        ),
        (
            TypeError,
            rf"rank {last}: target must hold integer class indices",
            lambda: vpce(zl, target.double() if rank == last else target),
        ),
        (
            TypeError,
            rf"rank {last}: local_logits must be a torch.Tensor, got list",
            lambda: vpce(zl.tolist() if rank == last else zl, target),
        ),
    ]
    raised = sum(expect_error(kind, pattern, call) for kind, pattern, call in faults)
    assert raised == len(faults)

    # the group is still in step: a good call afterwards equals the oracle
    z_full = z.clone().requires_grad_()
    expected = F.cross_entropy(z_full, target, label_smoothing=0.1)
    expected.backward()
    z_local = zl.clone().requires_grad_()
    loss = vpce(z_local, target, label_smoothing=0.1)
    loss.backward()
    close(loss, expected.detach(), "after the faults: loss")
    close(z_local.grad, z_full.grad[:, lo:hi], "after the faults: grad")
    return raised + 2


# ------------------------------------------------------------------------------------------------
# the communication schedule of the module docstring, and a group other than the default one


class CollectiveLog:
    """Records every all_reduce / all_gather the library makes: (kind, op, numel, dtype)."""

    def __init__(self):
        self.calls = []
        self._saved = dist.all_reduce, dist.all_gather

    def __enter__(self):
        all_reduce, all_gather = self._saved

        def logged_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append(("all_reduce", str(op).split(".")[-1], tensor.numel(), tensor.dtype))
            return all_reduce(tensor, op=op, group=group, async_op=async_op)

        def logged_all_gather(tensors, tensor, group=None, async_op=False):
            self.calls.append(("all_gather", None, tensor.numel(), tensor.dtype))
            return all_gather(tensors, tensor, group=group, async_op=async_op)

        dist.all_reduce, dist.all_gather = logged_all_reduce, logged_all_gather
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self._saved

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def check_schedule_and_groups(rank, world):
    """The collectives are those the module docstring draws; ``group=`` splits over a subgroup."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )
    from crossent.distributed.vocab_parallel import _FIELDS

    rows, features, sizes = 7, 5, [4, 6, 3][:world]
    vocab = sum(sizes)
    lo, hi = slice_bounds(sizes, rank)
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    x = torch.randn(rows, features, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, features, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    table = ("all_gather", None, len(_FIELDS), torch.int64)
    same_target = ("all_reduce", "MIN", 2 * rows, torch.int64)  # step 0b: [y, ~y]
    row_max = ("all_reduce", "MAX", rows, torch.float64)
    checks = 0
    with CollectiveLog() as log:
        for eps in (0.0, 0.1):
            stacked = ("all_reduce", "SUM", (4 if eps else 2) * rows, torch.float64)
            loss = vocab_parallel_cross_entropy(z[:, lo:hi].clone().requires_grad_(), target, label_smoothing=eps)
            assert log.take() == [table, same_target, row_max, stacked]
            loss.backward()
            assert log.take() == []  # the logits version needs nothing in backward
            for x_grad in (True, False):
                loss = vocab_parallel_linear_cross_entropy(
                    x.clone().requires_grad_(x_grad),
                    w[lo:hi].clone().requires_grad_(),
                    target,
                    label_smoothing=eps,
                    softcap=4.0,
                )
                assert log.take() == [table, same_target, row_max, stacked]
                loss.backward()
                input_grad = ("all_reduce", "SUM", rows * features, torch.float64)
                assert log.take() == ([input_grad] if x_grad else [])
                checks += 4
    assert len(_FIELDS) == 17  # the docstring's "17 W int64 per call", in both modes

    # the linear version never holds this rank's N x V_r logits: chunks of at most
    # _CHUNK_ELEMENTS // N columns, each column computed once in forward and once in backward
    import crossent.distributed.vocab_parallel as vp

    default_chunk, linear_chunk = vp._CHUNK_ELEMENTS, vp._linear_chunk
    widths = []

    def recording_chunk(x_, weight_, bias_, col0, width):
        out = linear_chunk(x_, weight_, bias_, col0, width)
        widths.append(out.shape[1])
        return out

    vp._CHUNK_ELEMENTS, vp._linear_chunk = rows * 2, recording_chunk
    try:
        loss = vocab_parallel_linear_cross_entropy(x.clone().requires_grad_(), w[lo:hi].clone(), target)
        loss.backward()
    finally:
        vp._CHUNK_ELEMENTS, vp._linear_chunk = default_chunk, linear_chunk
    assert max(widths, default=0) <= 2 and sum(widths) == 2 * (hi - lo), widths
    checks += 1

    # a subgroup: every rank but rank 1 splits the vocabulary; rank 1 is not in the group
    members = [r for r in range(world) if r != 1]
    group = dist.new_group(members)  # collective over the default group
    if rank in members:
        sub_sizes = [5, 8][: len(members)]
        sub_lo, sub_hi = slice_bounds(sub_sizes, members.index(rank))
        sub_vocab = sum(sub_sizes)
        t = target % sub_vocab
        z_full = z[:, :sub_vocab].clone().requires_grad_()
        expected = F.cross_entropy(z_full, t, reduction="sum", label_smoothing=0.2)
        expected.backward()
        z_local = z[:, sub_lo:sub_hi].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(z_local, t, group=group, reduction="sum", label_smoothing=0.2)
        loss.backward()
        close(loss, expected.detach(), f"subgroup loss rank {rank}")
        close(z_local.grad, z_full.grad[:, sub_lo:sub_hi], f"subgroup grad rank {rank}")
        checks += 2
    else:
        try:
            vocab_parallel_cross_entropy(z[:, :3].clone(), target % 3, group=group)
        except ValueError as err:
            assert "group must contain this process" in str(err), err
            checks += 2
    dist.barrier()
    return checks


def check_random_splits(rank, world, cases=8):
    """Random partitions of the vocabulary (empty slices included) with random options."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    checks = 0
    for case in range(cases):
        gen = torch.Generator().manual_seed(500 + case)  # the same on every rank
        vocab = int(torch.randint(1, 40, (), generator=gen))
        cuts = torch.randint(0, vocab + 1, (world - 1,), generator=gen).sort().values.tolist()
        edges = [0, *cuts, vocab]
        sizes = [edges[r + 1] - edges[r] for r in range(world)]
        lo, hi = slice_bounds(sizes, rank)
        rows, features = int(torch.randint(1, 12, (), generator=gen)), 3
        eps = [0.0, 0.3][case % 2]
        zl = [0.0, 0.05][(case // 2) % 2]
        reduction = ["mean", "sum", "none"][case % 3]
        softcap = [None, 2.5][(case // 4) % 2]
        target = make_targets(gen, (rows,), vocab, -100)
        x = torch.randn(rows, features, generator=gen, dtype=torch.float64)
        w = torch.randn(vocab, features, generator=gen, dtype=torch.float64)
        b = torch.randn(vocab, generator=gen, dtype=torch.float64)
        grad_out = upstream(reduction, (rows,), gen)
        x_full, w_full, b_full = (t.clone().requires_grad_() for t in (x, w, b))
        logits = x_full @ w_full.T + b_full
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits.retain_grad()
        rows_loss = oracle_rows(logits, target, ignore_index=-100, eps=eps, zl=zl)
        expected = oracle_reduce(rows_loss, target, ignore_index=-100, reduction=reduction, shape=(rows,))
        (expected * grad_out).sum().backward()
        opts = dict(reduction=reduction, label_smoothing=eps, z_loss=zl)
        what = f"random split {sizes} rank {rank} {opts} softcap={softcap}"

        z_local = logits.detach()[:, lo:hi].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(z_local, target, **opts)
        (loss * grad_out).sum().backward()
        close(loss, expected.detach(), f"logits loss, {what}")
        close(z_local.grad, logits.grad[:, lo:hi], f"logits grad, {what}")

        x_l, w_l, b_l = x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), b[lo:hi].clone()
        b_l.requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(x_l, w_l, target, local_bias=b_l, softcap=softcap, **opts)
        (loss * grad_out).sum().backward()
        close(loss, expected.detach(), f"linear loss, {what}")
        close(x_l.grad, x_full.grad, f"input grad, {what}")
        close(w_l.grad, w_full.grad[lo:hi], f"weight grad, {what}")
        close(b_l.grad, b_full.grad[lo:hi], f"bias grad, {what}")
        checks += 6
    return checks


# ------------------------------------------------------------------------------------------------
# the Triton path of the logits version (kernels under Triton's interpreter on the CPU)


def check_triton_logits(rank, world, sizes, special_sizes):
    """The logits version with its local math in crossent.triton's kernels (the parent sets
    TRITON_INTERPRET=1 and CROSSENT_VOCAB_PARALLEL_TRITON=1): every option case in float32
    against the float64 oracle and against the PyTorch chunks, masks, zero denominators, an
    empty slice, NaN on an ignored row, bfloat16, and the collectives of the module docstring."""
    import crossent.distributed.vocab_parallel as vp
    import crossent.triton as triton_ops
    import crossent.triton._partials as partials
    from crossent.distributed import vocab_parallel_cross_entropy
    from crossent.distributed.vocab_parallel import _FIELDS

    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(vp._TRITON_ENV) == "1"
    calls = {"partials": 0, "grad": 0}
    real_partials, real_grad = triton_ops._vocab_parallel_partials, triton_ops._vocab_parallel_grad

    def counted_partials(*args, **kwargs):
        calls["partials"] += 1
        return real_partials(*args, **kwargs)

    def counted_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    triton_ops._vocab_parallel_partials, triton_ops._vocab_parallel_grad = counted_partials, counted_grad
    default_block = partials.MAX_BLOCK
    checks = 0

    def both_paths(z_local, target, grad_out, **opts):
        """(loss, grad) through the Triton kernels, then through the PyTorch chunks."""
        results = []
        for switch in ("auto", "off"):
            vp._TRITON = switch
            leaf = z_local.clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(leaf, target, **opts)
            (loss * grad_out).sum().backward()
            results.append((loss, leaf.grad))
        vp._TRITON = "auto"
        return results

    try:
        # 1. every option case, float32 logits, uneven slices; odd cases take 16-column blocks
        vocab = sum(sizes)
        lo, hi = slice_bounds(sizes, rank)
        shape = (3, 5)
        grid = itertools.product(("mean", "sum", "none"), (None, -100, 3), (0.0, 0.2), (0.0, 0.03))
        for case, (reduction, ignore, eps, zl) in enumerate(grid):
            gen = torch.Generator().manual_seed(2000 + case)
            ignore_index = -100 if ignore is None else ignore
            target = make_targets(gen, shape, vocab, ignore)
            grad_out = upstream(reduction, shape, gen)
            partials.MAX_BLOCK = 16 if case % 2 else default_block
            opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=eps, z_loss=zl)
            what = f"triton rank {rank} sizes {sizes} {opts}"
            z = torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * 2.0
            z32 = z.float()
            z_full = z32.double().requires_grad_()
            rows = oracle_rows(z_full.reshape(-1, vocab), target.reshape(-1), ignore_index=ignore_index, eps=eps, zl=zl)
            expected = oracle_reduce(rows, target, ignore_index=ignore_index, reduction=reduction, shape=shape)
            (expected * grad_out).sum().backward()
            (loss, grad), (torch_loss, torch_grad) = both_paths(z32[..., lo:hi], target, grad_out.float(), **opts)
            close(loss, expected.detach().float(), f"loss vs float64, {what}", rtol=2e-6, atol=1e-6)
            close(grad, z_full.grad[..., lo:hi].float(), f"grad vs float64, {what}", rtol=1e-5, atol=1e-7)
            close(loss, torch_loss, f"loss vs torch path, {what}", rtol=1e-6, atol=1e-7)
            close(grad, torch_grad, f"grad vs torch path, {what}", rtol=1e-5, atol=1e-8)
            checks += 4
        partials.MAX_BLOCK = default_block

        # 2. -inf masks with smoothing (K over all ranks), an empty slice, NaN on an ignored row,
        #    zero denominators
        vocab = sum(special_sizes)
        lo, hi = slice_bounds(special_sizes, rank)
        gen = torch.Generator().manual_seed(17)
        z = torch.randn(6, vocab, generator=gen)
        target = torch.randint(0, vocab, (6,), generator=gen)
        z[1, torch.rand(vocab, generator=gen) < 0.4] = -math.inf
        z[1, target[1]] = 0.25
        target[4] = -100
        z[4] = math.nan
        for reduction, eps, zl in (("none", 0.25, 0.01), ("mean", 0.25, 0.0), ("sum", 1.0, 0.02)):
            z_full = z.double().requires_grad_()
            expected_rows = written_out_rows(z_full, target, ignore_index=-100, eps=eps, zl=zl)
            expected = oracle_reduce(expected_rows, target, ignore_index=-100, reduction=reduction, shape=(6,))
            grad_out = upstream(reduction, (6,), gen)
            (expected * grad_out).sum().backward()
            opts = dict(reduction=reduction, label_smoothing=eps, z_loss=zl)
            (loss, grad), (torch_loss, torch_grad) = both_paths(z[:, lo:hi], target, grad_out.float(), **opts)
            what = f"triton masked rank {rank} sizes {special_sizes} {opts}"
            close(loss, expected.detach().float(), f"loss, {what}", rtol=2e-6, atol=1e-6)
            close(grad, z_full.grad[:, lo:hi].float(), f"grad, {what}", rtol=1e-5, atol=1e-7)
            close(loss, torch_loss, f"loss vs torch path, {what}", rtol=1e-6, atol=1e-7)
            close(grad, torch_grad, f"grad vs torch path, {what}", rtol=1e-5, atol=1e-8)
            assert not bool(grad[4].any()) and bool((grad[torch.isinf(z[:, lo:hi])] == 0).all()), what
            checks += 5
        for reduction in ("mean", "sum"):
            leaf = z[:, lo:hi].clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(leaf, torch.full((6,), -100), reduction=reduction, label_smoothing=0.1)
            loss.backward()
            assert loss.item() == 0.0 and not bool(leaf.grad.any()), (reduction, loss)
            checks += 1

        # 3. bfloat16: float32 loss and statistics, the gradient rounded once to bfloat16
        vocab = sum(sizes)
        lo, hi = slice_bounds(sizes, rank)
        z6 = (torch.randn(9, vocab, generator=gen) * 3).to(torch.bfloat16)
        t6 = torch.randint(0, vocab, (9,), generator=gen)
        t6[2] = -100
        (loss, grad), (torch_loss, torch_grad) = both_paths(
            z6[:, lo:hi], t6, torch.tensor(1.0), label_smoothing=0.1, z_loss=0.01
        )
        z_ref = z6.double().requires_grad_()
        rows6 = oracle_rows(z_ref, t6, ignore_index=-100, eps=0.1, zl=0.01)
        expected = oracle_reduce(rows6, t6, ignore_index=-100, reduction="mean", shape=(9,))
        expected.backward()
        assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
        close(loss, expected.float(), "triton bf16 loss", rtol=1e-5, atol=1e-6)
        close(grad.double(), z_ref.grad[:, lo:hi], "triton bf16 grad", rtol=1e-2, atol=1e-4)
        close(loss, torch_loss, "triton bf16 loss vs torch path", rtol=1e-6, atol=1e-7)
        close(grad.double(), torch_grad.double(), "triton bf16 grad vs torch path", rtol=8e-3, atol=1e-6)
        checks += 4

        # 4. the same collectives as the PyTorch chunks: the table, the targets' MIN of 2N int64,
        # one MAX of N, one SUM of 2N / 4N
        z7 = torch.randn(7, vocab, generator=gen)
        t7 = torch.randint(0, vocab, (7,), generator=gen)
        with CollectiveLog() as log:
            for eps in (0.0, 0.1):
                loss = vocab_parallel_cross_entropy(z7[:, lo:hi].clone().requires_grad_(), t7, label_smoothing=eps)
                assert log.take() == [
                    ("all_gather", None, len(_FIELDS), torch.int64),
                    ("all_reduce", "MIN", 2 * 7, torch.int64),
                    ("all_reduce", "MAX", 7, torch.float32),
                    ("all_reduce", "SUM", (4 if eps else 2) * 7, torch.float32),
                ]
                loss.backward()
                assert log.take() == []
                checks += 2

        # 5. validate=False (the default on CUDA): the slices' sizes instead of the table and the
        # targets' check, the offset on the device; the same loss and gradient as validated, no
        # host traffic
        t8 = t7.clone()
        t8[3] = -100
        for eps in (0.0, 0.1):
            results = []
            for validate in (True, False):
                leaf = z7[:, lo:hi].clone().requires_grad_()
                with CollectiveLog() as log, HostTraffic() as traffic:
                    loss = vocab_parallel_cross_entropy(leaf, t8, label_smoothing=eps, z_loss=0.01, validate=validate)
                    loss.backward()
                results.append((loss, leaf.grad, log.take(), traffic.counts))
            (loss, grad, _, _), (loss_off, grad_off, collectives, traffic) = results
            assert torch.equal(loss, loss_off) and torch.equal(grad, grad_off), eps
            assert collectives == [
                ("all_gather", None, len(_FIELDS), torch.int64),
                ("all_reduce", "MAX", 7, torch.float32),
                ("all_reduce", "SUM", (4 if eps else 2) * 7, torch.float32),
            ], collectives
            assert traffic == {}, traffic
            checks += 3
    finally:
        triton_ops._vocab_parallel_partials, triton_ops._vocab_parallel_grad = real_partials, real_grad
        partials.MAX_BLOCK = default_block
        vp._TRITON = "auto"
    # every call above went through the kernels' entry points (a rank with an empty slice too:
    # the launcher returns the initial statistics without launching)
    assert calls["partials"] >= 36 + 3 + 2 + 1 + 2 + 4 and calls["grad"] >= 36 + 3 + 2 + 1 + 2 + 4, calls
    return checks + 1


# ------------------------------------------------------------------------------------------------
# an ignored row contributes 0 whatever its inputs (review of the distributed layer: D3)


def check_nonfinite_ignored_rows(rank, world, sizes):
    """NaN/inf on ignored rows: in the input of the linear version (a fully masked attention row
    in the padding) and in the upstream gradient of "none" (``loss / seq_len`` with seq_len 0).
    Loss and gradients equal the single-process float64 oracle on the kept rows only; the input
    gradient is 0 on the ignored rows; dW and db are finite."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    vocab = sum(sizes)
    lo, hi = slice_bounds(sizes, rank)
    gen = torch.Generator().manual_seed(21)
    rows, features = 8, 5
    x = torch.randn(rows, features, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, features, generator=gen, dtype=torch.float64)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[[2, 5]] = -100
    keep = target != -100
    checks = 0
    for bad, reduction, softcap, bias in itertools.product(
        (math.nan, math.inf), ("none", "sum", "mean"), (None, 3.0), (False, True)
    ):
        xb = x.clone()
        xb[2, 1] = bad
        xb[5] = bad
        grad_out = upstream(reduction, (rows,), gen)
        # the oracle: the kept rows only
        xk, wk = x[keep].clone().requires_grad_(), w.clone().requires_grad_()
        bk = b.clone().requires_grad_() if bias else None
        z = F.linear(xk, wk, bk)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        expected = F.cross_entropy(z, target[keep], reduction=reduction, label_smoothing=0.1)
        expected.backward(grad_out[keep] if reduction == "none" else grad_out)
        # vocab-parallel on every row
        xl = xb.clone().requires_grad_()
        wl = w[lo:hi].clone().requires_grad_()
        bl = b[lo:hi].clone().requires_grad_() if bias else None
        loss = vocab_parallel_linear_cross_entropy(
            xl, wl, target, local_bias=bl, reduction=reduction, label_smoothing=0.1, softcap=softcap
        )
        loss.backward(grad_out)
        what = f"nonfinite input {bad} {reduction} softcap {softcap} bias {bias} rank {rank}"
        if reduction == "none":
            close(loss[keep], expected, f"loss, {what}")
            assert not bool(loss[~keep].any()), what
        else:
            close(loss, expected, f"loss, {what}")
        close(xl.grad[keep], xk.grad, f"input grad, {what}")
        assert not bool(xl.grad[~keep].any()), what
        close(wl.grad, wk.grad[lo:hi], f"weight grad, {what}")
        if bias:
            close(bl.grad, bk.grad[lo:hi], f"bias grad, {what}")
        checks += 4

    # a NaN / inf upstream gradient on the ignored rows ("none"): both versions
    for bad in (math.nan, math.inf):
        grad_out = torch.where(keep, 1.0, bad).to(torch.float64)
        z_full = (x @ w.T).requires_grad_()
        F.cross_entropy(z_full, target, reduction="none").backward(grad_out)
        zl = (x @ w[lo:hi].T).requires_grad_()
        vocab_parallel_cross_entropy(zl, target, reduction="none").backward(grad_out)
        close(zl.grad, z_full.grad[:, lo:hi], f"logits grad, upstream {bad} on ignored rows rank {rank}")
        xl, wl = x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()
        vocab_parallel_linear_cross_entropy(xl, wl, target, reduction="none").backward(grad_out)
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        F.cross_entropy(xf @ wf.T, target, reduction="none").backward(grad_out)
        close(xl.grad, xf.grad, f"input grad, upstream {bad} on ignored rows rank {rank}")
        close(wl.grad, wf.grad[lo:hi], f"weight grad, upstream {bad} on ignored rows rank {rank}")
        checks += 3
    return checks


# ------------------------------------------------------------------------------------------------
# targets that differ between ranks: compared exactly (review of the distributed layer: D1)


def check_target_agreement(rank, world, sizes):
    """Targets that differ between ranks raise the same ValueError on every rank, however they
    differ: among them those a position-weighted checksum sum_i t_i (i % 65521 + 1) cannot tell
    apart. Targets that agree (ignore_index included) give the single-process loss."""
    from functools import partial

    from crossent.distributed import (
        vocab_parallel_cross_entropy as vpce,
    )
    from crossent.distributed import (
        vocab_parallel_linear_cross_entropy as vplce,
    )

    vocab = sum(sizes)
    lo, hi = slice_bounds(sizes, rank)
    gen = torch.Generator().manual_seed(31)

    def per_rank(*targets):
        return torch.tensor(targets[rank % len(targets)])

    long_rows = 65521 + 2
    base = torch.randint(0, vocab, (long_rows,), generator=gen)
    swapped = base.clone()
    swapped[[0, 65521]] = base[[65521, 0]]
    if base[0] == base[65521]:
        swapped[0] = (base[0] + 1) % vocab
    cases = [
        # (targets of rank 0, of rank 1, ...), ignore_index
        (([0, 1], [2, 0]), -100),  # 0*1 + 1*2 == 2*1 + 0*2
        (([3, 0, 2], [1, 1, 2]), -100),  # +2 at position 0, -1 at position 1
        ((base.tolist(), swapped.tolist()), -100),  # positions i and i + 65521 swapped
        (([-100, 1], [2, 1]), -100),  # ignored on one rank only
        (([1, 0], [0, 1]), 1),  # ignore_index inside the class range
    ]
    checks = 0
    pattern = r"the target must be the same on every rank of the group, got \d+ of \d+ positions"
    for targets, ignore in cases:
        target = per_rank(*targets)
        rows = target.numel()
        z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
        x = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
        w = torch.randn(vocab, 3, generator=gen, dtype=torch.float64)
        checks += expect_error(ValueError, pattern, partial(vpce, z[:, lo:hi], target, ignore_index=ignore))
        checks += expect_error(
            ValueError, pattern, partial(vplce, x, w[lo:hi], target, ignore_index=ignore, reduction="none")
        )
    # the first position that differs, and the values there, are named
    checks += expect_error(
        ValueError,
        r"first at flat index 1: values from 0 to 4",
        lambda: vpce(torch.zeros(3, hi - lo, dtype=torch.float64), per_rank([2, 0, 1], [2, 4, 3])),
    )

    # agreeing targets (ignore_index rows, an (B, T) shape, int32 on one rank) still work
    target = torch.randint(0, vocab, (2, 5), generator=gen)
    target[0, 1] = target[1, 4] = -100
    mine = target.to(torch.int32) if rank == 1 else target
    z = torch.randn(2, 5, vocab, generator=gen, dtype=torch.float64)
    z_full = z.clone().requires_grad_()
    expected = F.cross_entropy(z_full.reshape(10, vocab), target.reshape(10), label_smoothing=0.1)
    expected.backward()
    z_local = z[..., lo:hi].clone().requires_grad_()
    loss = vpce(z_local, mine, label_smoothing=0.1)
    loss.backward()
    close(loss, expected.detach(), "agreeing targets: loss")
    close(z_local.grad, z_full.grad[..., lo:hi], "agreeing targets: grad")
    return checks + 2


# ------------------------------------------------------------------------------------------------
# validate= (review of the distributed layer, round 2: F1-F3)

SHORT_TIMEOUT_S = 5  # a subgroup whose collectives give up fast: a hang regression fails in seconds


class HostTraffic:
    """Counts what moves values between the host and the tensors' device during a call: aten's
    ``_local_scalar_dense`` (``item``, ``bool``, ``int``, ``float`` of a tensor) and ``lift_fresh``
    (``torch.tensor`` of host data), and the methods that do not dispatch (``tolist``, ``numpy``,
    ``cpu``). On the CPU they cost nothing; on CUDA each one makes the host wait for the device.
    ``counts`` maps what was seen to how often."""

    METHODS = ("tolist", "numpy", "cpu")
    OPS = ("_local_scalar_dense", "lift_fresh", "lift_fresh_copy")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in HostTraffic.OPS:
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}

    def __enter__(self):
        for name, method in self._saved.items():

            def counted(tensor, *args, _name=name, _method=method, **kwargs):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _method(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)


def check_validate(rank, world, sizes):
    """``validate=False`` against ``validate=True`` (the same numbers: equal tensors) and the
    float64 oracle, over option cases of both functions; its collectives (the slice sizes, in a
    table of the validated size, len(_FIELDS) int64 per rank; MAX; SUM) and no host traffic in
    forward or backward; ``validate=True`` and the default (on for CPU tensors) keep the table
    and step 0b, with their host reads. Without
    validation an out-of-range target gives NaN on its row, and an argument error on every rank
    raises on every rank before any collective; a non-bool ``validate`` raises on every rank."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy as vpce,
    )
    from crossent.distributed import (
        vocab_parallel_linear_cross_entropy as vplce,
    )
    from crossent.distributed.vocab_parallel import _FIELDS

    vocab = sum(sizes)
    lo, hi = slice_bounds(sizes, rank)
    checks = 0
    cases = [
        # (shape, reduction, ignore, eps, z_loss, softcap, bias)
        ((7,), "mean", None, 0.0, 0.0, None, False),
        ((2, 5), "none", -100, 0.2, 0.03, 3.0, True),
        ((3, 3), "sum", 3, 0.0, 0.03, None, True),
        ((0,), "mean", -100, 0.1, 0.0, 2.0, False),
    ]
    for case, (shape, reduction, ignore, eps, zl, softcap, bias) in enumerate(cases):
        gen = torch.Generator().manual_seed(4000 + case)
        ignore_index = -100 if ignore is None else ignore
        target = make_targets(gen, shape, vocab, ignore)
        grad_out = upstream(reduction, shape, gen)
        opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=eps, z_loss=zl)
        what = f"validate=False rank {rank} sizes {sizes} shape {shape} {opts}"
        oracle_opts = dict(ignore_index=ignore_index, eps=eps, zl=zl, reduction=reduction)
        rows = target.numel()

        # logits version
        z = torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)
        z_full = z.clone().requires_grad_()
        expected = oracle_backward(z_full, target, grad_out, **oracle_opts)
        results = {}
        for validate in (True, False):
            leaf = z[..., lo:hi].clone().requires_grad_()
            with CollectiveLog() as log, HostTraffic() as traffic:
                loss = vpce(leaf, target, validate=validate, **opts)
                forward = log.take()
                (loss * grad_out).sum().backward()
                assert log.take() == [], what
            results[validate] = (loss.detach(), leaf.grad, forward, traffic.counts)
        loss, grad, forward, traffic = results[False]
        close(loss, expected.detach(), f"logits loss, {what}")
        close(grad, z_full.grad[..., lo:hi], f"logits grad, {what}")
        assert torch.equal(loss, results[True][0]) and torch.equal(grad, results[True][1]), what
        stacked = ("all_reduce", "SUM", (4 if eps else 2) * rows, torch.float64)
        row_max = ("all_reduce", "MAX", rows, torch.float64)
        assert forward == [("all_gather", None, len(_FIELDS), torch.int64), row_max, stacked], (what, forward)
        assert traffic == {}, (what, traffic)
        # validate=True: the table, step 0b (with rows on more than one rank), host reads
        validated = [("all_gather", None, len(_FIELDS), torch.int64)]
        validated += [("all_reduce", "MIN", 2 * rows, torch.int64)] if rows else []
        assert results[True][2] == validated + [row_max, stacked], (what, results[True][2])
        assert results[True][3].get("tolist", 0) >= 1, results[True][3]  # the detector sees them
        checks += 6

        # linear version, input gradient all-reduced in backward
        x = torch.randn(*shape, 4, generator=gen, dtype=torch.float64)
        w = torch.randn(vocab, 4, generator=gen, dtype=torch.float64)
        b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
        x_full, w_full = x.clone().requires_grad_(), w.clone().requires_grad_()
        b_full = b.clone().requires_grad_() if bias else None
        logits = F.linear(x_full, w_full, b_full)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        expected = oracle_backward(logits, target, grad_out, **oracle_opts)
        results = {}
        for validate in (True, False):
            leaves = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()]
            leaves.append(b[lo:hi].clone().requires_grad_() if bias else None)
            with CollectiveLog() as log, HostTraffic() as traffic:
                loss = vplce(leaves[0], leaves[1], target, local_bias=leaves[2], softcap=softcap,
                             validate=validate, **opts)
                forward = log.take()
                (loss * grad_out).sum().backward()
                backward = log.take()
            grads = [leaf.grad for leaf in leaves if leaf is not None]
            results[validate] = (loss.detach(), grads, forward, backward, traffic.counts)
        loss, grads, forward, backward, traffic = results[False]
        label = f"linear bias={bias} softcap={softcap}, {what}"
        close(loss, expected.detach(), f"loss, {label}")
        close(grads[0], x_full.grad, f"input grad, {label}")
        close(grads[1], w_full.grad[lo:hi], f"weight grad, {label}")
        if bias:
            close(grads[2], b_full.grad[lo:hi], f"bias grad, {label}")
        assert torch.equal(loss, results[True][0]), label
        assert all(torch.equal(a, b) for a, b in zip(grads, results[True][1], strict=True)), label
        assert forward == [("all_gather", None, len(_FIELDS), torch.int64), row_max, stacked], (label, forward)
        assert backward == [("all_reduce", "SUM", rows * 4, torch.float64)], (label, backward)
        assert traffic == {}, (label, traffic)
        checks += 7

    # the default on CPU tensors is validate=True: the table and step 0b
    gen = torch.Generator().manual_seed(4100)  # the same on every rank
    z = torch.randn(5, vocab, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (5,), generator=gen)
    with CollectiveLog() as log:
        vpce(z[:, lo:hi], target)
        assert [call[:3] for call in log.take()[:2]] == [
            ("all_gather", None, len(_FIELDS)),
            ("all_reduce", "MIN", 10),
        ]
    checks += 1

    # without validation, a target outside [0, V) (on every rank alike) gives NaN on its row
    bad = target.clone()
    bad[1], bad[3] = vocab, -3
    leaf = z[:, lo:hi].clone().requires_grad_()
    loss = vpce(leaf, bad, reduction="none", validate=False)
    loss.backward(torch.ones(5, dtype=torch.float64))
    keep = torch.tensor([0, 2, 4])
    z_kept = z[keep].clone().requires_grad_()
    F.cross_entropy(z_kept, target[keep], reduction="none").sum().backward()
    close(loss.detach()[keep], F.cross_entropy(z[keep], target[keep], reduction="none"), "NaN rows: kept rows")
    assert bool(loss[[1, 3]].isnan().all()), loss
    if hi > lo:
        assert bool(leaf.grad[[1, 3]].isnan().all()), leaf.grad
    close(leaf.grad[keep], z_kept.grad[:, lo:hi], "NaN rows: gradient of the kept rows")
    assert math.isnan(vpce(z[:, lo:hi], bad, validate=False).item())
    with pytest_raises(ValueError, r"got -3 \(raised on every rank\)"):
        vpce(z[:, lo:hi], bad)  # validated, the same targets raise
    checks += 5

    # without validation, an argument error raises where it is, before any collective; with the
    # same bad argument on every rank, every rank raises and the group stays in step
    with CollectiveLog() as log:
        here_only = r"validate=False: raised on this rank only"
        with pytest_raises(ValueError, rf"rank {rank}: reduction must be one of .*{here_only}"):
            vpce(z[:, lo:hi], target, reduction="avg", validate=False)
        with pytest_raises(TypeError, rf"rank {rank}: target must hold integer class indices"):
            vplce(torch.zeros(5, 4, dtype=torch.float64), torch.zeros(hi - lo, 4, dtype=torch.float64),
                  target.double(), validate=False)
        assert log.take() == []
    with pytest_raises(TypeError, r"rank \d: validate must be None, True or False, got 'yes' \(raised on every rank\)"):
        vpce(z[:, lo:hi], target, validate="yes" if rank == world - 1 else None)
    z_full = z.clone().requires_grad_()
    F.cross_entropy(z_full, target).backward()
    leaf = z[:, lo:hi].clone().requires_grad_()
    loss = vpce(leaf, target, validate=False)
    loss.backward()
    close(loss.detach(), F.cross_entropy(z, target), "after the errors: loss")
    close(leaf.grad, z_full.grad[:, lo:hi], "after the errors: grad")
    return checks + 5


class pytest_raises:  # noqa: N801 - reads like pytest.raises, which the ranks do not import
    """``with pytest_raises(kind, pattern):`` the block raises ``kind`` whose message matches."""

    def __init__(self, kind, pattern):
        self.kind, self.pattern = kind, pattern

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is None:
            raise AssertionError(f"expected {self.kind.__name__} matching {self.pattern!r}, nothing was raised")
        if not issubclass(kind, self.kind):
            return False
        assert re.search(self.pattern, str(err)), f"{self.pattern!r} not in {str(err)!r}"
        return True


def check_grad_mode_and_target_shape(rank, world):
    """Validated calls over a subgroup with a short timeout (a hang regression fails in
    ``SHORT_TIMEOUT_S``): a rank running the linear version's forward under ``torch.no_grad()``
    while the others record a graph raises on every rank (backward would all-reduce the input
    gradient on some ranks only); under no_grad on every rank, a rank-dependent
    ``input.requires_grad`` is fine (no backward runs); target shapes that differ across ranks
    with the same number of elements raise on every rank."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy as vpce,
    )
    from crossent.distributed import (
        vocab_parallel_linear_cross_entropy as vplce,
    )

    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    sizes = [3, 2, 4][:world]
    vocab = sum(sizes)
    lo, hi = slice_bounds(sizes, rank)
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, 3, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (6,), generator=gen)
    checks = 0
    pattern = r"whether input needs a gradient \(input.requires_grad under grad mode\) must be the same.*every rank"
    for no_grad_rank in range(world):
        leaf = x.clone().requires_grad_()
        with torch.set_grad_enabled(rank != no_grad_rank), pytest_raises(ValueError, pattern):
            vplce(leaf, w[lo:hi], target, group=group, validate=True)
        checks += 1
    with torch.no_grad():
        loss = vplce(x.clone().requires_grad_(rank == 0), w[lo:hi], target, group=group, validate=True)
    close(loss, F.cross_entropy(x @ w.T, target), "no_grad on every rank")
    checks += 1

    shape = [(2, 3), (3, 2)][rank % 2]
    z = torch.randn(6, hi - lo, generator=gen, dtype=torch.float64)
    pattern = r"target.shape must be the same on every rank of the group, got \d different shapes.*every rank"
    with pytest_raises(ValueError, pattern):
        vpce(z.reshape(*shape, hi - lo), target.reshape(shape), group=group, reduction="none")
    with pytest_raises(ValueError, r"target.shape must be the same"):
        vplce(x.reshape(*shape, 3), w[lo:hi], target.reshape(shape), group=group)
    checks += 2

    # the group is still in step: a backward that all-reduces the input gradient on every rank
    leaf = x.reshape(2, 3, 3).clone().requires_grad_()
    loss = vplce(leaf, w[lo:hi], target.reshape(2, 3), group=group, reduction="none", validate=True)
    loss.sum().backward()
    x_full = x.clone().requires_grad_()
    expected = F.cross_entropy(x_full @ w.T, target, reduction="none")
    expected.sum().backward()
    close(loss, expected.detach().reshape(2, 3), "after the errors: loss")
    close(leaf.grad, x_full.grad.reshape(2, 3, 3), "after the errors: input grad")
    dist.barrier()
    return checks + 2


# ------------------------------------------------------------------------------------------------
# torch.autocast, and a validate that differs across ranks


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm())


def check_autocast_linear(rank, world):
    """The linear version called under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with
    float32 tensors: its loss is eager autocast's (the same bfloat16 logits) and its gradients
    are those of that loss, so their errors against the float64 problem are no worse than eager
    autocast's (``F.linear`` under the same autocast, the loss of its logits in float32, gradients
    by autograd), whether backward runs inside or outside the autocast region. Before backward
    recomputed the logits under forward's autocast state, ``p = exp(z32 - lse_bf16)`` did not sum
    to 1 and the gradients were ~3x further off than eager's."""
    import crossent.distributed.vocab_parallel as vp
    from crossent.distributed import vocab_parallel_linear_cross_entropy as vplce

    sizes = [70, 53, 41][:world]
    vocab, features = sum(sizes), 29
    lo, hi = slice_bounds(sizes, rank)
    cases = [
        # (shape, bias, softcap, eps, z_loss, reduction, backward inside autocast)
        ((37,), True, None, 0.0, 0.0, "sum", False),
        ((37,), False, None, 0.1, 1e-3, "mean", True),
        ((5, 7), True, 4.0, 0.0, 0.0, "none", False),
    ]
    default_chunk = vp._CHUNK_ELEMENTS
    vp._CHUNK_ELEMENTS = 37 * 16  # several chunks of 16 columns per slice
    checks = 0
    try:
        for case, (shape, bias, softcap, eps, zl, reduction, inside) in enumerate(cases):
            gen = torch.Generator().manual_seed(6000 + case)
            x = torch.randn(*shape, features, generator=gen)
            w = torch.randn(vocab, features, generator=gen)
            b = torch.randn(vocab, generator=gen) if bias else None
            target = make_targets(gen, shape, vocab, -100)
            grad_out = upstream(reduction, shape, gen).float()
            opts = dict(ignore_index=-100, eps=eps, zl=zl, reduction=reduction)
            what = f"autocast case {case} rank {rank}"

            def eager(dtype, autocast, x=x, w=w, b=b, target=target, grad_out=grad_out, opts=opts, softcap=softcap):
                leaves = [t.to(dtype).clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = F.linear(*leaves)
                logits = logits.to(dtype)  # the loss of the (autocast) logits in float32 / float64
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                loss = oracle_backward(logits, target, grad_out.to(dtype), **opts)
                return loss.detach(), [leaf.grad for leaf in leaves]

            exact_loss, exact = eager(torch.float64, False)
            eager_loss, eager_grads = eager(torch.float32, True)
            leaves = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()]
            if bias:
                leaves.append(b[lo:hi].clone().requires_grad_())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = vplce(leaves[0], leaves[1], target, local_bias=leaves[2] if bias else None,
                             softcap=softcap, label_smoothing=eps, z_loss=zl, reduction=reduction)
                if inside:
                    (loss * grad_out).sum().backward()
            if not inside:
                (loss * grad_out).sum().backward()
            assert loss.dtype == torch.float32, (what, loss.dtype)
            # the same bfloat16 logits: the loss is eager autocast's, not float32's
            assert rel_err(loss.detach(), eager_loss) <= 1e-5, (what, rel_err(loss.detach(), eager_loss))
            checks += 1
            slices = [slice(None), slice(lo, hi), slice(lo, hi)]
            for name, leaf, eager_grad, exact_grad, cols in zip(
                ("input", "weight", "bias"), leaves, eager_grads, exact, slices, strict=False
            ):
                ours, theirs = rel_err(leaf.grad, exact_grad[cols]), rel_err(eager_grad[cols], exact_grad[cols])
                # bfloat16 logits are off by ~1e-2 relative: a real error to stay within, not noise
                assert 1e-3 < theirs < 1e-1, (what, name, theirs)
                assert ours <= 1.5 * theirs, f"{what}: {name} grad error {ours:.2e} > 1.5 x eager's {theirs:.2e}"
                checks += 1
            if case == 0:
                # sum_j dz_ij = g_i (sum_j p_ij - 1) = 0 when backward's p is forward's softmax
                total = leaves[2].grad.sum().reshape(1).double()
                dist.all_reduce(total)
                assert abs(float(total)) <= 1e-4 * float(leaves[2].grad.norm()), (what, float(total))
                checks += 1
    finally:
        vp._CHUNK_ELEMENTS = default_chunk
    return checks


def check_validate_mismatch(rank, world):
    """A ``validate`` that differs across two ranks: the validating rank raises a ValueError
    naming ``validate`` with every rank's value; the other, which reads nothing back, fails in its
    next collective with the group's timeout (a RuntimeError), and the process lives on: no
    mismatched all-gather (16 int64 against 1 aborted gloo with SIGABRT). Over subgroups with a
    short timeout; a call on every rank afterwards gives the oracle's loss."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy as vpce,
    )
    from crossent.distributed import (
        vocab_parallel_linear_cross_entropy as vplce,
    )

    assert world == 2
    sizes = [4, 3]
    lo, hi = slice_bounds(sizes, rank)
    gen = torch.Generator().manual_seed(77)
    z = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 7, (5,), generator=gen)
    checks = 0
    rounds = [
        # (validate per rank, the flags the message lists, function)
        ((True, False), r"\[True, False\]", lambda v, g: vpce(z[:, lo:hi], target, group=g, validate=v)),
        # None is True for CPU tensors
        ((False, None), r"\[False, True\]", lambda v, g: vplce(x, w[lo:hi], target, group=g, validate=v)),
    ]
    for flags, listed, call in rounds:
        group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
        validate = flags[rank]
        if validate is False:
            with pytest_raises(RuntimeError, ""):  # its MAX all-reduce, waiting for the other rank
                call(validate, group)
        else:
            pattern = rf"validate must be the same on every rank of the group, got {listed} in rank order"
            with pytest_raises(ValueError, pattern):
                call(validate, group)
        checks += 1
    # the default group is still in step
    loss = vpce(z[:, lo:hi], target)
    close(loss, F.cross_entropy(z, target), "after the mismatches")
    dist.barrier()
    return checks + 1
