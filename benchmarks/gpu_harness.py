"""Shared GPU benchmark harness: time, extra memory, errors, conditions, long-format CSV rows.

Used by bench_gpu_cross_entropy.py and bench_gpu_linear_cross_entropy.py. Every implementation
of one benchmark runs in the same process, on the same inputs, one after the other:

* time, two metrics, each as median, p10 and p90 in milliseconds over ``repeats`` samples taken
  after ``warmup`` calls (every call gets fresh inputs, made outside the timed region):

  - synced (``median_ms``): CUDA events around one forward+backward call started on an idle GPU.
    It includes the host's Python and launch time before the first kernel reaches the GPU and
    any gap in which the GPU waits for the host: what a caller who synchronizes after each call
    sees.
  - queued (``gpu_median_ms``): the same events, but behind a GPU busy-wait
    (``torch.cuda._sleep``) that lasts until the host has enqueued the whole call, checked on
    every sample; start..stop then holds the call's GPU work only, as in a training loop whose
    host runs ahead of the GPU. A call that makes the host wait for the GPU (a host sync inside)
    cannot be timed this way: its queued columns are empty and the note says why.

  ``throughput`` is computed from the synced median;
* extra memory: ``torch.cuda.max_memory_allocated()`` during the call minus what was allocated
  before it, minus the gradient buffers the call leaves behind (``.grad`` of the inputs): what the
  implementation needs beyond its inputs and outputs;
* errors: relative L2 error ``||g - g_ref|| / ||g_ref||`` of each gradient and absolute error of
  the loss against a float32 reference computed once per shape;
* conditions: device name, crossent revision (``crossent_revision``), torch / triton /
  liger-kernel / cut-cross-entropy versions, UTC date.

Configuration sweeps: ``--tiles`` (linear) / ``--configs`` (CE) take a ``;``-separated list of
crossent kernel configurations, or ``default-sweep`` for the candidate lists below; every crossent
implementation runs once per configuration (set through the ``CROSSENT_TRITON_LINEAR_TILES`` /
``CROSSENT_TRITON_CE_CONFIG`` environment variables, read by crossent at every call), the peers
once; each row names its configuration in the ``config`` column and the script prints the fastest
configuration per shape with its ratio to the target, for each of the two time metrics.

The pure-Python helpers (``parse_shapes``, ``parse_configs``, ``summarize``, ``append_rows``,
``best_configs``, ``crossent_revision``) are tested on the CPU in tests/triton/test_triton_bench_harness.py.
``--device cpu`` (with TRITON_INTERPRET=1 and an explicit ``--out``) runs a script end to end on
tiny shapes through Triton's interpreter: a smoke test of the script, never a measurement (its
rows say so, and carry no memory figures and no queued GPU time).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import importlib.metadata
import math
import os
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

COLUMNS = [
    "date", "crossent_rev", "device", "torch", "triton", "liger_kernel", "cut_cross_entropy", "benchmark",
    "shape", "dtype", "ignored_fraction", "impl", "config", "median_ms", "p10_ms", "p90_ms",
    "gpu_median_ms", "gpu_p10_ms", "gpu_p90_ms", "repeats",
    "extra_mib", "throughput", "throughput_unit", "loss_abs_err", "grad_rel_err",
    "grad2_rel_err", "note",
]

#: Columns a CSV must have for ``append_rows`` to add rows to it (under the union of its columns
#: and COLUMNS): without them it is not a file of these benchmarks.
KEY_COLUMNS = ("date", "benchmark", "shape", "impl", "median_ms")

#: The two time metrics: median column, label in printed summaries.
METRICS = (("median_ms", "ms (synced)"), ("gpu_median_ms", "GPU ms (queued)"))

#: Queued timing (see ``measure``): the busy-wait's length in cycles is computed from a host time
#: at this assumed GPU clock (2 GHz, about an H100's boost clock); only the first guess depends on
#: it, since every sample checks that its sleep lasted long enough.
SLEEP_HZ = 2e9
#: The sleep lasts ``SLEEP_FACTOR`` times the host time of the previous call, at least
#: ``MIN_SLEEP_S``; a sample whose sleep ended too early is redone with twice the cycles, at most
#: ``SLEEP_DOUBLINGS`` times, then recorded as not measured.
SLEEP_FACTOR = 3.0
MIN_SLEEP_S = 1e-3
SLEEP_DOUBLINGS = 6


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
    "tma=1",  # E and W through TMA descriptors in the forward kernel (not measured)
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

#: CROSSENT_TRITON_LINEAR_TILES values for the elementwise kernels of the lean default (cuBLAS
#: products): the stats kernel (stats_m x stats_v steps, stats_warps) and the gradient tile
#: (grad_m x grad_v, grad_warps). On the H100 profile at Gemma-2 they moved the logits at 1.35 and
#: 1.55 TB/s of the ~3 TB/s the copy reaches (8.5 of 60.9 ms). sm90_config_report.py (ptxas,
#: sm_90) shows why the defaults may be slow: both are memory-bound, yet hold 64 elements per
#: thread, so the stats kernel needs 236 registers under Triton 3.6 (244 under 3.9: 2 CTAs of 4
#: warps, 8 warps per SM) and the gradient tile 230 (177: 1 CTA of 8 warps). The entries below
#: keep fewer elements per thread for more warps per SM (none spills; register counts below are
#: Triton 3.9's, benchmarks/sm90_config_report.md has both). Not measured on a GPU yet: run them
#: with --tiles.
ELEMENTWISE_SWEEP = [
    DEFAULT_CONFIG,  # stats 16x512, 4 warps: 244 regs, 8 warps/SM; gradient 128x128, 8 warps: 177 regs, 8 warps/SM
    # Where the lean chunks live (same kernels and tiles), second so that a run cut short still
    # has it: the schedule measured until 2026-11-22 (forward and backward chunks in 56 MiB: 72 +
    # 65 steps at Gemma-2), against the default's wider forward chunks and backward chunks in the
    # unwritten part of dW (40 + 15 steps).
    "wide_forward=0,scratch_dw=0",
    # Each of the two schedule changes of 2026-11-22 (late) alone.
    "wide_forward=0",
    "scratch_dw=0",
    "stats_m=8,stats_warps=8",  # 8x512: 78 regs, 3 CTAs = 24 warps/SM, 1024 programs per chunk
    "stats_m=4",  # 4x512, 4 warps: 78 regs, 6 CTAs = 24 warps/SM, 2048 programs
    "stats_v=256",  # 16x256, 4 warps: 128 regs, 4 CTAs = 16 warps/SM
    "grad_m=32,grad_v=128,grad_warps=4",  # 84 regs, 5 CTAs = 20 warps/SM, 7168 programs per chunk
    "grad_m=64,grad_v=128",  # 8 warps: 112 regs, 2 CTAs = 16 warps/SM
    "stats_m=8,stats_warps=8,grad_m=32,grad_v=128,grad_warps=4",  # both
    # Not elementwise: the fused Triton forward (logits tiles reduced in registers, ignored row
    # blocks skipped on the device) before the same cuBLAS backward, against cuBLAS logits + the
    # stats kernel (15.7 ms of the last Gemma-2 profile; the fused kernel took 16.8 ms on every row).
    # Last: the schedules never run on a GPU yet (a sticky CUDA error there would spoil every
    # row after it in the process, so the proven kernels' rows come first).
    "products=2",
    # ... and the backward's logits recomputed by the Triton gradient-tile kernel, G formed in its
    # registers (no elementwise pass over the logits), dE and dW by cuBLAS.
    "products=3",
    # The same two with the fused forward reading E and W through TMA descriptors (E gathered in
    # the compacted order first): sm_90 compiles it with wgmma and bulk tensor copies.
    "products=2,tma=1",
    "products=3,tma=1",
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
    """Lines naming, per shape, crossent implementation and time metric (``METRICS``: synced, then
    queued), the fastest config and its ratio to the same metric's median of ``reference_impl``
    (a row whose impl starts with that text) in the same shape; ``target_ratio`` is the ratio the
    target allows, ``what`` names the reference. A metric no row of an implementation has (the
    queued one in the CPU smoke mode) gives no line."""
    lines = []
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for shape in shapes:
        here = [r for r in rows if r["shape"] == shape]
        for impl in dict.fromkeys(r["impl"] for r in here if r["impl"].startswith("crossent")):
            for key, label in METRICS:
                mine = [r for r in here if _timed(r, key)]
                ref = [r for r in mine if r["impl"].startswith(reference_impl)]
                cand = sorted((r for r in mine if r["impl"] == impl), key=lambda r, key=key: r[key])
                if not cand:
                    continue
                best = cand[0]
                line = f"{shape} {impl}, {label}: fastest config {best['config']!r} {best[key]:.3f} ms"
                default = [r for r in cand if r["config"] == DEFAULT_CONFIG]
                if default and best is not default[0]:
                    line += f" (default {default[0][key]:.3f} ms)"
                if ref:
                    ratio = best[key] / ref[0][key]
                    verdict = "meets" if ratio <= target_ratio else "misses"
                    line += (f" = {ratio:.2f}x {what} ({ref[0][key]:.3f} ms; target <= {target_ratio}x: "
                             f"{verdict})")
                lines.append(line)
    return lines


def _timed(r, key="median_ms"):
    v = r.get(key, "")
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
        if _timed(row):
            value = f"{row['median_ms']:.3f} ms synced"
            value += f", {row['gpu_median_ms']:.3f} ms GPU queued" if _timed(row, "gpu_median_ms") else ""
        else:
            value = row.get("note", "")
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


def summarize_measured(times_ms):
    """``summarize`` of the times that are not NaN (samples not measured); NaNs when none is."""
    valid = [t for t in times_ms if not math.isnan(t)]
    return summarize(valid) if valid else (float("nan"),) * 3


def append_rows(path, rows):
    """Append dict rows (keys from COLUMNS) to a CSV, writing the header when the file is new.

    A file written under an older layout (a header without some of COLUMNS, e.g. before the
    queued-time columns) is first rewritten under the union of its columns and COLUMNS: its rows
    keep every value under the same column name and get empty cells in the columns they lack. A
    file without ``KEY_COLUMNS`` is not a file of these benchmarks and is refused."""
    fields = COLUMNS
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in KEY_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path} has columns {header}, without {missing}: not a GPU benchmark CSV, "
                "write to a new file (--out)"
            )
        fields = COLUMNS + [c for c in header if c not in COLUMNS]
        if header != fields:
            _rewrite_with_columns(path, fields)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in fields})


def _rewrite_with_columns(path, fields):
    """Rewrite the CSV at ``path`` under header ``fields`` (its old columns among them), through a
    temporary file renamed over it, so that an interrupted rewrite leaves the old file whole."""
    with open(path, newline="") as f:
        old = list(csv.DictReader(f))
    tmp = f"{path}.rewrite-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="raise")
        writer.writeheader()
        writer.writerows(old)
    os.replace(tmp, path)


def _fmt(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


#: The crossent checkout these scripts belong to.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Written by benchmarks/fetch_gpu_wheels.sh next to the wheels, so that it travels to the GPU
#: machine with the carried .whl/ (the working tree goes there, .git does not). Two lines:
#: "revision <crossent_revision()>" and "code_sha256 <code_fingerprint()>", both taken when it ran.
REVISION_FILE = os.path.join(".whl", "REVISION")
#: The revision to report when neither git nor REVISION_FILE can tell it.
REVISION_ENV = "CROSSENT_REV"
#: What counts as crossent's code for the "+dirty" mark: these files under these folders (results,
#: reports and notes are outputs of the code, not part of it).
CODE_DIRS, CODE_SUFFIXES = ("src", "benchmarks"), (".py", ".sh")


def crossent_revision(root=ROOT):
    """The crossent code a benchmark runs: the short commit hash, with "+dirty" when the code files
    (``CODE_SUFFIXES`` under ``CODE_DIRS``) differ from that commit, e.g. ``"eba41d2+dirty"``.

    Taken from, in order: git, when ``root`` has a .git; ``REVISION_FILE``, with "+dirty" added when
    the code files' fingerprint now differs from the one recorded there (code edited since
    fetch_gpu_wheels.sh wrote it); environment variable ``REVISION_ENV``; else "unknown".
    """
    revision = _git_revision(root)
    if revision:
        return revision
    try:
        with open(os.path.join(root, REVISION_FILE)) as f:
            recorded = dict(line.split(None, 1) for line in f.read().splitlines() if line.strip())
    except (OSError, ValueError):
        recorded = {}
    revision = recorded.get("revision", "").strip()
    if revision:
        if recorded.get("code_sha256", "").strip() != code_fingerprint(root) and not revision.endswith("+dirty"):
            revision += "+dirty"
        return revision
    return os.environ.get(REVISION_ENV, "").strip() or "unknown"


def _git_revision(root):
    """``crossent_revision`` from git, or None without a .git in ``root`` or a working git."""
    if not os.path.exists(os.path.join(root, ".git")):
        return None

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    specs = [f"{d}/*{suffix}" for d in CODE_DIRS for suffix in CODE_SUFFIXES]  # "*" matches "/" too
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        # untracked code files count too: the device tool carries them with the working tree
        changed = git("status", "--porcelain", "--untracked-files=all", "--", *specs).strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if changed else "")


def code_fingerprint(root=ROOT):
    """sha256 of the code files (``CODE_SUFFIXES`` under ``CODE_DIRS`` of ``root``), names and
    contents, in a fixed order: equal on two machines when the code they hold is."""
    digest = hashlib.sha256()
    paths = []
    for top in CODE_DIRS:
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            paths += [os.path.join(folder, f) for f in files if f.endswith(CODE_SUFFIXES)]
    for path in sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in paths):
        with open(os.path.join(root, path), "rb") as f:
            digest.update(path.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


def revision_record(root=ROOT):
    """The text of ``REVISION_FILE`` for the code in ``root`` now (see ``crossent_revision``)."""
    return f"revision {crossent_revision(root)}\ncode_sha256 {code_fingerprint(root)}\n"


def conditions(torch, device="cuda"):
    """The columns every row of one run shares."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter smoke run, not a measurement)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "crossent_rev": crossent_revision(),
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


def new_grad_bytes(torch, grads, inputs):
    """Bytes of the gradient buffers the call allocated: the gradients, less those that live in
    an input's own storage (``inplace_backward=True``, Liger's CE), which are not new memory and
    must not be subtracted from the peak (that made the extra memory negative, clamped to 0)."""
    owned = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    return sum(g.numel() * g.element_size() for g in grads
               if g is not None and g.untyped_storage().data_ptr() not in owned)


class Measurement(NamedTuple):
    """What ``measure`` returns."""

    times_ms: list  # synced time of each timed repeat
    gpu_times_ms: list  # queued GPU time of each timed repeat; NaN where not measured
    extra_bytes: float  # peak extra memory over the synced repeats; NaN on the CPU
    result: object  # run()'s return value of the last call
    grads: list  # grads_of(inputs) of the last call
    note: str  # why queued samples are missing on CUDA, else ""


def measure(torch, make_inputs, run, repeats, warmup, grads_of, device="cuda", queued=True, queued_run=None):
    """Time ``run(*inputs)`` (forward+backward) with CUDA events, synced and queued.

    ``make_inputs()`` returns a fresh tuple of inputs for every call (outside the timed region);
    ``grads_of(inputs)`` lists the gradient tensors the call produced. ``warmup`` untimed calls,
    then per repeat two calls on fresh inputs:

    * synced: synchronize, then events around the call. The time includes the host's work
      before the first kernel reaches the idle GPU and every GPU wait for the host. The extra
      memory is measured on these calls.
    * queued (``queued=True`` on CUDA): synchronize, enqueue a GPU busy-wait
      (``torch.cuda._sleep``), an event ``after_sleep``, then events around the call; before
      synchronizing, ``after_sleep.query()`` must be False: the GPU was still asleep when the
      host had enqueued all of the call's work, so start..stop is GPU time alone. The sleep
      lasts ``SLEEP_FACTOR`` times the previous call's host time (at least ``MIN_SLEEP_S``, at
      ``SLEEP_HZ``); a sample whose sleep ended too early is redone with twice the cycles,
      ``SLEEP_DOUBLINGS`` times at most, and the later samples keep the doubled factor. When
      that fails, or the host waited as long as the sleep twice in a row (a call that
      synchronizes inside, which no sleep covers), the sample and the repeats after it are NaN
      and ``note`` says why. ``queued_run`` (default ``run``) is what the queued samples call:
      the same GPU work without a host wait that no sleep can cover (see
      bench_gpu_linear_cross_entropy.py).

    Returns a ``Measurement``; on the CPU (smoke mode) wall-clock synced times, NaN queued times
    and NaN extra memory.
    """
    cuda = device == "cuda"
    queued = queued and cuda
    times, gpu_times, extra = [], [], 0 if cuda else float("nan")
    inputs = result = grads = timer = None
    for i in range(warmup + repeats):
        inputs = result = grads = None  # free the previous call's buffers before making new ones
        inputs = make_inputs()
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        result = run(*inputs)
        host_s = time.perf_counter() - t0  # on CUDA: the host's enqueue time (idle GPU at start)
        if cuda:
            stop.record()
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        grads = grads_of(inputs)
        if i < warmup:
            continue
        if cuda:
            grad_bytes = new_grad_bytes(torch, grads, inputs)
            extra = max(extra, torch.cuda.max_memory_allocated() - before - grad_bytes)
            times.append(start.elapsed_time(stop))
        else:
            times.append(elapsed_ms)
        if not queued:
            gpu_times.append(float("nan"))
            continue
        if timer is None:
            timer = _QueuedTimer(torch, host_s)
        if timer.reason:  # it failed on an earlier sample and would fail the same way
            gpu_times.append(float("nan"))
            continue
        inputs = result = grads = None
        gpu_ms, result, grads = timer.sample(make_inputs, queued_run or run, grads_of)
        gpu_times.append(gpu_ms)
    note = ""
    if timer is not None and timer.reason:
        missing = sum(math.isnan(t) for t in gpu_times)
        note = f"queued GPU time: {missing} of {len(gpu_times)} samples not measured: {timer.reason}"
    return Measurement(times, gpu_times, extra, result, grads, note)


class _QueuedTimer:
    """Queued samples of one ``run`` (see ``measure``). Keeps the sleep's length factor from
    sample to sample (doubled for good when a sleep was too short), and ``reason`` once a sample
    could not be measured."""

    def __init__(self, torch, host_s):
        self.torch, self.host_s, self.factor, self.reason = torch, host_s, SLEEP_FACTOR, ""

    def sample(self, make_inputs, run, grads_of):
        """``(ms, result, grads)`` of one queued sample; ms is NaN when none could be measured."""
        cuda = self.torch.cuda
        cycles = int(max(MIN_SLEEP_S, self.factor * self.host_s) * SLEEP_HZ)
        host_waited = False
        for attempt in range(SLEEP_DOUBLINGS + 1):
            if attempt:
                cycles, self.factor = 2 * cycles, 2 * self.factor
            inputs = result = grads = None
            inputs = make_inputs()
            cuda.synchronize()
            after_sleep = cuda.Event()
            start, stop = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            cuda._sleep(cycles)
            after_sleep.record()
            start.record()
            t0 = time.perf_counter()
            result = run(*inputs)
            host_s = time.perf_counter() - t0
            stop.record()
            covered = not after_sleep.query()  # still asleep: all of run() is queued behind it
            cuda.synchronize()
            grads = grads_of(inputs)
            if covered:
                self.host_s = host_s
                return start.elapsed_time(stop), result, grads
            sleep_s = cycles / SLEEP_HZ
            if host_s >= sleep_s and host_waited:
                self.reason = (f"run() kept the host busy as long as the sleep twice in a row ({sleep_s * 1e3:.1f} "
                               "ms nominal): it waits for the GPU (a host sync inside, or a full launch queue)")
                return float("nan"), result, grads
            host_waited = host_s >= sleep_s
        self.reason = (f"the sleep was over before run() had been enqueued even at {cycles:.3g} cycles "
                       f"({cycles / SLEEP_HZ * 1e3:.1f} ms nominal)")
        return float("nan"), result, grads


def row(common, benchmark, shape, dtype, ignored, impl, times, extra_bytes, throughput, unit,
        loss_err, grad_err, grad2_err=float("nan"), note="", config="", gpu_times=()):
    """One CSV row: the synced ``times`` and queued ``gpu_times`` (ms; NaN or absent where not
    measured) summarized, throughput from the synced median."""
    median, p10, p90 = summarize(times)
    gpu_median, gpu_p10, gpu_p90 = summarize_measured(gpu_times)
    return dict(
        common, benchmark=benchmark, shape="x".join(map(str, shape)), dtype=dtype,
        ignored_fraction=ignored, impl=impl, config=config, median_ms=median, p10_ms=p10, p90_ms=p90,
        gpu_median_ms=gpu_median, gpu_p10_ms=gpu_p10, gpu_p90_ms=gpu_p90,
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


def run_impls(torch, impls, args, rec, common, benchmark, shape, config_var, make_inputs, grads_of, measured,
              queued_contexts=None):
    """Time every implementation of ``impls`` (``name -> fn(*inputs) -> loss``) forward+backward
    on ``make_inputs()``, crossent's once per config of ``args.config_list`` (set in environment
    variable ``config_var``), the peers once; add one row per run to ``rec``.

    ``measured(loss, grads)`` returns the row's ``(throughput, unit, loss_err, grad_err,
    grad2_err, note)``. A failing implementation or config gets a "failed" row and the others
    still run; past ``rec``'s time budget the rest get "skipped" rows. ``queued_contexts``: name ->
    (context manager factory, note): the queued samples of that implementation run inside it
    (``measure``'s ``queued_run``) and its rows carry the note.
    """
    queued_contexts = queued_contexts or {}
    for name, fn in impls.items():
        def run(*inputs, fn=fn):
            loss = fn(*inputs)
            loss.backward()
            return loss.detach()

        queued_run, queued_note = None, ""
        if name in queued_contexts:
            context, queued_note = queued_contexts[name]

            def queued_run(*inputs, run=run, context=context):
                with context():
                    return run(*inputs)

        for config in (args.config_list if name.startswith("crossent") else [""]):
            if rec.over_budget():
                rec.add(skipped_row(common, benchmark, shape, args.dtype, args.ignored, name, config))
                continue
            loss = grads = None
            try:
                with config_env(config_var, config or DEFAULT_CONFIG):
                    m = measure(torch, make_inputs, run, args.repeats, args.warmup, grads_of,
                                device=args.device, queued=args.queued, queued_run=queued_run)
                loss, grads = m.result, m.grads
                throughput, unit, loss_err, grad_err, grad2_err, note = measured(loss, grads)
                if queued_note and any(not math.isnan(t) for t in m.gpu_times_ms):
                    note = join_notes(note, queued_note)
                rec.add(row(common, benchmark, shape, args.dtype, args.ignored, name, m.times_ms, m.extra_bytes,
                            throughput, unit, loss_err, grad_err, grad2_err, note=join_notes(note, m.note),
                            config=config, gpu_times=m.gpu_times_ms))
            except Exception as e:  # one failing peer or config must not lose the others' numbers
                rec.add(failed_row(common, benchmark, shape, args.dtype, args.ignored, name, e, config=config))
            finally:
                m = loss = grads = None
                empty_cache(torch, args.device)


def join_notes(*notes):
    """The non-empty notes joined with "; "."""
    return "; ".join(n for n in notes if n)


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
    parser.add_argument("--no-queued", dest="queued", action="store_false",
                        help="time the synced calls only (no queued GPU time: half the timed calls)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: smoke run through TRITON_INTERPRET=1, needs --out (not a measurement)")


def select_impls(impls, text, extra=()):
    """The implementations named in ``text`` (comma list; an entry also matches a name that
    continues with "(", e.g. "crossent-triton-fast" matches "crossent-triton-fast(1000MiB)");
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
    """Human-readable summary of this run's rows on stdout: both time metrics (median, p10, p90)."""
    header = f"{'shape':>22} {'impl':>34} {'ms (synced)':>11} {'p10':>8} {'p90':>8} {'GPU ms (queued)':>15} " \
             f"{'p10':>8} {'p90':>8} {'extra MiB':>10} {'throughput':>16} {'loss err':>9} {'grad err':>9} " \
             f"{'grad2 err':>9}  config"
    print(header)
    for r in rows:
        if r.get("note", "").startswith(("failed", "skipped")):
            print(f"{r['shape']:>22} {r['impl']:>34}  {r['note']}  [{r.get('config', '')}]")
            continue

        def num(key, spec, r=r):
            v = r.get(key, "")
            return format(v, spec) if isinstance(v, float) and not math.isnan(v) else "-".rjust(int(spec.split(".")[0]))

        print(
            f"{r['shape']:>22} {r['impl']:>34} {num('median_ms', '11.3f')} {num('p10_ms', '8.3f')} "
            f"{num('p90_ms', '8.3f')} {num('gpu_median_ms', '15.3f')} {num('gpu_p10_ms', '8.3f')} "
            f"{num('gpu_p90_ms', '8.3f')} {num('extra_mib', '10.1f')} "
            f"{num('throughput', '10.1f')} {r['throughput_unit']:>5} {num('loss_abs_err', '9.2e')} "
            f"{num('grad_rel_err', '9.2e')} {num('grad2_rel_err', '9.2e')}  {r.get('config', '')}"
        )


if __name__ == "__main__":
    # For the shell scripts: benchmarks/gpu_session.sh writes the revision into env.txt,
    # benchmarks/fetch_gpu_wheels.sh writes the record into REVISION_FILE.
    import argparse

    parser = argparse.ArgumentParser(
        description="Print crossent's revision (see crossent_revision), or merge a device run's CSV "
        "into a results CSV by column name (append_rows: a plain `tail >>` shifts the columns "
        "when the two headers differ)."
    )
    parser.add_argument("what", choices=["revision", "record", "merge"],
                        help=f"revision: the revision; record: the text of {REVISION_FILE}; "
                        "merge SRC DEST: append SRC's rows to DEST")
    parser.add_argument("paths", nargs="*", help="merge: SRC DEST")
    args = parser.parse_args()
    if args.what == "revision":
        print(crossent_revision())
    elif args.what == "record":
        sys.stdout.write(revision_record())
    else:
        if len(args.paths) != 2:
            parser.error("merge takes SRC DEST")
        src, dest = args.paths
        with open(src, newline="") as f:
            reader = csv.DictReader(f)
            rows = []
            for row in reader:  # a row cut short (a run killed mid-write) or with extra cells
                if None in row or None in row.values():
                    parser.error(f"{src}, line {reader.line_num}: {len(reader.fieldnames)} cells expected, "
                                 f"got a row with {'more' if None in row else 'fewer'}")
                rows.append(row)
        unknown = sorted({k for row in rows for k in row} - set(COLUMNS))
        if unknown:
            parser.error(f"{src} has columns that are not gpu_harness.COLUMNS: {unknown}")
        append_rows(dest, rows)
        print(f"{len(rows)} rows of {src} appended to {dest}")
