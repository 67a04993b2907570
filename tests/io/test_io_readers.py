"""Readers of prediction files: every format gives back exactly the arrays written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from crossent.io import (
    DataError,
    class_names_from_columns,
    open_predictions,
    resolve_columns,
)

NAMES = ["cat", "dog", "cow", "pig", "hen"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, C = 1003, len(NAMES)
    z = rng.normal(size=(n, C)).astype(np.float32)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = rng.integers(0, C, n)
    w = rng.uniform(0, 2, n)
    return z, p.astype(np.float32), y, w


def _table(data):
    z, p, y, w = data
    cols = {"id": np.arange(len(y))}
    cols.update({f"p_{name}": p[:, k] for k, name in enumerate(NAMES)})
    cols["label"] = np.array(NAMES)[y]
    cols["y"] = y
    cols["w"] = w
    cols.update({f"l{k}": z[:, k] for k in range(len(NAMES))})
    return pa.table(cols)


def _collect(opened, batch_rows):
    batches = list(opened.batches(batch_rows))
    assert all(len(b.targets) <= batch_rows for b in batches)
    assert [b.start for b in batches] == list(np.cumsum([0] + [len(b.targets) for b in batches])[:-1])
    scores = np.concatenate([b.scores for b in batches])
    targets = np.concatenate([b.targets for b in batches])
    weight = None
    if batches and batches[0].sample_weight is not None:
        weight = np.concatenate([b.sample_weight for b in batches])
    return scores, targets, weight


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("target", ["y", "label"])
def test_tables_round_trip(tmp_path, data, fmt, target):
    z, p, y, w = data
    path = tmp_path / f"pred.{fmt}"
    if fmt == "parquet":
        pq.write_table(_table(data), path, row_group_size=300)
    else:
        pacsv.write_csv(_table(data), path)
    f = open_predictions(path, target=target, scores="p_*", sample_weight="w")
    assert f.score_columns == tuple(f"p_{n}" for n in NAMES)
    assert f.class_names == tuple(NAMES)
    scores, targets, weight = _collect(f, 128)
    np.testing.assert_array_equal(targets, y)
    np.testing.assert_allclose(weight, w, rtol=1e-15)
    if fmt == "parquet":
        assert scores.dtype == np.float32
        np.testing.assert_array_equal(scores, p)
    else:  # text: float64, equal to the float32 values written (shortest round-trip digits)
        assert scores.dtype == np.float64
        np.testing.assert_allclose(scores, p, rtol=1e-7)


def test_parquet_row_groups_and_batches(tmp_path, data):
    z, _, y, _ = data
    path = tmp_path / "logits.parquet"
    pq.write_table(_table(data), path, row_group_size=300)
    f = open_predictions(path, target="y", scores="l?")
    assert f.num_rows == len(y) and f.row_groups() == [(0, 0), (1, 300), (2, 600), (3, 900)]
    scores, targets, _ = _collect(f, 1000)
    np.testing.assert_array_equal(scores, z)
    parts = [b for rg in f.row_groups() for b in f.batches(64, row_group=rg)]
    np.testing.assert_array_equal(np.concatenate([b.scores for b in parts]), z)
    assert parts[-1].start + len(parts[-1].targets) == len(y)


def test_npz_matrix_and_npy_records(tmp_path, data):
    z, p, y, w = data
    npz = tmp_path / "pred.npz"
    np.savez(npz, logits=z, labels=y, weight=w)
    f = open_predictions(npz, target="labels", scores="logits", sample_weight="weight")
    assert f.score_columns == tuple(f"logits[{k}]" for k in range(5))
    scores, targets, weight = _collect(f, 100)
    np.testing.assert_array_equal(scores, z)
    np.testing.assert_array_equal(targets, y)
    np.testing.assert_array_equal(weight, w)
    compressed = tmp_path / "pred_c.npz"
    np.savez_compressed(compressed, logits=z, labels=y)
    scores, targets, _ = _collect(open_predictions(compressed, target="labels", scores="logits"), 77)
    np.testing.assert_array_equal(scores, z)

    records = np.zeros(len(y), dtype=[("y", "i8")] + [(f"p_{n}", "f4") for n in NAMES])
    records["y"] = y
    for k, n in enumerate(NAMES):
        records[f"p_{n}"] = p[:, k]
    npy = tmp_path / "records.npy"
    np.save(npy, records)
    f = open_predictions(npy, target="y", scores="p_*")
    scores, targets, _ = _collect(f, 256)
    np.testing.assert_array_equal(scores, p)
    np.testing.assert_array_equal(targets, y)


def test_plain_2d_npy_columns_are_numbered(tmp_path):
    a = np.array([[0.25, 0.75, 1.0], [0.5, 0.5, 0.0]])
    np.save(tmp_path / "a.npy", a)
    f = open_predictions(tmp_path / "a.npy", target="2", scores="0,1")
    scores, targets, _ = _collect(f, 1)
    np.testing.assert_array_equal(scores, a[:, :2])
    np.testing.assert_array_equal(targets, [1, 0])


def test_glob_keeps_file_order_not_text_order():
    names = ["y"] + [f"l{k}" for k in range(16)]
    assert resolve_columns("l*", names) == [f"l{k}" for k in range(16)]
    assert sorted(resolve_columns("l*", names)) != resolve_columns("l*", names)
    assert resolve_columns("l3, l1,l2", names) == ["l3", "l1", "l2"]
    with pytest.raises(DataError, match="pattern 'p_\\*' matches no column"):
        resolve_columns("p_*", names)
    with pytest.raises(DataError, match="no column 'l99' in the file"):
        resolve_columns("l1,l99", names)
    with pytest.raises(ValueError, match="selects column 'l1' twice"):
        resolve_columns("l1,l*", names)


def test_class_names():
    assert class_names_from_columns(["prob_cat", "prob_car"]) == ["cat", "car"]
    assert class_names_from_columns(["cat_p", "dog_p"]) == ["cat", "dog"]
    assert class_names_from_columns(["x", "y"]) == ["x", "y"]
    assert class_names_from_columns(["p_a", "p_a"]) == ["p_a", "p_a"]


def test_target_names_and_full_column_names(tmp_path):
    t = pa.table({"p_cat": [0.9, 0.2, 0.5], "p_dog": [0.1, 0.8, 0.5],
                  "y": ["cat", "p_dog", "dog"]})
    pq.write_table(t, tmp_path / "a.parquet")
    f = open_predictions(tmp_path / "a.parquet", target="y", scores="p_cat,p_dog")
    assert _collect(f, 2)[1].tolist() == [0, 1, 1]


def test_csv_integer_labels_are_indices(tmp_path):
    (tmp_path / "a.csv").write_text("a,b,y\n0.5,0.5,1\n0.25,0.75,0\n")
    f = open_predictions(tmp_path / "a.csv", target="y", scores="a,b")
    assert f.target.mode == "auto"  # names a, b are not integers: integer labels are indices
    assert _collect(f, 10)[1].tolist() == [1, 0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["cat", "dog", "cow"], r"column 'y', data row 2: label 'cow' is not among the classes"),
        (["cat", None, "dog"], r"column 'y', data row 1: missing class label"),
        ([0, 1, 2], r"column 'y', data row 2: label 2 is not a class index in \[0, 2\)"),
        ([0.0, 1.0, 0.5], r"column 'y', data row 2: label 0.5 is not an integer"),
        ([0, None, 1], r"column 'y', data row 1: missing class label"),
    ],
)
def test_bad_targets_name_column_and_row(tmp_path, values, message):
    t = pa.table({"p_cat": [0.9, 0.2, 0.5], "p_dog": [0.1, 0.8, 0.5], "y": values})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=2)
    f = open_predictions(tmp_path / "a.parquet", target="y", scores="p_*")
    with pytest.raises(DataError, match=message):
        _collect(f, 2)


def test_missing_score_value_names_column_and_row(tmp_path):
    t = pa.table({"a": [0.5, None, 0.5], "b": [0.5, 0.5, 0.5], "y": [0, 1, 0]})
    pq.write_table(t, tmp_path / "a.parquet")
    f = open_predictions(tmp_path / "a.parquet", target="y", scores="a,b")
    with pytest.raises(DataError, match=r"column 'a', data row 1: missing value"):
        _collect(f, 8)


def test_csv_unparseable_number_names_column_and_row(tmp_path):
    rows = "\n".join(["a,b,y"] + ["0.5,0.5,1"] * 5 + ["0.5,oops,0"]) + "\n"
    (tmp_path / "a.csv").write_text(rows)
    f = open_predictions(tmp_path / "a.csv", target="y", scores="a,b")
    with pytest.raises(DataError, match=r"column 'b', data row 5: 'oops' is not a number"):
        _collect(f, 2)


def test_open_errors(tmp_path, data):
    pq.write_table(_table(data), tmp_path / "a.parquet")
    path = tmp_path / "a.parquet"
    with pytest.raises(DataError, match="target: no column 'nope' in the file"):
        open_predictions(path, target="nope", scores="p_*")
    with pytest.raises(DataError, match="column 'label': holds string, expected numbers"):
        open_predictions(path, target="y", scores="p_*,label")
    with pytest.raises(ValueError, match="target column 'y' is also selected as a score column"):
        open_predictions(path, target="y", scores="p_*,y")
    with pytest.raises(ValueError, match="PATH must end in one of"):
        open_predictions(tmp_path / "a.txt", target="y", scores="p_*")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        open_predictions(tmp_path / "bad.parquet", target="y", scores="p_*")


def test_exact_names_win_over_globs(tmp_path):
    t = pa.table({"p[0]": [0.5, 0.25], "p[1]": [0.5, 0.75], "p0": [1.0, 1.0], "y": [0, 1]})
    pq.write_table(t, tmp_path / "a.parquet")
    f = open_predictions(tmp_path / "a.parquet", target="y", scores="p[0],p[1]")
    assert f.score_columns == ("p[0]", "p[1]")
    assert f.with_path(tmp_path / "a.parquet").score_columns == ("p[0]", "p[1]")


def test_truncated_npy_names_the_row(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(100, dtype=[("y", "i8"), ("a", "f8"), ("b", "f8")]))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[: len(data) - 24 * 30])
    f = open_predictions(tmp_path / "a.npy", target="y", scores="a,b")
    with pytest.raises(DataError, match="ends early, at data row 70"):
        _collect(f, 64)


@pytest.mark.parametrize("kind", ["dictionary", "large_string"])
def test_dictionary_and_large_string_targets(tmp_path, kind):
    labels = pa.array(["dog", "cat", "dog"])
    labels = labels.dictionary_encode() if kind == "dictionary" else labels.cast(pa.large_string())
    t = pa.table({"p_cat": [0.9, 0.2, 0.5], "p_dog": [0.1, 0.8, 0.5], "y": labels})
    pq.write_table(t, tmp_path / "a.parquet")
    f = open_predictions(tmp_path / "a.parquet", target="y", scores="p_*")
    assert _collect(f, 2)[1].tolist() == [1, 0, 1]
