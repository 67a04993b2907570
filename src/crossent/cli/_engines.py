"""Run the accumulators over files: locally batch by batch, or as Dask tasks that merge.

Local: one process reads each file batch by batch (``--batch-rows``) into one
``ScoreAccumulator``. Dask: one task per Parquet row group (per file when a file has one row
group); each task scores its rows into its own accumulator, and the accumulators are merged
pairwise in a tree of tasks, so the driver receives one accumulator (a few KiB), never rows.
"""

from __future__ import annotations

from crossent.io import DataError, PredictionFile
from crossent.metrics import InvalidDataError, ScoreAccumulator

__all__ = ["score_dask", "score_local"]


def _score_rows(file: PredictionFile, acc: ScoreAccumulator, batch_rows: int, row_group=None,
                progress=None) -> ScoreAccumulator:
    for batch in file.batches(batch_rows, row_group=row_group):
        try:
            acc.update(batch)
        except InvalidDataError as exc:
            raise DataError(exc.args[0], path=file.path) from None
        if progress is not None:
            progress(len(batch.targets))
    return acc


def score_local(files, accumulator_options: dict, *, batch_rows: int, progress=None):
    """Score ``files`` (PredictionFile objects) in this process; returns the accumulator."""
    acc = ScoreAccumulator(**accumulator_options)
    for file in files:
        _score_rows(file, acc, batch_rows, progress=progress)
    return acc


def _score_piece(file, row_group, batch_rows, accumulator_options):
    return _score_rows(file, ScoreAccumulator(**accumulator_options), batch_rows, row_group)


def _merge(a, b):
    return a.merge(b)


def _piece_rows(file, row_groups):
    """Rows in each of ``file``'s row groups (from the starts and the file's row count)."""
    starts = [first for _, first in row_groups]
    ends = starts[1:] + [file.num_rows]
    if any(end is None for end in ends):
        return [None] * len(starts)
    return [end - start for start, end in zip(starts, ends, strict=True)]


def score_dask(files, accumulator_options: dict, *, batch_rows: int, client=None, progress=None):
    """Score Parquet ``files`` with Dask: one task per row group, merged in a tree.

    Runs on ``client`` when given; otherwise on the cluster named by Dask's
    ``scheduler-address`` setting (``DASK_SCHEDULER_ADDRESS``), else on a local cluster of
    worker processes that lives for this call. ``progress(n)`` is called on the driver with each
    finished row group's row count, as the row groups finish.
    """
    from distributed import Client

    if client is None:
        with Client() as own:
            return score_dask(files, accumulator_options, batch_rows=batch_rows, client=own,
                              progress=progress)
    from dask import delayed

    leaves, rows = [], []
    for f in files:
        groups = f.row_groups()
        leaves += [delayed(_score_piece, pure=True)(f, rg, batch_rows, accumulator_options) for rg in groups]
        rows += _piece_rows(f, groups)
    if not leaves:
        return ScoreAccumulator(**accumulator_options)
    parts = client.compute(leaves)  # futures: the leaves run now, the merges are sent after
    if progress is not None:
        from distributed import as_completed

        rows_of = {fut.key: n for fut, n in zip(parts, rows, strict=True)}
        for fut in as_completed(parts):
            if fut.status == "error":
                break  # the merge below raises the task's exception
            progress(rows_of[fut.key] or 0)
    while len(parts) > 1:  # pairwise tree of merges, run on the workers
        merged = [client.submit(_merge, a, b, pure=False) for a, b in zip(parts[0::2], parts[1::2], strict=False)]
        parts = merged + (parts[-1:] if len(parts) % 2 else [])
    return parts[0].result()
