"""crossent's core API on JAX arrays under ``jax.jit``: time against optax, side by side in one run.

``crossent.softmax_cross_entropy`` has no JAX-specific code: it is the Array-API path, traced by
``jax.jit`` and differentiated by ``jax.grad``. This script measures what that costs against
optax, the loss JAX users reach for, on the same float32 logits (N(0, 3^2)) in one process:

* ``int``: integer labels, mean loss; optax ``softmax_cross_entropy_with_integer_labels``;
* ``soft``: probability targets (softmax of N(0, 1) draws); optax ``softmax_cross_entropy``;
* ``smooth``: integer labels with ``label_smoothing=0.1``; optax ``softmax_cross_entropy`` on
  ``smooth_labels(one_hot(y), 0.1)`` (the same loss for finite logits);

each as the loss (``jax.jit(f)``) and as its gradient (``jax.jit(jax.grad(f))``). Every pair is
checked to agree (loss and gradient to 1e-5 relative) before it is timed. Timing: median of
``--repeats`` calls after a warm-up (compilation excluded), cases interleaved round-robin so that
a change in load hits both libraries alike.

Results are appended to ``benchmarks/results/jax_core.csv`` (CPU model, versions, date, commit)
and the run's table is written to ``benchmarks/results/jax_core.md``.

    python benchmarks/bench_jax_core.py                      # 20000 x 1000
    python benchmarks/bench_jax_core.py --rows 4096 --classes 32000
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import statistics
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

from _cpu import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("int", "soft", "smooth")


def make_inputs(rows: int, classes: int, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    x = jnp.asarray(3 * rng.standard_normal((rows, classes), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, classes, rows, dtype=np.int32))
    t = jax.nn.softmax(jnp.asarray(rng.standard_normal((rows, classes), dtype=np.float32)), axis=-1)
    return x, y, t


def losses(task: str, classes: int):
    """(crossent's loss, optax's loss), each f(x, target) -> scalar mean."""
    import jax
    import optax

    import crossent

    if task == "int":
        return (lambda x, y: crossent.softmax_cross_entropy(x, y),
                lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean())
    if task == "soft":
        return (lambda x, t: crossent.softmax_cross_entropy(x, t),
                lambda x, t: optax.softmax_cross_entropy(x, t).mean())
    if task == "smooth":
        def optax_smooth(x, y):
            return optax.softmax_cross_entropy(x, optax.smooth_labels(jax.nn.one_hot(y, classes), 0.1)).mean()

        return lambda x, y: crossent.softmax_cross_entropy(x, y, label_smoothing=0.1), optax_smooth
    raise ValueError(f"unknown task {task!r}")


def check_agree(ours, theirs, x, target) -> float:
    """The largest relative difference of loss and gradient between the two (raises above 1e-5)."""
    import jax
    import numpy as np

    worst = 0.0
    for transform in (lambda f: f, jax.grad):
        a = np.asarray(jax.jit(transform(ours))(x, target), dtype=np.float64)
        b = np.asarray(jax.jit(transform(theirs))(x, target), dtype=np.float64)
        err = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
        if err > 1e-5:
            raise AssertionError(f"crossent and optax disagree: relative difference {err:.3g}")
        worst = max(worst, err)
    return worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    import jax

    x, y, t = make_inputs(args.rows, args.classes)
    cases = []  # (task, grad, library, compiled f, target, agreement)
    for task in [s for s in args.tasks.split(",") if s]:
        ours, theirs = losses(task, args.classes)
        target = t if task == "soft" else y
        agreement = check_agree(ours, theirs, x, target)
        for grad in (False, True):
            for lib, f in (("crossent", ours), ("optax", theirs)):
                compiled = jax.jit(jax.grad(f) if grad else f)
                jax.block_until_ready(compiled(x, target))  # compile and warm up
                cases.append({"task": task, "grad": grad, "lib": lib, "f": compiled, "target": target,
                              "agreement": agreement, "times": []})
    for _ in range(args.repeats):
        for c in cases:
            start = time.perf_counter()
            jax.block_until_ready(c["f"](x, c["target"]))
            c["times"].append(time.perf_counter() - start)

    conditions = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
        "python": platform.python_version(), "jax": version("jax"), "jaxlib": version("jaxlib"),
        "optax": version("optax"), "crossent": version("crossent"), "commit": _commit(),
    }  # fmt: skip
    rows = []
    for c in cases:
        med = statistics.median(c["times"])
        peer = next(o for o in cases if (o["task"], o["grad"], o["lib"]) == (c["task"], c["grad"], "optax"))
        rows.append({"task": c["task"], "what": "jax.grad" if c["grad"] else "loss", "library": c["lib"],
                     "median_ms": med * 1e3, "min_ms": min(c["times"]) * 1e3, "max_ms": max(c["times"]) * 1e3,
                     "ratio_to_optax": med / statistics.median(peer["times"]),
                     "max_rel_diff": c["agreement"]})  # fmt: skip
    table = _markdown(rows, args, conditions)
    print(table)
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "jax_core.csv"
    fields = ["date_utc", "rows", "classes", "task", "what", "library", "median_ms", "min_ms", "max_ms",
              "ratio_to_optax", "max_rel_diff", "repeats", "cpu", "python", "jax", "jaxlib", "optax", "crossent",
              "commit"]  # fmt: skip
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**{k: conditions[k] for k in conditions}, "rows": args.rows, "classes": args.classes,
                             "repeats": args.repeats, **{k: (f"{v:.4g}" if isinstance(v, float) else v)
                                                         for k, v in r.items()}})  # fmt: skip
    (RESULTS / "jax_core.md").write_text(table)
    print(f"appended to {path}; table in {RESULTS / 'jax_core.md'}")


def _markdown(rows, args, conditions) -> str:
    lines = [f"| {args.rows} x {args.classes} float32, jax.jit | library | median ms (min-max) | vs optax |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']}, {r['what']} | {r['library']} | {r['median_ms']:.1f} "
                     f"({r['min_ms']:.1f}-{r['max_ms']:.1f}) | {r['ratio_to_optax']:.2f}x |")
    lines += ["", f"Conditions: {conditions['cpu']}, {conditions['date_utc']}; Python {conditions['python']}, "
                  f"jax {conditions['jax']}, jaxlib {conditions['jaxlib']}, optax {conditions['optax']}, crossent "
                  f"{conditions['crossent']} ({conditions['commit']}). Median of {args.repeats} calls after "
                  "compilation, cases round-robin; crossent and optax agree to 1e-5 (loss and gradient) on every "
                  "task before timing. Reproduce: `python benchmarks/bench_jax_core.py`.", ""]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


if __name__ == "__main__":
    main()
