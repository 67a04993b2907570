"""`crossent score` shows class names and PATH as they are written (review of cli/io, finding
1): rich read ``[/s]`` as a closing markup tag (a MarkupError traceback, after --report and
--plots were already written), ``[bold]x`` was shown as ``x``, and matplotlib read ``$\\hat$``
as mathtext (a ParseSyntaxException)."""

from __future__ import annotations

import math

import pytest

from crossent.cli import _report
from crossent.metrics import ScoreAccumulator

from .conftest import run

NAMES = ["[/s]", "[bold]x", ":cat:", "$\\hat$", "$x$", "[pad]"]


def _csv(tmp_path, name="preds.csv"):
    # class k has probability 0.25 + 0.1 k for its true row; the rest is spread over the others
    C = len(NAMES)
    lines = ["y," + ",".join(f'"p_{n}"' for n in NAMES)]
    truth = []
    for k in range(C):
        q = 0.25 + 0.1 * k
        row = [(1 - q) / (C - 1)] * C
        row[k] = q
        truth.append(q)
        lines.append(f"{k}," + ",".join(repr(v) for v in row))
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path, truth


def test_table_shows_markup_and_emoji_codes_literally(tmp_path, monkeypatch):
    _, truth = _csv(tmp_path, "[red]p.csv")
    monkeypatch.chdir(tmp_path)  # a short PATH: the title is one line
    result = run("[red]p.csv", "--target", "y", "--probs", "p_*")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].strip() == "crossent score: [red]p.csv"
    for k, name in enumerate(NAMES):
        row = next(line for line in lines if line.startswith(f"│ {name} "))
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[0] == name
        assert math.isclose(float(cells[2]), -math.log(truth[k]), abs_tol=5e-7)


def test_plots_draw_dollar_signs_literally(tmp_path):
    acc = ScoreAccumulator(len(NAMES), class_names=tuple(NAMES))
    p = [[0.5 if j == k else 0.5 / (len(NAMES) - 1) for j in range(len(NAMES))]
         for k in range(len(NAMES))]
    result = acc.update(p, list(range(len(NAMES)))).compute()
    figures = []
    original = _report._png

    def keep(fig):
        figures.append(fig)
        return original(fig)  # drawing "$\hat$" as mathtext raised here

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_report, "_png", keep)
        pngs = _report.render_pngs(result)
    assert all(data.startswith(b"\x89PNG") for data in pngs.values())
    labels = figures[0].axes[0].get_yticklabels()
    assert [t.get_text() for t in labels] == NAMES
    assert not any(t.get_parse_math() for t in labels)


def test_report_and_plots_with_such_names_are_written(tmp_path):
    path, _ = _csv(tmp_path)
    report, plots = tmp_path / "out" / "r.html", tmp_path / "out" / "plots"
    report.parent.mkdir()
    result = run(path, "--target", "y", "--probs", "p_*", "--report", report, "--plots", plots)
    assert result.exit_code == 0, result.output
    assert report.exists() and sorted(p.name for p in plots.iterdir()) == sorted(_report.PLOTS)
    assert "<td>[/s]</td>" in report.read_text() and "<td>$\\hat$</td>" in report.read_text()


def test_a_table_that_cannot_be_rendered_leaves_no_report(tmp_path, monkeypatch):
    """The output is rendered before --report and --plots are written: a failure there (here a
    forced one) leaves nothing behind."""
    from crossent.cli import score

    def fail(*args):
        raise RuntimeError("cannot render")

    monkeypatch.setattr(score, "_format_table", fail)
    path, _ = _csv(tmp_path)
    report, plots = tmp_path / "r.html", tmp_path / "plots"
    result = run(path, "--target", "y", "--probs", "p_*", "--report", report, "--plots", plots)
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert not report.exists() and not plots.exists()
