"""The HTML report and PNG plots of ``crossent score --report/--plots`` (matplotlib, Agg).

Figures are drawn with ``matplotlib.figure.Figure`` (no pyplot global state) and embedded in
the page as base64 PNG data URIs, so the page is one self-contained file. Files are written
all or nothing (``write_all``): each to a temporary file in its destination directory, and
only when every one is written are they moved into place with ``os.replace`` (a failed move
takes back the moves before it). A new file gets
the mode a plain ``open()`` would give it (0o666 less the umask); a replaced file keeps its
mode.
"""

from __future__ import annotations

import base64
import datetime
import errno
import html
import io
import math
import os
import shutil
import stat
import tempfile

import numpy as np

__all__ = ["render_html", "render_pngs", "write_all", "write_atomic", "write_html_report",
           "write_pngs"]

PLOTS = {
    "per_class_loss.png": "Cross-entropy per true class",
    "reliability.png": "Reliability diagram",
    "loss_histogram.png": "Per-row loss",
}
_MAX_BARS = 40


def _umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stage(path: str, data: bytes) -> str:
    """Write ``data`` to a new temporary file beside ``path``; returns the temporary's path."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)  # replacing a file keeps its mode
    except OSError:
        mode = 0o666 & ~_umask()  # what open(path, "w") would give a new file
    fd, tmp = tempfile.mkstemp(prefix=".crossent-", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _backup(path: str) -> str | None:
    """A hard link (else a copy) of an existing file at ``path``, to put back on failure."""
    if not os.path.lexists(path):
        return None
    fd, backup = tempfile.mkstemp(prefix=".crossent-", suffix=".bak",
                                  dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    os.unlink(backup)  # a fresh unused name for the link
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:  # no hard links here: a copy
        shutil.copy2(path, backup, follow_symlinks=False)
    return backup


def write_all(outputs, /, *, folders=()) -> None:
    """Write each ``(path, bytes)`` of ``outputs``, all or nothing.

    ``folders`` are created first if missing (and removed again on failure). Every file is
    written to a temporary beside its destination; only when all are written are they moved
    into place. A destination that is a directory fails before anything is moved; if a move
    still fails (an immutable file, a race), the files already moved are taken back: a new
    file is removed, a replaced one is put back (from a hard link, or a copy, made before the
    move). An ``OSError`` names the destination (``filename``), never a temporary. Two outputs
    to the same file (after resolving links) are a ValueError, before anything is written.
    """
    seen = {}
    for path, _ in outputs:
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(
                f"outputs must go to distinct files: {os.fspath(seen[real])!r} and "
                f"{os.fspath(path)!r} are the same file"
            )
        seen[real] = path
    created, staged, moved = [], [], []
    try:
        for folder in folders:
            missing, parent = [], os.path.abspath(folder)
            while not os.path.exists(parent):
                missing.append(parent)
                parent = os.path.dirname(parent)
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, os.fspath(folder)) from None
            created += reversed(missing)
        for path, _ in outputs:
            path = os.fspath(path)
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        for path, data in outputs:
            path = os.fspath(path)
            try:
                staged.append((_stage(path, data), path))
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, path) from None
        while staged:
            tmp, path = staged[0]
            try:
                backup = _backup(path)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, path) from None
            try:
                os.replace(tmp, path)
            except OSError as exc:
                if backup is not None:
                    os.unlink(backup)
                raise OSError(exc.errno, exc.strerror, path) from None
            moved.append((path, backup))
            staged.pop(0)
    except BaseException:
        for path, backup in reversed(moved):  # undo the moves, newest first
            try:
                if backup is None:
                    os.unlink(path)
                else:
                    os.replace(backup, path)
            except OSError:
                pass
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        for folder in reversed(created):
            try:
                os.rmdir(folder)
            except OSError:
                pass
        raise
    for _, backup in moved:
        if backup is not None:
            try:
                os.unlink(backup)
            except OSError:
                pass


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and os.replace."""
    write_all([(path, data)])


def _figure(width=6.4, height=3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return buf.getvalue()


def _per_class_figure(result):
    """Horizontal bars of each class's mean cross-entropy, and a line at the overall mean.

    The x axis is scaled to the finite values only. An infinite class mean (a true class
    masked by a -inf logit) is a hatched bar to the right edge, marked "inf"; an infinite
    overall mean is a line on that edge, labelled inf. Classes without a mean (no rows, or
    weight 0) are left out, and the title says how many of the classes with a mean are shown.
    """
    entries = [e for e in result.per_class if e["cross_entropy_nats"] is not None]
    title = "Cross-entropy per true class"
    if len(entries) > _MAX_BARS:
        title += f" (the {_MAX_BARS} highest of {len(entries)})"
        entries = sorted(entries, key=lambda e: -e["cross_entropy_nats"])[:_MAX_BARS]
    fig, ax = _figure(6.4, max(2.5, 0.5 + 0.22 * len(entries)))
    values = np.array([e["cross_entropy_nats"] for e in entries], dtype=np.float64)
    mean = result.cross_entropy_nats
    infinite = np.isinf(values)
    finite = [*values[~infinite], *([mean] if mean is not None and math.isfinite(mean) else [])]
    top = max(finite, default=0.0)
    has_inf = infinite.any() or mean == math.inf
    # finite values take the left 87% of the axis when something is inf, 95% otherwise
    right = (top / (0.87 if has_inf else 0.95)) if top > 0 else 1.0
    y = np.arange(len(entries))
    ax.barh(y[~infinite], values[~infinite], color="#4c72b0")
    if infinite.any():
        ax.barh(y[infinite], right, color="#4c72b0", alpha=0.45, hatch="//", edgecolor="white",
                label="inf (bar cut at the edge)")
        for row in y[infinite]:
            ax.text(right, row, "inf ", ha="right", va="center", fontweight="bold")
    ax.set_yticks(y, [e["name"] for e in entries])
    ax.set_xlim(0, right)
    ax.invert_yaxis()
    if mean is not None:
        ax.axvline(min(mean, right), color="#c44e52", linestyle="--", clip_on=False,
                   linewidth=2.5 if mean == math.inf else 1.5, label=f"all rows: {mean:.4g}")
    ax.set_xlabel("mean cross-entropy (nats)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(entries) < 8 else -0.08),
                  frameon=False, ncols=2)
    return fig


def _reliability_figure(result):
    """Per-bin accuracy bars, the gap to the bin's mean confidence, and the diagonal."""
    bins = result.calibration
    fig, ax = _figure(5.2, 4.6)
    width = 1.0 / len(bins)
    centers = np.array([(b["lower"] + b["upper"]) / 2 for b in bins])
    acc = np.array([b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["confidence"] is not None else 0.0 for b in bins])
    used = np.array([b["weight"] > 0 for b in bins])
    ax.bar(centers[used], acc[used], width=width, edgecolor="black", color="#4c72b0",
           label="accuracy")
    ax.bar(centers[used], (conf - acc)[used], bottom=acc[used], width=width, color="#c44e52",
           alpha=0.35, edgecolor="#c44e52", label="gap to confidence")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-label confidence")
    ax.set_ylabel("accuracy")
    ece = result.expected_calibration_error
    ece = "\u2013" if ece is None else f"{ece:.4f}"
    ax.set_title(f"Reliability ({len(bins)} bins), ECE = {ece}")
    ax.legend(loc="upper left")
    return fig


def _rows(n: int) -> str:
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def _histogram_figure(result):
    """Histogram of the per-row loss, weighted when the rows have sample weights.

    The bars are the sample weight per loss bin (``loss_histogram["weights"]``): without
    weights that is the number of rows, and the y axis says "rows"; with weights it says
    "sample weight", and the dashed line is the weighted mean, which is then the mean of the
    plotted distribution. The bars go up to the 99.5th percentile of the finite losses (of
    their weight); a note counts the rows beyond, and the rows with infinite loss (also when
    every row is infinite). An infinite mean has no line: the note says "mean = inf".
    """
    hist = result.loss_histogram
    counts = np.asarray(hist["counts"], dtype=np.float64)
    weights = np.asarray(hist["weights"], dtype=np.float64)
    weighted = not np.array_equal(weights, counts)
    plotted = weights if weighted else counts
    width = hist["bin_width"]
    finite = plotted[:-1]
    fig, ax = _figure()
    notes = []
    if counts.sum() > 0:
        # show up to the 99.5th percentile of the finite losses, in at most 60 bars
        cum = np.cumsum(finite)
        last = int(np.searchsorted(cum, 0.995 * cum[-1])) + 1 if cum[-1] > 0 else 1
        last = max(last, 10)
        group = max(1, math.ceil(last / 60))
        last = min(len(finite), group * math.ceil(last / group))
        bars = finite[:last].reshape(-1, group).sum(axis=1) if last % group == 0 else finite[:last]
        step = width * (group if last % group == 0 else 1)
        edges = np.arange(len(bars)) * step
        ax.bar(edges, bars, width=step, align="edge", color="#55a868", edgecolor="white")
        beyond = int(counts.sum() - counts[:last].sum())
        if beyond:
            weight = f" (weight {plotted.sum() - finite[:last].sum():.4g})" if weighted else ""
            notes.append(f"{_rows(beyond)}{weight} above {last * width:.3g} nats")
    if result.infinite_loss_rows:
        notes.append(f"{_rows(result.infinite_loss_rows)} with infinite loss")
    label = "weighted mean" if weighted else "mean"
    mean = result.cross_entropy_nats
    if mean is not None and math.isfinite(mean):
        ax.axvline(mean, color="#c44e52", linestyle="--", label=f"{label}: {mean:.4g}")
        ax.legend(loc="center right")
    elif mean is not None:
        notes.append(f"{label} = inf")
    if notes:
        ax.text(0.98, 0.95, "\n".join(notes), transform=ax.transAxes, ha="right", va="top")
    ax.set_xlabel("per-row cross-entropy (nats)")
    ax.set_ylabel("sample weight" if weighted else "rows")
    ax.set_title("Histogram of per-row loss" + (" (weighted)" if weighted else ""))
    return fig


def render_pngs(result, *, from_logits: bool = False) -> dict[str, bytes]:
    """The report's plots as PNG bytes, by file name (see ``PLOTS``).

    Text is drawn as it is, never read as mathtext: a class named ``$\\hat$`` or ``$x$`` is
    shown with its dollar signs (and cannot fail the rendering).
    """
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        return {
            "per_class_loss.png": _png(_per_class_figure(result)),
            "reliability.png": _png(_reliability_figure(result)),
            "loss_histogram.png": _png(_histogram_figure(result)),
        }


def write_pngs(folder, pngs: dict[str, bytes]) -> None:
    """Write the PNGs into ``folder`` (created if missing), all or nothing."""
    write_all([(os.path.join(folder, name), data) for name, data in pngs.items()],
              folders=[folder])


def _fmt(x, digits=6) -> str:
    if x is None:
        return "&ndash;"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else html.escape(str(x))
    return html.escape(f"{x:,}" if isinstance(x, int) else str(x))


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 60rem; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.75rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1rem 0; } img { max-width: 100%; height: auto; }
.meta { color: #666; font-size: 0.9rem; }
"""


def render_html(result, pngs: dict[str, bytes], meta: dict) -> str:
    """One self-contained HTML page: summary, per-class table, plots as data URIs."""
    summary = [
        ("rows", result.rows),
        ("classes", result.classes),
        ("cross-entropy (nats)", result.cross_entropy_nats),
        ("cross-entropy (bits)", result.cross_entropy_bits),
        ("perplexity", result.perplexity),
        ("accuracy", result.accuracy),
        ("expected calibration error", result.expected_calibration_error),
    ]
    if result.weight != result.rows:
        summary.insert(1, ("total sample weight", result.weight))
    if result.infinite_loss_rows:
        summary.append(("rows with infinite loss", result.infinite_loss_rows))
    if result.clipped_rows:
        summary.append(("rows clipped to eps (probability of the true class below eps)",
                        result.clipped_rows))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>crossent score: {html.escape(str(meta.get('source', '')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>crossent score: {html.escape(str(meta.get('source', '')))}</h1>",
        '<p class="meta">'
        + ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in meta.items())
        + f", written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}</p>",
        '<h2>Summary</h2><table id="summary"><tbody>',
    ]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary]
    parts.append("</tbody></table>")
    for name, caption in PLOTS.items():
        data = base64.b64encode(pngs[name]).decode("ascii")
        parts.append(
            f'<h2>{html.escape(caption)}</h2><figure><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"></figure>'
        )
    parts.append('<h2>Per class</h2><table id="per-class"><thead><tr><th>class</th><th>rows</th>'
                 "<th>weight</th><th>cross-entropy (nats)</th><th>accuracy</th></tr></thead><tbody>")
    for e in result.per_class[:1000]:
        parts.append(
            f"<tr><td>{html.escape(e['name'])}</td><td>{_fmt(e['rows'])}</td>"
            f"<td>{_fmt(e['weight'])}</td><td>{_fmt(e['cross_entropy_nats'])}</td>"
            f"<td>{_fmt(e['accuracy'])}</td></tr>"
        )
    parts.append("</tbody></table>")
    if len(result.per_class) > 1000:
        parts.append(f"<p>{len(result.per_class) - 1000} more classes: see --format json.</p>")
    parts.append("<h2>Calibration bins</h2><table id=\"calibration\"><thead><tr><th>confidence</th>"
                 "<th>weight</th><th>mean confidence</th><th>accuracy</th></tr></thead><tbody>")
    for b in result.calibration:
        parts.append(
            f"<tr><td>({b['lower']:.3f}, {b['upper']:.3f}]</td><td>{_fmt(b['weight'])}</td>"
            f"<td>{_fmt(b['confidence'])}</td><td>{_fmt(b['accuracy'])}</td></tr>"
        )
    parts.append("</tbody></table></body></html>\n")
    return "\n".join(parts)


def write_html_report(path, result, pngs: dict[str, bytes], meta: dict) -> None:
    """Render the page and write it atomically to ``path``."""
    write_atomic(path, render_html(result, pngs, meta).encode("utf-8"))
