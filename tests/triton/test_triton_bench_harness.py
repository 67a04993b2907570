"""CPU checks of the GPU benchmark harness's pure-Python parts, and of its no-GPU exit."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def load_harness():
    spec = importlib.util.spec_from_file_location("gpu_harness", os.path.join(BENCH, "gpu_harness.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_shapes():
    h = load_harness()
    assert h.parse_shapes("8192x128256, 32768X32000", 2) == [(8192, 128256), (32768, 32000)]
    assert h.parse_shapes("8192x2304x256000", 3) == [(8192, 2304, 256000)]
    for bad in ("8192x", "8192x2304", "0x5", "axb", ""):
        with pytest.raises(ValueError, match="shapes"):
            h.parse_shapes(bad, 2 if bad != "8192x2304" else 3)


def test_summarize_matches_numpy_percentiles():
    h = load_harness()
    times = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0, 7.0]
    median, p10, p90 = h.summarize(times)
    assert median == np.median(times)
    assert p10 == pytest.approx(np.percentile(times, 10))
    assert p90 == pytest.approx(np.percentile(times, 90))


def test_measure_on_the_cpu_has_no_queued_time(tmp_path):
    """CPU smoke mode: wall-clock synced times, NaN queued times and memory; the row's queued
    columns are NaN and the CSV's cells empty."""
    torch = pytest.importorskip("torch")
    h = load_harness()
    made = []

    def make_inputs():
        made.append(torch.ones(3, requires_grad=True))
        return (made[-1],)

    def run(x):
        loss = (x * x).sum()
        loss.backward()
        return loss.detach()

    m = h.measure(torch, make_inputs, run, 3, 1, lambda inputs: [inputs[0].grad], device="cpu")
    assert len(made) == 4  # warmup + repeats: no queued calls on the CPU
    assert len(m.times_ms) == 3 and all(t > 0 for t in m.times_ms)
    assert len(m.gpu_times_ms) == 3 and all(np.isnan(m.gpu_times_ms))
    assert np.isnan(m.extra_bytes) and m.note == ""
    assert float(m.result) == 3.0 and m.grads[0].tolist() == [2.0, 2.0, 2.0]
    r = h.row({}, "b", (3,), "float32", 0.0, "impl", m.times_ms, m.extra_bytes, lambda ms: 1.0, "GB/s", 0.0, 0.0,
              gpu_times=m.gpu_times_ms)
    assert all(np.isnan(r[c]) for c in ("gpu_median_ms", "gpu_p10_ms", "gpu_p90_ms"))
    assert r["median_ms"] == np.median(m.times_ms)
    path = tmp_path / "cpu.csv"
    h.append_rows(str(path), [r])
    with open(path, newline="") as f:
        (written,) = csv.DictReader(f)
    assert written["gpu_median_ms"] == written["gpu_p90_ms"] == "" and float(written["median_ms"]) > 0


class FakeGPU:
    """A stand-in for torch.cuda and time.perf_counter: a sleep of ``cover`` cycles or more is
    still running when run() returns (unless run() waits for the GPU, ``syncs``); the events give
    2.0 ms synced and 1.5 ms behind a sleep; run() takes ``host_s`` of host time."""

    def __init__(self, cover, host_s=5e-4, syncs=False):
        self.cover, self.host_s, self.syncs = cover, host_s, syncs
        self.slept, self.pending, self.now = [], False, 0.0
        self.cuda = self  # the fake torch is its own .cuda
        self.calls = 0

    def perf_counter(self):
        return self.now

    def run(self):
        self.calls += 1
        self.now += self.host_s + (self.slept[-1] / 2e9 if self.syncs and self.pending else 0.0)
        return self.calls

    def synchronize(self):
        self.pending = False

    def _sleep(self, cycles):
        self.slept.append(cycles)
        self.pending = True

    def memory_allocated(self):
        return 0

    max_memory_allocated = memory_allocated

    def reset_peak_memory_stats(self):
        pass

    def Event(self, enable_timing=False):  # noqa: N802 (torch.cuda's name)
        gpu = self

        class Event:
            def record(self):
                self.queued = gpu.pending

            def query(self):  # the sleep (recorded just before) is over
                return gpu.syncs or gpu.slept[-1] < gpu.cover

            def elapsed_time(self, stop):
                return 1.5 if self.queued else 2.0

        return Event()


def fake_measure(monkeypatch, gpu, repeats=3, warmup=1, queued=True):
    h = load_harness()
    monkeypatch.setattr(h, "time", gpu)
    return h, h.measure(gpu, tuple, gpu.run, repeats, warmup, lambda inputs: [], queued=queued)


def test_measure_queued_doubles_a_short_sleep_and_keeps_the_longer_one(monkeypatch):
    # Host time 0.5 ms: the first sleep is max(1 ms, 3 x 0.5 ms) = 1.5 ms = 3e6 cycles at 2 GHz.
    gpu = FakeGPU(cover=10_000_000)
    h, m = fake_measure(monkeypatch, gpu)
    assert gpu.slept == [3_000_000, 6_000_000, 12_000_000, 12_000_000, 12_000_000]
    assert gpu.calls == 1 + 3 + 5  # warmup, synced repeats, queued attempts (fresh inputs each)
    assert m.times_ms == [2.0] * 3 and m.gpu_times_ms == [1.5] * 3 and m.note == ""
    assert m.result == gpu.calls  # the last call's result
    r = h.row({}, "b", (1,), "bf16", 0.0, "i", m.times_ms, 0, lambda ms: 1.0, "GB/s", 0.0, 0.0,
              gpu_times=m.gpu_times_ms)
    assert (r["median_ms"], r["gpu_median_ms"], r["gpu_p10_ms"], r["gpu_p90_ms"]) == (2.0, 1.5, 1.5, 1.5)


def test_measure_queued_gives_up_after_the_doublings(monkeypatch):
    gpu = FakeGPU(cover=float("inf"))
    h, m = fake_measure(monkeypatch, gpu)
    assert gpu.slept == [3_000_000 * 2**k for k in range(h.SLEEP_DOUBLINGS + 1)]  # then no more tries
    assert m.times_ms == [2.0] * 3 and all(np.isnan(m.gpu_times_ms))
    assert m.note.startswith("queued GPU time: 3 of 3 samples not measured: the sleep was over before run() "
                             "had been enqueued even at 1.92e+08 cycles (96.0 ms nominal)")


def test_measure_queued_detects_a_call_that_waits_for_the_gpu(monkeypatch):
    gpu = FakeGPU(cover=0, syncs=True)
    h, m = fake_measure(monkeypatch, gpu, repeats=2)
    assert gpu.slept == [3_000_000, 6_000_000]  # the host waited out both sleeps: no more doublings
    assert all(np.isnan(m.gpu_times_ms)) and m.times_ms == [2.0, 2.0]
    assert m.note.startswith("queued GPU time: 2 of 2 samples not measured: run() kept the host busy as long as "
                             "the sleep twice in a row (3.0 ms nominal): it waits for the GPU")


def test_measure_queued_off_runs_the_synced_calls_only(monkeypatch):
    gpu = FakeGPU(cover=0)
    h, m = fake_measure(monkeypatch, gpu, queued=False)
    assert gpu.slept == [] and gpu.calls == 4
    assert m.times_ms == [2.0] * 3 and all(np.isnan(m.gpu_times_ms)) and m.note == ""


def test_append_rows_writes_header_once(tmp_path):
    h = load_harness()
    path = tmp_path / "results" / "gpu_test.csv"
    common = {"date": "2026-01-01T00:00:00Z", "device": "dev", "torch": "t", "triton": "tr",
              "liger_kernel": "-", "cut_cross_entropy": "-"}
    r = h.row(common, "bench", (4, 5), "bfloat16", 0.1, "impl-a", [2.0, 1.0, 3.0], 3 * 2**20,
              lambda ms: 40.0 / ms, "GB/s", 1e-7, 2e-3)
    h.append_rows(str(path), [r])
    h.append_rows(str(path), [h.failed_row(common, "bench", (4, 5), "bfloat16", 0.1, "impl-b",
                                           RuntimeError("out of memory"))])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == h.COLUMNS
    assert [r["impl"] for r in rows] == ["impl-a", "impl-b"]
    assert rows[0]["shape"] == "4x5" and float(rows[0]["median_ms"]) == 2.0
    assert float(rows[0]["extra_mib"]) == 3.0 and float(rows[0]["throughput"]) == 20.0
    assert rows[1]["median_ms"] == "" and rows[1]["note"].startswith("failed: RuntimeError")


def test_append_rows_refuses_a_csv_of_another_benchmark(tmp_path):
    h = load_harness()
    path = tmp_path / "other.csv"
    path.write_text("date,device,impl\n2026,dev,x\n")
    with pytest.raises(ValueError, match=r"without \['benchmark', 'shape', 'median_ms'\]: not a GPU benchmark"):
        h.append_rows(str(path), [])
    assert path.read_text() == "date,device,impl\n2026,dev,x\n"


def test_append_rows_rewrites_an_older_header_under_the_union(tmp_path):
    """A results CSV from before the queued-time columns (and with a column COLUMNS no longer
    has) gets the union of columns; its rows keep their values, with empty new cells."""
    h = load_harness()
    new_cols = ["gpu_median_ms", "gpu_p10_ms", "gpu_p90_ms"]
    old_cols = [c for c in h.COLUMNS if c not in new_cols] + ["retired"]
    path = tmp_path / "gpu_old.csv"
    old_row = {c: f"{c}-value" for c in old_cols}
    old_row.update(impl="bare-matmuls (E W^T, G W, G^T E)", median_ms="39.6105", note='a "quoted", note')
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_cols)
        writer.writeheader()
        writer.writerow(old_row)
    common = {"date": "d", "device": "dev", "torch": "t", "triton": "tr", "liger_kernel": "-",
              "cut_cross_entropy": "-"}
    fresh = h.row(common, "bench", (4, 5), "bfloat16", 0.1, "impl-a", [2.0], 0, lambda ms: 1.0, "GB/s",
                  0.0, 0.0, gpu_times=[1.5])
    h.append_rows(str(path), [fresh])
    h.append_rows(str(path), [fresh])  # the header is the union now: appended, not rewritten
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == h.COLUMNS + ["retired"]
    assert len(rows) == 3
    assert {c: rows[0][c] for c in old_cols} == old_row
    assert all(rows[0][c] == "" for c in new_cols)
    for r in rows[1:]:
        assert r["retired"] == "" and float(r["median_ms"]) == 2.0 and float(r["gpu_median_ms"]) == 1.5
    assert not [p.name for p in tmp_path.iterdir() if p.name != "gpu_old.csv"]  # no temporary left


def test_parse_configs():
    h = load_harness()
    assert h.parse_configs("", "--tiles", ["a"]) == ["default"]
    assert h.parse_configs("default-sweep", "--tiles", h.LINEAR_SWEEP) == h.LINEAR_SWEEP
    assert h.parse_configs(" default ; 128,128,64,128,8,4 ;", "--tiles", []) == ["default", "128,128,64,128,8,4"]
    with pytest.raises(ValueError, match="--tiles lists a config twice"):
        h.parse_configs("a;a", "--tiles", [])
    with pytest.raises(ValueError, match="--tiles must be"):
        h.parse_configs(";;", "--tiles", [])

    def validate(config):
        if config != "ok":
            raise ValueError(f"bad {config!r}")

    with pytest.raises(ValueError, match="--configs: bad 'nope'"):
        h.parse_configs("default;ok;nope", "--configs", [], validate)


def test_default_sweeps_are_valid_configs():
    """Every entry of the default sweep lists parses with crossent's own validation."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    from crossent.triton import _launchers as L

    h = load_harness()
    assert h.LINEAR_SWEEP[0] == h.CE_SWEEP[0] == "default"
    import torch

    base = L.linear_tiles(torch.bfloat16)  # sweep entries override fields of the default
    tiles = [L.parse_linear_tiles(c, base) for c in h.LINEAR_SWEEP[1:]]
    assert len(set(tiles)) == len(tiles) and base not in tiles
    assert h.ELEMENTWISE_SWEEP[0] == "default"
    elementwise = [L.parse_linear_tiles(c, base) for c in h.ELEMENTWISE_SWEEP[1:]]
    assert len(set(elementwise)) == len(elementwise) and base not in elementwise
    ces = [L.parse_ce_config(c) for c in h.CE_SWEEP[1:]]
    assert len(set(ces)) == len(ces) and L.CEConfig() not in ces


def test_config_env_sets_and_restores(monkeypatch):
    h = load_harness()
    monkeypatch.setenv("CROSSENT_TEST_VAR", "outer")
    with h.config_env("CROSSENT_TEST_VAR", "a=1"):
        assert os.environ["CROSSENT_TEST_VAR"] == "a=1"
    with h.config_env("CROSSENT_TEST_VAR", "default"):
        assert "CROSSENT_TEST_VAR" not in os.environ
    assert os.environ["CROSSENT_TEST_VAR"] == "outer"


def test_select_impls():
    h = load_harness()
    impls = {"crossent-triton-lean": 1, "crossent-triton-fast(1536MiB)": 2, "torch-eager": 3}
    assert h.select_impls(impls, "") == impls
    assert h.select_impls(impls, "crossent-triton-fast, torch-eager") == {
        "crossent-triton-fast(1536MiB)": 2, "torch-eager": 3}
    assert h.select_impls(impls, "bare-matmuls", ("bare-matmuls",)) == {}
    with pytest.raises(ValueError, match=r"--impls: unknown \['crossent'\]; known: \["):
        h.select_impls(impls, "crossent")


def test_recorder_appends_each_row_at_once_and_keeps_a_budget(tmp_path):
    h = load_harness()
    path = str(tmp_path / "r.csv")
    rec = h.Recorder(path, budget_s=0.0)
    common = {"date": "d", "device": "dev", "torch": "t", "triton": "tr", "liger_kernel": "-",
              "cut_cross_entropy": "-"}
    rec.add(h.row(common, "b", (4, 5), "bfloat16", 0.1, "impl-a", [1.0], 0, lambda ms: 1.0, "GB/s",
                  0.0, 0.0, config="x=1"))
    with open(path, newline="") as f:
        assert [r["config"] for r in csv.DictReader(f)] == ["x=1"]
    assert not rec.over_budget()
    rec.budget_s, rec.t0 = 1.0, rec.t0 - 2.0
    assert rec.over_budget()
    rec.add(h.skipped_row(common, "b", (4, 5), "bfloat16", 0.1, "impl-b", "y=1"))
    assert [r["note"] for r in rec.rows] == ["", "skipped: --max-minutes reached"]


def test_best_configs_ratio_to_reference():
    h = load_harness()

    def r(impl, config, ms, shape="4x5"):
        return {"shape": shape, "impl": impl, "config": config, "median_ms": ms}

    rows = [r("floor", "", 1.0), r("crossent-a", "default", 1.8), r("crossent-a", "x=1", 1.4),
            r("crossent-a", "y=1", float("nan")), r("peer", "", 0.5), r("crossent-a", "default", 9.0, "6x7")]
    lines = h.best_configs(rows, "floor", 1.5, "the floor")
    assert lines == [
        "4x5 crossent-a, ms (synced): fastest config 'x=1' 1.400 ms (default 1.800 ms) = 1.40x the floor "
        "(1.000 ms; target <= 1.5x: meets)",
        "6x7 crossent-a, ms (synced): fastest config 'default' 9.000 ms",
    ]


def test_best_configs_gives_each_time_metric_its_own_fastest_config_and_ratio():
    h = load_harness()

    def r(impl, config, ms, gpu_ms):
        return {"shape": "4x5", "impl": impl, "config": config, "median_ms": ms, "gpu_median_ms": gpu_ms}

    rows = [r("floor", "", 1.0, 0.8), r("crossent-a", "default", 1.4, 1.1), r("crossent-a", "x=1", 1.5, 1.0),
            r("crossent-a", "y=1", 1.6, float("nan"))]
    assert h.best_configs(rows, "floor", 1.3, "the floor") == [
        "4x5 crossent-a, ms (synced): fastest config 'default' 1.400 ms = 1.40x the floor (1.000 ms; "
        "target <= 1.3x: misses)",
        "4x5 crossent-a, GPU ms (queued): fastest config 'x=1' 1.000 ms (default 1.100 ms) = 1.25x the floor "
        "(0.800 ms; target <= 1.3x: meets)",
    ]


@pytest.mark.parametrize(
    "script", ["bench_gpu_cross_entropy.py", "bench_gpu_linear_cross_entropy.py", "profile_gpu_kernels.py"])
def test_scripts_exit_clearly_without_cuda(script):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the scripts would run the benchmark")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr


@pytest.mark.parametrize(
    ("script", "shapes", "impls"),
    [
        ("bench_gpu_cross_entropy.py", "5x300", 6),  # floor + 5 impls (no liger, no compile on CPU)
        ("bench_gpu_linear_cross_entropy.py", "40x16x300", 7),  # bare matmuls + 2 lean, 3 fast, eager
    ],
)
def test_scripts_run_end_to_end_in_cpu_smoke_mode(tmp_path, script, shapes, impls):
    """The whole script (inputs, reference, every implementation, errors, CSV) on a tiny shape
    through the interpreter: catches Python errors before a GPU session is spent on them."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path / "smoke.csv"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, os.path.join(BENCH, script), "--device", "cpu", "--shapes", shapes,
           "--repeats", "1", "--warmup", "0", "--out", str(out)]
    if "linear" in script:
        cmd += ["--fast-budget-mib", "1,2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == impls
    assert all(not r["note"].startswith("failed") for r in rows), rows
    assert all("not a measurement" in r["device"] for r in rows)
    assert {r["crossent_rev"] for r in rows} == {load_harness().crossent_revision()}
    assert all(float(r["median_ms"]) > 0 for r in rows)  # synced: wall-clock time on the CPU
    assert all(r[c] == "" for r in rows for c in ("gpu_median_ms", "gpu_p10_ms", "gpu_p90_ms"))  # no GPU
    crossent = [r for r in rows if r["impl"].startswith("crossent")]
    assert crossent and all(float(r["grad_rel_err"]) < 2e-2 for r in crossent)
    assert "ms (synced)" in proc.stdout and "GPU ms (queued)" in proc.stdout


@pytest.mark.parametrize(
    ("script", "shapes", "flag", "configs", "impls"),
    [
        ("bench_gpu_cross_entropy.py", "5x300", "--configs",
         "default;persistent=1,reverse=0;single_max=64,loop_block=128,persistent=1", "crossent-triton"),
        ("bench_gpu_linear_cross_entropy.py", "40x16x300", "--tiles",
         "default;16,32,16,16,4,2,programs=8,group_m=2,chunk=64", "crossent-triton-lean,bare-matmuls"),
    ],
)
def test_scripts_sweep_configs_in_cpu_smoke_mode(tmp_path, script, shapes, flag, configs, impls):
    """The sweep path: one row per crossent config (named in the config column), the reference
    row once, the fastest config printed with its ratio to the target."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path / "sweep.csv"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, os.path.join(BENCH, script), "--device", "cpu", "--shapes", shapes,
           "--repeats", "1", "--warmup", "0", "--out", str(out), flag, configs, "--impls", impls]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    crossent = [r for r in rows if r["impl"].startswith("crossent")]
    assert [r["config"] for r in crossent] == configs.split(";")
    assert len(rows) == len(crossent) + 1  # the floor / the bare matmuls, once
    assert all(not r["note"].startswith("failed") for r in rows), rows
    assert all(float(r["grad_rel_err"]) < 2e-2 for r in crossent)
    assert "fastest config" in proc.stdout and "target <=" in proc.stdout


def test_linear_script_runs_the_elementwise_sweep_in_cpu_smoke_mode(tmp_path):
    """``--tiles elementwise-sweep``: one lean row per gpu_harness.ELEMENTWISE_SWEEP entry."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path / "sweep.csv"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, os.path.join(BENCH, "bench_gpu_linear_cross_entropy.py"), "--device", "cpu",
           "--shapes", "40x16x300", "--repeats", "1", "--warmup", "0", "--out", str(out),
           "--tiles", "elementwise-sweep", "--impls", "crossent-triton-lean"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == load_harness().ELEMENTWISE_SWEEP
    assert all(float(r["grad_rel_err"]) < 2e-2 for r in rows)


def test_sweep_rejects_a_bad_config_before_running(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, os.path.join(BENCH, "bench_gpu_linear_cross_entropy.py"), "--device", "cpu",
           "--out", str(tmp_path / "x.csv"), "--tiles", "default;128,96,64,128,8,3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "--tiles: CROSSENT_TRITON_LINEAR_TILES: block_v must be a power of two" in proc.stderr
    assert not (tmp_path / "x.csv").exists()


def test_max_minutes_skips_the_rest_and_records_it(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path / "budget.csv"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, os.path.join(BENCH, "bench_gpu_cross_entropy.py"), "--device", "cpu", "--shapes",
           "5x300", "--repeats", "1", "--warmup", "0", "--out", str(out), "--configs", "default;reverse=0",
           "--impls", "crossent-triton", "--max-minutes", "1e-9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["impl"], r["config"], r["note"]) for r in rows[1:]] == [
        ("crossent-triton", "default", "skipped: --max-minutes reached"),
        ("crossent-triton", "reverse=0", "skipped: --max-minutes reached"),
    ]


@pytest.mark.parametrize("value", ["0", "1000,x", ","])
def test_linear_script_refuses_a_bad_fast_budget_list(value):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_gpu_linear_cross_entropy.py"),
                           "--fast-budget-mib", value], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"--fast-budget-mib must be comma-separated integers >= 1, got {value!r}" in proc.stderr


def test_linear_script_row_count_given_replaces_the_host_count(monkeypatch):
    """The queued samples of crossent's default linear calls get the row count ahead: inside
    ``row_count_given`` a call's HostCount holds the given count and has no event to wait on;
    with the waits turned off it gives none, as the library would; outside, the library's own."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from crossent.triton import _launchers

    monkeypatch.syspath_prepend(BENCH)
    spec = importlib.util.spec_from_file_location(
        "bench_linear", os.path.join(BENCH, "bench_gpu_linear_cross_entropy.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real = _launchers._host_count
    with bench.row_count_given(55):
        count = _launchers._host_count(torch.tensor(7))
        assert count.event is None and count.get() == 55
        monkeypatch.setenv(_launchers.HOST_COUNT_ENV, "0")
        assert _launchers._host_count(torch.tensor(7)) is None
    assert _launchers._host_count is real


def test_measure_queued_run_is_what_queued_samples_call():
    """``measure(queued_run=...)``: synced samples call ``run``, queued ones ``queued_run`` (a
    stand-in for torch.cuda whose sleep always covers the call)."""
    import time
    import types

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def query(self):
            return False  # still asleep: the whole call was queued behind the sleep

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    cuda = types.SimpleNamespace(synchronize=lambda: None, Event=Event, _sleep=lambda cycles: None,
                                 memory_allocated=lambda: 0, reset_peak_memory_stats=lambda: None,
                                 max_memory_allocated=lambda: 0)
    h = load_harness()
    calls = []
    m = h.measure(types.SimpleNamespace(cuda=cuda), tuple, lambda: calls.append("run") or 1.0, 2, 1,
                  lambda inputs: [], device="cuda", queued_run=lambda: calls.append("queued") or 1.0)
    assert calls == ["run", "run", "queued", "run", "queued"]
    assert len(m.gpu_times_ms) == 2 and all(t >= 0 for t in m.gpu_times_ms) and not m.note


def test_profile_host_waits():
    """profile_gpu_kernels.host_waits: idle time before an op that started right after its launch
    call ended counts as a wait for the host, other idle time not; overlapping ops are no idle
    time; calls and ops that do not pair up one to one give None (its doctest included)."""
    import doctest

    sys.path.insert(0, BENCH)
    try:
        import profile_gpu_kernels as P
    finally:
        sys.path.remove(BENCH)
    failures, tried = doctest.testmod(P, verbose=False, report=False)
    assert failures == 0 and tried >= 1
    gpu = [(0, 100), (105, 200), (150, 260), (300, 400), (400, 450)]
    calls = [(0, 1), (2, 3), (4, 5), (290, 295), (296, 297)]
    # 5 us idle before op 1 (its call ended 102 us earlier: the GPU's own gap); op 2 overlaps;
    # 40 us idle before op 3, launched 5 us before it started: a wait; op 4 follows op 3 at once.
    assert P.host_waits(gpu, calls) == (40, 1, 5)
    assert P.host_waits(gpu, calls, slack_us=1.0) == (0, 0, 45)
    assert P.host_waits(gpu, calls[:-1]) is None and P.host_waits([], []) is None
    assert P.LAUNCH_CALL.match("cudaLaunchKernel") and P.LAUNCH_CALL.match("cuLaunchKernelEx")
    assert P.LAUNCH_CALL.match("cudaMemsetAsync") and P.LAUNCH_CALL.match("cudaMemcpyAsync")
    assert not P.LAUNCH_CALL.match("cudaEventRecord") and not P.LAUNCH_CALL.match("aten::mm")


def test_extra_memory_does_not_subtract_gradients_that_live_in_an_input():
    """A gradient written into its input's storage (inplace_backward=True, Liger's CE) is no new
    memory: subtracting it made the extra memory negative (then clamped to 0)."""
    import torch

    h = load_harness()
    logits, target = torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64)
    in_place = logits.detach()  # shares logits' storage, as the in-place gradient does
    separate = torch.zeros(2, 3)
    assert h.new_grad_bytes(torch, [in_place, separate, None], (logits, target)) == separate.numel() * 4
    assert h.new_grad_bytes(torch, [torch.zeros(4, 8)], (logits, target)) == 4 * 8 * 4


def test_elementwise_sweep_runs_the_untried_schedules_last():
    """products=2/3 (with or without tma) have never run on a GPU: a sticky CUDA error there must
    not spoil the rows of the schedules and tiles before them."""
    sweep = load_harness().ELEMENTWISE_SWEEP
    untried = [i for i, c in enumerate(sweep) if "products=" in c]
    assert untried == list(range(len(sweep) - len(untried), len(sweep))) and len(untried) == 4
    assert sweep[:4] == ["default", "wide_forward=0,scratch_dw=0", "wide_forward=0", "scratch_dw=0"]


def _git(root, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=root,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def code_repo(tmp_path):
    """A git repository laid out as crossent's: code under src/ and benchmarks/, a results CSV."""
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    root = tmp_path / "repo"
    for path, text in {"src/pkg/a.py": "A = 1\n", "benchmarks/b.py": "B = 1\n", "benchmarks/s.sh": "true\n",
                       "benchmarks/results/r.csv": "date\n", "README.md": "r\n"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "first")
    return root


def test_crossent_revision_from_git_marks_changed_code_dirty(code_repo):
    """The short hash; "+dirty" for a change to a code file under src/ or benchmarks/ (staged or
    not), also a new one git does not track (the device tool carries untracked files that git
    does not ignore; review gpuready 3: it was left out), not for results or notes."""
    h = load_harness()
    commit = _git(code_repo, "rev-parse", "--short", "HEAD")
    assert h.crossent_revision(str(code_repo)) == commit
    (code_repo / "benchmarks/results/r.csv").write_text("date\nx\n")
    (code_repo / "README.md").write_text("changed\n")
    assert h.crossent_revision(str(code_repo)) == commit
    (code_repo / "src/pkg/new.py").write_text("untracked\n")
    assert h.crossent_revision(str(code_repo)) == commit + "+dirty"
    (code_repo / "src/pkg/new.py").unlink()
    for path in ("src/pkg/a.py", "benchmarks/b.py", "benchmarks/s.sh"):
        (code_repo / path).write_text("changed\n")
        assert h.crossent_revision(str(code_repo)) == commit + "+dirty", path
        _git(code_repo, "checkout", "-q", "--", path)
    (code_repo / "src/pkg/a.py").write_text("staged\n")
    _git(code_repo, "add", "src/pkg/a.py")
    assert h.crossent_revision(str(code_repo)) == commit + "+dirty"


def test_crossent_revision_without_git_reads_the_revision_file_then_the_environment(code_repo, monkeypatch):
    """The GPU machine's case: the working tree and .whl/ without .git. The revision recorded by
    fetch_gpu_wheels.sh, "+dirty" once the code files differ from those it was taken from (not
    for a change to results or __pycache__); without the file CROSSENT_REV; else "unknown"."""
    import shutil

    h = load_harness()
    commit = _git(code_repo, "rev-parse", "--short", "HEAD")
    record = h.revision_record(str(code_repo))
    assert record.splitlines()[0] == f"revision {commit}"
    copy = code_repo.parent / "copy"
    shutil.copytree(code_repo, copy, ignore=shutil.ignore_patterns(".git"))
    (copy / ".whl").mkdir()
    (copy / ".whl/REVISION").write_text(record)
    monkeypatch.setenv("CROSSENT_REV", "from-env")
    assert h.crossent_revision(str(copy)) == commit
    (copy / "benchmarks/results/r.csv").write_text("date\nx\n")
    (copy / "src/pkg/__pycache__").mkdir()
    (copy / "src/pkg/__pycache__/a.py").write_text("cache\n")
    assert h.crossent_revision(str(copy)) == commit
    (copy / "src/pkg/a.py").write_text("edited after the record\n")
    assert h.crossent_revision(str(copy)) == commit + "+dirty"
    (code_repo / "src/pkg/a.py").write_text("dirty when recorded\n")
    (copy / ".whl/REVISION").write_text(h.revision_record(str(code_repo)))
    assert h.crossent_revision(str(copy)) == commit + "+dirty"  # not "+dirty+dirty"
    (copy / ".whl/REVISION").unlink()
    assert h.crossent_revision(str(copy)) == "from-env"
    monkeypatch.delenv("CROSSENT_REV")
    assert h.crossent_revision(str(copy)) == "unknown"


def test_fetch_gpu_wheels_writes_the_revision_without_downloading_wheels_it_has(code_repo):
    """fetch_gpu_wheels.sh, run where .whl already holds the pinned wheels (empty stand-ins
    here): no download (no network needed), .whl/REVISION rewritten for the code as it is."""
    import shutil

    h = load_harness()
    for name in ("fetch_gpu_wheels.sh", "gpu_harness.py"):
        shutil.copy(os.path.join(BENCH, name), code_repo / "benchmarks" / name)
    _git(code_repo, "add", "benchmarks")
    _git(code_repo, "commit", "-q", "-m", "scripts")
    (code_repo / ".whl").mkdir()
    for wheel in ("array_api_compat-1.16.0", "liger_kernel-0.8.5", "cut_cross_entropy-25.1.1"):
        (code_repo / ".whl" / f"{wheel}-py3-none-any.whl").write_text("")
    (code_repo / ".whl/REVISION").write_text("revision stale\ncode_sha256 0\n")
    bin_dir = code_repo.parent / "bin"  # the script runs python3: this interpreter
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "benchmarks/fetch_gpu_wheels.sh"], cwd=code_repo, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no download" in proc.stdout
    commit = _git(code_repo, "rev-parse", "--short", "HEAD")
    assert (code_repo / ".whl/REVISION").read_text() == h.revision_record(str(code_repo))
    assert (code_repo / ".whl/REVISION").read_text().startswith(f"revision {commit}\n")


def test_append_rows_gives_old_rows_an_empty_crossent_rev(tmp_path):
    """A results CSV from before the crossent_rev column: rewritten under the union, its rows with
    an empty revision, the new rows with the run's."""
    h = load_harness()
    old_cols = [c for c in h.COLUMNS if c != "crossent_rev"]
    path = tmp_path / "gpu_old.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_cols)
        writer.writeheader()
        writer.writerow({c: "1" for c in old_cols})
    common = {"date": "d", "crossent_rev": "abc1234+dirty", "device": "dev", "torch": "t", "triton": "tr",
              "liger_kernel": "-", "cut_cross_entropy": "-"}
    h.append_rows(str(path), [h.row(common, "bench", (4, 5), "bfloat16", 0.1, "impl-a", [2.0], 0,
                                    lambda ms: 1.0, "GB/s", 0.0, 0.0)])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == h.COLUMNS
    assert [r["crossent_rev"] for r in rows] == ["", "abc1234+dirty"]


def test_profile_script_runs_every_section_in_cpu_smoke_mode(tmp_path):
    """profile_gpu_kernels.py --device cpu: every section (kernel table, host time, idle gaps; the
    host profile for CE) of the lean, fast and CE calls runs through the interpreter on tiny shapes
    and writes its lines, under a header naming the revision: a broken section shows here, not on
    a GPU's clock."""
    import re

    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path / "profile.txt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, os.path.join(BENCH, "profile_gpu_kernels.py"), "--device", "cpu",
           "--linear-shapes", "40x16x300", "--ce-shapes", "5x300", "--fast-budget-mib", "1", "--steps", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "failed" not in text, text
    header = text.splitlines()[0]
    assert header.startswith("cpu (interpreter smoke run, not a measurement), torch ")
    assert f", crossent {load_harness().crossent_revision()}, " in header
    labels = ["linear_cross_entropy lean 40x16x300", "linear_cross_entropy fast 1 MiB 40x16x300",
              "cross_entropy 5x300"]
    tables = re.findall(r"^(.+): ([0-9.]+) ms of CPU ops .* per step \(mean of 1 steps\)\n +ms/step +share +calls +op\n"
                        r"((?: +[0-9.]+ +[0-9.]+% +\d+  \S.*\n)+)", text, flags=re.M)
    assert [label for label, _, _ in tables] == labels
    assert all(float(ms) > 0 and "aten::" in rows for _, ms, rows in tables)
    host = re.findall(r"^host time per call: ([0-9.]+) ms \(median of (\d+), CPU smoke run\)", text, flags=re.M)
    assert [int(n) for _, n in host] == [1, 1, 20] and all(float(ms) > 0 for ms, _ in host)
    assert re.search(r"^host profile \(50 calls\):\n.*function calls", text, flags=re.M)
    for label in labels:
        for mode in ("synced", "queued"):
            line = re.search(rf"^{re.escape(label)} \(CPU smoke run: aten ops for kernels\), one {mode} call under "
                             r"the profiler: first kernel [0-9.]+ ms after the call starts; .* (\d+) kernels$",
                             text, flags=re.M)
            assert line and int(line.group(1)) > 0, (label, mode)


def test_merge_appends_a_device_csv_by_column_name(tmp_path):
    """Review gpuready 2: a device CSV (with crossent_rev) appended to an older results CSV
    (without it) by `tail -n +2 >>` shifted every column (device read '69e5c2d+dirty'); the
    `merge` command appends by column name."""
    h = load_harness()
    old_columns = [c for c in h.COLUMNS if c != "crossent_rev"]
    dest = tmp_path / "results.csv"
    with open(dest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({c: "" for c in old_columns} | {"device": "old GPU", "impl": "torch"})
    src = tmp_path / "device.csv"
    with open(src, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=h.COLUMNS)
        writer.writeheader()
        writer.writerow({c: "" for c in h.COLUMNS} | {"device": "H100", "impl": "crossent-triton",
                                                       "crossent_rev": "abc1234", "median_ms": "1.5"})
    done = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_harness.py"), "merge", str(src), str(dest)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with open(dest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["device"], r["impl"], r["crossent_rev"], r["median_ms"]) for r in rows] == [
        ("old GPU", "torch", "", ""), ("H100", "crossent-triton", "abc1234", "1.5")]
    (tmp_path / "other.csv").write_text("date,unknown_column\nx,y\n")
    done = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_harness.py"), "merge",
                           str(tmp_path / "other.csv"), str(dest)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown_column" in done.stderr
    header = ",".join(h.COLUMNS)
    too_long = ",".join(["x"] * (len(h.COLUMNS) + 1))
    for name, line, word in (("short.csv", "x,y,z", "fewer"), ("long.csv", too_long, "more")):
        (tmp_path / name).write_text(f"{header}\n{line}\n")
        done = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_harness.py"), "merge",
                               str(tmp_path / name), str(dest)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and f"line 2: {len(h.COLUMNS)} cells expected, got a row with {word}" in done.stderr
    with open(dest, newline="") as f:
        assert len(list(csv.DictReader(f))) == 2  # nothing appended by the refused merges
