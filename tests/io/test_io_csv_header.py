"""The CSV header row is parsed as Arrow parses the rows (review of cli/io, finding 3): it was
split at the first b"\\n" and parsed alone, so a file with CR line endings failed with a
csv.Error traceback, and a quoted header name holding a line break lost its columns."""

from __future__ import annotations

import math

import pyarrow.csv as pacsv
import pytest

from crossent.io import DataError, _readers, open_predictions

from ..cli.conftest import run, run_json


def _ce(p_true):
    return -sum(math.log(q) for q in p_true) / len(p_true)


@pytest.mark.parametrize("newline", ["\r", "\r\n", "\n"])
def test_line_endings_are_read_as_arrow_reads_them(tmp_path, newline):
    path = tmp_path / "a.csv"
    path.write_bytes(newline.join(["y,p_a,p_b", "0,0.3,0.7", "1,0.4,0.6", ""]).encode())
    assert pacsv.read_csv(path).column_names == ["y", "p_a", "p_b"]  # Arrow's view
    out = run_json(path, "--target", "y", "--probs", "p_*")
    assert out["rows"] == 2 and out["class_names"] == ["a", "b"]
    assert math.isclose(out["cross_entropy_nats"], _ce([0.3, 0.6]), rel_tol=1e-15)


def test_cr_only_file_names_the_row_of_a_bad_value(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"y,p_a,p_b\r0,0.3,0.7\r1,abc,0.6\r")
    result = run(path, "--target", "y", "--probs", "p_*")
    assert result.exit_code == 1, result.output
    assert "column 'p_a', data row 1: 'abc' is not a number" in result.stderr


def test_quoted_header_name_with_a_line_break(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b'y,"p_\na","p_b,c"\n0,0.3,0.7\n1,0.4,0.6\n')
    columns = pacsv.read_csv(path).column_names
    assert columns == ["y", "p_\na", "p_b,c"]  # Arrow's view
    opened = open_predictions(path, target="y", scores="p_*")
    assert list(opened.score_columns) == columns[1:]
    out = run_json(path, "--target", "y", "--probs", "p_*")
    assert out["rows"] == 2
    assert math.isclose(out["cross_entropy_nats"], _ce([0.3, 0.6]), rel_tol=1e-15)


def test_header_that_is_not_utf8_with_cr_line_endings(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"p0,p1,caf\xe9\r0.2,0.8,1\r")
    with pytest.raises(DataError, match=r"line 1 \(the header\) is not UTF-8 text: byte 0xe9 at "
                                        r"column 10"):
        open_predictions(path, target="y", scores="p0,p1")


def test_header_the_csv_module_refuses_is_bad_data(tmp_path, monkeypatch):
    """A csv.Error (here a name longer than the field limit, which follows the largest block)
    is bad data naming the file: exit 1, no traceback."""
    monkeypatch.setattr(_readers, "_CSV_MAX_BLOCK", 1000)
    path = tmp_path / "long.csv"
    path.write_text('y,"p_' + "a" * 5000 + '",p_b\n0,0.3,0.7\n')
    result = run(path, "--target", "y", "--probs", "p_*")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: {path}: line 1 (the header) is not a CSV row: field "
                                    "larger than field limit (1000)")
