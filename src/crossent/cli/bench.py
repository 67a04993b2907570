"""``crossent bench``: time crossent against its peers on this machine, after checking the values.

A quick, self-contained comparison for users ("how fast is it here?"); the benchmarks/ scripts
are the project's measurement record. Every implementation first computes the loss (and with
``--grad`` the gradient) on the same seeded inputs, and that loss is compared with a float64
reference computed by plain NumPy / PyTorch on the CPU: a case whose value is off by more than its
dtype's tolerance is reported as wrong and makes the command exit with status 1, so a fast wrong
answer never looks like a win. Then each case runs ``--warmup`` untimed and ``--repeats`` timed
calls (wall clock on the CPU; CUDA events on a GPU), and the table gives the median and the ratio
to the baseline (torch's own function where torch is installed, else NumPy).

Operations:

* ``ce``: mean softmax cross-entropy of ``--rows x --classes`` logits (N(0, 3^2)) with integer
  labels. CPU: ``crossent.softmax_cross_entropy`` (NumPy input; the numba fast path when
  installed), the same with the fast path off (Array-API path), a stable NumPy log-sum-exp,
  ``torch.nn.functional.cross_entropy`` and ``crossent.torch.cross_entropy`` (impl "auto", which
  takes the numba kernels on the CPU, and "chunked"). CUDA: torch's
  function, ``crossent.torch.cross_entropy`` (impl "triton" and "chunked") and Liger-Kernel's
  cross-entropy when installed.
* ``soft``: mean softmax cross-entropy with soft targets (each row a probability vector, the
  softmax of N(0, 1) scores), float32 or float64: ``crossent.softmax_cross_entropy`` (NumPy; fast
  path on and off), a stable NumPy ``sum p (lse - x)``, ``torch.nn.functional.cross_entropy``
  with probability targets and ``crossent.torch.cross_entropy`` (impl "auto" and "chunked").
* ``linear``: ``loss(E @ W^T, y)`` with E ``--rows x --dim`` and W ``--classes x --dim``:
  ``crossent.torch.linear_cross_entropy`` (impl "auto": chunked on the CPU, Triton on CUDA), the
  plain composition and torch's own ``linear_cross_entropy`` where it exists.

Memory: on CUDA, each case's peak allocation beyond its inputs (``extra_mib``); not measured on
the CPU (one process cannot reset its peak resident set portably).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import click
import numpy as np

__all__ = ["bench", "run_bench"]

#: |loss - reference| allowed, relative to max(1, |reference|), per input dtype.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


@dataclass
class Case:
    name: str
    what: str
    fn: Callable[[], object]  # one call; returns the loss (a scalar of any library)
    baseline: bool = False


@dataclass
class CaseResult:
    impl: str
    what: str
    loss: float
    abs_error: float
    ok: bool
    median_ms: float | None = None
    min_ms: float | None = None
    ratio_to_baseline: float | None = None
    extra_mib: float | None = None


@dataclass
class BenchResult:
    op: str
    device: str
    rows: int
    classes: int
    dim: int | None
    dtype: str
    grad: bool
    repeats: int
    reference_loss: float
    tolerance: float
    baseline: str
    machine: dict = field(default_factory=dict)
    results: list[CaseResult] = field(default_factory=list)

    @property
    def all_ok(self) -> bool:
        return all(r.ok for r in self.results)


# ---- inputs and reference ---------------------------------------------------------------------


def _inputs(op, rows, classes, dim, seed):
    """float64 NumPy inputs: logits (ce) or (E, W) (linear), and labels; seeded."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=rows)
    if op == "ce":
        return (rng.standard_normal((rows, classes)) * 3.0,), labels
    if op == "soft":
        logits = rng.standard_normal((rows, classes)) * 3.0
        scores = rng.standard_normal((rows, classes))
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        return (logits,), probs / probs.sum(axis=1, keepdims=True)
    e = rng.standard_normal((rows, dim))
    w = rng.standard_normal((classes, dim)) / math.sqrt(dim) * 3.0
    return (e, w), labels


def _reference_loss(op, arrays, labels, dtype_name):
    """Mean cross-entropy in float64 of the inputs as rounded to the tested dtype, in row blocks."""
    import crossent as ce

    rounded = [_round_to(a, dtype_name) for a in arrays]
    if op == "soft":
        # Written out (not crossent's own function): sum_j p_j (lse - x_j) per row, stable.
        x, p = rounded[0], _round_to(labels, dtype_name)
        m = x.max(axis=1, keepdims=True)
        lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
        return float((p * (lse - x)).sum() / len(p))
    n_classes = rounded[0].shape[1] if op == "ce" else rounded[1].shape[0]
    total, block = 0.0, max(1, 2**22 // n_classes)  # about 32 MiB of float64 logits at a time
    for start in range(0, len(labels), block):
        sl = slice(start, start + block)
        logits = rounded[0][sl] if op == "ce" else rounded[0][sl] @ rounded[1].T
        if op == "linear" and dtype_name in ("bfloat16", "float16"):
            logits = _round_to(logits, dtype_name)  # the product is stored in the input dtype
        total += float(ce.softmax_cross_entropy(logits, labels[sl], reduction="sum"))
    return total / len(labels)


def _round_to(a, dtype_name):
    if dtype_name == "float64":
        return a
    if dtype_name == "float32":
        return a.astype(np.float32).astype(np.float64)
    import torch

    return torch.from_numpy(a).to(getattr(torch, dtype_name)).double().numpy()


# ---- cases ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cpu_fast_path(enabled):
    import crossent.cpu as cpu

    old, cpu.ENABLED = cpu.ENABLED, enabled
    try:
        yield
    finally:
        cpu.ENABLED = old


def _numpy_cases(op, arrays, labels, dtype_name, grad):
    import crossent as ce

    if op not in ("ce", "soft") or dtype_name not in ("float32", "float64"):
        return []
    x = arrays[0].astype(dtype_name)
    if op == "soft":
        return _numpy_soft_cases(x, labels.astype(dtype_name), grad)
    y = labels
    rows = np.arange(len(y))

    if grad:
        def ours():
            return ce.softmax_cross_entropy_and_grad(x, y)[0]

        def array_api():
            with _cpu_fast_path(False):
                return ce.softmax_cross_entropy_and_grad(x, y)[0]

        def plain():
            m = x.max(axis=1, keepdims=True)
            p = np.exp(x - m)
            s = p.sum(axis=1, keepdims=True)
            p /= s
            p[rows, y] -= 1.0
            p /= len(y)
            return np.mean(np.log(s[:, 0]) + m[:, 0] - x[rows, y])
    else:
        def ours():
            return ce.softmax_cross_entropy(x, y)

        def array_api():
            with _cpu_fast_path(False):
                return ce.softmax_cross_entropy(x, y)

        def plain():
            m = x.max(axis=1, keepdims=True)
            return np.mean(np.log(np.exp(x - m).sum(axis=1)) + m[:, 0] - x[rows, y])

    return [
        Case("crossent", "crossent.softmax_cross_entropy" + ("_and_grad" if grad else "") + " (NumPy)", ours),
        Case("crossent-array-api", "the same, numba fast path off", array_api),
        Case("numpy", "stable NumPy log-sum-exp" + (" + softmax - one-hot" if grad else ""), plain),
    ]


def _numpy_soft_cases(x, p, grad):
    import crossent as ce

    def plain_loss():
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        return e, s, np.sum(p * (np.log(s) + m - x)) / len(p)

    if grad:
        def ours():
            return ce.softmax_cross_entropy_and_grad(x, p)[0]

        def array_api():
            with _cpu_fast_path(False):
                return ce.softmax_cross_entropy_and_grad(x, p)[0]

        def plain():
            e, s, loss = plain_loss()
            _ = (e / s - p) / len(p)
            return loss
    else:
        def ours():
            return ce.softmax_cross_entropy(x, p)

        def array_api():
            with _cpu_fast_path(False):
                return ce.softmax_cross_entropy(x, p)

        def plain():
            return plain_loss()[2]

    return [
        Case("crossent", "crossent.softmax_cross_entropy" + ("_and_grad" if grad else "") + " (NumPy, soft)", ours),
        Case("crossent-array-api", "the same, numba fast path off", array_api),
        Case("numpy", "stable NumPy sum p (lse - x)" + (" + softmax - p" if grad else ""), plain),
    ]


def _torch_cases(op, arrays, labels, dtype_name, grad, device):
    import torch
    import torch.nn.functional as F

    import crossent.torch as cet

    dtype = getattr(torch, dtype_name)
    y = torch.from_numpy(labels).to(device)
    if op == "soft":
        y = y.to(dtype)
    leaves = [torch.from_numpy(a).to(device=device, dtype=dtype) for a in arrays]

    def run(loss_of):
        def call():
            inputs = [t.detach().requires_grad_(grad) for t in leaves]
            loss = loss_of(*inputs)
            if grad:
                loss.backward()
            return loss.detach()
        return call

    suffix = " + backward" if grad else ""
    cases = []
    if op == "soft":
        cases.append(Case("torch", "torch.nn.functional.cross_entropy, probability targets" + suffix,
                          run(lambda x: F.cross_entropy(x, y)), baseline=True))
        for impl in ("auto", "chunked"):
            cases.append(Case(f"crossent-{impl}", f"crossent.torch.cross_entropy(impl={impl!r}), soft" + suffix,
                              run(lambda x, impl=impl: cet.cross_entropy(x, y, impl=impl))))
    elif op == "ce":
        cases.append(Case("torch", "torch.nn.functional.cross_entropy" + suffix,
                          run(lambda x: F.cross_entropy(x, y)), baseline=True))
        impls = ["triton", "chunked"] if device == "cuda" else ["auto", "chunked"]
        for impl in impls:
            cases.append(Case(f"crossent-{impl}", f"crossent.torch.cross_entropy(impl={impl!r})" + suffix,
                              run(lambda x, impl=impl: cet.cross_entropy(x, y, impl=impl))))
        if device == "cuda":
            with contextlib.suppress(ImportError):
                from liger_kernel.transformers import LigerCrossEntropyLoss

                liger = LigerCrossEntropyLoss()
                cases.append(Case("liger-kernel", "LigerCrossEntropyLoss" + suffix, run(lambda x: liger(x, y))))
    else:
        cases.append(Case("torch-composition", "F.cross_entropy(E @ W.T)" + suffix,
                          run(lambda e, w: F.cross_entropy(e @ w.T, y)), baseline=True))
        cases.append(Case("crossent", "crossent.torch.linear_cross_entropy(impl='auto')" + suffix,
                          run(lambda e, w: cet.linear_cross_entropy(e, w, y))))
        if hasattr(F, "linear_cross_entropy"):
            cases.append(Case("torch-native", "torch.nn.functional.linear_cross_entropy" + suffix,
                              run(lambda e, w: F.linear_cross_entropy(e, w, y))))
    return cases


# ---- timing -----------------------------------------------------------------------------------


def _time_case(fn, warmup, repeats, device):
    """Median and min milliseconds of ``repeats`` calls, and (CUDA) the extra peak MiB."""
    for _ in range(warmup):
        fn()
    times, extra = [], None
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), extra


def _machine(device):
    info = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda":
            info["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    if device == "cpu":
        info["device"] = platform.processor() or platform.machine()
    with contextlib.suppress(ImportError):
        import crossent.cpu as cpu

        info["numba_fast_path"] = cpu.available()
    return info


def run_bench(op="ce", *, rows=20000, classes=1000, dim=256, dtype="float32", device="cpu",
              grad=False, warmup=1, repeats=5, seed=0, impls=None) -> BenchResult:  # fmt: skip
    r"""Check then time every available implementation of ``op``; see the module docstring.

    A case is right when :math:`|\ell - \ell_{64}| \le \mathrm{tol}_{dtype} \max(1, |\ell_{64}|)`,
    :math:`\ell_{64}` the mean loss in float64 of the inputs rounded to ``dtype``; ``rows x
    classes`` logits with class labels (``ce``) or probability targets (``soft``), or ``rows x
    dim`` inputs and a ``classes x dim`` head (``linear``).
    ``impls``: names to keep (default all available). Raises ValueError for bad arguments.

    >>> result = run_bench("ce", rows=8, classes=3, repeats=1, impls=["numpy"])
    >>> [(r.impl, r.ok) for r in result.results], result.all_ok
    ([('numpy', True)], True)
    """
    if op not in ("ce", "soft", "linear"):
        raise ValueError(f"op must be 'ce', 'soft' or 'linear', got {op!r}")
    for name, value in (("rows", rows), ("classes", classes), ("dim", dim), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be one of {sorted(TOLERANCE)}, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    try:
        import torch
    except ImportError:
        torch = None
    if device == "cuda" and (torch is None or not torch.cuda.is_available()):
        raise ValueError("device 'cuda' needs PyTorch with a visible CUDA GPU, and none is available here")
    if torch is None and (op == "linear" or dtype in ("bfloat16", "float16")):
        raise ValueError(f"op {op!r} with dtype {dtype!r} needs PyTorch: pip install 'crossent[torch]'")
    if op == "soft" and dtype not in ("float32", "float64"):
        raise ValueError(f"op 'soft' runs in float32 or float64 (probability targets in the logits' dtype), "
                         f"got dtype {dtype!r}")

    arrays, labels = _inputs(op, rows, classes, dim if op == "linear" else None, seed)
    cases = _numpy_cases(op, arrays, labels, dtype, grad) if device == "cpu" else []
    if torch is not None:
        cases += _torch_cases(op, arrays, labels, dtype, grad, device)
    if impls:
        unknown = sorted(set(impls) - {c.name for c in cases})
        if unknown:
            raise ValueError(f"impls: unknown or unavailable here {unknown}; available: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in impls]
    reference = _reference_loss(op, arrays, labels, dtype)
    tol = TOLERANCE[dtype]
    baseline = next((c.name for c in cases if c.baseline), None) or next(
        (c.name for c in cases if c.name == "numpy"), cases[0].name)
    result = BenchResult(op, device, rows, classes, dim if op == "linear" else None, dtype, grad, repeats,
                         reference, tol, baseline, _machine(device))  # fmt: skip
    for case in cases:
        loss = float(case.fn())
        err = abs(loss - reference)
        ok = bool(err <= tol * max(1.0, abs(reference)))
        res = CaseResult(case.name, case.what, loss, err, ok)
        if ok:
            res.median_ms, res.min_ms, res.extra_mib = _time_case(case.fn, warmup, repeats, device)
        result.results.append(res)
    base = next((r for r in result.results if r.impl == baseline and r.median_ms), None)
    for r in result.results:
        if base is not None and r.median_ms is not None:
            r.ratio_to_baseline = r.median_ms / base.median_ms
    return result


# ---- command ----------------------------------------------------------------------------------


def _print_table(result: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    shape = f"{result.rows} x {result.classes}" + (f" (dim {result.dim})" if result.dim else "")
    title = (f"{result.op}: {shape} {result.dtype} on {result.machine.get('device', result.device)}, "
             f"{'forward + backward' if result.grad else 'forward'}, median of {result.repeats}")
    table = Table(title=title)
    for col in ("impl", "what", "median ms", f"x {result.baseline}", "extra MiB", "loss", "|error|"):
        table.add_column(col, justify="left" if col in ("impl", "what") else "right")
    for r in result.results:
        table.add_row(
            r.impl, r.what,
            "-" if r.median_ms is None else f"{r.median_ms:.3f}",
            "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}",
            "-" if r.extra_mib is None else f"{r.extra_mib:.1f}",
            f"{r.loss:.6f}", f"{r.abs_error:.1e}" + ("" if r.ok else " WRONG"),
        )  # fmt: skip
    console = Console(width=160)
    console.print(table)
    console.print(f"float64 reference loss {result.reference_loss:.6f}; a case is wrong beyond "
                  f"{result.tolerance:g} x max(1, |reference|). Versions: {result.machine}")


@click.command(name="bench")
@click.argument("op", type=click.Choice(["ce", "soft", "linear"]), default="ce")
@click.option("--rows", type=click.IntRange(min=1), default=20000, show_default=True, help="Rows (tokens).")
@click.option("--classes", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Classes (vocabulary size).")
@click.option("--dim", type=click.IntRange(min=1), default=256, show_default=True,
              help="Hidden size (linear only).")
@click.option("--dtype", type=click.Choice(sorted(TOLERANCE)), default="float32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--grad", is_flag=True, help="Time the loss and its gradient (forward + backward).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--impls", default="", help="Comma list of implementations to run (default: all available).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def bench(op, rows, classes, dim, dtype, device, grad, warmup, repeats, seed, impls, fmt):
    """Check, then time, crossent against its peers on this machine.

    Every implementation's loss is first compared with a float64 reference; a wrong one is
    flagged and makes the exit status 1. Ratios are to torch's own function (NumPy without torch).
    """
    names = [s.strip() for s in impls.split(",") if s.strip()]
    try:
        result = run_bench(op, rows=rows, classes=classes, dim=dim, dtype=dtype, device=device, grad=grad,
                           warmup=warmup, repeats=repeats, seed=seed, impls=names)  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if fmt == "json":
        payload = asdict(result)
        payload["all_ok"] = result.all_ok
        click.echo(json.dumps(payload))
    else:
        _print_table(result)
    if not result.all_ok:
        wrong = [r.impl for r in result.results if not r.ok]
        raise click.ClickException(f"wrong values from {wrong} (see the |error| column)")
