"""Numbers beyond float64's range: Arrow reads ``1e400`` in a CSV as inf (``-1e400`` as -inf,
which as a logit would mask its class, as ``-inf`` does), so a value the file does not hold
was scored, or reported as "inf". Such a value is now a row error naming the file, the
column, the 0-based data row and the text; ``inf`` / ``-inf`` written as such keep their
meaning (a -inf logit masks a class; an infinite probability, weight or +inf logit is an error
of the accumulator). Parquet holds binary floats (no text to overflow) and is never narrowed:
a float64 column beside float32 ones makes the batch float64."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.special import log_softmax

from crossent.cli.score import score_files
from crossent.io import DataError, open_predictions

from ..cli.conftest import run

BATCHES = [1, 2, 7, 64, 2**63 - 1]
N = 60


def _csv(path, cells, *, logits=False, quoted_newline_at=None):
    """N rows (3 classes, labels, weights); ``cells``: {(row, column): text} replaces cells.
    ``quoted_newline_at``: that row's label is written quoted, over two lines."""
    rng = np.random.default_rng(11)
    z = rng.normal(size=(N, 3))
    scores = z if logits else np.exp(log_softmax(z, axis=1))
    y = rng.integers(0, 3, N)
    w = rng.uniform(0.5, 2.0, N)
    lines = ["y,s_a,s_b,s_c,w\n"]
    for i in range(N):
        row = {"y": str(y[i]), "w": repr(float(w[i]))}
        row.update({f"s_{c}": repr(float(v)) for c, v in zip("abc", scores[i], strict=True)})
        for (r, column), text in cells.items():
            if r == i:
                row[column] = text
        if quoted_newline_at == i:
            row["y"] = f'"{row["y"]}\n"'
        lines.append(",".join(row[k] for k in ("y", "s_a", "s_b", "s_c", "w")) + "\n")
    path.write_text("".join(lines))
    return z, y, w


def _where(error):
    """(column, data row) named by an error's message (the accumulator's errors are re-raised
    as a DataError naming the file, their column and row in the message only)."""
    found = re.search(r"column '([^']*)', data row (\d+)", str(error))
    return (found.group(1), int(found.group(2))) if found else (None, None)


def _error(path, batch_rows, *, logits=False, weight=True):
    option = {"logits": "s_*"} if logits else {"probs": "s_*"}
    with pytest.raises(DataError) as info:
        score_files(str(path), target="y", sample_weight="w" if weight else None,
                    batch_rows=batch_rows, **option)
    return info.value


CASES = [  # (column, text, logits, expected fragment)
    ("s_b", "1e400", False, "'1e400' is beyond float64's range"),
    ("s_b", "-1e400", False, "'-1e400' is beyond float64's range"),
    ("s_a", "-1e400", True, "'-1e400' is beyond float64's range"),  # was a silent mask
    ("s_c", "1e309", True, "'1e309' is beyond float64's range"),
    ("s_c", "1.7976931348623159e308", True, "'1.7976931348623159e308' is beyond"),
    ("s_a", "-1" + "0" * 400, True, "is beyond float64's range"),
    ("w", " 1E+400 ", False, "'1E+400' is beyond float64's range"),
    ("y", "1e400", False, "label '1e400' is beyond float64's range"),
    ("y", "-2e999", True, "label '-2e999' is beyond float64's range"),
    ("y", "9" * 25, False, f"label {'9' * 25} is not a class index in [0, 3)"),
]


@pytest.mark.parametrize(("column", "text", "logits", "fragment"), CASES)
@pytest.mark.parametrize("row", [0, 1, 37, N - 1])
def test_overflow_is_a_row_error_whatever_the_batch_size(tmp_path, column, text, logits,
                                                         fragment, row):
    path = tmp_path / "over.csv"
    _csv(path, {(row, column): text}, logits=logits)
    for b in BATCHES:
        error = _error(path, b, logits=logits)
        assert (error.path, error.column, error.row) == (str(path), column, row), (b, str(error))
        assert fragment in str(error), str(error)
        assert str(error).startswith(f"{path}, column {column!r}, data row {row}: "), str(error)


def test_overflow_in_the_cli_exits_1_naming_file_column_row_and_text(tmp_path):
    path = tmp_path / "over.csv"
    _csv(path, {(23, "s_b"): "-1e400"}, logits=True)
    result = run(path, "--target", "y", "--logits", "s_*", "--batch-rows", "5")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"Error: {path}, column 's_b', data row 23: '-1e400' is beyond float64's range "
        "(magnitudes up to 1.8e308): expected a number in that range, or inf / -inf written as "
        "such")


@pytest.mark.parametrize("b", BATCHES)
def test_the_first_bad_row_wins_over_a_later_overflow(tmp_path, b):
    path = tmp_path / "two.csv"
    # an overflow at 40 after a probability 1.25 at 30; a word at 50 after the overflow
    _csv(path, {(30, "s_a"): "1.25", (40, "s_b"): "1e400", (50, "s_c"): "abc"})
    first = _error(path, b)
    assert _where(first) == ("s_a", 30) and "1.25 is not in [0, 1]" in str(first)
    _csv(path, {(40, "s_b"): "1e400", (50, "s_c"): "abc"})
    assert _where(_error(path, b)) == ("s_b", 40)
    _csv(path, {(40, "s_b"): "1e400", (40, "s_a"): "1e999"})  # a tie: the leftmost column
    assert _where(_error(path, b)) == ("s_a", 40)
    _csv(path, {(12, "w"): "", (40, "s_b"): "1e400"})  # a missing weight first
    assert _where(_error(path, b)) == ("w", 12)


@pytest.mark.parametrize("b", BATCHES)
def test_rows_after_a_quoted_line_break_keep_their_numbers(tmp_path, b):
    path = tmp_path / "q.csv"
    _csv(path, {(44, "s_c"): "-1e400"}, logits=True, quoted_newline_at=9)
    error = _error(path, b, logits=True)
    assert (error.column, error.row) == ("s_c", 44), str(error)


@pytest.mark.parametrize("b", BATCHES)
def test_infinities_written_as_such_keep_their_meaning(tmp_path, b):
    """-inf logits mask their class (the loss against scipy's float64 log_softmax); an
    infinity the accumulator refuses is still its error, with its own wording."""
    path = tmp_path / "inf.csv"
    masks = {(3, "s_a"): "-inf", (17, "s_b"): " -Infinity", (18, "s_c"): "-INF ",
             (40, "s_a"): "-1e308"}  # -1e308 is in range: a number, not a mask
    z, y, w = _csv(path, masks, logits=True)
    for (r, column), text in masks.items():
        z[r, "abc".index(column[-1])] = float(text)
    y[[3, 17, 18]] = [1, 0, 0]  # the true classes are not the masked ones
    _csv(path, {**masks, (3, "y"): "1", (17, "y"): "0", (18, "y"): "0"}, logits=True)
    result, _ = score_files(str(path), target="y", logits="s_*", sample_weight="w", batch_rows=b)
    losses = -log_softmax(z, axis=1)[np.arange(N), y]
    assert result.infinite_loss_rows == 0
    np.testing.assert_allclose(result.cross_entropy_nats, np.sum(w * losses) / np.sum(w), rtol=1e-12)

    for column, text, logits, fragment in [("s_b", "+inf", True, "logit is +inf"),
                                           ("s_b", "inf", False, "probability inf is not in"),
                                           ("w", "Infinity", False, "sample weight inf is not"),
                                           ("y", "-inf", False, "label -inf is not an integer")]:
        _csv(path, {(29, column): text}, logits=logits)
        error = _error(path, b, logits=logits)
        assert _where(error) == (column, 29) and fragment in str(error), str(error)


def test_a_file_of_masked_logits_scores_like_scipy(tmp_path):
    """Every row holds a -inf (the text of each is looked up in one pass over the file)."""
    rng = np.random.default_rng(3)
    n = 3000
    z = rng.normal(size=(n, 4))
    y = rng.integers(0, 4, n)
    z[np.arange(n), (y + 1) % 4] = -np.inf
    text = "y,l0,l1,l2,l3\n" + "".join(
        f"{y[i]}," + ",".join(repr(float(v)) for v in z[i]) + "\n" for i in range(n))
    path = tmp_path / "masked.csv"
    path.write_text(text)
    expected = np.mean(-log_softmax(z, axis=1)[np.arange(n), y])
    for b in (1, 333, 2**63 - 1):
        result, _ = score_files(str(path), target="y", logits="l*", batch_rows=b)
        np.testing.assert_allclose(result.cross_entropy_nats, expected, rtol=1e-12)


# ---------------------------------------------------------------- Parquet


def _parquet(path, table):
    pq.write_table(table, path, row_group_size=13)


@pytest.mark.parametrize("b", BATCHES)
def test_parquet_infinities_are_the_file_s_values(tmp_path, b):
    rng = np.random.default_rng(4)
    z = rng.normal(size=(N, 3))
    y = rng.integers(0, 3, N)
    z[5, (y[5] + 1) % 3] = -np.inf  # a mask
    path = tmp_path / "z.parquet"
    _parquet(path, pa.table({"y": y, "s_a": z[:, 0], "s_b": z[:, 1], "s_c": z[:, 2]}))
    result, _ = score_files(str(path), target="y", logits="s_*", batch_rows=b)
    expected = np.mean(-log_softmax(z, axis=1)[np.arange(N), y])
    np.testing.assert_allclose(result.cross_entropy_nats, expected, rtol=1e-12)
    z[33, 2] = np.inf
    _parquet(path, pa.table({"y": y, "s_a": z[:, 0], "s_b": z[:, 1], "s_c": z[:, 2]}))
    with pytest.raises(DataError) as info:
        score_files(str(path), target="y", logits="s_*", batch_rows=b)
    assert _where(info.value) == ("s_c", 33) and "logit is +inf" in str(info.value)


@pytest.mark.parametrize("b", BATCHES)
def test_parquet_float64_beside_float32_is_not_narrowed(tmp_path, b):
    """A float64 logit of 1e300 (beyond float32's 3.4e38) beside float32 columns: the batch is
    float64 and the loss is scipy's on the float64 values, not an overflow to inf."""
    rng = np.random.default_rng(6)
    z = rng.normal(size=(N, 3)).astype(np.float32).astype(np.float64)
    y = rng.integers(0, 3, N)
    z[[8, 21], 1] = [1e300, -1e300]
    y[8] = 1  # loss ~0 there; at 21 the class is far below the others: a large finite loss
    y[21] = 1
    path = tmp_path / "mixed.parquet"
    _parquet(path, pa.table({"y": y, "s_a": z[:, 0].astype(np.float32), "s_b": z[:, 1],
                             "s_c": z[:, 2].astype(np.float32)}))
    opened = open_predictions(path, target="y", scores="s_*")
    assert opened.score_dtype == np.float64
    batches = list(opened.batches(b))
    got = np.concatenate([batch.scores for batch in batches])
    np.testing.assert_array_equal(got, z)
    result, _ = score_files(str(path), target="y", logits="s_*", batch_rows=b)
    expected = np.mean(-log_softmax(z, axis=1)[np.arange(N), y])
    np.testing.assert_allclose(result.cross_entropy_nats, expected, rtol=1e-12)
    assert np.isfinite(result.cross_entropy_nats)


@pytest.mark.parametrize("b", BATCHES)
def test_parquet_uint64_label_beyond_int64_is_its_row(tmp_path, b):
    y = np.zeros(N, np.uint64)
    y[41] = np.uint64(2**63 + 5)
    p = np.full((N, 2), 0.5)
    path = tmp_path / "u.parquet"
    _parquet(path, pa.table({"y": y, "p_a": p[:, 0], "p_b": p[:, 1]}))
    with pytest.raises(DataError) as info:
        score_files(str(path), target="y", probs="p_*", batch_rows=b)
    assert (info.value.column, info.value.row) == ("y", 41), str(info.value)
    assert f"label {2**63 + 5} is not a class index in [0, 2)" in str(info.value)
