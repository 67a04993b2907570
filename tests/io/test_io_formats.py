"""Readers on awkward files (review F4, F6, F7, F10): Fortran-ordered arrays streamed in bounded
memory, UTF-8 with a byte-order mark, undecodable bytes, ragged rows, mixed formats in a
directory, array shapes that cannot be columns, compressed CSV."""

from __future__ import annotations

import bz2
import gzip
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss

from crossent.io import DataError, open_predictions

from ..cli.conftest import run, run_json


def softmax_ce(z, y):
    """float64 oracle: mean of logsumexp(z_i) - z_{i, y_i}."""
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float((lse - z[np.arange(len(y)), y]).mean())


# ---------------------------------------------------------------- F4: Fortran-ordered arrays


@pytest.mark.parametrize("how", ["savez", "savez_compressed", "npy"])
@pytest.mark.parametrize("batch_rows", [1, 7, 1000, 100_000])
def test_fortran_ordered_arrays_read_like_c_ordered(tmp_path, how, batch_rows):
    rng = np.random.default_rng(3)
    n, C = 2345, 5
    z = rng.standard_normal((n, C)).astype(np.float32)
    y = rng.integers(0, C, n)
    if how == "savez":
        np.savez(tmp_path / "a.npz", z=np.asfortranarray(z), y=y)
    elif how == "savez_compressed":
        np.savez_compressed(tmp_path / "a.npz", z=np.asfortranarray(z), y=y)
    if how.startswith("savez"):
        f = open_predictions(tmp_path / "a.npz", target="y", scores="z")
    else:  # a plain 2-D .npy, Fortran order, labels in its last column
        zy = np.asfortranarray(np.column_stack([z, y]).astype(np.float64))
        np.save(tmp_path / "a.npy", zy)
        f = open_predictions(tmp_path / "a.npy", target=str(C), scores=",".join(map(str, range(C))))
    got_z, got_y = [], []
    for batch in f.batches(batch_rows):
        got_z.append(batch.scores)
        got_y.append(batch.targets)
    np.testing.assert_array_equal(np.concatenate(got_z), z)
    np.testing.assert_array_equal(np.concatenate(got_y), y)


def test_fortran_npz_scores_equal_the_oracle(tmp_path):
    rng = np.random.default_rng(4)
    z = rng.standard_normal((3001, 7))
    y = rng.integers(0, 7, 3001)
    np.savez_compressed(tmp_path / "f.npz", z=z.T.copy().T, y=y)  # saved as a.T: Fortran
    out = run_json(tmp_path / "f.npz", "--target", "y", "--logits", "z", "--batch-rows", "500")
    np.testing.assert_allclose(out["cross_entropy_nats"], softmax_ce(z, y), rtol=1e-12)


@pytest.mark.parametrize("compressed", [False, True])
def test_fortran_npz_memory_follows_the_batch(tmp_path, compressed):
    """Peak Python-tracked memory (numpy buffers included) while reading a 25 MB Fortran
    member in 4096-row batches stays a small fraction of the member (it was read whole)."""
    rng = np.random.default_rng(5)
    n, C = 400_000, 16
    z = np.asfortranarray(rng.standard_normal((n, C), dtype=np.float32))
    y = rng.integers(0, C, n)
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "f.npz", z=z, y=y)
    expected_sum = float(z.sum(dtype=np.float64))
    del z
    f = open_predictions(tmp_path / "f.npz", target="y", scores="z")
    tracemalloc.start()
    try:
        total, rows = 0.0, 0
        for batch in f.batches(4096):
            total += float(batch.scores.sum(dtype=np.float64))
            rows += len(batch.targets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == n
    np.testing.assert_allclose(total, expected_sum, rtol=1e-12)
    raw = n * C * 4
    assert peak < 0.1 * raw, f"peak {peak / 2**20:.1f} MiB for a {raw / 2**20:.1f} MiB member"


# ---------------------------------------------------------------- F10: shapes, formats


def test_npz_shapes_that_are_not_columns_give_a_shape_error(tmp_path):
    p = np.full((4, 2), 0.5)
    np.savez(tmp_path / "a.npz", p=p, y=np.zeros((4, 1), dtype=np.int64))
    with pytest.raises(DataError, match=r"target: array 'y' has shape \(4, 1\), expected a 1-D"):
        open_predictions(tmp_path / "a.npz", target="y", scores="p")
    np.savez(tmp_path / "b.npz", p=p[:, :, None], y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"array 'p' has shape \(4, 2, 1\); scores are a 2-D"):
        open_predictions(tmp_path / "b.npz", target="y", scores="p")
    result = run(tmp_path / "a.npz", "--target", "y", "--probs", "p")
    assert result.exit_code == 1 and "has shape (4, 1)" in result.stderr


def test_directory_of_mixed_formats_reads_each_by_its_suffix(tmp_path):
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(2), 300)
    y = rng.integers(0, 2, 300)
    folder = tmp_path / "mixed"
    folder.mkdir()
    t = pa.table({"p0": p[:, 0], "p1": p[:, 1], "y": y})
    pacsv.write_csv(t.slice(0, 100), folder / "a.csv")
    pq.write_table(t.slice(100, 100), folder / "b.parquet")
    np.savez(folder / "c.npz", p0=p[200:, 0], p1=p[200:, 1], y=y[200:])
    out = run_json(folder, "--target", "y", "--probs", "p0,p1")
    assert out["rows"] == 300
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss(y, p), rtol=1e-12)


@pytest.mark.parametrize(("suffix", "opener"), [(".csv.gz", gzip.open), (".csv.bz2", bz2.open),
                                                 (".CSV.GZ", gzip.open)])
def test_compressed_csv(tmp_path, suffix, opener):
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.ones(3), 5000)
    y = rng.integers(0, 3, 5000)
    text = "\ufeffy,p0,p1,p2\n" + "".join(
        f"{t},{a!r},{b!r},{c!r}\n" for t, (a, b, c) in zip(y, p.tolist(), strict=True))
    with opener(tmp_path / f"a{suffix}", "wt", encoding="utf-8") as f:
        f.write(text)
    out = run_json(tmp_path / f"a{suffix}", "--target", "y", "--probs", "p*", "--batch-rows", "999")
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss(y, p), rtol=1e-12)
    assert out["rows"] == 5000


def test_unknown_suffix_names_the_accepted_ones_without_a_format_hint(tmp_path):
    (tmp_path / "a.tsv").write_text("a\tb\n")
    result = run(tmp_path / "a.tsv", "--target", "y", "--probs", "a,b")
    assert result.exit_code == 2 and ".csv.gz" in result.stderr
    assert "pass a format" not in result.stderr


def test_json_tells_an_infinite_loss_from_a_class_without_rows(tmp_path):
    z = np.array([[0.0, -np.inf, 1.0], [0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    y = np.array([1, 1, 0])  # row 0: the true class is masked; class 2 has no rows
    np.savez(tmp_path / "a.npz", z=z, y=y)
    out = run_json(tmp_path / "a.npz", "--target", "y", "--logits", "z")
    c0, c1, c2 = out["per_class"]
    # +inf is the string "inf" and null is "no mean" (review of cli/io 4: both were null)
    assert out["cross_entropy_nats"] == "inf" and out["infinite_loss_rows"] == 1
    assert c1["cross_entropy_nats"] == "inf" and c1["rows"] == 2 and c1["infinite_loss_rows"] == 1
    assert c2["cross_entropy_nats"] is None and c2["rows"] == 0 and c2["infinite_loss_rows"] == 0
    np.testing.assert_allclose(c0["cross_entropy_nats"], softmax_ce(z[2:], y[2:]), rtol=1e-12)
    assert c0["infinite_loss_rows"] == 0


# ---------------------------------------------------------------- F6: encodings


def test_utf8_bom_is_skipped(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfp0,p1,y\n0.2,0.8,1\n0.6,0.4,1\n")
    out = run_json(tmp_path / "bom.csv", "--target", "y", "--probs", "p*")
    assert out["classes"] == 2 and out["class_names"] == ["p0", "p1"]
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss([1, 1], [[0.2, 0.8], [0.6, 0.4]],
                                                                   labels=[0, 1]), rtol=1e-12)
    (tmp_path / "bom2.csv").write_bytes(b"\xef\xbb\xbfy,p0,p1\n1,0.2,0.8\n")
    assert run_json(tmp_path / "bom2.csv", "--target", "y", "--probs", "p*")["rows"] == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"p0,p1,y\n0.2,0.8,1\n0.5,0.5,1\n0.5,0.5,caf\xe9\n",
         "data row 2: not UTF-8 text: byte 0xe9"),
        (b"p0,p1,caf\xe9\n0.2,0.8,1\n", "line 1 (the header) is not UTF-8 text: byte 0xe9"),
        (b"p0,p1,y\n0.2,0.8,1\n\n0.5,0.\xe95,1\n", "data row 1: not UTF-8 text: byte 0xe9"),
    ],
)
def test_undecodable_bytes_are_bad_data_naming_file_and_row(tmp_path, data, message):
    (tmp_path / "latin1.csv").write_bytes(data)
    result = run(tmp_path / "latin1.csv", "--target", "y", "--probs", "p0,p1")
    assert result.exit_code == 1, result.output
    assert "latin1.csv" in result.stderr and message in result.stderr, result.stderr


@pytest.mark.parametrize("kind", ["parquet", "npz", "gzip"])
def test_binary_file_named_csv(tmp_path, kind):
    path = tmp_path / "x.csv"
    if kind == "parquet":
        pq.write_table(pa.table({"p0": [0.5], "p1": [0.5], "y": [0]}), path)
        expected = "the file is a Parquet file (name it .parquet)"
    elif kind == "npz":
        with open(path, "wb") as f:
            np.savez(f, p=np.ones((1, 2)))
        expected = "the file is a zip archive"
    else:
        path.write_bytes(gzip.compress(b"p0,p1,y\n0.5,0.5,0\n"))
        expected = "gzip-compressed (name it .csv.gz)"
    result = run(path, "--target", "y", "--probs", "p0,p1")
    assert result.exit_code == 1 and expected in result.stderr and "x.csv" in result.stderr


# ---------------------------------------------------------------- F7: ragged rows


@pytest.mark.parametrize(("bad", "got"), [("0.2,0.8", 2), ("0.2,0.8,1,7", 4)])
def test_ragged_row_names_its_data_row(tmp_path, bad, got):
    lines = ["p0,p1,y"] + ["0.5,0.5,1"] * 100_000 + [bad] + ["0.5,0.5,0"] * 3
    (tmp_path / "ragged.csv").write_text("\n".join(lines) + "\n")
    result = run(tmp_path / "ragged.csv", "--target", "y", "--probs", "p0,p1")
    assert result.exit_code == 1
    assert (f"ragged.csv, data row 100000: has {got} fields, expected 3 (one per header column)"
            in result.stderr), result.stderr


def test_blank_lines_do_not_shift_the_reported_row(tmp_path):
    (tmp_path / "a.csv").write_text("p0,p1,y\n0.5,0.5,1\n\n0.5,oops,1\n")
    result = run(tmp_path / "a.csv", "--target", "y", "--probs", "p0,p1")
    assert result.exit_code == 1
    assert "column 'p1', data row 1: 'oops' is not a number" in result.stderr
