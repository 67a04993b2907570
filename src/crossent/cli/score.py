"""``crossent score``: cross-entropy, accuracy and calibration of a file of predictions.

Reads the file batch by batch (memory follows ``--batch-rows``, not the file size), feeds a
``crossent.metrics.ScoreAccumulator`` and prints a table or JSON. Exit codes: 0 success,
1 bad data (the message names the column and the 0-based data row), 2 usage error. Errors go
to stderr; on an error nothing is printed to stdout and no report or plot is written.
"""

from __future__ import annotations

import json
import math
import os
import sys

import click
import numpy as np

from crossent.io import DataError, expand_paths, open_predictions
from crossent.io._readers import MAX_BATCH_ROWS, SUFFIXES

__all__ = ["score", "score_files"]

# Default batch: 2^18 scores (1 MiB of float32), 16384 rows of 16 classes. Measured on 4M x 16
# float32 Parquet rows: peak RSS 134 MiB at 16384 rows per batch, 156 MiB at 65536.
BATCH_SCORES = 1 << 18


class BadData(click.ClickException):
    """Bad data in a prediction file: exit status 1."""

    exit_code = 1


def score_files(
    path: str,
    /,
    *,
    target: str,
    probs: str | None = None,
    logits: str | None = None,
    sample_weight: str | None = None,
    normalize: bool = False,
    labels: str = "auto",
    engine: str = "local",
    batch_rows: int | None = None,
    client=None,
    progress: bool = False,
):
    """Score the prediction file(s) at ``path``; returns ``(ScoreResult, [PredictionFile])``.

    ``path`` is a file, a directory or a glob (``--engine dask`` reads Parquet files only);
    each file is read by its own suffix. ``labels`` ("auto", "index", "name") says how the
    target is decoded (``crossent.io.TargetDecoder``). ``batch_rows=None`` reads about
    ``BATCH_SCORES`` scores per batch (16384 rows of 16 classes).
    Raises ``crossent.io.DataError`` for bad data, ``ValueError`` for bad arguments.
    """
    files = _open_files(path, target=target, probs=probs, logits=logits,
                        sample_weight=sample_weight, labels=labels, engine=engine)
    return _score_opened(files, target=target, logits=logits is not None, normalize=normalize,
                         sample_weight=sample_weight, engine=engine, batch_rows=batch_rows,
                         client=client, progress=progress), files


def _open_files(path, *, target, probs, logits, sample_weight, labels, engine):
    """The PredictionFile of each file at ``path`` (headers only). A ValueError here, other
    than a DataError or a UnicodeError, is a problem with the arguments."""
    if (probs is None) == (logits is None):
        raise ValueError("pass exactly one of probs= (--probs) and logits= (--logits)")
    if engine not in ("local", "dask"):
        raise ValueError(f"engine must be 'local' or 'dask', got {engine!r}")
    suffixes = (".parquet", ".pq") if engine == "dask" else SUFFIXES
    paths = expand_paths(path, suffixes=suffixes)
    first = open_predictions(
        paths[0], target=target, scores=probs or logits, sample_weight=sample_weight,
        labels=labels,
    )
    files = [first] + [first.with_path(p) for p in paths[1:]]
    for f in files:
        if engine == "dask" and f.format != "parquet":
            raise ValueError(f"--engine dask reads Parquet files, got {f.path!r}")
    return files


def _score_opened(files, *, target, logits, normalize, sample_weight, engine, batch_rows,
                  client, progress):
    """Read and score the opened ``files``; returns the ScoreResult."""
    first = files[0]
    if batch_rows is None:
        batch_rows = max(1, BATCH_SCORES // first.num_classes)
    options = {
        "num_classes": first.num_classes,
        "from_logits": logits,
        "normalize": normalize,
        # row-sum tolerance: each batch brings its own (text: float32's; binary files: their
        # own dtype's), see crossent.io.Batch
        "class_names": first.class_names,
        "column_names": first.score_columns,
        "target_name": target,
        "weight_name": sample_weight or "sample_weight",
    }
    if engine == "dask":
        from ._engines import score_dask

        if progress:
            with _progress_bar(files) as advance:
                acc = score_dask(files, options, batch_rows=batch_rows, client=client, progress=advance)
        else:
            acc = score_dask(files, options, batch_rows=batch_rows, client=client)
    else:
        from ._engines import score_local

        if progress:
            with _progress_bar(files) as advance:
                acc = score_local(files, options, batch_rows=batch_rows, progress=advance)
        else:
            acc = score_local(files, options, batch_rows=batch_rows)
    return acc.compute()


def _message(exc) -> str:
    """An exception's message, never empty (its class name when it has none)."""
    text = str(exc).strip()
    return text if text else type(exc).__name__


class _progress_bar:
    """A rich progress bar on stderr (used only when stderr is a terminal)."""

    def __init__(self, files):
        rows = [f.num_rows for f in files]
        self.total = sum(rows) if all(r is not None for r in rows) else None

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.progress = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), transient=True,
        )
        self.progress.__enter__()
        task = self.progress.add_task("scoring rows", total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _lean_arrow_memory() -> None:
    """Make Arrow hand freed memory back at once, so peak RSS follows the batch size.

    Arrow's default pool (mimalloc) keeps freed pages for reuse, and glibc's malloc fragments
    under the mix of Arrow and numpy buffers; jemalloc with a zero decay time returns them.
    (Measured on 4M x 16 float32 Parquet rows: 134 MiB peak instead of 151 MiB at
    --batch-rows 16384.) Builds of pyarrow without jemalloc keep their default pool.
    """
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        pa.jemalloc_set_decay_ms(0)
    except (NotImplementedError, pa.ArrowNotImplementedError):
        pass


# JSON has no infinity or NaN: they are written as these strings (still valid JSON), apart
# from null, which means "undefined" (a mean over weight 0: no rows, or sample weights all 0)
_NON_FINITE = {math.inf: "inf", -math.inf: "-inf"}


def _json_number(x):
    """``x`` for JSON: +inf, -inf and NaN become the strings "inf", "-inf" and "nan".

    >>> _json_number(float("inf")), _json_number(float("nan")), _json_number(None), _json_number(0.5)
    ('inf', 'nan', None, 0.5)
    """
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else _NON_FINITE[x]
    return x


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return _json_number(obj)


def _format_table(result, source: str) -> str:
    """The table of ``crossent score`` as text. Class names and ``source`` are shown as they
    are: rich markup (``[/s]``, ``[bold]``) and emoji codes (``:cat:``) in them are not read."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    summary = Table(title=Text(f"crossent score: {source}"), show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    rows = [
        ("rows", f"{result.rows:,}"),
        ("classes", f"{result.classes}"),
        ("cross-entropy (nats)", f"{result.cross_entropy_nats:.6f}"),
        ("cross-entropy (bits)", f"{result.cross_entropy_bits:.6f}"),
        ("perplexity", f"{result.perplexity:.6g}"),
        ("accuracy", f"{result.accuracy:.6f}"),
        ("expected calibration error", f"{result.expected_calibration_error:.6f}"),
    ]
    if result.weight != result.rows:
        rows.insert(1, ("total sample weight", f"{result.weight:.6g}"))
    if result.infinite_loss_rows:
        rows.append(("rows with infinite loss", f"{result.infinite_loss_rows:,}"))
    if result.clipped_rows:
        rows.append(("rows clipped to eps", f"{result.clipped_rows:,}"))
    for name, value in rows:
        summary.add_row(name, value)
    per_class = Table(title="per class")
    for col, justify in (("class", "left"), ("rows", "right"), ("cross-entropy", "right"),
                         ("accuracy", "right")):
        per_class.add_column(col, justify=justify)
    shown = result.per_class[:50]
    for entry in shown:
        ce, acc = entry["cross_entropy_nats"], entry["accuracy"]
        per_class.add_row(
            Text(entry["name"]), f"{entry['rows']:,}",
            "-" if ce is None else f"{ce:.6f}", "-" if acc is None else f"{acc:.4f}",
        )
    console = Console(file=None, width=100, record=True, force_terminal=False)
    with console.capture() as capture:
        console.print(summary)
        console.print(per_class)
        if len(result.per_class) > len(shown):
            console.print(f"({len(result.per_class) - len(shown)} more classes: use --format json)")
    return capture.get()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path")
@click.option("--target", required=True, metavar="COLUMN",
              help="Column of class indices, or class names matching the score columns "
                   "(p_cat -> cat).")
@click.option("--labels", type=click.Choice(["auto", "index", "name"]), default="auto",
              show_default=True,
              help="How --target is read. index: 0-based class indices (the k-th score "
                   "column). name: class names (p_1 -> '1'). auto: text labels are names, "
                   "integer labels are indices, except when the classes are named by integers "
                   "that are not their positions (p_1..p_5): then integer labels are an error "
                   "that asks for index or name. A fractional number is never an index (text "
                   "'0.5' is a class name under name only). The columns of a plain 2-D .npy "
                   "are positions, not names. The same in every file format.")
@click.option("--probs", metavar="COLUMNS",
              help="Probability columns, one per class: a comma list or a glob ('p_*').")
@click.option("--logits", metavar="COLUMNS",
              help="Logit columns, one per class: a comma list or a glob ('l*').")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table",
              show_default=True,
              help="Output on stdout. In json an infinite value is the string \"inf\" (a mean "
                   "loss of +inf, a perplexity beyond float64), and null means undefined (a "
                   "class with no rows, or whose sample weights are all 0).")
@click.option("--sample-weight", metavar="COLUMN",
              help="Column of row weights (finite, >= 0, not all 0).")
@click.option("--normalize", is_flag=True,
              help="Renormalize probability rows that do not sum to 1 (else they are an error).")
@click.option("--report", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Write a self-contained HTML report (summary, per-class loss, reliability "
                   "diagram, loss histogram).")
@click.option("--plots", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the report's plots as PNG files into DIR.")
@click.option("--engine", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="dask: PATH is a directory or glob of Parquet files, one task per row group "
                   "(cluster from DASK_SCHEDULER_ADDRESS, else a local one).")
@click.option("--batch-rows", type=click.IntRange(min=1, max=MAX_BATCH_ROWS), default=None,
              help="Rows per batch: peak memory follows this, not the file size "
                   "[default: 262144 / number of classes, 16384 rows of 16 classes].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score(path, target, labels, probs, logits, output_format, sample_weight, normalize, report,
          plots, engine, batch_rows, quiet):
    """Cross-entropy, accuracy and calibration of the predictions in PATH.

    PATH is a Parquet, CSV (also .csv.gz, .csv.bz2, .csv.zst, .csv.lz4), .npy or .npz file,
    or a directory or glob of them (each read by its own suffix). The class axis is given by
    --probs or --logits: class k is the k-th selected column (a glob keeps the file's column
    order). An .npz file may hold a 2-D array of scores: name it as the columns.

    Probabilities of the true class below eps are clipped to eps (counted as clipped_rows):
    eps is finfo(dtype).eps of the file's float16, float32 or float64 columns; CSV text is
    parsed as float64 (eps 2.2e-16) and its rows must sum to 1 within float32's tolerance
    (3.45e-4). Logits are never clipped.

    Exit status: 0 success, 1 bad data (the message names the column and the 0-based data
    row), 2 usage error.
    """
    if (probs is None) == (logits is None):
        raise click.UsageError("pass exactly one of --probs and --logits")
    if normalize and logits is not None:
        raise click.UsageError("--normalize applies to --probs only")
    if report and not os.path.isdir(os.path.dirname(os.path.abspath(report))):
        raise click.BadParameter(f"the folder of {report!r} does not exist", param_hint="--report")
    if report and plots:
        from ._report import PLOTS

        for name in PLOTS:
            if os.path.realpath(os.path.join(plots, name)) == os.path.realpath(report):
                raise click.BadParameter(
                    f"{report!r} is where --plots writes {name}: the report needs its own file",
                    param_hint="--report",
                )
    show_progress = not quiet and sys.stderr.isatty()
    _lean_arrow_memory()
    # Usage errors (exit 2) come only from the options: a ValueError while the files are
    # opened (a column that is selected twice, too few score columns, a sample weight column
    # that is the target; a name the file holds twice is a DataError). Reading the data, any
    # error is bad data (exit 1), ValueError subclasses included (UnicodeDecodeError,
    # io.UnsupportedOperation), and its message is never empty.
    try:
        files = _open_files(path, target=target, probs=probs, logits=logits,
                            sample_weight=sample_weight, labels=labels, engine=engine)
    except DataError as exc:
        raise BadData(str(exc)) from None
    except UnicodeError as exc:  # a ValueError, but bad data, not usage
        raise BadData(f"{path}: not UTF-8 text ({exc})") from None
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="PATH") from None
    except OSError as exc:
        raise BadData(f"{exc.filename or path}: cannot read ({exc.strerror or _message(exc)})") from None
    except ValueError as exc:
        raise click.UsageError(_message(exc)) from None
    try:
        result = _score_opened(files, target=target, logits=logits is not None,
                               normalize=normalize, sample_weight=sample_weight, engine=engine,
                               batch_rows=batch_rows, client=None, progress=show_progress)
    except DataError as exc:
        raise BadData(str(exc)) from None
    except UnicodeError as exc:
        raise BadData(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise BadData(f"{exc.filename or path}: cannot read ({exc.strerror or _message(exc)})") from None
    except ValueError as exc:  # not an option problem: the options were checked above
        raise BadData(f"{path}: {type(exc).__name__}: {_message(exc)}") from None
    if result.rows == 0:
        raise BadData(f"{path}: no data rows to score")
    if result.weight == 0:  # rows, but every --sample-weight is 0: no mean to report
        raise BadData(f"{path}: the total sample weight (--sample-weight {sample_weight}) is 0: "
                      "nothing to score")
    # the output is rendered first: a failure to format it leaves no report or plot behind
    if output_format == "json":
        text, newline = json.dumps(_clean(result.to_dict()), allow_nan=False), True
    else:
        text, newline = _format_table(result, path), False
    if report or plots:
        from ._report import render_html, render_pngs, write_all

        pngs = render_pngs(result, from_logits=logits is not None)
        meta = {
            "source": path,
            "columns": f"{files[0].score_columns[0]} .. {files[0].score_columns[-1]}",
            "kind": "logits" if logits is not None else "probabilities",
            "target": target,
            "files": len(files),
        }
        outputs = []
        if report:  # all files are written, or none (see _report.write_all)
            outputs.append((report, render_html(result, pngs, meta).encode("utf-8")))
        if plots:
            outputs += [(os.path.join(plots, name), data) for name, data in pngs.items()]
        try:
            write_all(outputs, folders=[plots] if plots else [])
        except OSError as exc:
            raise click.FileError(exc.filename or report or plots, hint=exc.strerror) from None
    click.echo(text, nl=newline)
