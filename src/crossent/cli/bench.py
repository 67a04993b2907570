"""``crossent bench``: time crossent against its peers on this machine, after checking the values.

A quick, self-contained comparison for users ("how fast is it here?"); the benchmarks/ scripts
are the project's measurement record. Every implementation first computes, on the same seeded
inputs, the mean loss, the per-row losses (reduction "none") and with ``--grad`` the gradient,
and each is compared with a float64 reference computed by plain NumPy on the CPU, within a
tolerance derived from the dtype's unit roundoff (the error model is written out above
``_reference``). The inputs give each row's true class a logit margin, so that a label bug
changes the loss by nats, not by sampling noise. A case that is off, or that raises, is
reported as wrong and makes the command exit with status 1, so a fast wrong answer never looks
like a win. Then each case runs ``--warmup`` untimed and ``--repeats`` timed calls (wall clock
on the CPU; CUDA events on a GPU), and the table gives the median and the ratio to the baseline:
torch's own function for ``ce`` and ``soft`` (NumPy without torch), and the plain composition
``F.cross_entropy(E @ W.T)`` for ``linear``.

Operations:

* ``ce``: mean softmax cross-entropy of ``--rows x --classes`` logits (N(0, 3^2), plus a margin of
  log C + 4.5 on each row's true class) with integer labels. CPU: ``crossent.softmax_cross_entropy``
  (NumPy input; the numba fast path when installed, else blocked numpy), the same with the fast
  paths off (Array-API path), a stable NumPy log-sum-exp, ``torch.nn.functional.cross_entropy`` and
  ``crossent.torch.cross_entropy`` (impl "auto", which takes the numba kernels on the CPU, and
  "chunked"). CUDA: torch's function, ``crossent.torch.cross_entropy`` (impl "triton" and "chunked")
  and Liger-Kernel's cross-entropy when installed.
* ``soft``: mean softmax cross-entropy with soft targets (each row a probability vector, the softmax
  of N(0, 1) scores plus log C + 0.5 on the labelled class), float32 or float64:
  ``crossent.softmax_cross_entropy`` (NumPy; fast path on and off), a stable NumPy ``sum p (lse -
  x)``, ``torch.nn.functional.cross_entropy`` with probability targets and
  ``crossent.torch.cross_entropy`` (impl "auto" and "chunked").
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

#: Unit roundoff u (half the machine epsilon) of each input dtype: a correctly rounded result in
#: that dtype is within u x |value|.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
#: The smallest positive (subnormal) number of each dtype: a gradient entry below it underflows.
TINY = {"float64": 2.0**-1074, "float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}


@dataclass
class Case:
    name: str
    what: str
    fn: Callable[[], tuple]  # one call: (the mean loss, the gradients or None), any library's
    rows_fn: Callable[[], object] | None = None  # the same implementation, reduction "none"
    baseline: bool = False


@dataclass
class CaseResult:
    impl: str
    what: str
    loss: float | None
    abs_error: float | None
    ok: bool
    row_error: float | None = None  # max over rows of |l_i - r_i| / tol_i (ok when <= 1)
    grad_error: float | None = None  # ||g - g_64|| / ||g_64|| (relative L2)
    grad_tolerance: float | None = None
    error: str | None = None  # why the case is not ok, where that is not a plain value error
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
    tolerance: float  # absolute, for the mean loss
    baseline: str
    machine: dict = field(default_factory=dict)
    results: list[CaseResult] = field(default_factory=list)

    @property
    def all_ok(self) -> bool:
        return all(r.ok for r in self.results)


# ---- inputs and reference ---------------------------------------------------------------------


def _margin(classes):
    """Logit margin of each row's true class: log C + 4.5 = log E[sum_j exp(3 Z_j)] for N(0, 1) Z.

    So the true class is about as likely as all the others together, the per-row losses spread
    around log 2 (from ~0 to ~10 nats), and a wrong label, row or smoothing costs several nats.
    """
    return math.log(classes) + 4.5


def _inputs(op, rows, classes, dim, seed):
    """float64 NumPy inputs: logits (ce, soft) or (E, W) (linear), and labels (soft: targets).

    N(0, 3^2) logits with ``_margin`` added to each row's true class (for ``linear``, E is moved
    along that class's row of W by the same margin), so that the loss depends on the labels.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=rows)
    idx = np.arange(rows)
    margin = _margin(classes)
    if op in ("ce", "soft"):
        logits = rng.standard_normal((rows, classes)) * 3.0
        logits[idx, labels] += margin
        if op == "ce":
            return (logits,), labels
        scores = rng.standard_normal((rows, classes))
        scores[idx, labels] += math.log(classes) + 0.5  # the labelled class holds about half
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        return (logits,), probs / probs.sum(axis=1, keepdims=True)
    e = rng.standard_normal((rows, dim))
    w = rng.standard_normal((classes, dim)) / math.sqrt(dim) * 3.0
    wy = w[labels]
    e += wy * (margin / (wy * wy).sum(axis=1, keepdims=True))  # z_iy += margin
    return (e, w), labels


@dataclass
class _Reference:
    rows: np.ndarray  # per-row loss in float64 of the rounded inputs
    row_tol: np.ndarray  # per-row allowed |l_i - r_i|
    mean: float
    mean_tol: float
    grad_check: Callable[[list], tuple[float, float]] | None  # grads -> (rel error, rel tolerance)


# Error model (the tolerances below), for inputs already rounded to the tested dtype, which the
# reference uses too. u: the dtype's unit roundoff; u_c: that of the compute precision (float32
# for float32, bfloat16 and float16 inputs; float64 for float64). A correct implementation
# evaluates l_i = lse(z_i) - z_{i,y_i} with |lse_i|, |z_iy| <= S_i = max_j |z_ij| + log C, and a
# sum of C exponentials (blocked or pairwise: (log2 C + 4) roundings deep), may round its
# intermediate lse (or max) to the dtype before the subtraction (torch's CPU bfloat16 and float16
# kernels do: up to u S_i), then rounds l_i to the dtype:
#     |l_i - r_i| <= u |r_i| + u S_i + (log2 C + 4) u_c S_i + 2 d_i,
# d_i the error of the logits themselves: 0 for ce and soft (the inputs are the logits); for
# linear, a dot product of length D in u_c, (log2 D + 2) u_c ||E_i|| max_j ||W_j||
# (Cauchy-Schwarz), plus 2 u max_j |z_ij| in bfloat16 / float16, where the product may or may
# not be stored in the dtype. The per-row tolerance is twice that bound.
# The mean: the rounding of each row loss and the final rounding are each <= u mean(r) (the losses
# are >= 0); the float32 sum over N rows adds (log2 N + 2) u_c mean(r); the intermediate
# roundings to the dtype are round-to-nearest errors of independent rows, whose mean has a
# standard deviation <= u rms(S) / sqrt(3 N), of which 6 are allowed:
#     tol = 2 u mean(r) + 2 (mean of the u_c and d terms) + 6 u rms(S) / sqrt(3 N).
# bfloat16 at 20000 rows: about 1% of the loss, so a 1.5% scale error fails the mean check, and
# any label error (several nats on most rows) fails the per-row check. The gradient
# (softmax - onehot)/N (float32 computation assumed): each entry rounded (u |g|), the softmax off
# by the lse error (relative (log2 C + 4) u_c S + 2 d, and ||softmax rows|| <= 1), and entries
# below the dtype's smallest subnormal lost (sqrt(size) x TINY / 2); linear adds the product with
# W or E (spectral norm, the (log2 K + 2) u_c accumulation over K terms, and u for the output).
# Tolerance: twice the bound, relative to ||g_64||.


def _round_to(a, dtype_name):
    if dtype_name == "float64":
        return a
    if dtype_name == "float32":
        return a.astype(np.float32).astype(np.float64)
    import torch

    return torch.from_numpy(a).to(getattr(torch, dtype_name)).double().numpy()


def _blocks(n, classes):
    step = max(1, 2**22 // max(1, classes))  # about 32 MiB of float64 logits at a time
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _reference(op, arrays, labels, dtype_name, grad=False):
    """Per-row and mean float64 losses of the inputs as rounded to ``dtype_name``, with tolerances."""
    u, tiny = UNIT_ROUNDOFF[dtype_name], TINY[dtype_name]
    u_c = UNIT_ROUNDOFF["float64" if dtype_name == "float64" else "float32"]
    low = dtype_name in ("bfloat16", "float16")
    rounded = [_round_to(a, dtype_name) for a in arrays]
    targets = _round_to(labels, dtype_name) if op == "soft" else labels
    n = len(labels)
    classes = rounded[0].shape[1] if op != "linear" else rounded[1].shape[0]
    log2c = math.log2(max(classes, 2))
    if op == "linear":
        e, w = rounded
        dim = e.shape[1]
        w_norm = float(np.sqrt((w * w).sum(axis=1)).max())

    def logits_of(sl):
        if op != "linear":
            return rounded[0][sl], np.zeros(sl.stop - sl.start)
        z = e[sl] @ w.T
        delta = (math.log2(max(dim, 2)) + 2) * u_c * np.sqrt((e[sl] * e[sl]).sum(axis=1)) * w_norm
        if low:
            z = _round_to(z, dtype_name)  # as the product stored in the input dtype
            delta = delta + 2 * u * np.abs(z).max(axis=1)
        return z, delta

    def softmax_lse(z):
        m = z.max(axis=1, keepdims=True)
        q = np.exp(z - m)
        s = q.sum(axis=1, keepdims=True)
        return q / s, (m + np.log(s))[:, 0]

    r = np.empty(n)
    compute = np.empty(n)  # the u_c and d terms of the bound
    s_all = np.empty(n)
    for sl in _blocks(n, classes):
        z, delta = logits_of(sl)
        _, lse = softmax_lse(z)
        if op == "soft":
            r[sl] = (targets[sl] * (lse[:, None] - z)).sum(axis=1)
        else:
            r[sl] = lse - z[np.arange(len(lse)), labels[sl]]
        s_i = np.abs(z).max(axis=1) + math.log(classes)
        s_all[sl] = s_i
        compute[sl] = (log2c + 4) * u_c * s_i + 2 * delta
    row_tol = 2 * (u * np.abs(r) + u * s_all + compute)
    mean = float(r.mean())
    mean_abs = float(np.abs(r).mean())
    mean_tol = (2 * u * mean_abs + 2 * (float(compute.mean()) + (math.log2(max(n, 2)) + 2) * u_c * mean_abs)
                + 6 * u * math.sqrt(float((s_all * s_all).mean()) / (3 * n)))  # fmt: skip

    grad_check = None
    if grad:
        soft_err = 2 * float(compute.max())  # relative error of every softmax entry (lse and logits)

        def g_of(sl):
            z, _ = logits_of(sl)
            q, _ = softmax_lse(z)
            if op == "soft":
                q -= targets[sl]
            else:
                q[np.arange(len(q)), labels[sl]] -= 1.0
            return q / n

        def grad_check(grads):
            if op != "linear":
                (g,) = grads
                if tuple(g.shape) != (n, classes):
                    raise _Wrong(f"gradient has shape {list(g.shape)}, expected {[n, classes]}")
                err2 = ref2 = 0.0
                for sl in _blocks(n, classes):
                    ref = g_of(sl)
                    err2 += float(((_f64(g[sl]) - ref) ** 2).sum())
                    ref2 += float((ref * ref).sum())
                ref_norm = math.sqrt(ref2)
                bound = u * ref_norm + soft_err * math.sqrt(n) / n + math.sqrt(n * classes) * tiny / 2
                return math.sqrt(err2) / ref_norm, 2 * bound / ref_norm
            de, dw = grads
            if tuple(de.shape) != e.shape or tuple(dw.shape) != w.shape:
                raise _Wrong(f"gradients have shapes {list(de.shape)}, {list(dw.shape)}, "
                             f"expected {list(e.shape)}, {list(w.shape)}")
            de_ref, dw_ref, g2 = np.zeros_like(e), np.zeros_like(w), 0.0
            for sl in _blocks(n, classes):
                g = g_of(sl)
                de_ref[sl] = g @ w
                dw_ref += g.T @ e[sl]
                g2 += float((g * g).sum())
            g_norm = math.sqrt(g2)
            # the logits' gradient as computed: rounded (u), off by the softmax error and underflow
            g_err = u * g_norm + soft_err * math.sqrt(n) / n + math.sqrt(n * classes) * tiny / 2
            worst = (0.0, 1.0)
            for got, ref, other, k in ((de, de_ref, w, classes), (dw, dw_ref, e, n)):
                ref_norm = float(np.linalg.norm(ref))
                other_2 = float(np.linalg.norm(other, 2))
                bound = (u * ref_norm + g_err * other_2 + (math.log2(max(k, 2)) + 2) * u_c * g_norm * other_2
                         + math.sqrt(ref.size) * tiny / 2)  # fmt: skip
                pair = float(np.linalg.norm(_f64(got) - ref)) / ref_norm, 2 * bound / ref_norm
                if pair[0] / pair[1] > worst[0] / worst[1]:
                    worst = pair
            return worst

    return _Reference(r, row_tol, mean, mean_tol, grad_check)


def _reference_loss(op, arrays, labels, dtype_name):
    """Mean cross-entropy in float64 of the inputs as rounded to the tested dtype."""
    return _reference(op, arrays, labels, dtype_name).mean


class _Wrong(Exception):
    """A value of the wrong shape: the case is wrong (not a crash of the benchmark)."""


def _f64(a):
    """Any library's array (NumPy, torch on any device, any dtype) as float64 NumPy."""
    if hasattr(a, "detach"):
        return a.detach().to("cpu").double().numpy()
    return np.asarray(a, dtype=np.float64)


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
    y = labels.astype(dtype_name) if op == "soft" else labels
    rows = np.arange(len(y))

    def plain_rows():
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        if op == "soft":
            return e, s, np.sum(y * (np.log(s) + m - x), axis=1)
        return e, s, np.log(s[:, 0]) + m[:, 0] - x[rows, y]

    def plain():
        e, s, loss = plain_rows()
        if not grad:
            return np.mean(loss), None
        e /= s
        if op == "soft":
            e -= y
        else:
            e[rows, y] -= 1.0
        e /= len(y)
        return np.mean(loss), (e,)

    def ours():
        if grad:
            loss, g = ce.softmax_cross_entropy_and_grad(x, y)
            return loss, (g,)
        return ce.softmax_cross_entropy(x, y), None

    def array_api():
        with _cpu_fast_path(False):
            return ours()

    def ours_rows():
        return ce.softmax_cross_entropy(x, y, reduction="none")

    def array_api_rows():
        with _cpu_fast_path(False):
            return ours_rows()

    kind = " (NumPy, soft)" if op == "soft" else " (NumPy)"
    plain_what = ("stable NumPy sum p (lse - x)" if op == "soft" else "stable NumPy log-sum-exp") + (
        (" + softmax - p" if op == "soft" else " + softmax - one-hot") if grad else "")
    return [
        Case("crossent", "crossent.softmax_cross_entropy" + ("_and_grad" if grad else "") + kind, ours,
             ours_rows),
        Case("crossent-array-api", "the same, numpy fast paths off", array_api, array_api_rows),
        Case("numpy", plain_what, plain, lambda: plain_rows()[2]),
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

    def case(name, what, loss_of, baseline=False):
        """``loss_of(*inputs, reduction)``: timed with the mean; checked per row with "none"."""
        def call():
            inputs = [t.detach().requires_grad_(grad) for t in leaves]
            loss = loss_of(*inputs, "mean")
            if not grad:
                return loss.detach(), None
            loss.backward()
            return loss.detach(), tuple(t.grad for t in inputs)

        def rows():
            with torch.no_grad():
                return loss_of(*leaves, "none")

        return Case(name, what + (" + backward" if grad else ""), call, rows, baseline)

    cases = []
    if op == "soft":
        cases.append(case("torch", "torch.nn.functional.cross_entropy, probability targets",
                          lambda x, r: F.cross_entropy(x, y, reduction=r), baseline=True))
        for impl in ("auto", "chunked"):
            cases.append(case(f"crossent-{impl}", f"crossent.torch.cross_entropy(impl={impl!r}), soft",
                              lambda x, r, impl=impl: cet.cross_entropy(x, y, impl=impl, reduction=r)))
    elif op == "ce":
        cases.append(case("torch", "torch.nn.functional.cross_entropy",
                          lambda x, r: F.cross_entropy(x, y, reduction=r), baseline=True))
        impls = ["triton", "chunked"] if device == "cuda" else ["auto", "chunked"]
        for impl in impls:
            cases.append(case(f"crossent-{impl}", f"crossent.torch.cross_entropy(impl={impl!r})",
                              lambda x, r, impl=impl: cet.cross_entropy(x, y, impl=impl, reduction=r)))
        if device == "cuda":
            with contextlib.suppress(ImportError):
                from liger_kernel.transformers import LigerCrossEntropyLoss

                liger = {r: LigerCrossEntropyLoss(reduction=r) for r in ("mean", "none")}
                cases.append(case("liger-kernel", "LigerCrossEntropyLoss", lambda x, r: liger[r](x, y)))
    else:
        cases.append(case("torch-composition", "F.cross_entropy(E @ W.T)",
                          lambda e, w, r: F.cross_entropy(e @ w.T, y, reduction=r), baseline=True))
        cases.append(case("crossent", "crossent.torch.linear_cross_entropy(impl='auto')",
                          lambda e, w, r: cet.linear_cross_entropy(e, w, y, reduction=r)))
        if hasattr(F, "linear_cross_entropy"):
            cases.append(case("torch-native", "torch.nn.functional.linear_cross_entropy",
                              lambda e, w, r: F.linear_cross_entropy(e, w, y, reduction=r)))
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
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"dtype must be one of {sorted(UNIT_ROUNDOFF)}, got {dtype!r}")
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
    ref = _reference(op, arrays, labels, dtype, grad=grad)
    baseline = next((c.name for c in cases if c.baseline), None) or next(
        (c.name for c in cases if c.name == "numpy"), cases[0].name)
    result = BenchResult(op, device, rows, classes, dim if op == "linear" else None, dtype, grad, repeats,
                         ref.mean, ref.mean_tol, baseline, _machine(device))  # fmt: skip
    for case in cases:
        res = CaseResult(case.name, case.what, None, None, False)
        try:
            _check_case(case, ref, res)
            if res.ok:
                res.median_ms, res.min_ms, res.extra_mib = _time_case(case.fn, warmup, repeats, device)
        except Exception as exc:  # an implementation that raises is that case's failure
            res.ok = False
            res.median_ms = res.min_ms = res.extra_mib = None
            res.error = f"raised {type(exc).__name__}: {exc}"
        result.results.append(res)
    base = next((r for r in result.results if r.impl == baseline and r.median_ms), None)
    for r in result.results:
        if base is not None and r.median_ms is not None:
            r.ratio_to_baseline = r.median_ms / base.median_ms
    return result


def _check_case(case, ref, res):
    """Fill ``res`` with the case's mean, per-row and gradient errors, and whether all are within."""
    loss, grads = case.fn()
    res.loss = float(loss)
    res.abs_error = abs(res.loss - ref.mean)
    problems = []
    if not res.abs_error <= ref.mean_tol:  # NaN fails
        problems.append(f"mean loss off by {res.abs_error:.3g} (tolerance {ref.mean_tol:.3g})")
    try:
        if case.rows_fn is not None:
            per_row = _f64(case.rows_fn()).reshape(-1)
            if per_row.shape != ref.rows.shape:
                raise _Wrong(f"reduction 'none' gave {per_row.size} row losses, expected {ref.rows.size}")
            ratio = np.abs(per_row - ref.rows) / ref.row_tol
            res.row_error = float(np.nan_to_num(ratio, nan=np.inf).max()) if ratio.size else 0.0
            if not res.row_error <= 1.0:
                i = int(np.argmax(np.nan_to_num(ratio, nan=np.inf)))
                problems.append(f"row {i} loss {per_row[i]:.6g}, reference {ref.rows[i]:.6g} "
                                f"(tolerance {ref.row_tol[i]:.3g})")
        if ref.grad_check is not None:
            if grads is None or any(g is None for g in grads):
                raise _Wrong("no gradient was computed")
            res.grad_error, res.grad_tolerance = ref.grad_check(grads)
            if not res.grad_error <= res.grad_tolerance:
                problems.append(f"gradient relative L2 error {res.grad_error:.3g} "
                                f"(tolerance {res.grad_tolerance:.3g})")
    except _Wrong as exc:
        problems.append(str(exc))
    res.ok = not problems
    res.error = "; ".join(problems) or None


# ---- command ----------------------------------------------------------------------------------


def _print_table(result: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    shape = f"{result.rows} x {result.classes}" + (f" (dim {result.dim})" if result.dim else "")
    title = (f"{result.op}: {shape} {result.dtype} on {result.machine.get('device', result.device)}, "
             f"{'forward + backward' if result.grad else 'forward'}, median of {result.repeats}")
    table = Table(title=title)
    cols = ["impl", "what", "median ms", f"x {result.baseline}", "extra MiB", "loss", "|error|", "rows"]
    if result.grad:
        cols.append("grad rel. error")
    for col in cols:
        table.add_column(col, justify="left" if col in ("impl", "what") else "right")
    for r in result.results:
        row = [
            r.impl, r.what,
            "-" if r.median_ms is None else f"{r.median_ms:.3f}",
            "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}",
            "-" if r.extra_mib is None else f"{r.extra_mib:.1f}",
            "-" if r.loss is None else f"{r.loss:.6f}",
            ("-" if r.abs_error is None else f"{r.abs_error:.1e}") + ("" if r.ok else " WRONG"),
            "-" if r.row_error is None else f"{r.row_error:.2f} tol",
        ]  # fmt: skip
        if result.grad:
            row.append("-" if r.grad_error is None else f"{r.grad_error:.1e} / {r.grad_tolerance:.1e}")
        table.add_row(*row)
    console = Console(width=180)
    console.print(table)
    console.print(f"float64 reference loss {result.reference_loss:.6f}; a case is wrong when its mean is "
                  f"off by more than {result.tolerance:.3g}, a row loss (reduction 'none') by more than "
                  "its tolerance ('rows': the worst row's error in tolerances)"
                  + (", or its gradient's relative L2 error exceeds its tolerance" if result.grad else "")
                  + f". Versions: {result.machine}")
    for r in result.results:
        if r.error:
            console.print(f"{r.impl}: {r.error}", markup=False)


def _json_safe(value):
    """``value`` with every non-finite float as None, so that the output is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@click.command(name="bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("op", type=click.Choice(["ce", "soft", "linear"]), default="ce")
@click.option("--rows", type=click.IntRange(min=1), default=20000, show_default=True, help="Rows (tokens).")
@click.option("--classes", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Classes (vocabulary size).")
@click.option("--dim", type=click.IntRange(min=1), default=256, show_default=True,
              help="Hidden size (linear only).")
@click.option("--dtype", type=click.Choice(sorted(UNIT_ROUNDOFF)), default="float32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--grad", is_flag=True,
              help="Time forward + backward, and check each gradient against the float64 reference "
                   "gradient (relative L2 error within a tolerance from the dtype's rounding).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--impls", default="", help="Comma list of implementations to run (default: all available).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: strict JSON, a non-finite number as null (its case has ok false).")
def bench(op, rows, classes, dim, dtype, device, grad, warmup, repeats, seed, impls, fmt):
    """Check, then time, crossent against its peers on this machine.

    \b
    Every implementation is first checked against a float64 reference on inputs whose loss
    depends strongly on the labels: the mean loss, each row's loss (reduction "none") and, with
    --grad, the gradient, each within a tolerance derived from the dtype's rounding. A wrong or
    failing (raising) implementation is reported, is not timed, and makes the exit status 1;
    exit 2 is for bad options only.
    \b
    Ratios are median times over the baseline's:
      ce      torch.nn.functional.cross_entropy (the stable NumPy log-sum-exp without torch)
      soft    torch.nn.functional.cross_entropy with probability targets (NumPy without torch)
      linear  the plain composition F.cross_entropy(E @ W.T), even where torch has its own
              F.linear_cross_entropy (then run as "torch-native")
    """
    names = [s.strip() for s in impls.split(",") if s.strip()]
    try:
        result = run_bench(op, rows=rows, classes=classes, dim=dim, dtype=dtype, device=device, grad=grad,
                           warmup=warmup, repeats=repeats, seed=seed, impls=names)  # fmt: skip
    except ValueError as exc:  # run_bench raises ValueError for its arguments only
        raise click.UsageError(str(exc)) from None
    if fmt == "json":
        payload = asdict(result)
        payload["all_ok"] = result.all_ok
        click.echo(json.dumps(_json_safe(payload), allow_nan=False))
    else:
        _print_table(result)
    if not result.all_ok:
        wrong = [r.impl for r in result.results if not r.ok]
        details = "; ".join(f"{r.impl}: {r.error}" for r in result.results if not r.ok and r.error)
        raise click.ClickException(f"wrong values from {wrong} ({details})")
