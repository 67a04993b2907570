"""Per-kernel GPU time of one crossent forward+backward, from torch.profiler (CUDA only).

Where the time of ``crossent.triton.linear_cross_entropy`` (lean, default tiles) and of
``crossent.triton.cross_entropy`` goes, kernel by kernel, at the DESIGN.md shapes (bf16, 10% of
targets ignored): the table a kernel change is judged by before the end-to-end benchmark.

    python benchmarks/profile_gpu_kernels.py [--linear-shapes NxDxV,...] [--ce-shapes NxV,...]
        [--steps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys


def _profile(torch, step, steps, label, lines):
    from torch.profiler import ProfilerActivity, profile

    step()
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    rows = []
    for ev in events:
        total = getattr(ev, "self_device_time_total", None)
        if total is None:
            total = ev.self_cuda_time_total
        if total > 0:
            rows.append((total / steps / 1e3, ev.count // steps, ev.key))
    rows.sort(reverse=True)
    whole = sum(r[0] for r in rows)
    lines.append(f"\n{label}: {whole:.3f} ms of kernels per step (mean of {steps} steps)")
    lines.append(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kernel")
    for ms, calls, name in rows[:14]:
        lines.append(f"{ms:9.3f} {ms / whole:6.1%} {calls:6d}  {name[:110]}")
    print("\n".join(lines[-(min(len(rows), 14) + 2):]), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--linear-shapes", default="8192x2304x256000,8192x4096x128256")
    parser.add_argument("--ce-shapes", default="8192x128256,32768x32000")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ignored", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("profile_gpu_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import crossent.triton as ctr

    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for shape in filter(None, args.linear_shapes.split(",")):
        n, d, v = (int(x) for x in shape.split("x"))
        e = torch.randn(n, d, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(v, d, device="cuda", generator=gen) / d**0.5).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device="cuda", generator=gen)
        t[torch.rand(n, device="cuda", generator=gen) < args.ignored] = -100

        def linear_step(e=e, w=w, t=t):
            ee, ww = e.detach().requires_grad_(), w.detach().requires_grad_()
            ctr.linear_cross_entropy(ee, ww, t).backward()

        _profile(torch, linear_step, args.steps, f"linear_cross_entropy lean {shape}", lines)
        del e, w
    for shape in filter(None, args.ce_shapes.split(",")):
        n, v = (int(x) for x in shape.split("x"))
        x = (torch.randn(n, v, device="cuda", generator=gen) * 2).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device="cuda", generator=gen)
        t[torch.rand(n, device="cuda", generator=gen) < args.ignored] = -100

        def ce_step(x=x, t=t):
            ctr.cross_entropy(x.detach().requires_grad_(), t).backward()

        _profile(torch, ce_step, args.steps, f"cross_entropy {shape}", lines)
        del x
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
