"""One rule for labels in every format (review F1, F2): decided by value, never by container.

The same table is written as CSV text, Parquet (integer, float and string columns) and .npz,
and scored through `crossent score` in each `--labels` mode; scikit-learn's log_loss with
explicit `labels=` is the oracle for both meanings of an integer label.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sklearn.metrics import log_loss

from crossent.cli.main import main
from crossent.io import DataError, open_predictions

STARS = [f"p_{k}" for k in range(1, 6)]  # class names 1..5 at positions 0..4


def score(path, *args):
    result = CliRunner().invoke(main, ["score", str(path), "--format", "json", "--quiet", *args])
    if result.exit_code == 0:
        return json.loads(result.stdout)
    assert result.exit_code == 1, result.output  # bad data, never a usage error here
    return re.sub(r"^Error: \S+?(, |: )", "Error: ", result.stderr.strip())  # no path


@pytest.fixture(scope="module")
def stars(tmp_path_factory):
    """1000 rows of p_1..p_5 and labels 1..4 (no 5, so both meanings stay in range)."""
    rng = np.random.default_rng(0)
    n = 1000
    p = rng.dirichlet(np.ones(5), n)
    y = rng.integers(1, 5, n)
    folder = tmp_path_factory.mktemp("stars")
    cols = {name: p[:, k] for k, name in enumerate(STARS)}
    paths = {}
    for kind, labels in (("int", pa.array(y)), ("float", pa.array(y.astype(np.float64))),
                         ("str", pa.array([str(v) for v in y]))):
        paths[f"parquet-{kind}"] = folder / f"stars_{kind}.parquet"
        pq.write_table(pa.table({**cols, "stars": labels}), paths[f"parquet-{kind}"],
                       row_group_size=300)
    paths["csv"] = folder / "stars.csv"
    pacsv.write_csv(pa.table({**cols, "stars": pa.array(y)}), paths["csv"])
    paths["csv-float"] = folder / "stars_float.csv"  # "1.0": as pandas writes int-with-NaN
    pacsv.write_csv(pa.table({**cols, "stars": pa.array(y.astype(np.float64))}),
                    paths["csv-float"])
    paths["npz"] = folder / "stars.npz"
    np.savez(paths["npz"], **cols, stars=y)
    return p, y, paths


@pytest.mark.parametrize("mode", ["auto", "index", "name"])
def test_same_table_same_result_or_same_error_in_every_format(stars, mode):
    p, y, paths = stars
    results = {kind: score(path, "--target", "stars", "--probs", "p_*", "--labels", mode,
                           "--batch-rows", "128")
               for kind, path in paths.items()}
    first = results["parquet-int"]
    if mode == "auto":
        assert isinstance(first, str)
        assert "data row 0: label" in first and "is ambiguous" in first
        assert "--labels index or --labels name" in first
        for kind, other in results.items():
            assert other == first, kind
        return
    # index: label k is the k-th column (p_{k+1}); name: label k is column p_k
    labels = [0, 1, 2, 3, 4] if mode == "index" else [1, 2, 3, 4, 5]
    expected = log_loss(y, p, labels=labels)
    for kind, out in results.items():
        assert isinstance(out, dict), (kind, out)
        np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-12, err_msg=kind)
        assert out["rows"] == len(y)


def test_the_two_meanings_differ(stars):
    """The oracle numbers behind the test above are not equal by accident."""
    p, y, _ = stars
    assert abs(log_loss(y, p, labels=[0, 1, 2, 3, 4]) - log_loss(y, p, labels=[1, 2, 3, 4, 5])) > 0.01


def test_decision_does_not_depend_on_the_first_batch(tmp_path):
    """0-based labels 1..2 for the first rows, then a 0: CSV and Parquet decode alike."""
    rng = np.random.default_rng(1)
    n = 70_000
    p = rng.dirichlet(np.ones(3), n)
    y = rng.integers(1, 3, n)
    y[-5:] = 0
    cols = {"p_a": p[:, 0], "p_b": p[:, 1], "p_c": p[:, 2]}
    pacsv.write_csv(pa.table({**cols, "y": y}), tmp_path / "a.csv")
    pq.write_table(pa.table({**cols, "y": y}), tmp_path / "a.parquet")
    expected = log_loss(y, p, labels=[0, 1, 2])
    for path in (tmp_path / "a.csv", tmp_path / "a.parquet"):
        out = score(path, "--target", "y", "--probs", "p_*")
        np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-12)
    # text labels: names in the first batches, an integer (an index) late in the file
    names = np.array(["a", "b", "c"])[y].astype(object)
    names[-1] = "2"
    pacsv.write_csv(pa.table({**cols, "y": pa.array(list(names))}), tmp_path / "b.csv")
    pq.write_table(pa.table({**cols, "y": pa.array(list(names))}), tmp_path / "b.parquet")
    y2 = y.copy()
    y2[-1] = 2
    expected = log_loss(y2, p, labels=[0, 1, 2])
    for path in (tmp_path / "b.csv", tmp_path / "b.parquet"):
        out = score(path, "--target", "y", "--probs", "p_*", "--batch-rows", "1000")
        np.testing.assert_allclose(out["cross_entropy_nats"], expected, rtol=1e-12)


def test_labels_index_refuses_names_and_name_refuses_unknown(tmp_path):
    (tmp_path / "a.csv").write_text("p_1,p_2,y\n0.5,0.5,1\n0.2,0.8,cat\n")
    assert score(tmp_path / "a.csv", "--target", "y", "--probs", "p_*", "--labels", "index") == (
        "Error: column 'y', data row 1: label 'cat' is not a class index (an integer in [0, 2)), "
        "as --labels index reads every label"
    )
    assert score(tmp_path / "a.csv", "--target", "y", "--probs", "p_*", "--labels", "name") == (
        "Error: column 'y', data row 1: label 'cat' is not among the classes [1, 2]"
    )
    (tmp_path / "b.csv").write_text("p_1,p_2,y\n0.5,0.5,1\n0.2,0.8,0\n")
    assert score(tmp_path / "b.csv", "--target", "y", "--probs", "p_*", "--labels", "name") == (
        "Error: column 'y', data row 1: label 0 is not among the classes [1, 2]"
    )


def test_bad_labels_option_is_a_usage_error(stars):
    result = CliRunner().invoke(main, ["score", str(stars[2]["csv"]), "--target", "stars",
                                       "--probs", "p_*", "--labels", "both"])
    assert result.exit_code == 2
    with pytest.raises(ValueError, match="labels must be one of"):
        open_predictions(stars[2]["csv"], target="stars", scores="p_*", labels="both")


def _pair(tmp_path, name, csv_labels: str, arrow_labels):
    """The same 3-row table as CSV text and as Parquet."""
    lines = ["p0,p1,y"] + [f"0.5,0.5,{v}" for v in csv_labels.split("|")]
    (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    t = pa.table({"p0": [0.5] * 3, "p1": [0.5] * 3, "y": arrow_labels})
    pq.write_table(t, tmp_path / f"{name}.parquet")
    return tmp_path / f"{name}.csv", tmp_path / f"{name}.parquet"


@pytest.mark.parametrize(
    ("csv_labels", "arrow_labels", "message"),
    [
        ("1|0|", pa.array([1, 0, None]), "data row 2: missing class label"),
        ("1|0|", pa.array([1.0, 0.0, float("nan")]), "data row 2: missing class label"),
        ("1|0|nan", pa.array(["1", "0", None]), "data row 2: missing class label"),
        ("1.0|0.0|0.5", pa.array([1.0, 0.0, 0.5]), "data row 2: label 0.5 is not an integer"),
        ("1|0|inf", pa.array([1.0, 0.0, float("inf")]), "data row 2: label inf is not an integer"),
        ("1|0|2", pa.array([1, 0, 2]), r"data row 2: label 2 is not a class index in [0, 2)"),
    ],
)
def test_bad_label_at_its_own_row_in_csv_and_parquet(tmp_path, csv_labels, arrow_labels,
                                                     message):
    csv_path, parquet_path = _pair(tmp_path, "a", csv_labels, arrow_labels)
    a = score(csv_path, "--target", "y", "--probs", "p0,p1")
    b = score(parquet_path, "--target", "y", "--probs", "p0,p1")
    assert a == b == f"Error: column 'y', {message}"


def test_whole_number_float_labels_are_accepted_in_both(tmp_path):
    csv_path, parquet_path = _pair(tmp_path, "a", "1.0|0.0| 1 ", pa.array([1.0, 0.0, 1.0]))
    for path in (csv_path, parquet_path):
        out = score(path, "--target", "y", "--probs", "p0,p1")
        assert out["per_class"][0]["rows"] == 1 and out["per_class"][1]["rows"] == 2


def test_decoder_reports_the_row_of_a_late_bad_label(tmp_path):
    """Errors name the 0-based data row of the file, however the rows are batched."""
    y = ["1"] * 100 + [""] + ["0"] * 10
    (tmp_path / "a.csv").write_text("p0,p1,y\n" + "".join(f"0.5,0.5,{v}\n" for v in y))
    f = open_predictions(tmp_path / "a.csv", target="y", scores="p0,p1")
    with pytest.raises(DataError, match="column 'y', data row 100: missing class label"):
        for _ in f.batches(7):
            pass
