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


def score_dask(files, accumulator_options: dict, *, batch_rows: int, client=None):
    """Score Parquet ``files`` with Dask: one task per row group, merged in a tree.

    Runs on ``client`` when given; otherwise on the cluster named by Dask's
    ``scheduler-address`` setting (``DASK_SCHEDULER_ADDRESS``), else on a local cluster of
    worker processes that lives for this call.
    """
    import dask
    from dask import delayed

    parts = [
        delayed(_score_piece, pure=True)(f, rg, batch_rows, accumulator_options)
        for f in files
        for rg in f.row_groups()
    ]
    if not parts:
        return ScoreAccumulator(**accumulator_options)
    while len(parts) > 1:  # pairwise tree of merges
        merged = [delayed(_merge)(a, b) for a, b in zip(parts[0::2], parts[1::2], strict=False)]
        parts = merged + (parts[-1:] if len(parts) % 2 else [])
    if client is not None:
        return client.compute(parts[0]).result()
    from distributed import Client

    with Client() as own:
        return dask.compute(parts[0], scheduler=own)[0]
