"""Benchmark `crossent score` against pandas.read_parquet + sklearn.metrics.log_loss.

One setup (a Parquet file of N x C float32 probabilities and logits with int64 labels, written in
row groups), then each contender runs in its own fresh subprocess, interleaved, several times:
- crossent score FILE --target y --probs 'p*'          (the comparison the issue asks for)
- crossent score FILE --target y --logits 'l*'         (same file, from logits)
- pandas.read_parquet(FILE, columns=p*, y) + sklearn.metrics.log_loss
Time is the wall time of the whole subprocess (interpreter start and imports included, for
both); memory is the subprocess's peak RSS (VmHWM from /proc/self/status: ru_maxrss would
include the forking parent's memory on Linux). Results are appended to
benchmarks/results/score.csv (long format, with device, versions and date) and the latest run is
written as a markdown table to benchmarks/results/score.md.

Usage: python benchmarks/bench_score.py [--rows 4000000] [--classes 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

METRICS = ("seconds", "cpu_seconds", "peak_rss_mib")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_PEAK = """
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"value": value, "peak_rss_kib": hwm}), file=sys.stderr)
"""

CROSSENT = """
import json, sys
from crossent.cli.main import main
import contextlib, io
out = io.StringIO()
with contextlib.redirect_stdout(out):
    main(["score", sys.argv[1], "--target", "y", sys.argv[2], sys.argv[3], "--format", "json",
          "--quiet"], standalone_mode=False)
value = json.loads(out.getvalue())["cross_entropy_nats"]
""" + _PEAK

PANDAS_SKLEARN = """
import json, sys
import pandas as pd
from sklearn.metrics import log_loss
C = int(sys.argv[2])
cols = [f"p{k}" for k in range(C)]
df = pd.read_parquet(sys.argv[1], columns=cols + ["y"])
value = float(log_loss(df["y"].to_numpy(), y_proba=df[cols].to_numpy(), labels=list(range(C))))
""" + _PEAK


def setup(path: str, rows: int, classes: int, row_group: int = 131072, seed: int = 0) -> None:
    """Write N x C float32 probabilities p*, logits l* and int64 labels y, by row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, row_group):
        n = min(row_group, rows - start)
        z = (rng.standard_normal((n, classes), dtype=np.float32) * 2).astype(np.float32)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        y = rng.integers(0, classes, n)
        cols = {f"p{k}": p[:, k] for k in range(classes)}
        cols.update({f"l{k}": z[:, k] for k in range(classes)})
        cols["y"] = y
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def run_once(code: str, args: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": report["peak_rss_kib"] / 1024,
            "value": report["value"]}


def device() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} logical CPUs visible)"


def versions() -> str:
    names = ["crossent", "numpy", "pyarrow", "pandas", "scikit-learn"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return f"python {platform.python_version()}, " + ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only, append nothing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "preds.parquet")
        setup(path, args.rows, args.classes)
        contenders = {
            "crossent score --probs": (CROSSENT, [path, "--probs", "p*"]),
            "crossent score --logits": (CROSSENT, [path, "--logits", "l*"]),
            "pandas.read_parquet + sklearn log_loss": (PANDAS_SKLEARN,
                                                       [path, str(args.classes)]),
        }
        runs = {name: [] for name in contenders}
        for _ in range(args.repeats):  # interleaved, so machine noise hits every contender
            for name, (code, argv) in contenders.items():
                runs[name].append(run_once(code, argv))

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev, ver = device(), versions()
    raw_mib = args.rows * args.classes * 4 / 2**20
    rows_out = []
    for name, results in runs.items():
        for metric in METRICS:
            values = [r[metric] for r in results]
            rows_out.append({
                "date": date, "device": dev, "versions": ver, "operation": "score",
                "rows": args.rows, "classes": args.classes, "dtype": "float32",
                "contender": name, "metric": metric, "median": round(statistics.median(values), 3),
                "min": round(min(values), 3), "max": round(max(values), 3),
                "repeats": len(values), "cross_entropy_nats": results[0]["value"],
            })

    med = {(r["contender"], r["metric"]): r["median"] for r in rows_out}
    base = "pandas.read_parquet + sklearn log_loss"
    ours = "crossent score --probs"
    time_ratio = med[(ours, "seconds")] / med[(base, "seconds")]
    cpu_ratio = med[(ours, "cpu_seconds")] / med[(base, "cpu_seconds")]
    best = {name: min(r["seconds"] for r in results) for name, results in runs.items()}
    best_ratio = best[ours] / best[base]
    mem_ratio = med[(ours, "peak_rss_mib")] / med[(base, "peak_rss_mib")]
    logits_vs_raw = med[("crossent score --logits", "peak_rss_mib")] / raw_mib

    lines = [
        f"# crossent score vs pandas + scikit-learn ({args.rows:,} x {args.classes} float32)",
        "",
        "| contender | wall time, s (median [min, max]) | CPU time (user+sys), s "
        "| peak RSS, MiB | cross-entropy (nats) |",
        "|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        cell = {}
        for metric in METRICS:
            r = next(x for x in rows_out if x["contender"] == name and x["metric"] == metric)
            digits = 0 if metric == "peak_rss_mib" else 2
            cell[metric] = (f"{r['median']:.{digits}f} [{r['min']:.{digits}f}, "
                            f"{r['max']:.{digits}f}]")
        lines.append(f"| {name} | {cell['seconds']} | {cell['cpu_seconds']} | "
                     f"{cell['peak_rss_mib']} | {results[0]['value']:.9f} |")
    lines += [
        "",
        f"- crossent / pandas+sklearn (probabilities): wall time {time_ratio:.3f}x of medians, "
        f"{best_ratio:.3f}x of the fastest runs; CPU time {cpu_ratio:.3f}x (target <= 0.2); "
        f"peak memory {mem_ratio:.3f}x (target <= 0.1)",
        f"- crossent --logits peak RSS / raw logits size ({raw_mib:.0f} MiB): {logits_vs_raw:.3f} "
        "(target < 0.6)",
        "",
        f"Conditions: {dev}; {ver}; {date}. Each contender runs {args.repeats} times in a fresh "
        "subprocess, interleaved; times include interpreter start and imports (CPU time from "
        "getrusage of the child, robust to other load on the machine: load average "
        f"{os.getloadavg()[0]:.1f} at the end); memory is the subprocess's VmHWM. The file is Parquet (snappy) in row "
        "groups of 131072 rows with p0..p15, l0..l15 (float32) and y (int64); crossent runs "
        "with its default --batch-rows.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.no_record:
        return
    os.makedirs(RESULTS, exist_ok=True)
    csv_path = os.path.join(RESULTS, "score.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows_out)
    with open(os.path.join(RESULTS, "score.md"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
