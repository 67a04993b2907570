"""Shared GPU benchmark harness: time, extra memory, errors, conditions, long-format CSV rows.

Used by bench_gpu_cross_entropy.py and bench_gpu_linear_cross_entropy.py. Every implementation
of one benchmark runs in the same process, on the same inputs, one after the other:

* time: CUDA events around one forward+backward call, ``repeats`` times after ``warmup`` calls;
  median, p10 and p90 in milliseconds (inputs are re-created outside the timed region when an
  implementation overwrites them, e.g. an in-place gradient);
* extra memory: ``torch.cuda.max_memory_allocated()`` during the call minus what was allocated
  before it, minus the gradient buffers the call leaves behind (``.grad`` of the inputs): what the
  implementation needs beyond its inputs and outputs;
* errors: relative L2 error ``||g - g_ref|| / ||g_ref||`` of each gradient and absolute error of
  the loss against a float32 reference computed once per shape;
* conditions: device name, torch / triton / liger-kernel / cut-cross-entropy versions, UTC date.

Configuration sweeps: ``--tiles`` (linear) / ``--configs`` (CE) take a ``;``-separated list of
crossent kernel configurations, or ``default-sweep`` for the candidate lists below; every crossent
implementation runs once per configuration (set through the ``CROSSENT_TRITON_LINEAR_TILES`` /
``CROSSENT_TRITON_CE_CONFIG`` environment variables, read by crossent at every call), the peers
once; each row names its configuration in the ``config`` column and the script prints the fastest
configuration per shape with its ratio to the target.

The pure-Python helpers (``parse_shapes``, ``parse_configs``, ``summarize``, ``append_rows``,
``best_configs``) are tested on the CPU in tests/triton/test_triton_bench_harness.py.
``--device cpu`` (with TRITON_INTERPRET=1 and an explicit ``--out``) runs a script end to end on
tiny shapes through Triton's interpreter: a smoke test of the script, never a measurement (its
rows say so, and carry no memory figures).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import importlib.metadata
import math
import os
import statistics
import sys
import time

COLUMNS = [
    "date", "device", "torch", "triton", "liger_kernel", "cut_cross_entropy", "benchmark",
    "shape", "dtype", "ignored_fraction", "impl", "config", "median_ms", "p10_ms", "p90_ms", "repeats",
    "extra_mib", "throughput", "throughput_unit", "loss_abs_err", "grad_rel_err",
    "grad2_rel_err", "note",
]


#: "default" in a sweep list: no override, crossent's fixed defaults.
DEFAULT_CONFIG = "default"

#: ``--tiles default-sweep``: CROSSENT_TRITON_LINEAR_TILES values
#: (block_m,block_v,block_k,block_d,num_warps,num_stages[,key=value]). Every entry compiles for
#: sm_90 with wgmma, a pipelined K loop, no register spill and shared memory within 228 KB in all
#: five kernel variants the benchmark runs (benchmarks/sm90_config_report.py, bf16, Triton 3.6 and
#: 3.9). Pruned by that report: 128x256 and 256x128 output tiles (8 warps), 128x128 tiles with 4
#: warps, block_d 256 and 64x128x128 with 4 warps all spill (4-2244 bytes) in some kernel.
LINEAR_SWEEP = [
    # Entries override fields of the default (CROSSENT_TRITON_LINEAR_TILES keeps what it does not
    # name). Measured on an H100 (benchmarks/results/gpu_linear_cross_entropy.csv, lean, ms at
    # 8192x2304x256000 / 8192x4096x128256):
    DEFAULT_CONFIG,  # 128,128,64,128,8,4,group_m=8, 3584-column chunks at N 8192: 80.9 / 73.2
    "group_m=0,num_stages=3,chunk=3072",  # the first default: 94.3 / 81.5
    "group_m=16",  # 80.4 (fast mode 74.0) / 73.0
    "group_m=4",  # 80.1 / 74.1
    "num_stages=5",  # 160 KiB smem: - / 72.8
    "num_stages=3",  # 96 KiB smem, the grouped order and chunks kept
]

#: ``--configs default-sweep``: CROSSENT_TRITON_CE_CONFIG values (key=value items). Each compiles
#: for sm_90 without spills under Triton 3.6 and 3.9 (sm90_config_report.py), except the default
#: itself under 3.6 at 32000 columns (one 32768-column block, 16 warps: 128 registers + 40 bytes
#: spilled; 3.9: no spill), which is why ``single_warps=32`` is in the list. Pruned: persistent=1
#: alone and persistent=1,single_warps=32 (3.6 spills 8 bytes at 128256 columns), loop_warps=8
#: with persistent=1 (3.6: 4 bytes).
CE_SWEEP = [
    # Measured on an H100 (benchmarks/results/gpu_cross_entropy.csv, ms at 8192x128256 /
    # 32768x32000, copy floors 1.40 / 1.62):
    DEFAULT_CONFIG,  # rows > 16384 columns streamed in 8192-column steps, reversed 2nd pass: 2.27 / 2.02
    # (the first default, single_max=32768, held 32000 columns in registers with 16 warps: 2.28 /
    # 2.66; left out: Triton 3.6 spills 40 bytes there. With 32 warps it does not spill:)
    "single_max=32768,single_warps=32",  # - / 2.23
    "loop_block=16384",  # 2.36 / 2.61 (with single_max=32768)
    "reverse=0",  # second pass in forward order: 2.37 / 2.67 (with single_max=32768)
    "loop_block=4096",  # smaller steps, more programs in flight
]


def parse_configs(text, flag, sweep, validate=None):
    """``"a;b"`` -> ["a", "b"]; ``"default-sweep"`` -> ``sweep``; "" -> ["default"].

    ``validate(config)`` (optional) raises ValueError for a bad config; it runs on every entry
    before any GPU time is spent, and its message is prefixed with ``flag``.
    """
    text = (text or "").strip()
    if not text:
        return [DEFAULT_CONFIG]
    if text == "default-sweep":
        configs = list(sweep)
    else:
        configs = [c.strip() for c in text.split(";") if c.strip()]
    if not configs:
        raise ValueError(f"{flag} must be 'default-sweep' or a ';'-separated list of configs, got {text!r}")
    if len(set(configs)) != len(configs):
        raise ValueError(f"{flag} lists a config twice: {text!r}")
    for config in configs:
        if validate is not None and config != DEFAULT_CONFIG:
            try:
                validate(config)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
    return configs


@contextlib.contextmanager
def config_env(var, config):
    """Set environment variable ``var`` to ``config`` for the duration (unset for "default")."""
    old = os.environ.pop(var, None)
    if config != DEFAULT_CONFIG:
        os.environ[var] = config
    try:
        yield
    finally:
        os.environ.pop(var, None)
        if old is not None:
            os.environ[var] = old


def best_configs(rows, reference_impl, target_ratio, what):
    """Lines naming, per shape and crossent implementation, the fastest config and its ratio to
    the median of ``reference_impl`` (a row whose impl starts with that text) in the same shape;
    ``target_ratio`` is the ratio the target allows, ``what`` names the reference."""
    lines = []
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for shape in shapes:
        mine = [r for r in rows if r["shape"] == shape and _timed(r)]
        ref = [r for r in mine if r["impl"].startswith(reference_impl)]
        for impl in dict.fromkeys(r["impl"] for r in mine if r["impl"].startswith("crossent")):
            cand = sorted((r for r in mine if r["impl"] == impl), key=lambda r: r["median_ms"])
            best = cand[0]
            line = f"{shape} {impl}: fastest config {best['config']!r} {best['median_ms']:.3f} ms"
            default = [r for r in cand if r["config"] == DEFAULT_CONFIG]
            if default and best is not default[0]:
                line += f" (default {default[0]['median_ms']:.3f} ms)"
            if ref:
                ratio = best["median_ms"] / ref[0]["median_ms"]
                verdict = "meets" if ratio <= target_ratio else "misses"
                line += (f" = {ratio:.2f}x {what} ({ref[0]['median_ms']:.3f} ms; target <= {target_ratio}x: "
                         f"{verdict})")
            lines.append(line)
    return lines


def _timed(r):
    v = r.get("median_ms", "")
    return isinstance(v, float) and not math.isnan(v)


class Recorder:
    """Rows of one run: each is appended to the CSV and printed as soon as it is measured, so a
    run cut short (a device call's time limit) keeps what it measured; ``budget_s`` (> 0) makes
    ``over_budget()`` true once that many seconds have passed since the start, so the scripts skip
    (and record as skipped) what is left instead of being killed mid-way."""

    def __init__(self, out, budget_s=0.0):
        self.out, self.budget_s, self.rows, self.t0 = out, budget_s, [], time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.t0

    def over_budget(self):
        return self.budget_s > 0 and self.elapsed() > self.budget_s

    def add(self, row):
        append_rows(self.out, [row])
        self.rows.append(row)
        ms = row.get("median_ms", "")
        value = f"{ms:.3f} ms" if isinstance(ms, float) else row.get("note", "")
        print(f"[{self.elapsed():7.1f} s] {row['shape']} {row['impl']} [{row.get('config', '')}]: {value}",
              flush=True)


def parse_shapes(text, dims):
    """``"8192x128256,32768x32000"`` -> [(8192, 128256), (32768, 32000)]; each has ``dims`` ints."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) != dims or not all(p.strip().isdigit() for p in parts):
            raise ValueError(
                f"--shapes must be a comma list of {dims} positive integers joined by 'x', got {item!r}"
            )
        shape = tuple(int(p) for p in parts)
        if min(shape) <= 0:
            raise ValueError(f"--shapes entries must be positive, got {item!r}")
        shapes.append(shape)
    if not shapes:
        raise ValueError("--shapes is empty")
    return shapes


def _percentile(sorted_values, q):
    """Linear-interpolation percentile (numpy's default) of an ascending list."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms):
    """(median, p10, p90) of a list of times in milliseconds."""
    if not times_ms:
        raise ValueError("summarize needs at least one time")
    values = sorted(times_ms)
    return statistics.median(values), _percentile(values, 0.1), _percentile(values, 0.9)


def append_rows(path, rows):
    """Append dict rows (keys from COLUMNS) to a CSV, writing the header when the file is new.

    A file whose header is not COLUMNS (an older layout) is refused rather than misaligned."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise ValueError(
                f"{path} has columns {header}, expected {COLUMNS}: write to a new file (--out)"
            )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})


def _fmt(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def conditions(torch, device="cuda"):
    """The columns every row of one run shares."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter smoke run, not a measurement)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": name,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
    }


def require_cuda():
    """Import torch and exit with status 2 and a clear message when no CUDA device is present."""
    try:
        import torch
    except ImportError:
        sys.exit("error: these GPU benchmarks need PyTorch with CUDA; torch is not installed")
    if not torch.cuda.is_available():
        print(
            "error: no CUDA device: the GPU benchmarks time CUDA kernels and cannot run here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        sys.exit(2)
    return torch


def setup_device(device, out_given):
    """torch, after checking that ``device`` can run: CUDA, or the CPU smoke mode (see above)."""
    if device == "cuda":
        return require_cuda()
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: --device cpu runs the Triton kernels through the interpreter: set TRITON_INTERPRET=1")
    if not out_given:
        sys.exit("error: --device cpu is a smoke run of the script; pass --out (never the results CSV)")
    import torch

    return torch


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def empty_cache(torch, device):
    if device == "cuda":
        torch.cuda.empty_cache()


def relative_error(value, reference):
    """||value - reference|| / ||reference|| in float64 (accumulated), NaN when absent."""
    if value is None or reference is None:
        return float("nan")
    diff = (value.double() - reference.double()).norm()
    return float(diff / reference.double().norm().clamp_min(1e-300))


def measure(torch, make_inputs, run, repeats, warmup, grads_of, device="cuda"):
    """Time ``run(*inputs)`` (forward+backward) with CUDA events.

    ``make_inputs()`` returns a fresh tuple of inputs for every call (outside the timed region);
    ``grads_of(inputs)`` lists the gradient tensors the call produced. Returns
    (times_ms, extra_bytes, last_result, last_grads); on the CPU (smoke mode) wall-clock times
    and NaN extra memory.
    """
    cuda = device == "cuda"
    times, extra, result, grads = [], 0 if cuda else float("nan"), None, None
    for i in range(warmup + repeats):
        inputs = make_inputs()
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        result = run(*inputs)
        if cuda:
            stop.record()
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        grads = grads_of(inputs)
        if i >= warmup:
            if cuda:
                grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
                extra = max(extra, torch.cuda.max_memory_allocated() - before - grad_bytes)
                times.append(start.elapsed_time(stop))
            else:
                times.append(elapsed_ms)
        if i < warmup + repeats - 1:
            del inputs, result, grads
            result = grads = None
    return times, extra, result, grads


def row(common, benchmark, shape, dtype, ignored, impl, times, extra_bytes, throughput, unit,
        loss_err, grad_err, grad2_err=float("nan"), note="", config=""):
    median, p10, p90 = summarize(times)
    return dict(
        common, benchmark=benchmark, shape="x".join(map(str, shape)), dtype=dtype,
        ignored_fraction=ignored, impl=impl, config=config, median_ms=median, p10_ms=p10, p90_ms=p90,
        repeats=len(times), extra_mib=extra_bytes / 2**20, throughput=throughput(median),
        throughput_unit=unit, loss_abs_err=loss_err, grad_rel_err=grad_err,
        grad2_rel_err=grad2_err, note=note,
    )


def failed_row(common, benchmark, shape, dtype, ignored, impl, error, config=""):
    return dict(
        common, benchmark=benchmark, shape="x".join(map(str, shape)), dtype=dtype,
        ignored_fraction=ignored, impl=impl, config=config, note=f"failed: {type(error).__name__}: {error}"[:300],
    )


def skipped_row(common, benchmark, shape, dtype, ignored, impl, config=""):
    return dict(
        common, benchmark=benchmark, shape="x".join(map(str, shape)), dtype=dtype,
        ignored_fraction=ignored, impl=impl, config=config, note="skipped: --max-minutes reached",
    )


def run_impls(torch, impls, args, rec, common, benchmark, shape, config_var, make_inputs, grads_of, measured):
    """Time every implementation of ``impls`` (``name -> fn(*inputs) -> loss``) forward+backward
    on ``make_inputs()``, crossent's once per config of ``args.config_list`` (set in environment
    variable ``config_var``), the peers once; add one row per run to ``rec``.

    ``measured(loss, grads)`` returns the row's ``(throughput, unit, loss_err, grad_err,
    grad2_err, note)``. A failing implementation or config gets a "failed" row and the others
    still run; past ``rec``'s time budget the rest get "skipped" rows.
    """
    for name, fn in impls.items():
        def run(*inputs, fn=fn):
            loss = fn(*inputs)
            loss.backward()
            return loss.detach()

        for config in (args.config_list if name.startswith("crossent") else [""]):
            if rec.over_budget():
                rec.add(skipped_row(common, benchmark, shape, args.dtype, args.ignored, name, config))
                continue
            loss = grads = None
            try:
                with config_env(config_var, config or DEFAULT_CONFIG):
                    times, extra, loss, grads = measure(torch, make_inputs, run, args.repeats, args.warmup,
                                                        grads_of, device=args.device)
                throughput, unit, loss_err, grad_err, grad2_err, note = measured(loss, grads)
                rec.add(row(common, benchmark, shape, args.dtype, args.ignored, name, times, extra,
                            throughput, unit, loss_err, grad_err, grad2_err, note=note, config=config))
            except Exception as e:  # one failing peer or config must not lose the others' numbers
                rec.add(failed_row(common, benchmark, shape, args.dtype, args.ignored, name, e, config=config))
            finally:
                loss = grads = None
                empty_cache(torch, args.device)


def add_common_args(parser, shapes, shapes_help, repeats, warmup, default_out):
    """The options both GPU benchmark scripts take (each adds its own config flag)."""
    parser.add_argument("--shapes", default=shapes, help=shapes_help)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ignored", type=float, default=0.1, help="fraction of ignored targets")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--impls", default="", help="comma list of implementations (default all)")
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="skip (and record as skipped) what is left after this many minutes; 0: no limit")
    parser.add_argument("--out", default=None, help=f"CSV to append to (default {default_out})")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: smoke run through TRITON_INTERPRET=1, needs --out (not a measurement)")


def select_impls(impls, text, extra=()):
    """The implementations named in ``text`` (comma list; an entry also matches a name that
    continues with "(", e.g. "crossent-triton-fast" matches "crossent-triton-fast(1536MiB)");
    all of them when ``text`` is empty. ``extra`` are names handled outside ``impls``. Raises
    ValueError naming the unknown entries and the known names."""
    wanted = [w.strip() for w in (text or "").split(",") if w.strip()]
    if not wanted:
        return dict(impls)

    def matches(name, w):
        return name == w or name.startswith(w + "(")

    unknown = [w for w in wanted if w not in extra and not any(matches(n, w) for n in impls)]
    if unknown:
        raise ValueError(f"--impls: unknown {unknown}; known: {sorted(impls) + sorted(extra)}")
    return {n: f for n, f in impls.items() if any(matches(n, w) for w in wanted)}


def print_table(rows):
    """Human-readable summary of this run's rows on stdout."""
    header = f"{'shape':>22} {'impl':>34} {'median ms':>10} {'p10':>8} {'p90':>8} {'extra MiB':>10} " \
             f"{'throughput':>16} {'loss err':>9} {'grad err':>9} {'grad2 err':>9}  config"
    print(header)
    for r in rows:
        if r.get("note", "").startswith(("failed", "skipped")):
            print(f"{r['shape']:>22} {r['impl']:>34}  {r['note']}  [{r.get('config', '')}]")
            continue

        def num(key, spec, r=r):
            v = r.get(key, "")
            return format(v, spec) if isinstance(v, float) and not math.isnan(v) else "-"

        print(
            f"{r['shape']:>22} {r['impl']:>34} {num('median_ms', '10.3f')} {num('p10_ms', '8.3f')} "
            f"{num('p90_ms', '8.3f')} {num('extra_mib', '10.1f')} "
            f"{num('throughput', '10.1f')} {r['throughput_unit']:>5} {num('loss_abs_err', '9.2e')} "
            f"{num('grad_rel_err', '9.2e')} {num('grad2_rel_err', '9.2e')}  {r.get('config', '')}"
        )
