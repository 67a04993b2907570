"""Fused linear cross-entropy (LM head), forward+backward, on one CUDA GPU: crossent vs peers.

One command on a GPU machine (from the repository root, crossent installed):

    python benchmarks/bench_gpu_linear_cross_entropy.py     # Gemma-2 and Llama-3 shapes, bf16

Runs, in one process and on the same inputs (N x D hidden states E, V x D head W, 10% ignored
targets): crossent.triton.linear_cross_entropy "lean" (default) and "fast" (one row per budget of
--fast-budget-mib, default 1000 and 1536 MiB), both of which skip the ignored rows in most of
their products after waiting for the row count their forward sent to the host (``HostCount``; no
sleep covers such a wait, so their queued samples get the count ahead: ``row_count_given``, same
GPU work); and both again with every row through the products
(CROSSENT_TRITON_LINEAR_HOST_COUNT=0, no wait; fast at the first budget only),
torch eager (logits.float() then F.cross_entropy), the same under torch.compile, Liger's
LigerFusedLinearCrossEntropyLoss and Cut Cross-Entropy (default filtering, and filter_eps=None)
when installed, and the three bare matmuls of the head (E W^T, G W, G^T E: 6NDV flops), the
yardstick of DESIGN.md's targets. Each is timed twice per repeat (gpu_harness.measure): synced
(from an idle GPU: host launch time and GPU waits for the host included) and queued (GPU time
alone, as when the host runs ahead of the GPU). Throughput is 6NDV / synced time. Errors: loss,
dE and dW against a float32 reference (relative L2). Appends long-format rows to
benchmarks/results/gpu_linear_cross_entropy.csv and prints a table. Exits with status 2 and a
message when no CUDA device is present.

Tile sweep (crossent only; peers and the bare matmuls run once per shape):

    python benchmarks/bench_gpu_linear_cross_entropy.py --tiles default-sweep   # gpu_harness.LINEAR_SWEEP
    python benchmarks/bench_gpu_linear_cross_entropy.py --tiles elementwise-sweep \
        --impls crossent-triton-lean,bare-matmuls                              # gpu_harness.ELEMENTWISE_SWEEP
    python benchmarks/bench_gpu_linear_cross_entropy.py --tiles "default;128,128,64,128,8,4;group_m=8"

Each config is a CROSSENT_TRITON_LINEAR_TILES value (block_m,block_v,block_k,block_d,num_warps,
num_stages, then optional key=value: programs, group_m, chunk; see
crossent.triton._launchers.LinearTiles; "default" = no override); rows carry it in the ``config``
column; the fastest config per shape is printed with its ratio to the bare matmuls (lean target
<= 1.4x) and to torch.compile (fast target <= 1x), in each time metric. ``--impls`` picks
implementations, e.g.
``--impls crossent-triton-lean,bare-matmuls`` for a quick sweep.

Time on an H100 (estimate from counts, not measured): per config, lean compiles 7 kernel variants
(forward, combine, gradient tile, 3 dE, dW) and fast 3 more, once for both shapes (same
specializations); sm90_config_report.py compiles 40 of the matmul variants (+ a ptxas rerun each)
in 18 s with Triton 3.6 on a 2-core CPU, so ~5-10 s per config. A lean call takes ~50-90 ms and
a fast one ~40-60 ms, x (warmup 2 + repeats 10 synced + 10 queued, each queued call behind a
sleep of 3x its host enqueue time, >= 1 ms): ~2-3 s per config and shape (--no-queued: ~1-2 s).
The 6-config default sweep: ~2 min for crossent at both shapes. Once per shape: the float32
reference (~1 s, ~35 GB at Gemma-2), the bare matmuls, torch eager, torch.compile (~0.5-1.5 min
of compile per shape), Liger and Cut Cross-Entropy (their Triton compiles and autotuning, then 22
calls of 50-160 ms): about 6-8 minutes in all. Pass --max-minutes 7.5 inside a 10-minute device
call (an item that starts just before that must still end inside the call): whatever is left at
that point is recorded as skipped and the rows so far are already in the CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA = ("bare-matmuls",)  # --impls names run outside implementations()
BENCHMARK = "linear_cross_entropy_fwd_bwd"
DEFAULT_OUT = os.path.join(HERE, "results", "gpu_linear_cross_entropy.csv")
CONFIG_ENV = "CROSSENT_TRITON_LINEAR_TILES"
HOST_COUNT_ENV = "CROSSENT_TRITON_LINEAR_HOST_COUNT"
BARE = "bare-matmuls (E W^T, G W, G^T E)"


def implementations(torch, F, fast_budgets, device):
    import crossent.triton as ctr

    def eager(e, w, t):
        return F.cross_entropy((e @ w.T).float(), t)

    def every_row(e, w, t, budget=None):
        # Ignored rows through the products, no wait for the row count (HostCount): the default's
        # queued GPU time cannot be measured (the host waits for its own forward's count), this
        # one's can, and the synced pair shows what skipping the ignored rows gains.
        os.environ[HOST_COUNT_ENV] = "0"
        try:
            return ctr.linear_cross_entropy(e, w, t, memory_budget=budget)
        finally:
            del os.environ[HOST_COUNT_ENV]

    impls = {"crossent-triton-lean": lambda e, w, t: ctr.linear_cross_entropy(e, w, t),
             "crossent-triton-lean-every-row": every_row}
    for budget in fast_budgets:
        impls[f"crossent-triton-fast({budget >> 20}MiB)"] = (
            lambda e, w, t, budget=budget: ctr.linear_cross_entropy(e, w, t, memory_budget=budget))
    if fast_budgets:
        impls[f"crossent-triton-fast-every-row({fast_budgets[0] >> 20}MiB)"] = (
            lambda e, w, t, budget=fast_budgets[0]: every_row(e, w, t, budget))
    impls["torch-eager"] = eager
    if device == "cuda":  # the CPU smoke mode has no inductor toolchain to rely on
        # dynamic=False: one static graph per shape (a function reused at a second shape would
        # otherwise be recompiled with symbolic sizes, a slower baseline than a user would get).
        impls["torch-compile"] = torch.compile(eager, dynamic=False)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger-kernel"] = lambda e, w, t: liger(w, e, t)
    except ImportError as err:
        print(f"note: liger-kernel not importable ({err}); skipped", file=sys.stderr)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cut-cross-entropy"] = lambda e, w, t: cce(e, w, t)
        impls["cut-cross-entropy(filter_eps=None)"] = lambda e, w, t: cce(e, w, t, filter_eps=None)
    except ImportError as err:
        print(f"note: cut-cross-entropy not importable ({err}); skipped", file=sys.stderr)
    return impls


def bench_shape(torch, F, impls, shape, dtype, args, common, rec):
    """Rows for one (N, D, V) shape: the bare matmuls, then every implementation."""
    n, d, v = shape
    gen = torch.Generator(device=args.device).manual_seed(0)
    emb = torch.randn(n, d, device=args.device, generator=gen).to(dtype)
    head = (torch.randn(v, d, device=args.device, generator=gen) * (2.0 / math.sqrt(d))).to(dtype)
    target = torch.randint(0, v, (n,), device=args.device, generator=gen)
    target[torch.rand(n, device=args.device, generator=gen) < args.ignored] = -100
    flops = 6.0 * n * d * v

    def tflops(ms):
        return flops / (ms * 1e-3) / 1e12

    # float32 reference (no TF32): loss, dE, dW.
    re, rw = emb.float().requires_grad_(), head.float().requires_grad_()
    ref_loss = F.cross_entropy(re @ rw.T, target)
    ref_loss.backward()
    ref_de, ref_dw, ref_loss = re.grad, rw.grad, ref_loss.detach()
    del re, rw
    H.empty_cache(torch, args.device)

    if not args.impls or "bare-matmuls" in args.impls:
        g = (torch.randn(n, v, device=args.device, generator=gen) * 1e-4).to(dtype)

        def bare():
            logits = emb @ head.T
            return logits, g @ head, g.T @ emb

        m = H.measure(torch, tuple, bare, args.repeats, args.warmup, lambda inputs: [],
                      device=args.device, queued=args.queued)
        rec.add(H.row(common, BENCHMARK, shape, args.dtype, args.ignored, BARE, m.times_ms, m.extra_bytes,
                      tflops, "TFLOP/s", float("nan"), float("nan"),
                      note=H.join_notes("yardstick; extra includes logits", m.note), gpu_times=m.gpu_times_ms))
        m = None
        del g, bare
        H.empty_cache(torch, args.device)

    def make_inputs():
        return (emb.detach().requires_grad_(), head.detach().requires_grad_(), target)

    def measured(loss, grads):
        loss_err = float((loss.float() - ref_loss).abs())
        return (tflops, "TFLOP/s", loss_err, H.relative_error(grads[0], ref_de),
                H.relative_error(grads[1], ref_dw), "grad_rel_err = dE, grad2_rel_err = dW")

    # The default lean and fast calls wait on the host for the row count their forward sends
    # (HostCount): behind the queued samples' sleep that wait lasts until the sleep ends, so no
    # sleep covers the call. Their queued samples get the count ahead instead (computed here,
    # outside the timing): the same kernels on the same rows, without the host wait, which by
    # design never leaves the GPU without queued work.
    n_valid = int((target != -100).sum())
    hint = (functools.partial(row_count_given, n_valid),
            "queued: the row count given ahead, no host wait (same GPU work)")
    queued = {name: hint for name in impls if name.startswith("crossent-triton") and "every-row" not in name}
    H.run_impls(torch, impls, args, rec, common, BENCHMARK, shape, CONFIG_ENV, make_inputs,
                lambda inputs: [inputs[0].grad, inputs[1].grad], measured, queued_contexts=queued)


@contextlib.contextmanager
def row_count_given(n_valid):
    """Inside: crossent's linear calls take ``n_valid`` as their host row count (a HostCount with
    no event to wait on) instead of sending it from the GPU. Benchmark use only: the caller vouches
    that it is the count of the call's targets."""
    import torch

    from crossent.triton import _launchers

    real = _launchers._host_count

    def given(n):
        return _launchers.HostCount(torch.tensor(n_valid), None) if real(n) is not None else None

    _launchers._host_count = given
    try:
        yield
    finally:
        _launchers._host_count = real

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common_args(parser, "8192x2304x256000,8192x4096x128256", "NxDxV,...", repeats=10, warmup=2,
                      default_out=DEFAULT_OUT)
    parser.add_argument("--fast-budget-mib", default="1000,1536",
                        help="comma-separated memory_budget values of crossent's fast mode, MiB (one row "
                             "each: the target allows half of torch.compile's extra memory, about 2000 MiB "
                             "at the Gemma-2 shape and 1000 MiB at the Llama-3 shape)")
    parser.add_argument("--tiles", default="",
                        help="';'-separated CROSSENT_TRITON_LINEAR_TILES values for the crossent implementations, "
                             "'default-sweep' (gpu_harness.LINEAR_SWEEP) or 'elementwise-sweep' "
                             "(gpu_harness.ELEMENTWISE_SWEEP); default: crossent's defaults only")
    args = parser.parse_args(argv)
    try:
        shapes = H.parse_shapes(args.shapes, 3)
    except ValueError as e:
        parser.error(str(e))
    try:
        budgets = [int(b) for b in args.fast_budget_mib.split(",") if b.strip()]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        parser.error(f"--fast-budget-mib must be comma-separated integers >= 1, got {args.fast_budget_mib!r}")
    torch = H.setup_device(args.device, args.out is not None)
    from crossent.triton import _launchers

    def validate(config):
        _launchers.parse_linear_tiles(config, _launchers.linear_tiles(getattr(torch, args.dtype)))

    try:
        elementwise = args.tiles.strip() == "elementwise-sweep"
        args.config_list = H.parse_configs("default-sweep" if elementwise else args.tiles, "--tiles",
                                           H.ELEMENTWISE_SWEEP if elementwise else H.LINEAR_SWEEP, validate)
    except ValueError as e:
        parser.error(str(e))
    if args.out is None:
        args.out = DEFAULT_OUT
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    common = H.conditions(torch, args.device)
    impls = implementations(torch, F, [b << 20 for b in budgets], args.device)
    try:
        impls = H.select_impls(impls, args.impls, EXTRA)
    except ValueError as e:
        parser.error(str(e))

    rec = H.Recorder(args.out, args.max_minutes * 60.0)
    for shape in shapes:
        bench_shape(torch, F, impls, shape, dtype, args, common, rec)
        H.empty_cache(torch, args.device)

    rows = rec.rows
    H.print_table(rows)
    lean = [r for r in rows if not r["impl"].startswith("crossent-triton-fast")]
    fast = [r for r in rows if not r["impl"].startswith("crossent-triton-lean")]
    for line in H.best_configs(lean, BARE, 1.4, "the bare matmuls"):
        print(line)
    for line in H.best_configs(fast, "torch-compile", 1.0, "torch.compile"):
        print(line)
    print(f"appended {len(rows)} rows to {args.out} in {rec.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
