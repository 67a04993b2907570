"""Label values across dtypes and names (second review D1, D4, D8 and its label nits).

Oracle: scikit-learn's log_loss with explicit ``labels=`` (which meaning an integer label has).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sklearn.metrics import log_loss

from crossent.cli.main import main
from crossent.io import DataError, open_predictions

INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


def score(path, *args):
    result = CliRunner().invoke(main, ["score", str(path), "--format", "json", "--quiet", *args])
    if result.exit_code == 0:
        return json.loads(result.stdout)
    assert result.exit_code == 1, result.output  # bad data, never a usage error or a traceback
    return re.sub(r"^Error: \S+?(, |: )", "Error: ", result.stderr.strip())


@pytest.fixture(scope="module")
def probs():
    rng = np.random.default_rng(3)
    n, C = 509, 3
    return rng.dirichlet(np.ones(C), n), rng.integers(0, C, n)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_every_integer_label_dtype_reads_as_indices(tmp_path, probs, dtype):
    """D1: uint8/16/32 labels raised OverflowError (NumPy 2 casting of int64's max)."""
    p, y = probs
    labels = y.astype(dtype)
    expected = log_loss(y, p, labels=[0, 1, 2])
    cols = {f"p{k}": p[:, k] for k in range(3)}
    pq.write_table(pa.table({**cols, "y": labels}), tmp_path / "a.parquet")
    np.savez(tmp_path / "a.npz", p=p, y=labels)
    for path, spec in ((tmp_path / "a.parquet", "p*"), (tmp_path / "a.npz", "p")):
        out = score(path, "--target", "y", "--probs", spec, "--batch-rows", "100")
        assert isinstance(out, dict), (path, out)
        np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-12)
    f = open_predictions(tmp_path / "a.parquet", target="y", scores="p*")
    got = np.concatenate([b.targets for b in f.batches(64)])
    np.testing.assert_array_equal(got, y)
    assert got.dtype == np.int64


@pytest.mark.parametrize("mode", ["auto", "index", "name"])
def test_uint64_beyond_int64_is_out_of_range_at_its_row(tmp_path, mode):
    y = np.array([0, 1, 1, 2**63, 0], dtype=np.uint64)  # 2**63: int64's max + 1
    p = np.full((5, 2), 0.5)
    pq.write_table(pa.table({"p0": p[:, 0], "p1": p[:, 1], "y": y}), tmp_path / "a.parquet")
    if mode == "name":
        y[3] = 2**64 - 1
        pq.write_table(pa.table({"p_0": p[:, 0], "p_1": p[:, 1], "y": y}), tmp_path / "a.parquet")
    message = score(tmp_path / "a.parquet", "--target", "y", "--probs", "p*", "--labels", mode)
    assert isinstance(message, str) and message.startswith("Error: column 'y', data row 3: label ")
    assert str(int(y[3])) in message  # the value itself, not a clipped one


def test_plain_npy_columns_are_positions_not_class_names(tmp_path, probs):
    """D4: np.save(np.column_stack([y, P])): --target 0 --probs 1,2,3 are indices (auto)."""
    p, y = probs
    np.save(tmp_path / "stack.npy", np.column_stack([y, p]))
    expected = log_loss(y, p, labels=[0, 1, 2])
    for mode in ("auto", "index", "name"):  # name: class k is the k-th score column, too
        out = score(tmp_path / "stack.npy", "--target", "0", "--probs", "1,2,3", "--labels", mode)
        assert isinstance(out, dict), (mode, out)
        np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-12)
        assert out["class_names"] == ["0", "1", "2"]
    # a label 3 is out of range in every mode, never "column '3'" (a position in the file)
    y3 = y.copy()
    y3[7] = 3
    np.save(tmp_path / "stack3.npy", np.column_stack([y3, p]))
    for mode in ("auto", "index", "name"):
        message = score(tmp_path / "stack3.npy", "--target", "0", "--probs", "1,2,3",
                        "--labels", mode)
        assert isinstance(message, str) and "data row 7: label 3" in message, message


def test_pandas_style_integer_column_names_ask_for_labels_index(tmp_path, probs):
    """D4: Parquet columns '0'..'3' from pd.DataFrame(np.column_stack([y, P])) are names:
    '1','2','3' at positions 0..2 stay ambiguous, with a hint towards --labels index."""
    p, y = probs
    stacked = np.column_stack([y, p])
    pq.write_table(pa.table({str(k): stacked[:, k] for k in range(4)}), tmp_path / "pd.parquet")
    message = score(tmp_path / "pd.parquet", "--target", "0", "--probs", "1,2,3")
    assert "is ambiguous" in message and "(--labels index)" in message
    out = score(tmp_path / "pd.parquet", "--target", "0", "--probs", "1,2,3", "--labels", "index")
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss(y, p, labels=[0, 1, 2]),
                               rtol=1e-12)
    # names equal to the positions of the selected columns: never ambiguous
    pq.write_table(pa.table({**{str(k): p[:, k] for k in range(3)}, "y": y}),
                   tmp_path / "same.parquet")
    out = score(tmp_path / "same.parquet", "--target", "y", "--probs", "0,1,2")
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss(y, p, labels=[0, 1, 2]),
                               rtol=1e-12)


def test_class_name_beyond_int64_under_labels_name(tmp_path, probs):
    """D8: a class named 99999999999999999999 crashed --labels name (OverflowError)."""
    p, _ = probs
    big = "99999999999999999999"
    q = np.column_stack([p[:, 0], p[:, 1] + p[:, 2]])
    y = np.array([1, 1, 1, 1, 1])
    cols = {"p_1": q[:5, 0], f"p_{big}": q[:5, 1]}
    pq.write_table(pa.table({**cols, "y": y}), tmp_path / "int.parquet")
    out = score(tmp_path / "int.parquet", "--target", "y", "--probs", "p_*", "--labels", "name")
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss([0] * 5, q[:5], labels=[0, 1]),
                               rtol=1e-12)
    # text labels compare as Python ints: the big name is matched, "1" is class 0
    text = np.array(["1", big, big, "1", big])
    pq.write_table(pa.table({**cols, "y": text}), tmp_path / "text.parquet")
    out = score(tmp_path / "text.parquet", "--target", "y", "--probs", "p_*", "--labels", "name")
    k = np.array([0, 1, 1, 0, 1])
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss(k, q[:5], labels=[0, 1]),
                               rtol=1e-12)
    # an int64 label never matches the big name
    y[2] = 2**63 - 1
    pq.write_table(pa.table({**cols, "y": y}), tmp_path / "int2.parquet")
    message = score(tmp_path / "int2.parquet", "--target", "y", "--probs", "p_*", "--labels", "name")
    assert message.startswith(f"Error: column 'y', data row 2: label {2**63 - 1} is not among")


@pytest.mark.parametrize("text", ["1_0", "\u0661", "1 0", "0x1"])
def test_text_that_python_float_accepts_is_not_a_number(tmp_path, text):
    """Nit: "1_0" read as 10 (float()); with 11 classes it silently meant class 10."""
    cols = ",".join(f"p{k}" for k in range(11))
    row = ",".join(["0.1"] * 10 + ["0"])
    (tmp_path / "a.csv").write_text(f"{cols},y\n{row},1\n{row},{text}\n", encoding="utf-8")
    for mode, what in (("auto", "is not among the classes"), ("index", "is not a class index")):
        message = score(tmp_path / "a.csv", "--target", "y", "--probs", "p*", "--labels", mode)
        assert message.startswith(f"Error: column 'y', data row 1: label {text!r} {what}"), message


def test_text_numbers_in_ascii_are_numbers(tmp_path):
    (tmp_path / "a.csv").write_text("p0,p1,y\n0.25,0.75,+1\n0.5,0.5,1e0\n0.5,0.5,0.0\n")
    out = score(tmp_path / "a.csv", "--target", "y", "--probs", "p0,p1")
    expected = log_loss([1, 1, 0], [[0.25, 0.75], [0.5, 0.5], [0.5, 0.5]], labels=[0, 1])
    np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-12)


def test_fractional_label_is_a_class_name_only_as_text_under_labels_name(tmp_path):
    """Nit: text "0.5" matched a class named 0.5 under auto, a float 0.5 never did. Now a
    fractional number is never an index, and a class name only as text under --labels name."""
    p = np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    cols = {"p_0.5": p[:, 0], "p_1.25": p[:, 1]}
    pq.write_table(pa.table({**cols, "y": ["1.25", "0.5", "1.25"]}), tmp_path / "text.parquet")
    pq.write_table(pa.table({**cols, "y": [1.25, 0.5, 1.25]}), tmp_path / "float.parquet")
    auto = score(tmp_path / "text.parquet", "--target", "y", "--probs", "p_*")
    assert auto.startswith("Error: column 'y', data row 0: label '1.25' is a number and also the "
                           "class name '1.25'") and "--labels name" in auto
    assert score(tmp_path / "float.parquet", "--target", "y", "--probs", "p_*") == (
        "Error: column 'y', data row 0: label 1.25 is not an integer")
    out = score(tmp_path / "text.parquet", "--target", "y", "--probs", "p_*", "--labels", "name")
    np.testing.assert_allclose(out["cross_entropy_nats"], log_loss([1, 0, 1], p, labels=[0, 1]),
                               rtol=1e-12)
    message = score(tmp_path / "float.parquet", "--target", "y", "--probs", "p_*",
                    "--labels", "name")
    assert message == "Error: column 'y', data row 0: label 1.25 is not an integer"


def test_whole_number_text_that_names_another_class_is_an_error_under_auto(tmp_path):
    """Text "1.0" naming class 0 (column p_1.0) would silently be index 1 under auto."""
    (tmp_path / "a.csv").write_text("p_1.0,p_0.5,y\n0.3,0.7,1.0\n")
    message = score(tmp_path / "a.csv", "--target", "y", "--probs", "p_*")
    assert message.startswith("Error: column 'y', data row 0: label '1.0' is a number and also")
    for mode, expected in (("index", 1), ("name", 0)):
        out = score(tmp_path / "a.csv", "--target", "y", "--probs", "p_*", "--labels", mode)
        np.testing.assert_allclose(out["cross_entropy_nats"],
                                   log_loss([expected], [[0.3, 0.7]], labels=[0, 1]), rtol=1e-12)


def test_decoder_errors_are_data_errors(tmp_path):
    np.savez(tmp_path / "a.npz", p=np.full((3, 2), 0.5), y=np.array([0, 2**64 - 1, 1], np.uint64))
    f = open_predictions(tmp_path / "a.npz", target="y", scores="p")
    with pytest.raises(DataError, match="data row 1: label 18446744073709551615 is not a class"):
        list(f.batches(2))


def test_labels_index_never_matches_a_class_name(tmp_path):
    (tmp_path / "a.csv").write_text("p_cat,p_dog,y\n0.5,0.5,1\n0.2,0.8,cat\n")
    message = score(tmp_path / "a.csv", "--target", "y", "--probs", "p_*", "--labels", "index")
    assert message.startswith("Error: column 'y', data row 1: label 'cat' is not a class index")
