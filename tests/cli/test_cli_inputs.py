"""`crossent score` on awkward inputs (CLI review D1, D2, D4, D5, D6): duplicated column names,
directories whose files select other columns, a weight column that is the target, huge
--batch-rows, sub-directories named like files. Bad data exits 1 naming the file and column;
option problems exit 2; nothing reaches stdout on an error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from crossent.cli.score import score_files
from crossent.io import DataError, open_predictions

from .conftest import run, run_json, softmax


def _ce(p, y):
    """float64 oracle: mean of -log p[i, y_i]."""
    return float(-np.log(np.asarray(p, dtype=np.float64)[np.arange(len(y)), y]).mean())


def _write(table, path):
    """Write ``table`` (duplicated names allowed) as Parquet, CSV or .npz (a record array whose
    fields are the columns, beside a 1-D array per duplicated name)."""
    suffix = path.suffix
    if suffix == ".parquet":
        pq.write_table(table, path)
    elif suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        names = table.column_names
        first = [k for k, n in enumerate(names) if n not in names[:k]]
        rec = np.rec.fromarrays([table.column(k).to_numpy() for k in first],
                                names=[names[k] for k in first])
        extra = {names[k]: table.column(k).to_numpy() for k in range(len(names)) if k not in first}
        np.savez(path, rec=rec, **extra)


def _table(names, columns):
    return pa.Table.from_arrays([pa.array(c) for c in columns], names=names)


_Y, _P0, _P1 = [0, 1, 1], [0.5, 0.2, 0.4], [0.5, 0.8, 0.6]


def _bad_data(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ------------------------------------------------------------------ D1: duplicated names


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
@pytest.mark.parametrize(
    ("names", "options", "column"),
    [
        (["y", "p0", "p1", "p1"], ["--probs", "p0,p1"], "p1"),  # a score column, by name
        (["y", "p0", "p1", "p1"], ["--probs", "p*"], "p1"),  # ... by a glob
        (["y", "p0", "p1", "y"], ["--probs", "p0,p1"], "y"),  # the target
        (["y", "p0", "p1", "w", "w"], ["--probs", "p0,p1", "--sample-weight", "w"], "w"),
    ],
)
def test_a_selected_duplicated_name_is_bad_data_naming_it(tmp_path, suffix, names, options,
                                                          column):
    """D1: Parquet gave a KeyError traceback, CSV silently used the first column, a glob was a
    usage error blaming the option."""
    columns = [_Y, _P0, _P1, [1, 0, 0] if names[3] == "y" else [0.1, 0.1, 0.1], [1.0, 1.0, 1.0]]
    path = tmp_path / f"dup{suffix}"
    _write(_table(names, columns[: len(names)]), path)
    result = run(path, "--target", "y", *options)
    _bad_data(result, str(path), f"column {column!r}: the file has 2 columns named {column!r}")
    with pytest.raises(DataError, match=f"the file has 2 columns named {column!r}"):
        open_predictions(path, target="y", scores=options[1],
                         sample_weight=options[3] if len(options) > 2 else None)


def test_a_duplicated_name_with_engine_dask(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _write(_table(["y", "p0", "p1", "p1"], [_Y, _P0, _P1, _P0]), folder / "a.parquet")
    result = run(folder, "--target", "y", "--probs", "p0,p1", "--engine", "dask")
    _bad_data(result, "a.parquet", "column 'p1': the file has 2 columns named 'p1'")


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
def test_duplicated_names_that_are_not_selected_do_not_matter(tmp_path, suffix):
    path = tmp_path / f"dupx{suffix}"
    _write(_table(["x", "y", "p0", "p1", "x"], [[7, 7, 7], _Y, _P0, _P1, [8, 8, 8]]), path)
    out = run_json(path, "--target", "y", "--probs", "p*")
    assert out["rows"] == 3
    np.testing.assert_allclose(out["cross_entropy_nats"],
                               _ce(np.column_stack([_P0, _P1]), _Y), rtol=1e-12)


# ------------------------------------------------------------------ D2: files of a directory


def _shards(folder, widths, suffix=".parquet", order=None):
    """Files of logits l0..l{w-1} (one file per width); returns (logits, labels) per file."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    parts = []
    for i, width in enumerate(widths):
        z = rng.normal(size=(37 + i, width))
        y = rng.integers(0, min(widths), len(z))
        keys = order or list(range(width))
        table = pa.table({"y": y, **{f"l{k}": z[:, k] for k in keys}})
        _write(table, folder / f"{chr(97 + i)}{suffix}")
        parts.append((z, y))
    return parts


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_later_file_whose_glob_selects_more_columns_is_bad_data(tmp_path, suffix):
    """D2: b's fourth logit column was silently dropped (softmax over 3 of its 4 classes)."""
    folder = tmp_path / "shards"
    _shards(folder, [3, 4], suffix)
    result = run(folder, "--target", "y", "--logits", "l*")
    _bad_data(result, f"b{suffix}", "'l*'", "['l0', 'l1', 'l2', 'l3']", "['l0', 'l1', 'l2']",
              f"a{suffix}")


def test_a_later_file_with_other_columns_under_engine_dask(tmp_path):
    folder = tmp_path / "shards"
    _shards(folder, [3, 4])
    with pytest.raises(DataError, match=r"b\.parquet.*\['l0', 'l1', 'l2', 'l3'\]"):
        score_files(str(folder), target="y", logits="l*", engine="dask")
    result = run(folder, "--target", "y", "--logits", "l*", "--engine", "dask")
    _bad_data(result, "b.parquet", "a.parquet")


def test_the_same_columns_in_another_order_are_read_by_name(tmp_path):
    """A later file whose glob matches the same columns in another physical order is read in
    the first file's class order (a class is its column's name)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    rng = np.random.default_rng(4)
    z = rng.normal(size=(50, 3))
    y = rng.integers(0, 3, 50)
    _write(pa.table({"y": y[:20], **{f"l{k}": z[:20, k] for k in range(3)}}), folder / "a.parquet")
    _write(pa.table({"y": y[20:], **{f"l{k}": z[20:, k] for k in (2, 0, 1)}}), folder / "b.parquet")
    out = run_json(folder, "--target", "y", "--logits", "l*")
    assert out["rows"] == 50 and out["class_names"] == ["l0", "l1", "l2"]
    np.testing.assert_allclose(out["cross_entropy_nats"], _ce(softmax(z), y), rtol=1e-12)


# ------------------------------------------------------------------ D4: weight == target


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
def test_sample_weight_naming_the_target_is_a_usage_error(tmp_path, suffix):
    """D4: CSV said the integer labels hold strings (exit 1), Parquet used the labels as
    weights (exit 0)."""
    path = tmp_path / f"a{suffix}"
    _write(_table(["y", "p0", "p1"], [_Y, _P0, _P1]), path)
    result = run(path, "--target", "y", "--probs", "p0,p1", "--sample-weight", "y")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "sample weight column 'y' is the target column" in result.stderr
    with pytest.raises(ValueError, match="is the target column"):
        open_predictions(path, target="y", scores="p0,p1", sample_weight="y")


# ------------------------------------------------------------------ D5: --batch-rows range


def test_batch_rows_beyond_int64_is_a_usage_error(parquet_path):
    """D5: 2**63 was an OverflowError traceback (exit 1)."""
    result = run(parquet_path, "--target", "y", "--probs", "p_*", "--batch-rows", 2**63)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "--batch-rows" in result.stderr and f"1<=x<={2**63 - 1}" in result.stderr
    with pytest.raises(ValueError, match=r"batch_rows must be an integer in \[1, "):
        next(open_predictions(parquet_path, target="y", scores="p_*").batches(2**63))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
def test_largest_batch_rows_reads_every_format(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    _write(_table(["y", "p0", "p1"], [_Y, _P0, _P1]), path)
    out = run_json(path, "--target", "y", "--probs", "p0,p1", "--batch-rows", 2**63 - 1)
    assert out["rows"] == 3
    np.testing.assert_allclose(out["cross_entropy_nats"],
                               _ce(np.column_stack([_P0, _P1]), _Y), rtol=1e-12)


# ------------------------------------------------------------------ D6: sub-directories


def test_a_sub_directory_named_like_a_file_is_skipped(tmp_path):
    """D6: a directory PATH holding ``sub.parquet/`` (as Spark writes) failed on it."""
    folder = tmp_path / "nest"
    (folder / "sub.parquet").mkdir(parents=True)
    table = _table(["y", "p0", "p1"], [_Y, _P0, _P1])
    _write(table, folder / "x.parquet")
    _write(table, folder / "sub.parquet" / "part-0.parquet")
    out = run_json(folder, "--target", "y", "--probs", "p0,p1")
    assert out["rows"] == 3


# ------------------------------------------------------------------ paths that look like globs


def test_an_existing_file_with_brackets_is_scored_not_globbed(tmp_path):
    """Review (cli/io) 2: ``run[1].csv`` was read as a glob: run1.csv was scored, or exit 2."""
    (tmp_path / "run[1].csv").write_text("y,p_a,p_b\n0,0.9,0.1\n")
    (tmp_path / "run1.csv").write_text("y,p_a,p_b\n0,0.1,0.9\n")  # what the glob matches
    out = run_json(tmp_path / "run[1].csv", "--target", "y", "--probs", "p_*")
    np.testing.assert_allclose(out["cross_entropy_nats"], -np.log(0.9), rtol=1e-15)
    (tmp_path / "run1.csv").unlink()
    out = run_json(tmp_path / "run[1].csv", "--target", "y", "--probs", "p_*")
    np.testing.assert_allclose(out["cross_entropy_nats"], -np.log(0.9), rtol=1e-15)
    # a directory with brackets in its name is read as a directory too
    folder = tmp_path / "fold[2]"
    folder.mkdir()
    (folder / "a.csv").write_text("y,p_a,p_b\n1,0.4,0.6\n")
    out = run_json(folder, "--target", "y", "--probs", "p_*")
    np.testing.assert_allclose(out["cross_entropy_nats"], -np.log(0.6), rtol=1e-15)
    # a glob is still a glob when no file has its name (glob.escape's form matches the file)
    out = run_json(tmp_path / "run[[]1].csv", "--target", "y", "--probs", "p_*")
    np.testing.assert_allclose(out["cross_entropy_nats"], -np.log(0.9), rtol=1e-15)
