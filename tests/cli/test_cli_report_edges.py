"""The plots' data when losses are infinite or weighted, and `crossent score` at degenerate
sample weights and colliding output paths (review of cli/_report.py and cli/score.py).
The plots are checked through what is handed to matplotlib (bars, lines, limits, texts)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss

from crossent.cli import _report
from crossent.metrics import ScoreAccumulator

from .conftest import run, run_json, softmax


def _log_softmax_loss(z, y):
    """Per-row cross-entropy from logits in float64 (-inf logits give 0 probability)."""
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return lse - z[np.arange(len(y)), y]


def _bars(ax):
    return [p for p in ax.patches if p.get_width() > 0 and p.get_height() > 0]


@pytest.fixture
def axes(monkeypatch):
    """``axes(result)``: the Axes of each plot by file name, as render_pngs draws them."""

    def draw(result):
        figures = []
        monkeypatch.setattr(_report, "_png", lambda fig: figures.append(fig) or b"")
        names = list(_report.render_pngs(result))  # one _png call per plot, in this order
        monkeypatch.undo()
        return {name: fig.axes[0] for name, fig in zip(names, figures, strict=True)}

    return draw


# ---- per-class plot ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_infinite_class():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 3))
    y = rng.integers(0, 3, 200)
    z[0, 2], y[0] = -np.inf, 2  # the true class is masked: loss +inf, class 2's mean inf
    return z, y, ScoreAccumulator(3, from_logits=True).update(z, y).compute()


def test_per_class_axis_is_scaled_to_the_finite_means(one_infinite_class, axes):
    z, y, r = one_infinite_class
    loss = _log_softmax_loss(z, y)
    means = [loss[y == k].mean() for k in range(3)]
    assert means[2] == math.inf
    ax = axes(r)["per_class_loss.png"]
    left, right = ax.get_xlim()
    assert left == 0 and max(means[:2]) < right < 2 * max(means[:2])
    widths = sorted(p.get_width() for p in _bars(ax))
    np.testing.assert_allclose(widths, sorted([means[0], means[1], right]), rtol=1e-12)
    # the infinite class is hatched, cut at the edge and marked "inf"
    hatched = [p for p in _bars(ax) if p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_width() == right
    assert [t.get_text().strip() for t in ax.texts] == ["inf"]
    # the overall mean is inf: its line is on the edge and says so
    (line,) = ax.lines
    assert line.get_label() == "all rows: inf" and line.get_xdata()[0] == right
    assert "all rows: inf" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert _report.render_pngs(r)["per_class_loss.png"].startswith(b"\x89PNG")


def test_per_class_finite_means_are_the_bars(axes):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(500, 4)) * 2
    y = rng.integers(0, 4, 500)
    r = ScoreAccumulator(4, from_logits=True).update(z, y).compute()
    ax = axes(r)["per_class_loss.png"]
    loss = _log_softmax_loss(z, y)
    expected = [log_loss(y[y == k], softmax(z[y == k]), labels=range(4)) for k in range(4)]
    np.testing.assert_allclose([p.get_width() for p in _bars(ax)], expected, rtol=1e-10)
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata()[0], loss.mean(), rtol=1e-12)
    assert ax.get_xlim()[1] > max(expected) and not ax.texts


def test_per_class_title_counts_the_classes_with_a_mean(axes):
    rng = np.random.default_rng(3)
    C, present = 1000, 60
    y = rng.permutation(np.repeat(rng.choice(C, present, replace=False), 5))
    z = rng.normal(size=(len(y), C))
    r = ScoreAccumulator(C, from_logits=True).update(z, y).compute()
    ax = axes(r)["per_class_loss.png"]
    assert ax.get_title() == f"Cross-entropy per true class (the 40 highest of {present})"
    means = sorted((e["cross_entropy_nats"] for e in r.per_class if e["rows"]), reverse=True)
    np.testing.assert_allclose(sorted((p.get_width() for p in _bars(ax)), reverse=True),
                               means[:40], rtol=1e-12)


# ---- loss histogram ---------------------------------------------------------------------------


def _note(ax):
    return "\n".join(t.get_text() for t in ax.texts)


def test_histogram_note_says_row_for_one_row(axes):
    z = np.array([[0.0, -np.inf], [1.0, 0.0]])
    r = ScoreAccumulator(2, from_logits=True).update(z, np.array([1, 0])).compute()
    assert _note(axes(r)["loss_histogram.png"]).startswith("1 row with infinite loss\n")


def test_histogram_when_every_row_is_infinite(axes):
    z = np.array([[0.0, -np.inf], [1.0, -np.inf]])
    r = ScoreAccumulator(2, from_logits=True).update(z, np.array([1, 1])).compute()
    ax = axes(r)["loss_histogram.png"]
    assert not ax.lines  # no "mean" line drawn at 0 nats
    assert _note(ax) == "2 rows with infinite loss\nmean = inf"
    assert _report.render_pngs(r)["loss_histogram.png"].startswith(b"\x89PNG")


def test_histogram_with_some_infinite_rows_has_no_mean_line_at_zero(axes):
    rng = np.random.default_rng(4)
    z = rng.normal(size=(300, 3))
    y = rng.integers(0, 3, 300)
    z[:3, 0], y[:3] = -np.inf, 0
    r = ScoreAccumulator(3, from_logits=True).update(z, y).compute()
    ax = axes(r)["loss_histogram.png"]
    assert not ax.lines
    assert "3 rows with infinite loss" in _note(ax) and _note(ax).endswith("mean = inf")
    # every finite row is in a bar or in the note's "N rows above X nats"
    above = [int(line.split()[0].replace(",", "")) for line in _note(ax).splitlines()
             if " above " in line]
    finite = np.isfinite(_log_softmax_loss(z, y)).sum()
    assert sum(p.get_height() for p in _bars(ax)) + sum(above) == finite == 297


def test_weighted_histogram_has_the_weighted_mean_as_its_mean(axes):
    """99 rows of loss 0.01 and weight 0.01, one row of loss 4.6 and weight 100."""
    q = np.r_[np.full(99, math.exp(-0.01)), math.exp(-4.6)]
    p = np.c_[q, 1 - q]
    y = np.zeros(100, int)
    w = np.r_[np.full(99, 0.01), 100.0]
    r = ScoreAccumulator(2).update(p, y, sample_weight=w).compute()
    expected = log_loss(y, p, sample_weight=w, labels=[0, 1])
    ax = axes(r)["loss_histogram.png"]
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata()[0], expected, rtol=1e-12)
    assert line.get_label() == f"weighted mean: {expected:.4g}"
    assert ax.get_ylabel() == "sample weight"
    bars = _bars(ax)
    heights = np.array([b.get_height() for b in bars])
    centers = np.array([b.get_x() + b.get_width() / 2 for b in bars])
    np.testing.assert_allclose(heights.sum(), w.sum(), rtol=1e-12)  # every row is in a bar
    step = bars[0].get_width()
    assert abs(np.average(centers, weights=heights) - expected) <= step / 2


def test_unweighted_histogram_counts_rows(axes):
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    r = ScoreAccumulator(2).update(p, np.array([0, 1, 0])).compute()
    ax = axes(r)["loss_histogram.png"]
    assert ax.get_ylabel() == "rows" and ax.lines[0].get_label().startswith("mean: ")
    assert sum(b.get_height() for b in _bars(ax)) == 3


# ---- write_all and crossent score --------------------------------------------------------------


def test_write_all_refuses_one_file_twice(tmp_path):
    with pytest.raises(ValueError, match="outputs must go to distinct files"):
        _report.write_all([(tmp_path / "a", b"1"), (tmp_path / "sub" / ".." / "a", b"2")],
                          folders=[tmp_path / "sub"])
    assert list(tmp_path.iterdir()) == []


def test_report_on_a_plot_path_is_refused_before_anything_is_written(parquet_path, tmp_path):
    plots = tmp_path / "coll"
    plots.mkdir()
    result = run(parquet_path, "--target", "y", "--probs", "p_*",
                 "--report", plots / "reliability.png", "--plots", plots)
    assert result.exit_code == 2, result.output
    assert "--report" in result.stderr and "is where --plots writes reliability.png" in result.stderr
    assert list(plots.iterdir()) == [] and result.stdout == ""


def test_total_sample_weight_zero_is_a_data_error(tmp_path):
    # one row, its true class at probability 0 (clipped), weight 0: once scored as CE 0
    path = tmp_path / "w.parquet"
    pq.write_table(pa.table({"p_a": [0.0], "p_b": [1.0], "y": [0], "w": [0.0]}), path)
    result = run(path, "--target", "y", "--probs", "p_*", "--sample-weight", "w",
                 "--report", tmp_path / "r.html")
    assert result.exit_code == 1, result.output
    assert "total sample weight (--sample-weight w) is 0" in result.stderr
    assert result.stdout == "" and not (tmp_path / "r.html").exists()


def test_json_class_of_weight_zero_is_null_and_the_rest_match_sklearn(tmp_path):
    path = tmp_path / "w.parquet"
    p = np.array([[0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    y = np.array([1, 0, 0, 1])
    w = np.array([0.0, 2.0, 1.0, 0.0])  # class 1's rows weigh 0
    pq.write_table(pa.table({"p_a": p[:, 0], "p_b": p[:, 1], "y": y, "w": w}), path)
    result = run(path, "--target", "y", "--probs", "p_*", "--sample-weight", "w",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    kept = w > 0
    np.testing.assert_allclose(out["cross_entropy_nats"],
                               log_loss(y[kept], p[kept], sample_weight=w[kept], labels=[0, 1]),
                               rtol=1e-12)
    assert out["per_class"][1]["rows"] == 2
    assert out["per_class"][1]["cross_entropy_nats"] is None
    assert out["per_class"][1]["accuracy"] is None


def _json_of_logits_csv(path, text):
    """The JSON of ``crossent score PATH --target y --logits 'l_*' --format json`` on a CSV
    file of ``text`` written at ``path`` (the command must exit 0)."""
    path.write_text(text)
    return run_json(path, "--target", "y", "--logits", "l_*")


def test_json_writes_infinity_as_the_string_inf_apart_from_null(tmp_path):
    """Review (cli/io) 4: +inf was written as null, the null of "no rows / weight 0"."""
    # class a: its only row has a -inf true-class logit (loss +inf); class c has no rows
    out = _json_of_logits_csv(tmp_path / "inf.csv", "y,l_a,l_b,l_c\n0,-inf,0.6,0\n1,0.3,0.7,0\n")
    z_b = np.array([[0.3, 0.7, 0.0]])
    b_loss = float(_log_softmax_loss(z_b, np.array([1]))[0])
    assert out["cross_entropy_nats"] == "inf" and out["perplexity"] == "inf"
    assert out["infinite_loss_rows"] == 1
    by_name = {e["name"]: e for e in out["per_class"]}
    assert by_name["a"]["cross_entropy_nats"] == "inf" and by_name["a"]["rows"] == 1
    np.testing.assert_allclose(by_name["b"]["cross_entropy_nats"], b_loss, rtol=1e-15)
    assert by_name["c"]["rows"] == 0 and by_name["c"]["cross_entropy_nats"] is None


def test_json_perplexity_beyond_float64_is_inf(tmp_path):
    """CE 1000 nats is finite, its perplexity e^1000 is not: "inf", with no infinite rows."""
    out = _json_of_logits_csv(tmp_path / "big.csv", "y,l_a,l_b\n0,-1000,1000\n1,1000,-1000\n")
    np.testing.assert_allclose(out["cross_entropy_nats"], 2000.0, rtol=1e-15)
    assert out["perplexity"] == "inf" and out["infinite_loss_rows"] == 0
    assert 2000.0 > math.log(np.finfo(np.float64).max)  # exp(2000) is beyond float64
