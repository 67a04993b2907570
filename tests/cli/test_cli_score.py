"""`crossent score`: values against scikit-learn and the core, exit codes, light imports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow.csv as pacsv
import pytest
from click.testing import CliRunner
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, log_loss

import crossent as ce
from crossent.cli.main import main

from .conftest import NAMES


def run(*args):
    return CliRunner().invoke(main, ["score", *map(str, args)])


def run_json(*args):
    result = run(*args, "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_equals_scikit_learn(parquet_path, preds):
    _, p, y, w = preds
    out = run_json(parquet_path, "--target", "label", "--probs", "p_*")
    labels = list(range(len(NAMES)))
    expected = log_loss(y, y_proba=p, labels=labels)
    # the text holds float32's shortest digits, read back as float64: equal to ~1e-8 per value
    np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-7)
    np.testing.assert_allclose(out["cross_entropy_bits"], expected / math.log(2), rtol=1e-12)
    np.testing.assert_allclose(out["perplexity"], math.exp(expected), rtol=1e-12)
    np.testing.assert_allclose(out["accuracy"], accuracy_score(y, p.argmax(1)), rtol=1e-12)
    assert out["rows"] == len(y) and out["classes"] == len(NAMES)
    assert out["class_names"] == NAMES
    assert 0 <= out["expected_calibration_error"] <= 1
    assert [c["name"] for c in out["per_class"]] == NAMES
    for k, entry in enumerate(out["per_class"]):
        rows = y == k
        np.testing.assert_allclose(entry["cross_entropy_nats"],
                                   float(ce.log_loss(p[rows], y[rows])), rtol=1e-12)
        np.testing.assert_allclose(entry["cross_entropy_nats"],
                                   log_loss(y[rows], p[rows], labels=labels), rtol=1e-12)
        assert entry["rows"] == rows.sum()


def test_weights_and_logits(parquet_path, preds):
    z, p, y, w = preds
    out = run_json(parquet_path, "--target", "y", "--logits", "logit*", "--sample-weight", "w")
    core = float(ce.softmax_cross_entropy(z.astype(np.float64), y, sample_weight=w))
    np.testing.assert_allclose(out["cross_entropy_nats"], core, rtol=1e-6)
    # the oracle: scipy's float64 log_softmax at the target, weighted mean
    logp = log_softmax(z.astype(np.float64), axis=1)[np.arange(len(y)), y]
    np.testing.assert_allclose(out["cross_entropy_nats"], -np.average(logp, weights=w), rtol=1e-6)
    np.testing.assert_allclose(out["accuracy"], accuracy_score(y, z.argmax(1), sample_weight=w))
    np.testing.assert_allclose(out["weight"], w.sum(), rtol=1e-12)


def test_formats_agree(tmp_path, pred_table, preds, parquet_path):
    z, p, y, _ = preds
    pacsv.write_csv(pred_table, tmp_path / "preds.csv")
    np.savez(tmp_path / "preds.npz", probs=p, y=y)
    a = run_json(parquet_path, "--target", "y", "--probs", "p_*")
    b = run_json(tmp_path / "preds.csv", "--target", "label", "--probs", "p_*")
    c = run_json(tmp_path / "preds.npz", "--target", "y", "--probs", "probs")
    for other in (b, c):
        for key in ("cross_entropy_nats", "accuracy", "expected_calibration_error"):
            np.testing.assert_allclose(other[key], a[key], rtol=1e-12, err_msg=key)
        assert other["rows"] == a["rows"]


def test_batch_size_does_not_change_the_result(parquet_path):
    a = run_json(parquet_path, "--target", "y", "--probs", "p_*", "--batch-rows", "7")
    b = run_json(parquet_path, "--target", "y", "--probs", "p_*", "--batch-rows", "100000")
    for key in ("cross_entropy_nats", "accuracy", "expected_calibration_error"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12)


def test_table_output(parquet_path, preds):
    _, p, y, _ = preds
    result = run(parquet_path, "--target", "y", "--probs", "p_*")
    assert result.exit_code == 0
    assert f"{log_loss(y, y_proba=p):.6f}" in result.stdout
    assert "expected calibration error" in result.stdout and "cow" in result.stdout
    assert result.stderr == ""  # stderr is not a terminal: no progress bar


def test_normalize_flag(tmp_path):
    (tmp_path / "a.csv").write_text("a,b,y\n1,3,1\n2,2,0\n")
    bad = run(tmp_path / "a.csv", "--target", "y", "--probs", "a,b")
    assert bad.exit_code == 1  # 1 and 3 are not probabilities
    (tmp_path / "b.csv").write_text("a,b,y\n0.1,0.3,1\n0.2,0.2,0\n")
    bad = run(tmp_path / "b.csv", "--target", "y", "--probs", "a,b")
    assert bad.exit_code == 1 and "data row 0: probabilities of the row sum to 0.4" in bad.stderr
    out = run_json(tmp_path / "b.csv", "--target", "y", "--probs", "a,b", "--normalize")
    np.testing.assert_allclose(out["cross_entropy_nats"], -(np.log(0.75) + np.log(0.5)) / 2)


@pytest.mark.parametrize(
    "args",
    [
        ["--target", "y"],  # neither --probs nor --logits
        ["--target", "y", "--probs", "p_*", "--logits", "logit*"],
        ["--target", "y", "--probs", "p_*", "--batch-rows", "0"],
        ["--target", "y", "--probs", "p_*", "--format", "xml"],
        ["--probs", "p_*"],  # no --target
        ["--target", "y", "--logits", "logit*", "--normalize"],
        ["--target", "y", "--probs", "p_*,y"],
    ],
)
def test_usage_errors_exit_2(parquet_path, args):
    result = run(parquet_path, *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""


def test_report_into_a_missing_folder_exits_2_before_scoring(parquet_path, tmp_path):
    result = run(parquet_path, "--target", "y", "--probs", "p_*", "--report",
                 tmp_path / "nope" / "r.html")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_missing_path_and_unknown_suffix_exit_2(tmp_path):
    assert run(tmp_path / "nope.parquet", "--target", "y", "--probs", "a,b").exit_code == 2
    (tmp_path / "a.txt").write_text("a,b,y\n")
    assert run(tmp_path / "a.txt", "--target", "y", "--probs", "a,b").exit_code == 2


@pytest.mark.parametrize(
    ("column", "row", "value", "message"),
    [
        ("p_dog", 1234, 1.5, r"column 'p_dog', data row 1234: probability 1.5 is not in \[0, 1\]"),
        ("p_cow", 2000, float("nan"), r"column 'p_cow', data row 2000: probability NaN"),
        ("p_cat", 17, 0.9, r"column 'p_cat..p_ant', data row 17: probabilities of the row sum"),
        ("y", 2530, 9, r"column 'y', data row 2530: label 9 is not a class index in \[0, 7\)"),
        ("w", 3, -1.0, r"column 'w', data row 3: sample weight -1.0 is not a finite number"),
    ],
)
def test_bad_data_exits_1_naming_column_and_row(tmp_path, pred_table, column, row, value,
                                                 message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pred_table.column(column).to_numpy().copy()
    values[row] = value
    table = pred_table.set_column(pred_table.schema.get_field_index(column), column,
                                  pa.array(values))
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path, row_group_size=500)
    report, plots = tmp_path / "out.html", tmp_path / "plots"
    result = run(path, "--target", "y", "--probs", "p_*", "--sample-weight", "w",
                 "--report", report, "--plots", plots)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    import re

    assert re.search(message, result.stderr), result.stderr
    assert not report.exists() and not plots.exists()  # nothing partial written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]


def test_unknown_class_name_exits_1(tmp_path):
    (tmp_path / "a.csv").write_text("p_cat,p_dog,y\n0.5,0.5,cat\n0.5,0.5,dog\n0.5,0.5,cow\n")
    result = run(tmp_path / "a.csv", "--target", "y", "--probs", "p_*")
    assert result.exit_code == 1
    assert "column 'y', data row 2: label 'cow' is not among the classes [cat, dog]" in result.stderr


def test_missing_column_exits_1(parquet_path):
    result = run(parquet_path, "--target", "y", "--probs", "q_*")
    assert result.exit_code == 1 and "pattern 'q_*' matches no column" in result.stderr
    result = run(parquet_path, "--target", "truth", "--probs", "p_*")
    assert result.exit_code == 1 and "target: no column 'truth'" in result.stderr


_IMPORTS = """
import json, sys
from crossent.cli.main import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    heavy = {"torch", "sklearn", "pandas", "matplotlib", "scipy", "jax", "triton", "dask"}
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & heavy)), file=sys.stderr)
"""


def test_score_imports_nothing_heavy(parquet_path, tmp_path):
    args = [sys.executable, "-c", _IMPORTS, "score", str(parquet_path), "--target", "label",
            "--probs", "p_*", "--format", "json"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
    assert json.loads(done.stdout)["rows"] == 2531
    done = subprocess.run(args + ["--plots", str(tmp_path / "plots")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == ["matplotlib"]


def test_console_script_exit_codes(parquet_path):
    cmd = [sys.executable, "-m", "crossent.cli.main", "score", str(parquet_path)]
    ok = subprocess.run(cmd + ["--target", "y", "--probs", "p_*", "--format", "json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stderr == "" and json.loads(ok.stdout)["rows"] == 2531
    bad = subprocess.run(cmd + ["--target", "w", "--probs", "p_*"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert "column 'w', data row 0: label " in bad.stderr and "is not an integer" in bad.stderr
    usage = subprocess.run(cmd + ["--probs", "p_*"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "Missing option '--target'" in usage.stderr


def test_group_lists_subcommands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "score" in result.stdout
    assert CliRunner().invoke(main, ["score", "--help"]).exit_code == 0
    assert CliRunner().invoke(main, ["nope"]).exit_code == 2


def _run_on_terminal(cmd):
    """Run cmd with stderr on a pseudo-terminal; returns (completed process, stderr bytes)."""
    import os
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="100")
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, env=env, timeout=120)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return done, b"".join(chunks)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a pseudo-terminal")
def test_progress_bar_only_on_a_terminal(parquet_path):
    cmd = [sys.executable, "-m", "crossent.cli.main", "score", str(parquet_path), "--target", "y",
           "--probs", "p_*", "--format", "json", "--batch-rows", "100"]
    done, stderr = _run_on_terminal(cmd)
    assert done.returncode == 0
    assert json.loads(done.stdout)["rows"] == 2531  # stdout stays clean JSON
    assert b"scoring rows" in stderr
    done, stderr = _run_on_terminal(cmd + ["--quiet"])
    assert done.returncode == 0 and b"scoring rows" not in stderr


def test_csv_of_float32_probabilities_needs_no_normalize(tmp_path, preds):
    """Text has no dtype: rows written from float32 are held to float32's tolerance."""
    import pyarrow as pa

    _, p, y, _ = preds
    p32 = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    off = np.abs(p32.astype(np.float64).sum(axis=1) - 1)
    assert off.max() > np.sqrt(np.finfo(np.float64).eps)  # float64's tolerance would reject it
    table = pa.table({**{f"p{k}": p32[:, k] for k in range(p.shape[1])}, "y": y})
    pacsv.write_csv(table, tmp_path / "p32.csv")
    out = run_json(tmp_path / "p32.csv", "--target", "y", "--probs", "p*")
    # scikit-learn warns that these rows do not sum to 1: the float64 transcription is the oracle
    expected = -np.log(p32.astype(np.float64)[np.arange(len(y)), y]).mean()
    # the text holds float32's shortest digits, read back as float64: equal to ~1e-8 per value
    np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-7)
