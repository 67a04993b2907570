"""Prediction files for the `crossent score` tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

NAMES = ["cat", "dog", "cow", "pig", "hen", "owl", "ant"]


def run(*args):
    """``crossent score ARGS --quiet`` through click's test runner (stdout and stderr apart)."""
    from click.testing import CliRunner

    from crossent.cli.main import main

    return CliRunner().invoke(main, ["score", *map(str, args), "--quiet"])


def run_json(*args):
    """The JSON object ``crossent score ARGS --format json`` prints (it must exit 0)."""
    import json

    result = run(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="session")
def preds():
    """2531 rows, 7 classes: float32 logits, their softmax (float64), labels, weights."""
    rng = np.random.default_rng(7)
    n, C = 2531, len(NAMES)
    z = (rng.normal(size=(n, C)) * 2).astype(np.float32)
    z[:, 2] += 1.0
    p = softmax(z.astype(np.float64))
    y = rng.integers(0, C, n)
    w = rng.uniform(0.0, 2.0, n)
    return z, p, y, w


@pytest.fixture(scope="session")
def pred_table(preds):
    z, p, y, w = preds
    cols = {f"p_{name}": p[:, k] for k, name in enumerate(NAMES)}
    cols["label"] = np.array(NAMES)[y]
    cols["y"] = y
    cols["w"] = w
    cols.update({f"logit{k}": z[:, k] for k in range(len(NAMES))})
    return pa.table(cols)


@pytest.fixture(scope="session")
def parquet_path(pred_table, tmp_path_factory):
    path = tmp_path_factory.mktemp("score") / "preds.parquet"
    pq.write_table(pred_table, path, row_group_size=500)
    return path
