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
