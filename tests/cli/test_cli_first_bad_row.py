"""The first bad row of a file is the one reported, whatever --batch-rows (review of cli/io,
finding 5): the labels were decoded before the scores were checked, and the accumulator checks
the probabilities' range over a whole batch before their row sums, so a later bad row could be
reported first; a CSV value Arrow cannot read failed its whole block."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from crossent.cli.score import score_files
from crossent.io import DataError

from .conftest import run

BATCHES = [1, 2, 3, 7, 64, 1000, 2**63 - 1]

# one kind of bad row each: (the column it breaks, how)
KINDS = ["label", "missing score", "probability > 1", "row sum", "negative weight",
         "missing weight"]


def _rows(n, bad, seed):
    """n valid rows of 3 classes, then the rows of ``bad`` ({row: kind}) broken."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([1.0, 1.0, 1.0], n)
    p = [[float(v) for v in row] for row in p]
    y = [int(v) for v in rng.integers(0, 3, n)]
    w = [float(v) for v in rng.uniform(0.5, 2.0, n)]
    for row, kind in bad.items():
        if kind == "label":
            y[row] = 7
        elif kind == "missing score":
            p[row][1] = None
        elif kind == "probability > 1":
            p[row] = [1.25, 0.0, 0.0]
        elif kind == "row sum":
            p[row] = [0.5, 0.4, 0.05]
        elif kind == "negative weight":
            w[row] = -1.0
        else:
            w[row] = None
    return pa.table({"y": y, "p_a": [r[0] for r in p], "p_b": [r[1] for r in p],
                     "p_c": [r[2] for r in p], "w": w})


def _reported_row(path, batch_rows):
    with pytest.raises(DataError) as info:
        score_files(str(path), target="y", probs="p_*", sample_weight="w", batch_rows=batch_rows)
    found = re.search(r"data row (\d+)", str(info.value))
    assert found, str(info.value)
    return int(found.group(1))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("seed", range(6))
def test_first_bad_row_whatever_the_batch_size(tmp_path, suffix, seed):
    rng = np.random.default_rng(100 + seed)
    n = 150
    rows = rng.choice(n, size=4, replace=False)
    kinds = rng.choice(len(KINDS), size=4, replace=False)
    bad = {int(r): KINDS[k] for r, k in zip(rows, kinds, strict=True)}
    table = _rows(n, bad, seed)
    path = tmp_path / f"bad{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, path, row_group_size=23)
    else:
        pacsv.write_csv(table, path)
    first = min(bad)
    assert [_reported_row(path, b) for b in BATCHES] == [first] * len(BATCHES), bad


def test_the_review_files(tmp_path):
    """The reviewer's files: row 1 sums to 0.9; a label 7 at row 3, a probability 1.2 at row 2."""
    one = tmp_path / "firstrow.csv"
    one.write_text("y,p_a,p_b\n0,0.3,0.7\n0,0.5,0.4\n1,0.2,0.8\n7,0.2,0.8\n")
    two = tmp_path / "firstrow2.csv"
    two.write_text("y,p_a,p_b\n0,0.3,0.7\n0,0.5,0.4\n1,1.2,0.8\n")
    for path in (one, two):
        for batch_rows in (1, 1000):
            result = run(path, "--target", "y", "--probs", "p_*", "--batch-rows", batch_rows)
            assert result.exit_code == 1
            assert "data row 1: probabilities of the row sum to 0.9" in result.stderr


def test_csv_value_arrow_cannot_read_does_not_hide_earlier_rows(tmp_path):
    """A CSV of ~480 KB: at a large batch size Arrow reads it in one block, and a value it
    cannot read (or a ragged row) failed the block before its earlier rows were checked."""
    rng = np.random.default_rng(0)
    n = 5000
    p = rng.dirichlet([1.0, 1.0, 1.0], n).tolist()
    y = rng.integers(0, 3, n).tolist()

    def line(i):
        return f"{y[i]},{p[i][0]!r},{p[i][1]!r},{p[i][2]!r}"

    lines = ["y,p_a,p_b,p_c"] + [line(i) for i in range(n)]
    lines[1 + 4000] = f"{y[4000]},abc,0.4,0.6"  # not a number (column p_a)
    lines[1 + 3000] = f"{y[3000]},0.2,0.2,0.6,9"  # ragged
    lines[1 + 2000] = f"{y[2000]},0.2,x,0.6"  # not a number (column p_b, after p_a's)
    lines[1 + 10] = f"{y[10]},0.5,0.4,0.05"  # sums to 0.95
    expected = [(10, "sum to 0.95"), (2000, "'x' is not a number"),
                (3000, "has 5 fields, expected 4"), (4000, "'abc' is not a number")]
    path = tmp_path / "big.csv"
    for row, message in expected:
        path.write_text("\n".join(lines) + "\n")
        for batch_rows in (1, 100, 1000, 100_000):
            with pytest.raises(DataError, match=f"data row {row}: .*{re.escape(message)}"):
                score_files(str(path), target="y", probs="p_*", batch_rows=batch_rows)
        lines[1 + row] = line(row)  # repair it: the next one is the first


@pytest.mark.parametrize("bad_row, expected", [(None, 17), (25, 17), (9, 9)])
def test_weights_summing_beyond_float64_name_the_first_row(tmp_path, bad_row, expected):
    """Sample weights of 1e307 sum to inf at row 17 (1.8e308): that row is reported at every
    --batch-rows (it was the batch's last row: 20 at 7 rows a batch, 39 at 64), also when a
    row sum of 0.9 follows it in the batch (at 64 rows that row, 25, was reported), and a bad
    row before it (9) is reported instead."""
    lines = ["y,p_a,p_b,w"] + [f"{i % 2},{0.75 - 0.5 * (i % 2)},{0.25 + 0.5 * (i % 2)},1e307"
                               for i in range(40)]
    if bad_row is not None:
        lines[1 + bad_row] = "1,0.5,0.4,1e307"
    path = tmp_path / "heavy.csv"
    path.write_text("\n".join(lines) + "\n")
    for batch_rows in (1, 2, 3, 7, 64, 1000):
        result = run(path, "--target", "y", "--probs", "p_*", "--sample-weight", "w",
                     "--batch-rows", batch_rows)
        assert result.exit_code == 1, result.output
        if expected == 17:
            assert ("column 'w', data row 17: the sample weights sum beyond float64's largest "
                    "number (1.8e308) at this row") in result.stderr, (batch_rows, result.stderr)
        else:
            assert "data row 9: probabilities of the row sum to 0.9" in result.stderr
    assert _reported_row(path, None) == expected  # the default batch size
