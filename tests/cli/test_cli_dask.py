"""`--engine dask`: one task per row group on a local cluster of 2 worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossent.cli.score import score_files
from crossent.io import DataError

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None, worker_dashboard_address=None) as c:
        with distributed.Client(c) as client:
            yield c, client


@pytest.fixture(scope="module")
def folder(pred_table, tmp_path_factory):
    out = tmp_path_factory.mktemp("dask")
    n = pred_table.num_rows
    cuts = [0, 700, 1500, n]
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        pq.write_table(pred_table.slice(a, b - a), out / f"part-{i}.parquet", row_group_size=256)
    return out


def _same(a, b):
    assert a.rows == b.rows and a.class_names == b.class_names
    for key in ("weight", "cross_entropy_nats", "accuracy", "expected_calibration_error"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-12, err_msg=key)
    for x, y in zip(a.per_class, b.per_class, strict=True):
        assert x["rows"] == y["rows"]
        np.testing.assert_allclose(x["cross_entropy_nats"], y["cross_entropy_nats"], rtol=1e-12)
    np.testing.assert_array_equal(a.loss_histogram["counts"], b.loss_histogram["counts"])


def test_dask_progress_counts_every_row_group(cluster, folder, parquet_path):
    """The progress callback hears each finished row group's rows once: they add up to the data."""
    _, client = cluster
    args = {"target": "label", "probs": "p_*", "sample_weight": "w"}
    calls = []
    expected, files = score_files(str(folder), engine="dask", client=client, **args)
    from crossent.cli._engines import score_dask

    groups = sum(len(f.row_groups()) for f in files)
    assert groups > len(files)  # several row groups per file: the count below is per task
    options = {"num_classes": files[0].num_classes, "from_logits": False, "normalize": False,
               "tolerance": None, "class_names": files[0].class_names,
               "column_names": files[0].score_columns, "target_name": "label", "weight_name": "w"}
    acc = score_dask(files, options, batch_rows=100, client=client, progress=calls.append)
    assert len(calls) == groups
    assert sum(calls) == pq.ParquetFile(parquet_path).metadata.num_rows
    _same(acc.compute(), expected)


def test_dask_equals_local(cluster, folder, parquet_path):
    _, client = cluster
    args = {"target": "label", "probs": "p_*", "sample_weight": "w"}
    dask_result, files = score_files(str(folder), engine="dask", client=client, **args)
    assert len(files) == 3
    local_dir, _ = score_files(str(folder), engine="local", **args)
    local_one, _ = score_files(str(parquet_path), engine="local", **args)
    _same(dask_result, local_dir)
    _same(dask_result, local_one)
    glob_result, _ = score_files(str(folder / "part-*.parquet"), engine="dask", client=client,
                                 target="y", logits="logit*")
    local_logits, _ = score_files(str(parquet_path), target="y", logits="logit*")
    _same(glob_result, local_logits)


def test_dask_bad_data_names_file_column_and_row(cluster, folder, tmp_path):
    _, client = cluster
    bad = pq.read_table(folder / "part-1.parquet")
    values = bad.column("p_dog").to_numpy().copy()
    values[300] = 2.0
    bad = bad.set_column(bad.schema.get_field_index("p_dog"), "p_dog", pa.array(values))
    pq.write_table(pq.read_table(folder / "part-0.parquet"), tmp_path / "a.parquet")
    pq.write_table(bad, tmp_path / "b.parquet", row_group_size=256)
    with pytest.raises(DataError, match=r"b.parquet: column 'p_dog', data row 300: probability"):
        score_files(str(tmp_path), engine="dask", client=client, target="y", probs="p_*")


def test_cli_dask_engine_on_a_scheduler_address(cluster, folder, parquet_path):
    c, _ = cluster
    env = dict(os.environ, DASK_SCHEDULER_ADDRESS=c.scheduler_address)
    cmd = [sys.executable, "-m", "crossent.cli.main", "score", str(folder), "--target", "y",
           "--probs", "p_*", "--engine", "dask", "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    local, _ = score_files(str(parquet_path), target="y", probs="p_*")
    assert out["rows"] == local.rows
    np.testing.assert_allclose(out["cross_entropy_nats"], local.cross_entropy_nats, rtol=1e-12)


def test_dask_engine_reads_parquet_only(tmp_path):
    (tmp_path / "a.csv").write_text("a,b,y\n0.5,0.5,1\n")
    with pytest.raises(FileNotFoundError, match="names no file"):
        score_files(str(tmp_path), engine="dask", target="y", probs="a,b")


def test_dask_reports_the_first_bad_row_of_the_first_bad_file(cluster, tmp_path):
    """Review (cli/io) 5: the error raised was whichever failed task the merge tree reached
    first (row 393 or row 3 of the same file, run to run). Now the first bad row in file order."""
    _, client = cluster
    rng = np.random.default_rng(5)
    n = 400
    for name, bad in (("a", {393: 9, 120: 8}), ("b", {3: 7})):
        z = rng.normal(size=(n, 3))
        y = rng.integers(0, 3, n)
        for row, label in bad.items():
            y[row] = label
        table = pa.table({"y": y, **{f"l{k}": z[:, k] for k in range(3)}})
        pq.write_table(table, tmp_path / f"{name}.parquet", row_group_size=10)
    for _ in range(3):
        with pytest.raises(DataError, match=r"a.parquet, column 'y', data row 120: label 8 "):
            score_files(str(tmp_path), engine="dask", client=client, target="y", logits="l*")
    (tmp_path / "a.parquet").unlink()
    for _ in range(2):
        with pytest.raises(DataError, match=r"b.parquet, column 'y', data row 3: label 7 "):
            score_files(str(tmp_path), engine="dask", client=client, target="y", logits="l*")


def test_cli_dask_error_is_one_line_on_stderr(tmp_path):
    """Review (cli/io) 6: the cluster the command starts logged each failed task's traceback
    to stderr before the error line (also with --quiet)."""
    z = np.zeros((40, 2))
    y = np.zeros(40, dtype=np.int64)
    y[33] = 5
    pq.write_table(pa.table({"y": y, "l0": z[:, 0], "l1": z[:, 1]}), tmp_path / "a.parquet",
                   row_group_size=10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    cmd = [sys.executable, "-m", "crossent.cli.main", "score", str(tmp_path), "--target", "y",
           "--logits", "l*", "--engine", "dask"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"Error: {tmp_path / 'a.parquet'}, column 'y', data row 33: label 5 is not a class "
        "index in [0, 2)"
    ]


def test_dask_overflow_found_when_merging_names_its_row(cluster, tmp_path):
    """Sample weights of 1e307 in row groups of 10 rows: no row group reaches float64's largest
    number (1e308 each), their merge does (1.8e308 at row 17 of the first file). The error named
    no file and no row ("... when merging parts"); now the row, as the local engine does, also
    when the overflow falls in the second file."""
    _, client = cluster
    n = 40
    y = np.arange(n) % 2
    p = np.stack([0.75 - 0.5 * y, 0.25 + 0.5 * y], axis=1)
    table = pa.table({"y": y, "p_a": p[:, 0], "p_b": p[:, 1], "w": np.full(n, 1e307)})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)
    args = {"target": "y", "probs": "p_*", "sample_weight": "w"}
    message = r"column 'w', data row {}: the sample weights sum beyond float64's largest number"
    with pytest.raises(DataError, match=r"a.parquet: " + message.format(17)):
        score_files(str(tmp_path), engine="dask", client=client, **args)
    with pytest.raises(DataError, match=r"a.parquet: " + message.format(17)):
        score_files(str(tmp_path), **args)  # the local engine names the same row
    pq.write_table(table.slice(0, 10), tmp_path / "a.parquet", row_group_size=10)
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=10)
    with pytest.raises(DataError, match=r"b.parquet: " + message.format(7)):
        score_files(str(tmp_path), engine="dask", client=client, **args)
