"""Host overhead of the Triton cross-entropy entry points, measured without a GPU.

A synced GPU timing of one call includes the host's work before the kernel starts (checks,
allocation, the small torch ops of the mean's denominators, the Triton launch). This script
measures that host path on the CPU with the Triton kernels replaced by stubs that only record
their launch, so it runs on any machine:

* ``host us/call``: median wall time of one forward+backward call (kernels stubbed), over
  ``--rounds`` rounds of ``--calls`` calls on (64, 1000) float32 CPU tensors;
* ``torch ops``: the aten ops per call that launch a device kernel on CUDA (allocation, views and
  detach excluded), counted with a TorchDispatchMode;
* ``triton launches``: the Triton kernel launches per call.

``--linear``: instead, what one lean linear cross-entropy call (forward+backward, bf16, 10%
ignored) launches at the DESIGN.md shapes under each schedule: the torch ops (the matrix products
among them, recorded but not computed) and the Triton launches (stubbed). Counts only: the call's
other ops run for real on the CPU at full size, so its wall time says nothing about a GPU host's.

CUDA conditions are emulated where the CPU path differs: the value checks of the targets and class
weights, which only CPU tensors get (on CUDA they would sync), are left out; crossent.torch is
called with ``validate=False``, its default for CUDA tensors. Absolute
times are the CPU's Python and dispatch costs, not a GPU host's (whose torch op launches cost
more); compare rows within one run.

    python benchmarks/bench_host_overhead.py [--calls 2000] [--rounds 5] [--out FILE]
    python benchmarks/bench_host_overhead.py --linear [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_harness import crossent_revision  # noqa: E402

#: aten ops that launch no device kernel: allocation, views, aliasing.
NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "view",
    "_unsafe_view", "expand", "as_strided", "alias", "t", "transpose", "slice", "select",
    "unsqueeze", "squeeze", "permute", "lift_fresh", "_reshape_alias", "reshape", "movedim",
})


#: aten matrix products (``KernelOps(skip_products=True)`` records them without computing).
PRODUCTS = frozenset({"mm", "addmm", "addmm_"})


class KernelOps:
    """TorchDispatchMode-based counter of the aten ops that would launch a device kernel.

    ``with KernelOps() as ops: ...`` then ``ops.names`` lists them in call order (the overload
    dropped: ``ne``, ``sum``). ``skip_products=True``: the matrix products (``PRODUCTS``) are
    recorded but not computed (their output is left as it is, or allocated empty).
    """

    def __init__(self, skip_products=False):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                kwargs = kwargs or {}
                if name not in NO_KERNEL:
                    names.append(name)
                if skip_products and name in PRODUCTS:
                    if "out" in kwargs:
                        return kwargs["out"]
                    if name.endswith("_"):
                        return args[0]
                    a, b = [t for t in args if isinstance(t, torch.Tensor) and t.ndim == 2][-2:]
                    return torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
                return func(*args, **kwargs)

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records one launch."""

    def __init__(self, launches):
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(grid)

        return launch


@contextlib.contextmanager
def stubbed_ce_kernels():
    """Replace the CE kernels of ``crossent.triton`` by launch recorders (yields the list of
    launches), accept CPU tensors, and skip the value check of the targets that only CPU tensors
    get (``_check_target_values``, ``_check_weight_values``): the host path of a CUDA call, on the
    CPU."""
    from crossent.triton import _kernels as K
    from crossent.triton import _launchers as L

    launches = []
    names = ("interpreted", "_check_target_values", "_check_weight_values")
    saved = (K._ce_forward_kernel, K._scale_rows_kernel, *(getattr(L, n) for n in names))
    K._ce_forward_kernel = K._scale_rows_kernel = _Recorder(launches)
    L.interpreted = lambda: True
    L._check_target_values = L._check_weight_values = lambda *args: None
    try:
        yield launches
    finally:
        K._ce_forward_kernel, K._scale_rows_kernel = saved[:2]
        for name, value in zip(names, saved[2:], strict=True):
            setattr(L, name, value)


#: The Triton kernels of the linear paths, stubbed by ``stubbed_linear_kernels``.
LINEAR_KERNELS = ("_lce_stats_kernel", "_lce_combine_kernel", "_lce_grad_tile_kernel", "_scatter_rows_kernel",
                  "_lce_forward_kernel", "_lce_grad_input_kernel", "_lce_grad_weight_kernel",
                  "_ce_forward_kernel", "_scale_rows_kernel")


@contextlib.contextmanager
def stubbed_linear_kernels():
    """``stubbed_ce_kernels`` for the linear paths: every Triton kernel they launch records its
    launch (yields the list), and the float32 accumulation of dE (``_addmm_float32_``: one
    ``addmm`` with a float32 output on CUDA) is one in-place ``addmm_``, as on CUDA (use it under
    ``KernelOps(skip_products=True)``)."""
    from crossent.triton import _kernels as K
    from crossent.triton import _launchers as L

    with stubbed_ce_kernels() as launches:
        saved = {name: getattr(K, name) for name in LINEAR_KERNELS}
        saved_addmm = L._addmm_float32_
        for name in LINEAR_KERNELS:
            setattr(K, name, _Recorder(launches))
        L._addmm_float32_ = lambda acc, a, b: acc.addmm_(a, b)
        try:
            yield launches
        finally:
            for name, kernel in saved.items():
                setattr(K, name, kernel)
            L._addmm_float32_ = saved_addmm


#: ``--linear``: the DESIGN.md shapes (N x D x V) and the lean schedules compared
#: (CROSSENT_TRITON_LINEAR_TILES values; "" = the default).
LINEAR_SHAPES = ((8192, 2304, 256000), (8192, 4096, 128256))
LINEAR_SCHEDULES = (
    ("lean default", ""),
    ("lean, schedule before 2026-11-22 late (wide_forward=0,scratch_dw=0)", "wide_forward=0,scratch_dw=0"),
    ("lean, products=3", "products=3"),
)


def linear_launches(torch, shape, tiles, ignored=0.1, seed=0):
    """(torch ops, of which matrix products, Triton launches) of one lean fwd+bwd call (bf16,
    ``ignored`` of the targets ignored) with ``CROSSENT_TRITON_LINEAR_TILES=tiles``."""
    import crossent.triton as ctr

    n, d, v = shape
    g = torch.Generator().manual_seed(seed)
    e = torch.zeros(n, d, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(v, d, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = -100
    with mock.patch.dict(os.environ, {"CROSSENT_TRITON_LINEAR_TILES": tiles}), stubbed_linear_kernels() as launches, \
            KernelOps(skip_products=True) as ops:
        ctr.linear_cross_entropy(e, w, t).backward()
    return len(ops.names), sum(name in PRODUCTS for name in ops.names), len(launches)


def linear_table(torch):
    lines = ["| shape (N x D x V) | schedule | torch ops | of which products | triton launches | all |",
             "|---|---|---|---|---|---|"]
    for shape in LINEAR_SHAPES:
        for name, tiles in LINEAR_SCHEDULES:
            n_ops, n_products, n_triton = linear_launches(torch, shape, tiles)
            lines.append(f"| {'x'.join(map(str, shape))} | {name} | {n_ops} | {n_products} | {n_triton} | "
                         f"{n_ops + n_triton} |")
            print(lines[-1], flush=True)
    return lines


def cases(torch):
    """name -> (call(x, t) returning the loss, uses class weights)."""
    import crossent.torch as cet
    import crossent.triton as ctr

    weight = torch.rand(1000) + 0.5
    return {
        "crossent.triton, mean": lambda x, t: ctr.cross_entropy(x, t),
        "crossent.triton, sum": lambda x, t: ctr.cross_entropy(x, t, reduction="sum"),
        "crossent.triton, mean, class weights": lambda x, t: ctr.cross_entropy(x, t, weight=weight),
        "crossent.triton, mean, in place": lambda x, t: ctr.cross_entropy(x, t, inplace_backward=True),
        "crossent.torch (impl=triton), mean": lambda x, t: cet.cross_entropy(x, t, impl="triton",
                                                                             validate=False),
    }


def measure(torch, call, calls, rounds):
    """(median us per fwd+bwd call, kernel-launching aten ops per call, Triton launches per call)."""
    x = torch.randn(64, 1000)
    t = torch.randint(0, 1000, (64,))
    t[::10] = -100

    def step():
        xx = x.clone().requires_grad_()
        call(xx, t).backward()

    ops = KernelOps()
    with stubbed_ce_kernels() as launches:
        for _ in range(50):
            step()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            times.append((time.perf_counter() - t0) / calls * 1e6)
        xx = x.clone().requires_grad_()
        del launches[:]
        with ops:
            call(xx, t).backward()
    return statistics.median(times), ops.names, len(launches)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--linear", action="store_true",
                        help="count what a lean linear call launches at the DESIGN shapes instead")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        parser.error(f"--calls and --rounds must be >= 1, got {args.calls} and {args.rounds}")
    # crossent.torch accepts impl="triton" on CPU tensors only under the interpreter's flag (the
    # kernels themselves are stubbed here); both settings are restored on return.
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if args.linear:
            lines = linear_table(torch)
        else:
            lines = ["| case (fwd+bwd, kernels stubbed) | host us/call | torch ops (kernel-launching) | "
                     "triton launches |", "|---|---|---|---|"]
            for name, call in cases(torch).items():
                us, names, launches = measure(torch, call, args.calls, args.rounds)
                lines.append(f"| {name} | {us:.1f} | {len(names)}: {', '.join(names)} | {launches} |")
                print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(threads)
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    cond = (f"Conditions: {_cpu_name()}, 1 torch thread, Python "
            f"{platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"crossent {crossent_revision()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; ")
    if args.linear:
        cond += ("one forward+backward call per row, bf16 CPU tensors, 10% of the targets ignored, Triton kernels "
                 "stubbed, matrix products recorded but not computed; torch ops exclude allocation and views "
                 "and include autograd's ones_like.")
    else:
        cond += (f"median of {args.rounds} rounds of {args.calls} calls on (64, 1000) float32 CPU tensors, 10% "
                 f"ignored. The torch ops listed include autograd's ones_like for the upstream gradient.")
    lines += ["", cond]
    print(cond)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
