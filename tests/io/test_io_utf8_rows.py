"""A byte that is not UTF-8 in the body of a CSV is reported at its data row and column,
whatever the line endings: the rescan split the bytes on "\\n" only, so in a file with CR-only
line endings ("\\r", old Mac exports) the whole file was one line and the error named "line 1
(the header)"; a quoted field spanning lines shifted the rows after it."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from crossent.cli.score import score_files
from crossent.io import DataError

from ..cli.conftest import run

N = 12
ENDINGS = {"LF": b"\n", "CRLF": b"\r\n", "CR": b"\r"}


def _rows(bad_row, column, *, spanning=None, blank=None):
    """Data rows (lists of byte fields p0, p1, y); ``bad_row``'s ``column`` gets a byte 0xe9.
    ``spanning``: that row's label is quoted over two lines (its line break is the file's);
    ``blank``: a blank line before that row (not a row)."""
    rng = np.random.default_rng(bad_row)
    p = rng.uniform(0.1, 0.9, N)
    rows = [[repr(float(a)).encode(), repr(1 - float(a)).encode(), str(i % 2).encode()]
            for i, a in enumerate(p)]
    k = ["p0", "p1", "y"].index(column)
    rows[bad_row][k] = rows[bad_row][k][:2] + b"\xe9" + rows[bad_row][k][2:]
    return rows, spanning, blank


def _write(path, rows, spanning, blank, eol):
    lines = [b"p0,p1,y"]
    for i, fields in enumerate(rows):
        if blank == i:
            lines.append(b"")
        if spanning == i:
            fields = [*fields[:2], b'"' + eol + fields[2] + b'"']
        lines.append(b",".join(fields))
    data = eol.join(lines) + eol
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _error(path, batch_rows):
    with pytest.raises(DataError) as info:
        score_files(str(path), target="y", probs="p0,p1", batch_rows=batch_rows)
    return info.value


@pytest.mark.parametrize("eol", ENDINGS)
@pytest.mark.parametrize("bad_row", [0, 1, 6, N - 1])
@pytest.mark.parametrize("column", ["p1", "y"])
@pytest.mark.parametrize("layout", ["plain", "spanning", "blank"])
def test_the_bad_byte_is_named_at_its_row_and_column(tmp_path, eol, bad_row, column, layout):
    rows, spanning, blank = _rows(bad_row, column,
                                  spanning=3 if layout == "spanning" else None,
                                  blank=2 if layout == "blank" else None)
    path = tmp_path / "t.csv"
    _write(path, rows, spanning, blank, ENDINGS[eol])
    for b in (1, 5, 2**63 - 1):
        error = _error(path, b)
        assert (error.path, error.column, error.row) == (str(path), column, bad_row), str(error)
        value = rows[bad_row][["p0", "p1", "y"].index(column)]
        at = value.index(b"\xe9") + 1
        assert f"not UTF-8 text: byte 0xe9 at byte {at} of the value {value!r}" in str(error)


@pytest.mark.parametrize("eol", ENDINGS)
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_the_bad_byte_inside_a_quoted_field_that_spans_lines(tmp_path, eol, suffix):
    e = ENDINGS[eol]
    data = (b"p0,p1,y" + e + b"0.2,0.8,1" + e + b'0.5,0.5,"' + e + b'0"' + e
            + b'0.5,0.5,"1' + e + b'\xe9"' + e + b"0.3,0.7,0" + e)
    path = tmp_path / f"q{suffix}"
    path.write_bytes(gzip.compress(data) if suffix == ".csv.gz" else data)
    error = _error(path, 2)
    assert (error.column, error.row) == ("y", 2), str(error)
    raw = b"1" + e + b"\xe9"
    assert f"byte 0xe9 at byte {len(raw)} of the value {raw!r} (field 3 of the row)" in str(error)


@pytest.mark.parametrize("eol", ENDINGS)
def test_the_cli_names_file_column_and_row(tmp_path, eol):
    rows, spanning, blank = _rows(7, "p1", spanning=2)
    path = tmp_path / "cli.csv"
    _write(path, rows, spanning, blank, ENDINGS[eol])
    result = run(path, "--target", "y", "--probs", "p0,p1", "--batch-rows", "3")
    assert result.exit_code == 1, result.output
    bad = rows[7][1]
    assert result.stderr.strip() == (
        f"Error: {path}, column 'p1', data row 7: not UTF-8 text: byte 0xe9 at byte 3 of the "
        f"value {bad!r} (field 2 of the row); expected UTF-8 text")


@pytest.mark.parametrize("eol", ENDINGS)
def test_the_same_rows_without_the_bad_byte_are_read(tmp_path, eol):
    """The files above are valid CSV apart from the byte: with it removed they score (the
    rows are those Arrow reads, the same count for every line ending)."""
    rows, spanning, blank = _rows(5, "p1", spanning=3, blank=8)
    rows[5][1] = rows[5][1].replace(b"\xe9", b"")
    path = tmp_path / "ok.csv"
    _write(path, rows, spanning, blank, ENDINGS[eol])
    result, _ = score_files(str(path), target="y", probs="p0,p1", batch_rows=4)
    assert result.rows == N
