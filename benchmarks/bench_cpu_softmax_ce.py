"""Softmax cross-entropy on the CPU, numpy logits with integer labels (or probability targets):
crossent against its peers.

One setup (:func:`make_inputs`): ``N x C`` float32 logits drawn from N(0, sigma^2) (sigma = 3 by
default: then about 1% of the true-class probabilities fall below float32's epsilon, which is
where scikit-learn's clipping changes the loss) and uniform integer labels, or with
``--targets probs`` float32 probability targets (each row the softmax of N(0, 1) draws;
``probs64``: the same in float64, which torch gets cast to float32 inside its timed call). Every
case runs in a fresh subprocess, so that its peak memory can be read from ``ru_maxrss``:

1. import everything and warm every case up on a tiny input (numba compiles, torch initializes);
2. draw the logits in place (no temporaries) and record the peak RSS so far as the baseline;
3. one warm call, then ``--repeats`` timed calls; report the median, min and max wall time and
   the peak RSS above the baseline ("extra memory": everything the case allocated at once).

The fast cases run round-robin ``--rounds`` times (each time in a new process) and their timed
calls are pooled, so a change in the machine's load hits all of them alike; ratios to torch are
taken between cases of the same run.

Cases (forward: the mean loss; ``--grad`` adds loss-and-gradient cases):

* ``crossent``            ``crossent.softmax_cross_entropy`` (numba fast path)
* ``crossent-kernel``     ``crossent.cpu.lse_and_nll`` and ``mean(nll)`` only
* ``crossent-blocked``    ``crossent.softmax_cross_entropy`` as installed without numba (the numba
  import fails in that process): the blocked numpy path, ``crossent.cpu._blocked``
* ``crossent-array-api``  ``crossent.softmax_cross_entropy`` with ``crossent.cpu.ENABLED = False``
* ``crossent-torch``      ``crossent.torch.cross_entropy`` on the same tensors (impl="auto": the
  numba kernels behind autograd)
* ``torch``               ``torch.nn.functional.cross_entropy`` on ``torch.from_numpy`` (no copy)
* ``scipy``               ``scipy.special.logsumexp(x, axis=1)`` minus the picked logits
* ``sklearn``             ``sklearn.metrics.log_loss(y, scipy.special.softmax(x, axis=1))``
  (softmax included in the time); it clips probabilities to [eps, 1 - eps], hence its value
* ``crossent-grad``       ``crossent.softmax_cross_entropy_and_grad`` (``--grad``)
* ``crossent-blocked-grad`` the same without numba (``--grad``)
* ``crossent-kernel-grad`` ``crossent.cpu.softmax_minus_onehot`` into a preallocated gradient
* ``crossent-torch-grad`` ``crossent.torch.cross_entropy(x.requires_grad_()).backward()``
* ``torch-grad``          ``F.cross_entropy(x.requires_grad_()).backward()``

``--label-smoothing EPS`` (> 0) passes ``label_smoothing=EPS`` to every crossent and torch case and
drops the cases that take none (the ``crossent.cpu`` class-index kernels, scipy, sklearn); with
numba, "crossent" and "crossent-torch" run its smoothing kernel. ``--class-weight`` passes class
weights (uniform in [0.5, 1.5], fixed seed) to the same cases. ``--targets probs`` drops the cases
made for class indices (the kernel cases, scipy, sklearn). ``--z-loss Z`` and ``--softcap S`` pass
crossent's LLM options to the crossent cases; torch, which has neither, runs the composition
``F.cross_entropy(S * tanh(x / S)) + Z * mean(logsumexp^2)`` (the cases that take neither are
dropped). Results go to ``cpu_softmax_ce[_probs|_probs64][_smoothing][_weighted][_zloss][_softcap].{csv,md}``.

Threads: torch and numba use ``--threads`` (2 by default); numpy and scipy are single-threaded.
Results are appended to ``benchmarks/results/cpu_softmax_ce.csv`` (long format, one row per case
with CPU model, library versions, date) and the run's table is written to
``benchmarks/results/cpu_softmax_ce.md``.

    python benchmarks/bench_cpu_softmax_ce.py                 # 200000 x 1000, all forward cases
    python benchmarks/bench_cpu_softmax_ce.py --grad --rows 50000
    python benchmarks/bench_cpu_softmax_ce.py --grad --label-smoothing 0.1
    python benchmarks/bench_cpu_softmax_ce.py --grad --targets probs --class-weight --label-smoothing 0.1
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from _cpu import cpu_model

FORWARD = ["crossent", "crossent-kernel", "crossent-blocked", "crossent-array-api", "crossent-torch", "torch", "scipy",
           "sklearn"]
GRADIENT = ["crossent-grad", "crossent-kernel-grad", "crossent-blocked-grad", "crossent-torch-grad", "torch-grad"]
RESULTS = Path(__file__).resolve().parent / "results"
CSV_FIELDS = [
    "date_utc", "case", "what", "rows", "classes", "dtype", "sigma", "threads", "repeats",
    "median_s", "min_s", "max_s", "ratio_to_torch", "extra_peak_mib", "extra_pct_of_logits",
    "loss", "cpu", "python", "numpy", "numba", "torch", "scipy", "sklearn", "crossent", "commit",
]  # fmt: skip
DESCRIPTION = {
    "crossent": "crossent.softmax_cross_entropy (numba fast path)",
    "crossent-kernel": "crossent.cpu.lse_and_nll + mean(nll)",
    "crossent-blocked": "crossent.softmax_cross_entropy without numba (blocked numpy)",
    "crossent-array-api": "crossent.softmax_cross_entropy, Array-API path (fast paths off)",
    "crossent-torch": "crossent.torch.cross_entropy (impl=auto: numba kernels)",
    "torch": "torch F.cross_entropy",
    "scipy": "scipy.special.logsumexp - picked",
    "sklearn": "sklearn log_loss(softmax(x)) (clips)",
    "crossent-grad": "crossent.softmax_cross_entropy_and_grad",
    "crossent-kernel-grad": "crossent.cpu.softmax_minus_onehot (loss + grad)",
    "crossent-blocked-grad": "crossent.softmax_cross_entropy_and_grad without numba (blocked numpy)",
    "crossent-torch-grad": "crossent.torch.cross_entropy + backward",
    "torch-grad": "torch F.cross_entropy + backward",
}
#: Cases that take no label smoothing, class weights or probability targets (left out with those).
NO_SMOOTHING = ("crossent-kernel", "crossent-kernel-grad", "scipy", "sklearn")
#: Descriptions that change with label smoothing.
SMOOTHING_DESCRIPTION = {
    "crossent": "crossent.softmax_cross_entropy (numba smoothing kernel)",
    "crossent-torch": "crossent.torch.cross_entropy (impl=auto: numba smoothing kernel)",
}


# ---- setup ------------------------------------------------------------------------------------


def make_inputs(rows: int, classes: int, sigma: float, seed: int = 0, targets: str = "labels"):
    """float32 logits ~ N(0, sigma^2), drawn in place, and int64 labels uniform in [0, classes)
    or (``targets="probs"``) float32 probability rows, the softmax of N(0, 1) draws, formed in place
    (``"probs64"``: the same rows in float64, as numpy makes targets by default)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, classes), dtype=np.float32)
    x *= np.float32(sigma)
    if targets == "labels":
        return x, rng.integers(0, classes, rows)
    y = rng.standard_normal((rows, classes), dtype=np.float32)
    np.exp(y, out=y)
    y /= y.sum(axis=1, keepdims=True)
    return x, (y.astype(np.float64) if targets == "probs64" else y)


def make_case(case: str, threads: int, smoothing: float = 0.0, class_weight: bool = False, z_loss: float = 0.0,
              softcap: float | None = None):  # fmt: skip
    """The callable f(x, y) -> float (mean loss) of one case, with its imports done; ``smoothing``:
    the label smoothing of the crossent and torch cases; ``class_weight``: pass them class weights
    (uniform in [0.5, 1.5], drawn once per number of classes with a fixed seed); ``z_loss`` and
    ``softcap``: crossent's options, and for torch, which has neither, the composition
    ``F.cross_entropy(s * tanh(x / s)) + z * mean(logsumexp(.)^2)``."""
    import numpy as np

    options = {"label_smoothing": smoothing} if smoothing else {}
    llm_options = {k: v for k, v in (("z_loss", z_loss), ("softcap", softcap)) if v}

    def ls(x, tensor=lambda a: a):
        if not class_weight:
            return options
        w = np.random.default_rng(7).uniform(0.5, 1.5, x.shape[1]).astype(x.dtype)
        return {**options, "weight": tensor(w)}

    if case.startswith(("torch", "crossent-torch")):
        import torch
        import torch.nn.functional as F

        import crossent.torch as cet

        torch.set_num_threads(threads)
        if case.startswith("crossent"):
            loss_fn = lambda x, y, **kw: cet.cross_entropy(x, y, **kw, **llm_options)  # noqa: E731
        elif llm_options:
            def loss_fn(x, y, **kw):
                z = x if softcap is None else softcap * torch.tanh(x / softcap)
                loss = F.cross_entropy(z, y, **kw)
                return loss + z_loss * torch.logsumexp(z, dim=1).square().mean() if z_loss else loss
        else:
            loss_fn = F.cross_entropy
        def target(x, y):  # float64 probabilities: torch wants the logits' dtype (cast in the timed call)
            y = torch.from_numpy(y)
            return y.to(torch.float32) if y.dtype == torch.float64 and x.dtype == np.float32 else y

        if not case.endswith("grad"):
            return lambda x, y: loss_fn(torch.from_numpy(x), target(x, y), **ls(x, torch.from_numpy)).item()

        def torch_grad(x, y):
            t = torch.from_numpy(x).requires_grad_(True)
            loss = loss_fn(t, target(x, y), **ls(x, torch.from_numpy))
            loss.backward()
            return loss.item()

        return torch_grad
    if case.startswith("crossent"):
        if case.startswith("crossent-blocked"):
            sys.modules["numba"] = None  # this process (the case's own) runs as if numba were not installed
        import crossent
        from crossent import cpu

        cpu.ENABLED = case != "crossent-array-api"
        if case in ("crossent", "crossent-blocked", "crossent-array-api"):
            return lambda x, y: float(crossent.softmax_cross_entropy(x, y, **ls(x), **llm_options))
        if case == "crossent-kernel":

            def kernel(x, y):
                _, nll = cpu.lse_and_nll(x, y)
                return float(np.mean(nll, dtype=np.float64))

            return kernel
        if case in ("crossent-grad", "crossent-blocked-grad"):

            def public_grad(x, y):
                loss, grad = crossent.softmax_cross_entropy_and_grad(x, y, **ls(x), **llm_options)
                del grad
                return float(loss)

            return public_grad
        if case == "crossent-kernel-grad":
            grad_buffer = {}

            def kernel_grad(x, y):
                out = grad_buffer.get(x.shape)
                if out is None:  # the gradient buffer is the output, allocated once per shape
                    out = grad_buffer[x.shape] = np.empty_like(x)
                _, nll = cpu.softmax_minus_onehot(x, y, 1.0 / x.shape[0], out)
                return float(np.mean(nll, dtype=np.float64))

            return kernel_grad
    if case == "scipy":
        from scipy.special import logsumexp

        def scipy_case(x, y):
            lse = logsumexp(x, axis=1)
            return float(np.mean(lse - x[np.arange(x.shape[0]), y], dtype=np.float64))

        return scipy_case
    if case == "sklearn":
        from scipy.special import softmax
        from sklearn.metrics import log_loss

        def sklearn_case(x, y):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # float32 rows "do not sum to 1" at 1e-7
                return float(log_loss(y, softmax(x, axis=1), labels=np.arange(x.shape[1])))

        return sklearn_case
    raise ValueError(f"unknown case {case!r}")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(args) -> dict:
    f = make_case(args.worker, args.threads, args.label_smoothing, args.class_weight, args.z_loss, args.softcap)
    tiny_x, tiny_y = make_inputs(64, 17, args.sigma, seed=1, targets=args.targets)
    f(tiny_x, tiny_y)  # imports, numba compilation (or its cache), torch start-up
    x, y = make_inputs(args.rows, args.classes, args.sigma, targets=args.targets)
    baseline = peak_rss_bytes()
    loss = f(x, y)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        f(x, y)
        times.append(time.perf_counter() - t0)
    extra = max(0, peak_rss_bytes() - baseline)
    return {
        "case": args.worker,
        "times": times,
        "extra_peak_bytes": extra,
        "logits_bytes": x.nbytes,
        "loss": loss,
    }


# ---- conditions -------------------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for key, dist in [("numpy", "numpy"), ("numba", "numba"), ("torch", "torch"),
                      ("scipy", "scipy"), ("sklearn", "scikit-learn"), ("crossent", "crossent")]:
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = ""
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


# ---- driver -----------------------------------------------------------------------------------


SLOW = ("sklearn", "crossent-array-api", "crossent-grad", "scipy")


def run_case(case: str, args) -> dict:
    repeats = args.slow_repeats if case in SLOW else args.repeats
    cmd = [sys.executable, __file__, "--worker", case, "--rows", str(args.rows),
           "--classes", str(args.classes), "--sigma", str(args.sigma),
           "--threads", str(args.threads), "--repeats", str(repeats),
           "--label-smoothing", str(args.label_smoothing), "--targets", args.targets,
           *(["--class-weight"] if args.class_weight else []), "--z-loss", str(args.z_loss),
           *(["--softcap", str(args.softcap)] if args.softcap else [])]  # fmt: skip
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS="1")  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {case:22s} median {statistics.median(result['times']):.3f} s, extra "
          f"{result['extra_peak_bytes'] / 2**20:.0f} MiB, loss {result['loss']:.4f}", flush=True)
    return result


def run_all(cases: list[str], args) -> list[dict]:
    """Run the cases round-robin, ``--rounds`` times (the slow ones once), so that a change in
    the machine's load during the run hits every case alike; pool each case's timed calls."""
    pooled: dict[str, dict] = {}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1} of {args.rounds}", flush=True)
        for case in cases:
            if round_ > 0 and case in SLOW:
                continue
            r = run_case(case, args)
            if case not in pooled:
                pooled[case] = {**r, "processes": 1}
            else:
                p = pooled[case]
                p["times"] += r["times"]
                p["extra_peak_bytes"] = max(p["extra_peak_bytes"], r["extra_peak_bytes"])
                p["processes"] += 1
    results = []
    for case in cases:
        p = pooled[case]
        t = p["times"]
        results.append({**p, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                        "repeats": len(t)})  # fmt: skip
    return results


def markdown(results: list[dict], args, conditions: dict) -> str:
    torch_fwd = next((r["median_s"] for r in results if r["case"] == "torch"), None)
    torch_grad = next((r["median_s"] for r in results if r["case"] == "torch-grad"), None)
    logits_mib = args.rows * args.classes * 4 / 2**20
    kinds = {"probs": ", probability targets", "probs64": ", float64 probability targets"}
    smoothing = kinds.get(args.targets, "") + (
        f", label smoothing {args.label_smoothing}" if args.label_smoothing else "") + (
        ", class weights" if args.class_weight else "") + (f", z_loss {args.z_loss}" if args.z_loss else "") + (
        f", softcap {args.softcap}" if args.softcap else "")
    lines = [
        f"| case ({args.rows} x {args.classes} float32, sigma {args.sigma}{smoothing}) | median s (min-max) "
        "| vs torch | extra peak MiB (% of logits) | mean loss |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        ref = torch_grad if r["case"].endswith("grad") else torch_fwd
        ratio = f"{r['median_s'] / ref:.2f}x" if ref else ""
        extra = r["extra_peak_bytes"] / 2**20
        lines.append(
            f"| {describe(r['case'], args)} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) "
            f"| {ratio} | {extra:.1f} ({100 * extra / logits_mib:.1f}%) | {r['loss']:.4f} |"
        )
    lines.append("")
    lines.append(
        f"Conditions: {conditions['cpu']}, {args.threads} threads for torch and numba (numpy and "
        f"scipy single-threaded), {conditions['date_utc']}; Python {conditions['python']}, "
        f"numpy {conditions['numpy']}, numba {conditions['numba']}, torch {conditions['torch']}, "
        f"scipy {conditions['scipy']}, scikit-learn {conditions['sklearn']}, crossent "
        f"{conditions['crossent']} ({conditions['commit']}). Median of {args.rounds} x "
        f"{args.repeats} warm calls, the cases run round-robin in {args.rounds} rounds "
        f"({args.slow_repeats} calls in one round for scipy, sklearn and the Array-API path); "
        "extra peak = peak RSS above the inputs, each case in its own process. Logits ~ "
        "N(0, sigma^2): scikit-learn clips probabilities to [eps, 1 - eps] (eps = float32 "
        "epsilon), which lowers the loss of rows whose true-class "
        "probability is below eps. The gradient cases count the gradient (100% of the logits) "
        "as extra."
    )
    return "\n".join(lines) + "\n"


#: Descriptions with probability targets and class weights or label smoothing (the numba
#: soft-target kernels take neither: core runs its blocked pass, crossent.torch its chunked path).
SOFT_OPTIONS_DESCRIPTION = {
    "crossent": "crossent.softmax_cross_entropy (blocked numpy pass; numba installed)",
    "crossent-grad": "crossent.softmax_cross_entropy_and_grad (blocked numpy pass; numba installed)",
    "crossent-torch": "crossent.torch.cross_entropy (impl=auto: blocked numpy pass)",
    "crossent-torch-grad": "crossent.torch.cross_entropy (impl=auto: blocked numpy pass) + backward",
}
def llm_options_description(case: str, args) -> str | None:
    """Descriptions with a z-loss or a softcap (torch: the composition, see make_case). Class
    indices: numba's kernels take the loss without a softcap, and the gradient without a softcap
    or a z-loss with smoothing (the z-loss folded into softmax_minus_onehot); probability targets:
    the loss without a softcap, class weights or smoothing, the gradient also without a z-loss;
    else the blocked pass."""
    if args.targets == "labels":
        blocked_loss = bool(args.softcap)
        blocked_grad = blocked_loss or bool(args.z_loss and args.label_smoothing)
    else:
        blocked_loss = bool(args.softcap or args.class_weight or args.label_smoothing)
        blocked_grad = blocked_loss or bool(args.z_loss)
    # crossent.torch: the class-index kernels take a z-loss without smoothing or softcap; its
    # probability-target kernels take neither option.
    torch_blocked = blocked_grad if args.targets == "labels" else True
    torch_route = "blocked numpy pass" if torch_blocked else "numba kernels"
    torch_logits = "softcap * tanh(x / softcap)" if args.softcap else "x"
    torch_z = " + z * mean(lse^2)" if args.z_loss else ""
    return {
        "crossent": "crossent.softmax_cross_entropy ("
        + ("numba installed: blocked pass" if blocked_loss else "numba kernel") + ")",
        "crossent-grad": "crossent.softmax_cross_entropy_and_grad ("
        + ("numba installed: blocked pass" if blocked_grad else "numba kernel, z-term folded in") + ")",
        "crossent-torch": f"crossent.torch.cross_entropy (impl=auto: {torch_route})",
        "crossent-torch-grad": f"crossent.torch.cross_entropy (impl=auto: {torch_route}) + backward",
        "torch": f"torch F.cross_entropy({torch_logits}){torch_z}",
        "torch-grad": f"torch F.cross_entropy({torch_logits}){torch_z} + backward",
    }.get(case)


def describe(case: str, args) -> str:
    if args.z_loss or args.softcap:
        return llm_options_description(case, args) or DESCRIPTION[case]
    if args.targets != "labels" and (args.label_smoothing or args.class_weight):
        return SOFT_OPTIONS_DESCRIPTION.get(case, DESCRIPTION[case])
    if args.label_smoothing:
        return SMOOTHING_DESCRIPTION.get(case, DESCRIPTION[case])
    return DESCRIPTION[case]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slow-repeats", type=int, default=2,
                        help="repeats for the slow cases (scipy, sklearn, the Array-API path)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="round-robin passes over the fast cases (the slow ones run once)")
    parser.add_argument("--cases", default=",".join(FORWARD), help="comma list of cases")
    parser.add_argument("--grad", action="store_true", help="add the loss-and-gradient cases")
    parser.add_argument("--no-save", action="store_true", help="print only; write no results")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="label_smoothing of the crossent and torch cases (drops the cases without it)")
    parser.add_argument("--targets", choices=["labels", "probs", "probs64"], default="labels",
                        help="integer labels, or float32 (float64: probs64) probability targets (drops the "
                        "cases without them)")
    parser.add_argument("--class-weight", action="store_true",
                        help="pass class weights to the crossent and torch cases (drops the cases without them)")
    parser.add_argument("--z-loss", type=float, default=0.0,
                        help="z_loss of the crossent cases (torch: added to its loss; drops the cases without it)")
    parser.add_argument("--softcap", type=float, default=None,
                        help="softcap of the crossent cases (torch: applied to its logits; drops the cases without it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    if not 0.0 <= args.label_smoothing <= 1.0:
        parser.error(f"--label-smoothing must be in [0, 1], got {args.label_smoothing}")
    given = [c for c in args.cases.split(",") if c]
    cases = list(given)
    if args.grad:
        cases += [c for c in GRADIENT if c not in cases]
    unknown = sorted(set(cases) - set(FORWARD) - set(GRADIENT))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {FORWARD + GRADIENT}")
    if args.z_loss < 0 or (args.softcap is not None and not args.softcap > 0):
        parser.error(f"--z-loss must be >= 0 and --softcap > 0, got {args.z_loss} and {args.softcap}")
    if args.label_smoothing or args.class_weight or args.targets != "labels" or args.z_loss or args.softcap:
        if args.cases != ",".join(FORWARD) and set(given) & set(NO_SMOOTHING):
            parser.error(f"cases {sorted(set(given) & set(NO_SMOOTHING))} take no label smoothing, class "
                         "weights, probability targets, z-loss or softcap")
        cases = [c for c in cases if c not in NO_SMOOTHING]
    conditions = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "cpu": cpu_model(), "commit": git_commit(), **versions()}  # fmt: skip
    print(f"{args.rows} x {args.classes} float32, {args.threads} threads, {conditions['cpu']}")
    results = run_all(cases, args)
    table = markdown(results, args, conditions)
    print()
    print(table)
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    stem = "cpu_softmax_ce" + ("" if args.targets == "labels" else f"_{args.targets}") + (
        "_smoothing" if args.label_smoothing else "") + ("_weighted" if args.class_weight else "") + (
        "_zloss" if args.z_loss else "") + ("_softcap" if args.softcap else "")
    extra_fields = {"label_smoothing": args.label_smoothing} if args.label_smoothing else {}
    if args.z_loss:
        extra_fields["z_loss"] = args.z_loss
    if args.softcap:
        extra_fields["softcap"] = args.softcap
    if args.targets != "labels":
        extra_fields["targets"] = args.targets
    if args.class_weight:
        extra_fields["class_weight"] = "uniform(0.5, 1.5)"
    fields = CSV_FIELDS + list(extra_fields)
    csv_path = RESULTS / f"{stem}.csv"
    new = not csv_path.exists()
    torch_ref = {r["case"]: r["median_s"] for r in results if r["case"] in ("torch", "torch-grad")}
    with csv_path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in results:
            ref = torch_ref.get("torch-grad" if r["case"].endswith("grad") else "torch")
            writer.writerow({
                "date_utc": conditions["date_utc"], "case": r["case"],
                "what": describe(r["case"], args), "rows": args.rows, "classes": args.classes,
                "dtype": "float32", "sigma": args.sigma, "threads": args.threads,
                "repeats": r["repeats"], "median_s": f"{r['median_s']:.4f}",
                "min_s": f"{r['min_s']:.4f}", "max_s": f"{r['max_s']:.4f}",
                "ratio_to_torch": f"{r['median_s'] / ref:.3f}" if ref else "",
                "extra_peak_mib": f"{r['extra_peak_bytes'] / 2**20:.1f}",
                "extra_pct_of_logits": f"{100 * r['extra_peak_bytes'] / r['logits_bytes']:.2f}",
                "loss": f"{r['loss']:.6f}",
                **{k: conditions[k] for k in ("cpu", "python", "numpy", "numba", "torch",
                                              "scipy", "sklearn", "crossent", "commit")},
                **extra_fields,
            })  # fmt: skip
    (RESULTS / f"{stem}.md").write_text(table)
    print(f"appended to {csv_path}; table in {RESULTS / f'{stem}.md'}")


if __name__ == "__main__":
    main()
