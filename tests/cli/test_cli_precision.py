"""Precision of probability files (review F3, F5): tolerance and clipping eps follow the file's
own dtype, and every clipped row is counted. Oracles: float64 numpy transcriptions and
scikit-learn's log_loss (which clips at finfo(dtype).eps of its input, as crossent does)."""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sklearn.metrics import log_loss

from crossent.metrics import ScoreAccumulator

from .conftest import run, run_json


def oracle(p, y, eps):
    """Mean of -log max(p[i, y_i], eps) in float64, and how many rows were clipped."""
    q = np.asarray(p, dtype=np.float64)[np.arange(len(y)), y]
    return float(-np.log(np.maximum(q, eps)).mean()), int(np.count_nonzero(q < eps))


def _write(path, p, y):
    table = pa.table({**{f"p{k}": p[:, k] for k in range(p.shape[1])}, "y": y})
    if str(path).endswith(".csv"):
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)


def test_float16_probabilities_use_float16_tolerance_and_eps(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3) * 0.3, 1000).astype(np.float16)  # rows off 1 by up to ~1e-3
    y = rng.integers(0, 3, 1000)
    off = np.abs(p.astype(np.float64).sum(axis=1) - 1).max()
    assert off > math.sqrt(np.finfo(np.float32).eps)  # float32's tolerance rejected this file
    _write(tmp_path / "f16.parquet", p, y)
    out = run_json(tmp_path / "f16.parquet", "--target", "y", "--probs", "p*")
    eps16 = float(np.finfo(np.float16).eps)
    expected, clipped = oracle(p, y, eps16)
    assert clipped > 0  # float16 rounds small probabilities to 0: the eps matters here
    np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-6)
    # scikit-learn computes in float16, clipping at float16's eps: agrees to float16 rounding
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss(y, p, labels=[0, 1, 2]),
                               rtol=2e-3)
    assert out["clipped_rows"] == clipped


def test_float16_row_sum_tolerance_is_float16s(tmp_path):
    tol16 = math.sqrt(float(np.finfo(np.float16).eps))  # 0.03125
    p = np.array([[0.5, 0.5], [0.5, 0.52], [0.5, 0.5]], dtype=np.float16)  # row 1: 1.02
    y = np.array([0, 1, 1])
    _write(tmp_path / "ok.parquet", p, y)
    out = run_json(tmp_path / "ok.parquet", "--target", "y", "--probs", "p*")
    expected = -(2 * math.log(0.5) + math.log(float(np.float16(0.52)))) / 3
    np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-12)
    p[1, 1] = 0.55  # 1.05: outside float16's tolerance
    _write(tmp_path / "bad.parquet", p, y)
    bad = run(tmp_path / "bad.parquet", "--target", "y", "--probs", "p*")
    assert bad.exit_code == 1
    assert "data row 1: probabilities of the row sum to 1.0498046875" in bad.stderr
    assert f"tolerance {tol16:.3g}" in bad.stderr


def test_accumulator_keeps_float16_eps_after_upcast():
    p = np.array([[1.0, 0.0], [0.25, 0.75]], dtype=np.float16)
    y = np.array([1, 1])
    r = ScoreAccumulator(2).update(p, y).compute()
    expected, clipped = oracle(p, y, float(np.finfo(np.float16).eps))
    np.testing.assert_allclose(r.cross_entropy_nats, expected, rtol=1e-12)
    assert r.clipped_rows == clipped == 1


def test_clipped_rows_counted_csv_float64_vs_parquet_float32(tmp_path, monkeypatch):
    """The review's clip32 example: the eps of each container, each clipped row counted."""
    p = np.array([[1, 0], [0.3, 0.7], [0.9, 0.1]], dtype=np.float32)
    y = np.array([1, 1, 0])
    _write(tmp_path / "clip32.parquet", p, y)
    _write(tmp_path / "clip32.csv", p, y)
    a = run_json(tmp_path / "clip32.parquet", "--target", "y", "--probs", "p*")
    b = run_json(tmp_path / "clip32.csv", "--target", "y", "--probs", "p*")
    np.testing.assert_allclose(a["cross_entropy_nats"], oracle(p, y, np.finfo(np.float32).eps)[0],
                               rtol=1e-12)
    np.testing.assert_allclose(a["cross_entropy_nats"], log_loss(y, p), rtol=1e-6)
    # CSV text is parsed as float64: float64's eps (the text of float32 0.7 is "0.7")
    p64 = np.array([[1, 0], [0.3, 0.7], [0.9, 0.1]])
    np.testing.assert_allclose(b["cross_entropy_nats"], log_loss(y, p64), rtol=1e-12)
    assert a["clipped_rows"] == b["clipped_rows"] == 1
    monkeypatch.chdir(tmp_path)  # a short title: the table is not wrapped
    table = run("clip32.csv", "--target", "y", "--probs", "p*")
    assert re.search(r"│ rows clipped to eps +│ +1 │", table.stdout), table.stdout


def test_clipped_rows_merge_and_logits_never_clip():
    a = ScoreAccumulator(2).update(np.array([[1.0, 0.0]]), np.array([1]))
    b = ScoreAccumulator(2).update(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0, 0]))
    assert a.merge(b).compute().clipped_rows == 2
    z = np.array([[0.0, -800.0]])
    r = ScoreAccumulator(2, from_logits=True).update(z, np.array([1])).compute()
    assert r.clipped_rows == 0
    np.testing.assert_allclose(r.cross_entropy_nats, 800.0, rtol=1e-12)


def test_mixed_float16_and_float32_columns_use_float16_tolerance(tmp_path):
    """Second review nit: float16 columns beside a float32 one were held to float32's
    tolerance, so rows of valid float16 probabilities were rejected. The row-sum tolerance
    of mixed dtypes is the widest one (the coarsest dtype's); eps is the batch's (float32)."""
    rng = np.random.default_rng(0)
    n = 5001
    p = rng.dirichlet(np.ones(3) * 0.3, n).astype(np.float16)
    y = rng.integers(0, 3, n)
    sums = p.astype(np.float32).sum(axis=1, dtype=np.float64)
    assert np.abs(sums - 1).max() > math.sqrt(np.finfo(np.float32).eps)  # float32's rejects
    assert np.abs(sums - 1).max() <= math.sqrt(np.finfo(np.float16).eps)
    table = pa.table({"p0": p[:, 0], "p1": p[:, 1].astype(np.float32), "p2": p[:, 2], "y": y})
    pq.write_table(table, tmp_path / "mix.parquet")
    out = run_json(tmp_path / "mix.parquet", "--target", "y", "--probs", "p*")
    loss, clipped = oracle(p.astype(np.float32), y, float(np.finfo(np.float32).eps))
    assert math.isclose(out["cross_entropy_nats"], loss, rel_tol=1e-12)
    assert out["clipped_rows"] == clipped
    # a row off by more than float16's tolerance is still an error
    bad = p.copy()
    bad[17] = [0.5, 0.5, 0.25]
    table = pa.table({"p0": bad[:, 0], "p1": bad[:, 1].astype(np.float32), "p2": bad[:, 2],
                      "y": y})
    pq.write_table(table, tmp_path / "bad.parquet")
    result = run(tmp_path / "bad.parquet", "--target", "y", "--probs", "p*")
    assert result.exit_code == 1 and "data row 17" in result.stderr
    assert f"(tolerance {math.sqrt(np.finfo(np.float16).eps):.3g})" in result.stderr
