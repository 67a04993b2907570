"""CSV rows longer than the estimated block (CLI review D3): a valid file is read whatever
--batch-rows is, with the same rows, values and row numbers; long cells do not break the
error path's rescan of the file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from crossent.io import DataError, _readers, open_predictions

from ..cli.conftest import run, run_json


def _text_column_csv(path, rows=200, long_row=150, long_cell=200_000, bad=None, blank=False):
    """A CSV whose first column is text: short cells, one very long cell at ``long_row``. The
    block size is estimated from the first lines, so that row does not fit the first block.
    ``bad=(row, line)`` replaces a data row's line; ``blank`` adds blank lines (not rows)."""
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(3), rows)
    y = rng.integers(0, 3, rows)
    lines = ["text,y,p0,p1,p2\n"]
    for i in range(rows):
        text = "x" * long_cell if i == long_row else "short"
        line = f"{text},{y[i]}," + ",".join(repr(float(v)) for v in p[i]) + "\n"
        if bad is not None and i == bad[0]:
            line = bad[1]
        lines.append(line)
        if blank and i % 40 == 0:
            lines.append("\n")
    data = "".join(lines).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return p, y


def _ce(p, y):
    return float(-np.log(p[np.arange(len(y)), y]).mean())


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
@pytest.mark.parametrize("batch_rows", [1, 7, 1000, 100_000])
def test_a_long_text_cell_reads_at_every_batch_size(tmp_path, suffix, batch_rows):
    """D3: at --batch-rows 1000 this was 'straddling object straddles two block boundaries'
    (exit 1, no row, no column); at 100000 it passed."""
    path = tmp_path / f"text{suffix}"
    p, y = _text_column_csv(path, blank=True)
    out = run_json(path, "--target", "y", "--probs", "p*", "--batch-rows", batch_rows)
    assert out["rows"] == len(y)
    np.testing.assert_allclose(out["cross_entropy_nats"], _ce(p, y), rtol=1e-12)


def test_batches_are_the_rows_in_order_after_a_retry(tmp_path):
    """The retry re-reads the file from the start and skips the rows already yielded: each row
    comes once, in order, with its own 0-based number."""
    path = tmp_path / "text.csv"
    p, y = _text_column_csv(path, blank=True)
    f = open_predictions(path, target="y", scores="p*")
    batches = list(f.batches(3))
    assert [b.start for b in batches] == list(np.cumsum([0] + [len(b.targets) for b in batches])[:-1])
    assert all(len(b.targets) <= 3 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.targets for b in batches]), y)
    np.testing.assert_array_equal(np.concatenate([b.scores for b in batches]), p)


def test_wide_rows_after_short_ones(tmp_path):
    """D3: 4000 classes, the first 70 rows short (zeros), the later ones long: failed at
    --batch-rows 1, passed at 10."""
    rng = np.random.default_rng(6)
    C, n = 4000, 100
    p = rng.dirichlet(np.ones(C), n)
    p[:70] = np.eye(C)[rng.integers(0, C, 70)]  # one-hot rows: "1" and 3999 "0" cells
    y = rng.integers(0, C, n)
    path = tmp_path / "wide.csv"
    with open(path, "w") as f:
        f.write("y," + ",".join(f"p{k}" for k in range(C)) + "\n")
        for i in range(n):
            cells = [repr(float(v)) if v % 1 else str(int(v)) for v in p[i]]
            f.write(f"{y[i]}," + ",".join(cells) + "\n")
    results = [run_json(path, "--target", "y", "--probs", "p*", "--batch-rows", b)
               for b in (1, 10, 1000)]
    expected = float(-np.log(np.maximum(p[np.arange(n), y], np.finfo(np.float64).eps)).mean())
    for out in results:
        assert out["rows"] == n
        np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-12)


def test_bad_value_after_the_long_row_names_its_row(tmp_path):
    """Row numbers after a retry are the file's own (blank lines are not rows)."""
    path = tmp_path / "text.csv"
    _text_column_csv(path, bad=(180, "short,1,0.5,abc,0.5\n"), blank=True)
    result = run(path, "--target", "y", "--probs", "p*", "--batch-rows", 10)
    assert result.exit_code == 1, result.output
    assert "column 'p1', data row 180: 'abc' is not a number" in result.stderr


@pytest.mark.parametrize(("bad", "message"), [
    ("short,1,0.5,abc,0.5\n", "column 'p1', data row 199: 'abc' is not a number"),
    ("short,1,0.5,0.5\n", "data row 199: has 4 fields, expected 5"),
])
def test_error_rescan_reads_past_a_long_cell(tmp_path, bad, message):
    """The error path rescans the file with Python's csv module, whose default field limit
    (128 KiB) raised a bare _csv.Error traceback on the 200 KB cell before the bad row."""
    path = tmp_path / "text.csv"
    _text_column_csv(path, bad=(199, bad))
    result = run(path, "--target", "y", "--probs", "p*", "--batch-rows", 100_000)
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_a_row_longer_than_the_largest_block_names_its_row(tmp_path, monkeypatch):
    """Blocks grow up to _CSV_MAX_BLOCK (256 MiB); a row longer than two such blocks is bad
    data at its row (here with the largest block lowered to 128 KiB)."""
    monkeypatch.setattr(_readers, "_CSV_MAX_BLOCK", 1 << 17)
    path = tmp_path / "text.csv"
    _text_column_csv(path, long_cell=400_000)
    with pytest.raises(DataError, match="data row 150: is longer than 131,072 bytes, the longest "
                                        "row the CSV reader takes"):
        list(open_predictions(path, target="y", scores="p*").batches(10))
