"""--report and --plots (review F8, F9): all files or none, errors name the user's path, and
files get the mode a plain open() would give them."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from crossent.cli import _report

from .conftest import run

_PNGS = list(_report.PLOTS)  # in the order they are written, after the report


@pytest.mark.skipif(not os.path.isdir("/proc/sys"), reason="needs an unwritable /proc/sys")
def test_failed_report_leaves_no_plots_and_names_the_report(parquet_path, tmp_path):
    plots = tmp_path / "plots"
    result = run(parquet_path, "--target", "y", "--probs", "p_*", "--plots", plots,
                 "--report", "/proc/sys/x.html")
    assert result.exit_code == 1
    assert "/proc/sys/x.html" in result.stderr and ".tmp" not in result.stderr
    assert not plots.exists()
    assert result.stdout == ""


def test_a_failing_plot_leaves_nothing_written(parquet_path, tmp_path, monkeypatch):
    report, plots = tmp_path / "r.html", tmp_path / "out" / "plots"
    report.write_text("old report")
    real = _report._stage
    staged = []

    def stage(path, data):
        if path.endswith(_PNGS[-1]):
            raise OSError(28, "No space left on device")
        staged.append(real(path, data))
        return staged[-1]

    monkeypatch.setattr(_report, "_stage", stage)
    result = run(parquet_path, "--target", "y", "--probs", "p_*", "--plots", plots,
                 "--report", report)
    assert result.exit_code == 1
    assert os.path.join(str(plots), _PNGS[-1]) in result.stderr
    assert "No space left on device" in result.stderr
    assert report.read_text() == "old report"  # not replaced
    assert len(staged) == 3 and not any(os.path.exists(t) for t in staged)  # temps removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # out/plots removed


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_umask_mode(parquet_path, tmp_path, umask):
    old = os.umask(umask)
    try:
        result = run(parquet_path, "--target", "y", "--probs", "p_*", "--plots",
                     tmp_path / "plots", "--report", tmp_path / "r.html")
        with open(tmp_path / "touched", "w"):
            pass
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    expected = stat.S_IMODE(os.stat(tmp_path / "touched").st_mode)
    assert expected == 0o666 & ~umask
    for path in [tmp_path / "r.html"] + [tmp_path / "plots" / name for name in _PNGS]:
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX modes")
def test_replaced_report_keeps_its_mode(parquet_path, tmp_path):
    report = tmp_path / "r.html"
    report.write_text("old")
    os.chmod(report, 0o640)
    result = run(parquet_path, "--target", "y", "--probs", "p_*", "--report", report)
    assert result.exit_code == 0
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o640
    assert report.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_plot_path_that_is_a_directory_moves_nothing(parquet_path, tmp_path):
    """Second review D5: the report and the first plot were moved into place before the
    move onto the directory failed."""
    report, plots = tmp_path / "r.html", tmp_path / "plots"
    report.write_text("old report")
    (plots / "reliability.png").mkdir(parents=True)
    result = run(parquet_path, "--target", "y", "--probs", "p_*", "--plots", plots,
                 "--report", report)
    assert result.exit_code == 1
    assert str(plots / "reliability.png") in result.stderr and "directory" in result.stderr
    assert report.read_text() == "old report"
    assert sorted(p.name for p in plots.iterdir()) == ["reliability.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "r.html"]  # no temporaries


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX modes")
def test_a_failed_move_takes_back_the_moves_before_it(parquet_path, tmp_path, monkeypatch):
    """D5: a move that fails after others (an immutable file, a race) restores the replaced
    report (content and mode) and removes the plots already moved."""
    report, plots = tmp_path / "r.html", tmp_path / "plots"
    report.write_text("old report")
    os.chmod(report, 0o640)
    plots.mkdir()
    (plots / _PNGS[0]).write_bytes(b"old png")
    real = os.replace
    moves = []

    def replace(src, dst):
        if os.fspath(dst).endswith(_PNGS[-1]) and ".crossent-" in os.fspath(src):
            raise PermissionError(1, "Operation not permitted")
        moves.append(dst)
        return real(src, dst)

    monkeypatch.setattr(_report.os, "replace", replace)
    result = run(parquet_path, "--target", "y", "--probs", "p_*", "--plots", plots,
                 "--report", report)
    assert result.exit_code == 1
    assert str(plots / _PNGS[-1]) in result.stderr and "Operation not permitted" in result.stderr
    assert len(moves) >= 3  # the report and two plots were moved, then taken back
    assert report.read_text() == "old report"
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o640
    assert (plots / _PNGS[0]).read_bytes() == b"old png"
    assert sorted(p.name for p in plots.iterdir()) == [_PNGS[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "r.html"]  # no .bak, .tmp


def test_a_successful_write_leaves_no_backups(parquet_path, tmp_path):
    report = tmp_path / "r.html"
    report.write_text("old report")
    result = run(parquet_path, "--target", "y", "--probs", "p_*", "--report", report)
    assert result.exit_code == 0
    assert report.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
