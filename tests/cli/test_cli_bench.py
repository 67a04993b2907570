"""`crossent bench`: every case is checked against a float64 reference before it is timed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.special
from click.testing import CliRunner

from crossent.cli import bench as B
from crossent.cli.main import main

torch = pytest.importorskip("torch")


def _invoke(*args):
    return CliRunner().invoke(main, ["bench", *args])


def test_reference_loss_is_scipy_logsumexp_minus_picked():
    (x,), y = B._inputs("ce", 37, 11, None, seed=3)
    expected = np.mean(scipy.special.logsumexp(x, axis=1) - x[np.arange(37), y])
    assert B._reference_loss("ce", (x,), y, "float64") == pytest.approx(expected, rel=1e-12)
    (e, w), y = B._inputs("linear", 37, 11, 5, seed=3)
    z = e @ w.T
    expected = np.mean(scipy.special.logsumexp(z, axis=1) - z[np.arange(37), y])
    assert B._reference_loss("linear", (e, w), y, "float64") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_ce_json_every_case_checked_and_timed(grad):
    args = ["ce", "--rows", "53", "--classes", "17", "--repeats", "2", "--format", "json"]
    out = _invoke(*args, *(["--grad"] if grad else []))
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["all_ok"] and res["baseline"] == "torch" and res["grad"] is grad
    names = {r["impl"] for r in res["results"]}
    assert {"crossent", "crossent-array-api", "numpy", "torch", "crossent-auto", "crossent-chunked"} <= names
    x = B._inputs("ce", 53, 17, None, seed=0)
    (logits,), y = x
    ref = np.mean(scipy.special.logsumexp(logits.astype(np.float32).astype(np.float64), axis=1)
                  - logits.astype(np.float32).astype(np.float64)[np.arange(53), y])
    assert res["reference_loss"] == pytest.approx(ref, rel=1e-12)
    for r in res["results"]:
        assert abs(r["loss"] - ref) <= 1e-4 * max(1, ref)
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        assert math.isfinite(r["ratio_to_baseline"])
    assert next(r for r in res["results"] if r["impl"] == "torch")["ratio_to_baseline"] == 1.0


def test_soft_reference_is_scipy_log_softmax_and_targets_are_distributions():
    (x,), p = B._inputs("soft", 37, 11, None, seed=3)
    assert p.shape == (37, 11) and (p > 0).all() and np.allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    expected = -np.mean(np.sum(p * scipy.special.log_softmax(x, axis=1), axis=1))
    assert B._reference_loss("soft", (x,), p, "float64") == pytest.approx(expected, rel=1e-12)
    # float32: the reference scores the logits and the targets as rounded to float32
    x32, p32 = x.astype(np.float32).astype(np.float64), p.astype(np.float32).astype(np.float64)
    expected32 = -np.mean(np.sum(p32 * scipy.special.log_softmax(x32, axis=1), axis=1))
    assert B._reference_loss("soft", (x,), p, "float32") == pytest.approx(expected32, rel=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_soft_json_every_case_checked_and_timed(grad):
    out = _invoke("soft", "--rows", "41", "--classes", "13", "--repeats", "2", "--format", "json",
                  *(["--grad"] if grad else []))
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["op"] == "soft" and res["all_ok"] and res["baseline"] == "torch"
    names = {r["impl"] for r in res["results"]}
    assert names == {"crossent", "crossent-array-api", "numpy", "torch", "crossent-auto", "crossent-chunked"}
    for r in res["results"]:
        assert abs(r["loss"] - res["reference_loss"]) <= 1e-4 * max(1, res["reference_loss"])


def test_soft_in_low_precision_is_refused():
    with pytest.raises(ValueError, match="op 'soft' runs in float32 or float64"):
        B.run_bench("soft", rows=4, classes=3, dtype="bfloat16")


def test_linear_bfloat16_table():
    out = _invoke("linear", "--rows", "29", "--classes", "41", "--dim", "7", "--dtype", "bfloat16",
                  "--grad", "--repeats", "1")
    assert out.exit_code == 0, out.output
    for name in ("torch-composition", "crossent", "median ms", "float64 reference loss"):
        assert name in out.output


def test_impls_filter_and_a_wrong_case_fails(monkeypatch):
    out = _invoke("ce", "--rows", "8", "--classes", "5", "--impls", "numpy", "--format", "json")
    assert out.exit_code == 0, out.output
    assert [r["impl"] for r in json.loads(out.output)["results"]] == ["numpy"]

    real = B._numpy_cases

    def broken(*args):
        cases = real(*args)
        cases[0].fn = lambda: 0.0  # a fast wrong answer
        return cases

    monkeypatch.setattr(B, "_numpy_cases", broken)
    out = _invoke("ce", "--rows", "8", "--classes", "5", "--format", "json")
    assert out.exit_code == 1
    res = json.loads(out.output.splitlines()[0])
    wrong = [r for r in res["results"] if not r["ok"]]
    assert [r["impl"] for r in wrong] == ["crossent"] and wrong[0]["median_ms"] is None
    assert "wrong values from ['crossent']" in out.output


@pytest.mark.parametrize("args, message", [
    (["--impls", "nope"], "impls: unknown or unavailable here ['nope']"),
    (["--rows", "0"], "Invalid value for '--rows'"),
    (["--dtype", "int8"], "Invalid value for '--dtype'"),
])  # fmt: skip
def test_usage_errors_exit_2(args, message):
    out = _invoke("ce", *args)
    assert out.exit_code == 2 and message in out.output


def test_cuda_without_a_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    out = _invoke("ce", "--device", "cuda")
    assert out.exit_code == 2 and "device 'cuda' needs PyTorch with a visible CUDA GPU" in out.output


def test_run_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="op must be 'ce', 'soft' or 'linear', got 'mse'"):
        B.run_bench("mse")
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got -1"):
        B.run_bench(warmup=-1)
