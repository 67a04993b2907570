"""Linear cross-entropy on the CPU: time and peak memory, fwd+bwd, one subprocess per case.

Cases (same inputs, float32, 10% of targets ignored, with bias):
- ``crossent chunked``: ``cet.linear_cross_entropy(..., impl="chunked")``;
- ``plain composition``: ``F.cross_entropy(F.linear(x, W, b), y)`` (holds the N x V logits);
- ``torch native``: ``F.linear_cross_entropy(x, W, y, linear_bias=b)`` (PyTorch 2.13, options=None,
  its reference path);
- ``torch native chunked``: the same with ``options=torch.nn.LinearCrossEntropyOptions()`` (its
  defaults; for float32 on the CPU its "aspect_ratio:2" heuristic picks tiny batch chunks, 2 rows
  at 4096 x 64 x 100000);
- ``torch native chunked at our block size``: ``batch_chunk_size`` set to the rows per block that
  crossent's chunked path uses for the shape (``chunking_method=None``), for a like-for-like
  comparison.

Memory: the worker's peak resident set during the first full fwd+bwd (VmHWM, reset to the
current RSS just before the call through /proc/self/clear_refs) minus its resident set before
the call, measured after the inputs and their gradient buffers exist and after a warm-up on a
small slice ("extra" memory). Time: median (and min, max) of ``--repeats`` further
fwd+bwd calls. Each case runs in its own process so
peaks do not mix. Results are appended to ``benchmarks/results/linear_ce_cpu.csv`` (long format,
with CPU model, versions and date) and the table of this run is written to
``benchmarks/results/linear_ce_cpu.md``.

    python benchmarks/bench_linear_ce_cpu.py                   # default shapes
    python benchmarks/bench_linear_ce_cpu.py --shapes 1024x64x32000 --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _cpu import cpu_model, peak_rss_bytes, reset_peak_rss

CASES = [
    "crossent chunked",
    "plain composition",
    "torch native",
    "torch native chunked",
    "torch native chunked at our block size",
]
RESULTS = Path(__file__).resolve().parent / "results"


def setup(n: int, d: int, v: int, seed: int = 0):
    """float32 inputs (x, W, b) that require grad and int64 targets with 10% ignored."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).requires_grad_()
    w = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_()
    b = torch.zeros(v).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.1] = -100
    return x, w, b, y


def _loss_fn(case: str, n: int, v: int):
    import torch
    import torch.nn.functional as F

    import crossent.torch as cet

    if case == "crossent chunked":
        return lambda x, w, b, y: cet.linear_cross_entropy(x, w, y, linear_bias=b, impl="chunked")
    if case == "plain composition":
        return lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b), y)
    if case == "torch native":
        return lambda x, w, b, y: F.linear_cross_entropy(x, w, y, linear_bias=b, ignore_index=-100)
    if case.startswith("torch native chunked"):
        options = torch.nn.LinearCrossEntropyOptions()
        if case.endswith("our block size"):
            from crossent.torch._chunked import rows_per_block

            rows = rows_per_block(n, v, None)
            options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows, chunking_method=None)
        return lambda x, w, b, y: F.linear_cross_entropy(
            x, w, y, linear_bias=b, ignore_index=-100, options=options
        )
    raise ValueError(f"unknown case {case!r}")


def worker(case: str, n: int, d: int, v: int, repeats: int, budget_s: float) -> dict:
    import torch

    x, w, b, y = setup(n, d, v)
    fn = _loss_fn(case, n, v)
    # Warm up libraries on a small slice (thread pools, allocator), then give every input a
    # gradient buffer, so the first full call's peak-RSS growth is the loss's own extra memory.
    small = fn(x[:8], w[:1000], b[:1000], torch.where(y[:8] >= 0, y[:8] % 1000, y[:8]))
    small.backward()
    for t in (x, w, b):
        t.grad = torch.zeros_like(t)
    before = reset_peak_rss()
    start = time.perf_counter()
    loss = fn(x, w, b, y)
    loss.backward()
    first = time.perf_counter() - start
    extra = peak_rss_bytes() - before
    times = []
    for _ in range(repeats if first < budget_s else 0):
        for t in (x, w, b):
            t.grad.zero_()
        start = time.perf_counter()
        loss = fn(x, w, b, y)
        loss.backward()
        times.append(time.perf_counter() - start)
    return dict(
        loss=float(loss.detach()),
        grad_w_norm=float(w.grad.norm()),
        first_s=first,
        times=times,
        extra_bytes=extra,
        threads=torch.get_num_threads(),
    )


def run_case(case: str, shape: tuple[int, int, int], repeats: int, slow_s: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, "--shapes", "x".join(map(str, shape)),
           "--repeats", str(repeats), "--slow-s", str(slow_s)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x64x100000,2048x256x32000",
                   help="comma list of NxDxV")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--slow-s", type=float, default=90.0,
                   help="a case whose first full call takes longer is timed by that call alone")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--csv", default=str(RESULTS / "linear_ce_cpu.csv"))
    p.add_argument("--markdown", default=str(RESULTS / "linear_ce_cpu.md"))
    args = p.parse_args(argv)
    shapes = [tuple(int(s) for s in item.split("x")) for item in args.shapes.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, *shapes[0], args.repeats, args.slow_s)))
        return

    import torch

    import crossent

    conditions = dict(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        torch=torch.__version__,
        crossent=getattr(crossent, "__version__", "unknown"),
        python=platform.python_version(),
    )
    rows = []
    for n, d, v in shapes:
        for case in args.cases.split(","):
            r = run_case(case, (n, d, v), args.repeats, args.slow_s)
            timed = r["times"] or [r["first_s"]]
            row = dict(
                conditions,
                case=case, N=n, D=d, V=v, dtype="float32", ignored_fraction=0.1,
                threads=r["threads"], timed_calls=len(r["times"]),
                first_call_s=round(r["first_s"], 4),
                median_s=round(statistics.median(timed), 4),
                min_s=round(min(timed), 4), max_s=round(max(timed), 4),
                extra_mib=round(r["extra_bytes"] / 2**20, 1),
                logits_mib=round(n * v * 4 / 2**20, 1),
                loss=r["loss"], grad_w_norm=r["grad_w_norm"],
            )
            rows.append(row)
            print(f"{n}x{d}x{v} {case:22s} {row['median_s']:8.3f} s  "
                  f"extra {row['extra_mib']:8.1f} MiB  loss {row['loss']:.6f}", flush=True)

    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)

    lines = [
        "| N x D x V | case | fwd+bwd median s (min-max) | extra peak MiB | extra / logits | loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['N']} x {row['D']} x {row['V']} | {row['case']} | {row['median_s']:.3f} "
            f"({row['min_s']:.3f}-{row['max_s']:.3f}){'' if row['timed_calls'] else ' *'} | "
            f"{row['extra_mib']:.1f} | "
            f"{row['extra_mib'] / row['logits_mib']:.2f} | {row['loss']:.6f} |"
        )
    lines += [
        "",
        f"Conditions: {conditions['device']}, torch {conditions['torch']} "
        f"({rows[0]['threads']} threads), Python {conditions['python']}, crossent "
        f"{conditions['crossent']}, {conditions['date']}. float32, bias, 10% of targets ignored; "
        f"median of {args.repeats} fwd+bwd calls after a first full call, each case in its own "
        "process; extra = peak RSS during the first full call minus RSS before it (inputs "
        "and gradient buffers already allocated, libraries warmed up on a small slice); logits "
        "= N x V x 4 bytes. A shared, busy machine: compare "
        "ratios within one run.",
    ]
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
