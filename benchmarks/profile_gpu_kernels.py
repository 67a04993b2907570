"""Per-kernel GPU time of one crossent forward+backward, from torch.profiler (CUDA only).

Where the time of ``crossent.triton.linear_cross_entropy`` (lean, default tiles) and of
``crossent.triton.cross_entropy`` goes, kernel by kernel, at the DESIGN.md shapes (bf16, 10% of
targets ignored): the table a kernel change is judged by before the end-to-end benchmark.
Also, per call, the host time (Python, checks, launches: measured with the GPU kept busy by a
sleep kernel, so the host never waits for it) and, for cross-entropy, the host functions that
take it (cProfile, by own time), and the GPU's idle time within one synced call (time to the
first kernel, gaps between kernels): what a synced timing adds to the kernels' time.
``--fast-budget-mib`` profiles the "fast" linear mode too (memory_budget). The output's first
line states the conditions: device, torch, triton, crossent revision (gpu_harness.crossent_revision).

``--device cpu`` (with TRITON_INTERPRET=1 and ``--out``) runs every section end to end on the CPU
through Triton's interpreter, on the tiny shapes given (tests/triton/test_triton_bench_harness.py
does): a smoke test of the script, never a measurement. There the profiler sees the aten ops, not
the interpreted Triton kernels, the aten ops stand in for the GPU's ops in the idle-gap section,
and no sleep kernel keeps a GPU busy.

    python benchmarks/profile_gpu_kernels.py [--linear-shapes NxDxV,...] [--ce-shapes NxV,...]
        [--fast-budget-mib M] [--steps 3] [--out FILE] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_harness as H  # noqa: E402
from bench_gpu_linear_cross_entropy import row_count_given  # noqa: E402

#: Busy-waits that keep the GPU occupied while the host works, in cycles at ~2 GHz: longer than
#: any host call here (0.1 s), and than the cProfile'd calls (1 s).
SLEEP_CYCLES, LONG_SLEEP_CYCLES = 200_000_000, 2_000_000_000


def _keep_busy(torch, device, cycles):
    """Queue a sleep kernel of ``cycles`` on the GPU (nothing in the CPU smoke run); True if queued."""
    if device != "cuda":
        return False
    torch.cuda._sleep(cycles)
    return True


def _profile(torch, device, step, steps, label, lines):
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    step()
    step()
    H.sync(torch, device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        H.sync(torch, device)
    events = prof.key_averages()
    rows = []
    for ev in events:
        if cuda:
            total = getattr(ev, "self_device_time_total", None)
            if total is None:
                total = ev.self_cuda_time_total
        else:
            total = ev.self_cpu_time_total
        if total > 0:
            rows.append((total / steps / 1e3, ev.count // steps, ev.key))
    rows.sort(reverse=True)
    whole = sum(r[0] for r in rows)
    what = "kernels" if cuda else "CPU ops (CPU smoke run: the interpreted Triton kernels are not among them)"
    lines.append(f"\n{label}: {whole:.3f} ms of {what} per step (mean of {steps} steps)")
    lines.append(f"{'ms/step':>9} {'share':>6} {'calls':>6}  {'kernel' if cuda else 'op'}")
    for ms, calls, name in rows[:14]:
        lines.append(f"{ms:9.3f} {ms / whole:6.1%} {calls:6d}  {name[:110]}")
    print("\n".join(lines[-(min(len(rows), 14) + 2):]), flush=True)


def _host_time(torch, device, step, steps, lines, context=contextlib.nullcontext):
    """Median host time of ``step()`` (ms) while the GPU is busy with a sleep kernel queued first,
    each call inside ``context()`` (the linear calls: their row count given ahead, since the
    host would otherwise wait for the sleep to end; see bench_gpu_linear_cross_entropy.py)."""
    import time

    cuda = device == "cuda"
    times = []
    before = torch.cuda.memory_stats() if cuda else {}
    for _ in range(steps):
        H.sync(torch, device)
        _keep_busy(torch, device, SLEEP_CYCLES)
        with context():
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        H.sync(torch, device)
    times.sort()
    if cuda:
        # cudaMalloc / cudaFree calls of the caching allocator during the calls (cudaFree waits
        # for the device): a call that keeps making them pays host time a training loop may not.
        after = torch.cuda.memory_stats()
        churn = ", ".join(f"{k} {after.get(k, 0) - before.get(k, 0)}"
                          for k in ("num_device_alloc", "num_device_free", "num_alloc_retries"))
    else:
        churn = "not counted on the CPU"
    lines.append(f"host time per call: {times[len(times) // 2]:.3f} ms (median of {steps}"
                 f"{', GPU kept busy' if cuda else ', CPU smoke run'}); allocator over the {steps} calls: {churn}")
    print(lines[-1], flush=True)


def _host_profile(torch, device, step, steps, lines):
    """Host functions by own time over ``steps`` calls (GPU kept busy, as in ``_host_time``)."""
    import cProfile
    import io
    import pstats

    H.sync(torch, device)
    _keep_busy(torch, device, LONG_SLEEP_CYCLES)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    H.sync(torch, device)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    text = "\n".join(line for line in buf.getvalue().splitlines() if line.strip())
    lines.append(f"host profile ({steps} calls):\n{text}")
    print(lines[-1], flush=True)


#: The host calls that put one operation on the GPU's stream (CUDA runtime and driver API names
#: as the profiler records them): kernel launches, memsets, copies.
LAUNCH_CALL = re.compile(r"^cu(da)?(LaunchKernel|LaunchCooperativeKernel|Memset|Memcpy)")


def host_waits(gpu, calls, slack_us=10.0):
    """How much of the GPU's idle time was spent waiting for the host to launch the next op.

    ``gpu``: (start, end) us of the GPU ops of one stream in start order; ``calls``: (start, end)
    us of the host calls that launched them (``LAUNCH_CALL``), in the same order, one per op. The
    idle time before op i (its start minus the latest end before it) counts as a wait for the host
    when op i started within ``slack_us`` of its launch call's end: the GPU was ready first.
    Returns (idle us waiting for the host, ops started so, other idle us), or None when the calls
    and ops do not pair up one to one (an op without its call in the trace, or the reverse).

    >>> host_waits([(0, 10), (30, 40), (41, 50)], [(0, 1), (25, 28), (26, 29)])
    (20, 1, 1)
    """
    if len(gpu) != len(calls) or not gpu:
        return None
    waited = others = 0
    n_waited = 0
    end = gpu[0][1]
    for (start, stop), (_, call_end) in zip(gpu[1:], calls[1:], strict=True):
        idle = start - end
        if idle > 0:
            if start - call_end <= slack_us:
                waited += idle
                n_waited += 1
            else:
                others += idle
        end = max(end, stop)
    return waited, n_waited, others


def _device_ops(torch, events, device):
    """The profiler events of the ops the GPU runs (kernels, memsets, copies), in start order; in
    the CPU smoke run, where there are none, the aten ops stand in for them, so that ``_gaps``
    runs end to end there."""
    if device == "cuda":
        ops = [ev for ev in events if ev.device_type == torch.autograd.DeviceType.CUDA]
    else:
        ops = [ev for ev in events if ev.name.startswith("aten::")]
    return sorted(ops, key=lambda ev: ev.time_range.start)


def _gaps(torch, device, step, lines, label, context=contextlib.nullcontext):
    """Where the GPU waits during one call, synced and queued (from torch.profiler traces, CPU +
    CUDA): the time from the call's start to its first kernel, and the idle time between kernels
    from the first to the last, split at 20 us (launch-to-launch gaps below it, waits for the host
    above). Synced: the GPU idle when the call starts (as the benchmark's synced time). Queued: a
    sleep kernel first keeps it busy until the host has queued the call (``context()`` around the
    call, as in the benchmark's queued samples): the gaps that remain are the GPU's own, and the
    difference between the two is what the host adds. In the CPU smoke run the aten ops stand in
    for the GPU's ops (``_device_ops``) and no sleep comes first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if not cuda:
        label += " (CPU smoke run: aten ops for kernels)"
    for mode in ("synced", "queued"):
        step()
        H.sync(torch, device)
        with profile(activities=activities) as prof:
            slept = mode == "queued" and _keep_busy(torch, device, SLEEP_CYCLES)
            with context() if mode == "queued" else contextlib.nullcontext():
                step()
            H.sync(torch, device)
        events = prof.events()
        gpu = _device_ops(torch, events, device)
        if slept:
            gpu = gpu[1:]  # the sleep kernel, queued first after a synchronize
        cpu = [ev for ev in events if ev.device_type != torch.autograd.DeviceType.CUDA]
        if not gpu or not cpu:
            lines.append(f"{label}, one {mode} call under the profiler: no {'kernels' if cuda else 'aten ops'} "
                         "recorded")
            print(lines[-1], flush=True)
            continue
        calls = sorted((ev for ev in cpu if LAUNCH_CALL.match(ev.name)), key=lambda ev: ev.time_range.start)
        if slept:
            calls = calls[1:]  # the sleep kernel's launch
        waits = host_waits([(ev.time_range.start, ev.time_range.end) for ev in gpu],
                           [(ev.time_range.start, ev.time_range.end) for ev in calls])
        t0 = min(ev.time_range.start for ev in cpu)
        first = gpu[0].time_range.start - t0
        small = large = 0.0
        gaps, end = [], gpu[0].time_range.end
        for prev, ev in zip(gpu, gpu[1:], strict=False):
            gap = ev.time_range.start - end
            if gap > 20:
                gaps.append((gap, prev.name[:60], ev.name[:60]))
                large += gap
            elif gap > 0:
                small += gap
            end = max(end, ev.time_range.end)
        busy = end - gpu[0].time_range.start
        lines.append(f"{label}, one {mode} call under the profiler: first kernel {first / 1e3:.3f} ms after the "
                     f"call starts{' (behind the sleep)' if slept else ''}; {busy / 1e3:.3f} ms from "
                     f"first to last kernel: idle {small / 1e3:.3f} ms in gaps <= 20 us, {large / 1e3:.3f} ms in "
                     f"{len(gaps)} gaps > 20 us; {len(gpu)} kernels")
        if waits is None:
            lines.append(f"  waits for the host: not paired ({len(calls)} launch calls, {len(gpu)} GPU ops)")
        else:
            lines.append(f"  waits for the host: {waits[0] / 1e3:.3f} ms idle before {waits[1]} ops that started "
                         f"within 10 us of their launch call's end; {waits[2] / 1e3:.3f} ms idle otherwise")
        for gap, before, after in sorted(gaps, reverse=True)[:5]:
            lines.append(f"  {gap / 1e3:.3f} ms idle between {before} and {after}")
        print("\n".join(lines[-(min(len(gaps), 5) + 2):]), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--linear-shapes", default="8192x2304x256000,8192x4096x128256")
    parser.add_argument("--ce-shapes", default="8192x128256,32768x32000")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fast-budget-mib", type=int, default=0,
                        help="also profile the fast linear mode with this memory_budget (MiB)")
    parser.add_argument("--ignored", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: smoke run through TRITON_INTERPRET=1 (tiny shapes), needs --out; not a measurement")
    args = parser.parse_args(argv)
    torch = H.setup_device(args.device, args.out is not None)  # exits with a message if it cannot run
    import crossent.triton as ctr

    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    c = H.conditions(torch, dev)
    lines = [f"{c['device']}, torch {c['torch']}, triton {c['triton']}, crossent {c['crossent_rev']}, {c['date']}"]

    failed = []

    def section(fn, *fargs):
        """``fn(*fargs)`` (it appends its lines), then the file rewritten: a failing section
        (or a timeout that kills the command) keeps every line written before it."""
        try:
            fn(*fargs)
        except Exception as exc:  # one failing section must not lose the others' lines
            lines.append(f"{fn.__name__}: failed: {type(exc).__name__}: {exc}")
            print(lines[-1], file=sys.stderr, flush=True)
            failed.append(fn.__name__)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    for shape in filter(None, args.linear_shapes.split(",")):
        n, d, v = (int(x) for x in shape.split("x"))
        e = torch.randn(n, d, device=dev, generator=gen).to(torch.bfloat16)
        w = (torch.randn(v, d, device=dev, generator=gen) / d**0.5).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev, generator=gen)
        t[torch.rand(n, device=dev, generator=gen) < args.ignored] = -100

        def linear_step(e=e, w=w, t=t):
            ee, ww = e.detach().requires_grad_(), w.detach().requires_grad_()
            ctr.linear_cross_entropy(ee, ww, t).backward()

        section(_profile, torch, dev, linear_step, args.steps, f"linear_cross_entropy lean {shape}", lines)
        given = functools.partial(row_count_given, int((t != -100).sum()))
        section(_host_time, torch, dev, linear_step, args.steps, lines, given)
        section(_gaps, torch, dev, linear_step, lines, f"linear_cross_entropy lean {shape}", given)
        if args.fast_budget_mib:
            budget = args.fast_budget_mib << 20

            def fast_step(e=e, w=w, t=t, budget=budget):
                ee, ww = e.detach().requires_grad_(), w.detach().requires_grad_()
                ctr.linear_cross_entropy(ee, ww, t, memory_budget=budget).backward()

            name = f"linear_cross_entropy fast {args.fast_budget_mib} MiB {shape}"
            section(_profile, torch, dev, fast_step, args.steps, name, lines)
            section(_host_time, torch, dev, fast_step, args.steps, lines, given)
            section(_gaps, torch, dev, fast_step, lines, name, given)
        del e, w
    for shape in filter(None, args.ce_shapes.split(",")):
        n, v = (int(x) for x in shape.split("x"))
        x = (torch.randn(n, v, device=dev, generator=gen) * 2).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev, generator=gen)
        t[torch.rand(n, device=dev, generator=gen) < args.ignored] = -100

        def ce_step(x=x, t=t):
            ctr.cross_entropy(x.detach().requires_grad_(), t).backward()

        section(_profile, torch, dev, ce_step, args.steps, f"cross_entropy {shape}", lines)
        section(_host_time, torch, dev, ce_step, max(args.steps, 20), lines)
        section(_host_profile, torch, dev, ce_step, 50, lines)
        section(_gaps, torch, dev, ce_step, lines, f"cross_entropy {shape}")
        del x
    return 1 if failed else 0  # every section ran; exit status 1 says some failed (lines "failed: ...")


if __name__ == "__main__":
    sys.exit(main())
