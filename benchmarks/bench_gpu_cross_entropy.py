"""Cross-entropy on materialized logits, forward+backward, on one CUDA GPU: crossent vs peers.

One command on a GPU machine (from the repository root, crossent installed):

    python benchmarks/bench_gpu_cross_entropy.py            # DESIGN.md shapes, bf16, 10% ignored

Runs, in one process and on the same inputs: crossent.triton.cross_entropy (gradient in a new
buffer, and in place), torch F.cross_entropy on the bf16 logits, on logits.float(), the latter
under torch.compile, and Liger's LigerCrossEntropyLoss when liger-kernel is installed; plus the
floor of the operation: a device copy of the logits (read once, write once) at the measured copy
bandwidth. Each is timed twice per repeat (gpu_harness.measure): synced (from an idle GPU: host
launch time and GPU waits for the host included) and queued (GPU time alone, as when the host runs
ahead of the GPU). Appends one long-format row per implementation and shape to
benchmarks/results/gpu_cross_entropy.csv (see gpu_harness.COLUMNS) and prints a table.
Exits with status 2 and a message when no CUDA device is present.

Kernel-configuration sweep (crossent only; peers and the floor run once per shape):

    python benchmarks/bench_gpu_cross_entropy.py --configs default-sweep   # gpu_harness.CE_SWEEP
    python benchmarks/bench_gpu_cross_entropy.py --configs "default;persistent=1;loop_block=4096,loop_warps=8"

Each config is a CROSSENT_TRITON_CE_CONFIG value (``key=value`` items, see
crossent.triton._launchers.CEConfig; "default" = no override); rows carry it in the ``config``
column, and the fastest config per shape is printed with its ratio to the copy floor (target
<= 1.5x) in each time metric. ``--impls crossent-triton`` skips the peers. Time on an H100
(estimate, not measured): each config compiles one CE kernel variant per shape (< 1 s) and runs
2 impls x 43 calls of 2-7 ms (3 warmup, 20 synced, 20 queued behind a sleep of >= 1 ms;
--no-queued: 23 calls); torch.compile compiles once per shape (~0.5-1 min): the 5-config default
sweep at both shapes takes about 2-4 minutes, most of it torch.compile, the float32 references
and input copies.
--max-minutes N skips (and records as skipped) what is left after N minutes.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA = ()  # --impls names run outside implementations()
BENCHMARK = "cross_entropy_logits_fwd_bwd"
DEFAULT_OUT = os.path.join(HERE, "results", "gpu_cross_entropy.csv")
CONFIG_ENV = "CROSSENT_TRITON_CE_CONFIG"
FLOOR = "floor: copy logits (read+write once)"


def implementations(torch, F, device):
    import crossent.torch as cet
    import crossent.triton as ctr

    impls = {
        "crossent-triton": lambda x, t: ctr.cross_entropy(x, t),
        "crossent-triton-inplace": lambda x, t: ctr.cross_entropy(x, t, inplace_backward=True),
        # The public entry point (impl="auto" picks the same kernels on CUDA): its checks and
        # dispatch are host time that a synced timing includes.
        "crossent.torch-auto": lambda x, t: cet.cross_entropy(x, t),
        "torch-eager-bf16": lambda x, t: F.cross_entropy(x, t),
        "torch-eager-logits.float()": lambda x, t: F.cross_entropy(x.float(), t),
    }
    if device == "cuda":  # the CPU smoke mode has no inductor toolchain to rely on
        # dynamic=False: static graphs per shape (see bench_gpu_linear_cross_entropy.py).
        impls["torch-compile-logits.float()"] = torch.compile(lambda x, t: F.cross_entropy(x.float(), t),
                                                              dynamic=False)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        impls["liger-kernel"] = lambda x, t: liger(x, t)
    except ImportError as e:
        print(f"note: liger-kernel not importable ({e}); skipped", file=sys.stderr)
    return impls


def bench_shape(torch, F, impls, shape, dtype, args, common, rec):
    """Rows for one (rows, classes) shape: the copy floor, then every implementation."""
    n_rows, n_cols = shape
    gen = torch.Generator(device=args.device).manual_seed(0)
    base = (torch.randn(n_rows, n_cols, device=args.device, generator=gen) * 2.0).to(dtype)
    target = torch.randint(0, n_cols, (n_rows,), device=args.device, generator=gen)
    target[torch.rand(n_rows, device=args.device, generator=gen) < args.ignored] = -100
    moved = 2 * base.numel() * base.element_size()  # read the logits once, write the grad once

    def bandwidth(ms):
        return moved / (ms * 1e-3) / 1e9

    # float32 reference: loss and gradient of F.cross_entropy on the upcast logits.
    ref_x = base.float().requires_grad_()
    ref_loss = F.cross_entropy(ref_x, target)
    ref_loss.backward()
    ref_grad, ref_loss = ref_x.grad, ref_loss.detach()
    del ref_x

    # Floor: one device copy of the logits = read once + write once.
    dst = torch.empty_like(base)
    m = H.measure(torch, tuple, lambda: dst.copy_(base), args.repeats, args.warmup, lambda inputs: [],
                  device=args.device, queued=args.queued)
    rec.add(H.row(common, BENCHMARK, shape, args.dtype, args.ignored, FLOOR, m.times_ms, 0, bandwidth,
                  "GB/s", float("nan"), float("nan"), note=m.note, gpu_times=m.gpu_times_ms))
    dst = None  # free the copy before the implementations run

    def make_inputs():
        return (base.clone().requires_grad_(), target)

    def measured(loss, grads):
        loss_err = float((loss.float() - ref_loss).abs())
        return bandwidth, "GB/s", loss_err, H.relative_error(grads[0], ref_grad), float("nan"), ""

    H.run_impls(torch, impls, args, rec, common, BENCHMARK, shape, CONFIG_ENV, make_inputs,
                lambda inputs: [inputs[0].grad], measured)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common_args(parser, "8192x128256,32768x32000", "ROWSxCLASSES,...", repeats=20, warmup=3,
                      default_out=DEFAULT_OUT)
    parser.add_argument("--configs", default="",
                        help="';'-separated CROSSENT_TRITON_CE_CONFIG values for the crossent implementations, "
                             "or 'default-sweep' (gpu_harness.CE_SWEEP); default: crossent's defaults only")
    args = parser.parse_args(argv)
    try:
        shapes = H.parse_shapes(args.shapes, 2)
    except ValueError as e:
        parser.error(str(e))
    torch = H.setup_device(args.device, args.out is not None)
    from crossent.triton import _launchers

    try:
        args.config_list = H.parse_configs(args.configs, "--configs", H.CE_SWEEP, _launchers.parse_ce_config)
    except ValueError as e:
        parser.error(str(e))
    if args.out is None:
        args.out = DEFAULT_OUT
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    common = H.conditions(torch, args.device)
    impls = implementations(torch, F, args.device)
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
    for line in H.best_configs(rows, FLOOR, 1.5, "the copy floor"):
        print(line)
    print(f"appended {len(rows)} rows to {args.out} in {rec.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
