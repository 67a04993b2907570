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


def test_append_rows_refuses_an_older_header(tmp_path):
    h = load_harness()
    path = tmp_path / "old.csv"
    path.write_text("date,device,impl\n2026,dev,x\n")
    with pytest.raises(ValueError, match="expected"):
        h.append_rows(str(path), [])


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
    assert lines[0] == ("4x5 crossent-a: fastest config 'x=1' 1.400 ms (default 1.800 ms) = 1.40x the floor "
                        "(1.000 ms; target <= 1.5x: meets)")
    assert lines[1] == "6x7 crossent-a: fastest config 'default' 9.000 ms"


@pytest.mark.parametrize("script", ["bench_gpu_cross_entropy.py", "bench_gpu_linear_cross_entropy.py"])
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
        ("bench_gpu_cross_entropy.py", "5x300", 5),  # floor + 4 impls (no liger, no compile on CPU)
        ("bench_gpu_linear_cross_entropy.py", "40x16x300", 4),  # bare matmuls + lean, fast, eager
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
        cmd += ["--fast-budget-mib", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == impls
    assert all(not r["note"].startswith("failed") for r in rows), rows
    assert all("not a measurement" in r["device"] for r in rows)
    crossent = [r for r in rows if r["impl"].startswith("crossent")]
    assert crossent and all(float(r["grad_rel_err"]) < 2e-2 for r in crossent)


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
