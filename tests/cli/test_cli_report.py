"""The HTML report and PNG plots; the page is opened in headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from crossent.cli.main import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ["loss_histogram.png", "per_class_loss.png", "reliability.png"]


@pytest.fixture(scope="module")
def report(parquet_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(main, [
        "score", str(parquet_path), "--target", "label", "--probs", "p_*", "--quiet",
        "--report", str(out / "report.html"), "--plots", str(out / "plots"), "--format", "json",
    ])
    assert result.exit_code == 0, result.output
    return out


def test_report_is_self_contained(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(data).startswith(PNG_SIGNATURE) for data in images)
    assert not re.search(r'(src|href)="(https?:|file:|//)', page)  # nothing fetched from outside
    for text in ("Summary", "cross-entropy (nats)", "expected calibration error",
                 "Reliability diagram", "Per-row loss", 'id="per-class"', "cow"):
        assert text in page
    # no temporary files left next to the report
    assert sorted(p.name for p in report.iterdir()) == ["plots", "report.html"]


def test_plots_are_pngs(report):
    assert sorted(os.listdir(report / "plots")) == PLOTS
    for name in PLOTS:
        assert (report / "plots" / name).read_bytes().startswith(PNG_SIGNATURE)


def test_report_embeds_the_same_pngs(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    for name in PLOTS:
        data = base64.b64encode((report / "plots" / name).read_bytes()).decode()
        assert data in page


def test_report_rewrites_atomically(report, parquet_path):
    path = report / "report.html"
    before = path.stat().st_ino
    result = CliRunner().invoke(main, ["score", str(parquet_path), "--target", "y", "--logits",
                                       "logit*", "--quiet", "--report", str(path)])
    assert result.exit_code == 0
    assert path.stat().st_ino != before  # a new file was renamed over the old one
    assert "logits" in path.read_text(encoding="utf-8")


_CHECK_IMAGES = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", `${loaded}/${images.length}`);
  const table = document.getElementById("summary");
  document.body.setAttribute("data-summary-rows", table ? table.rows.length : 0);
});
</script>
"""


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.environ.get("CI") != "true":
        pytest.skip("chromium is not installed (CI installs it: apt-get install chromium)")
    assert path is not None, "CI must have chromium (apt-get install chromium)"
    return path


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    page = (report / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _CHECK_IMAGES + "</body>"), encoding="utf-8")
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-images-loaded="3/3"' in dom, dom[:500]
    assert 'data-summary-rows="7"' in dom
    shot = tmp_path / "shot.png"
    done = subprocess.run(cmd[:-2] + ["--window-size=1200,2400", f"--screenshot={shot}",
                                      probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.read_bytes().startswith(PNG_SIGNATURE)
