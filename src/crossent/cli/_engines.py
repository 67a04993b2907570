"""Run the accumulators over files: locally batch by batch, or as Dask tasks that merge.

Local: one process reads each file batch by batch (``--batch-rows``) into one
``ScoreAccumulator``. Dask: one task per Parquet row group (per file when a file has one row
group); each task scores its rows into its own accumulator, and the accumulators are merged
pairwise in a tree of tasks, so the driver receives one accumulator (a few KiB), never rows.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

from crossent.io import DataError, PredictionFile
from crossent.metrics import InvalidDataError, ScoreAccumulator

__all__ = ["score_dask", "score_local"]


def _score_rows(file: PredictionFile, acc: ScoreAccumulator, batch_rows: int, row_group=None,
                progress=None) -> ScoreAccumulator:
    for batch in file.batches(batch_rows, row_group=row_group):
        try:
            acc.update(batch)
        except InvalidDataError as exc:
            raise DataError(_first_bad_row(acc, batch, exc).args[0], path=file.path) from None
        if progress is not None:
            progress(len(batch.targets))
    return acc


def _head(batch, k: int):
    """The first ``k`` rows of ``batch``."""
    weight = None if batch.sample_weight is None else batch.sample_weight[:k]
    return dataclasses.replace(batch, scores=batch.scores[:k], targets=batch.targets[:k],
                               sample_weight=weight)


def _first_bad_row(acc, batch, error: InvalidDataError) -> InvalidDataError:
    """The error of the first bad row of ``batch``, whose update raised ``error``.

    The accumulator runs each check over the whole batch in turn (labels, then weights, then
    the range of the probabilities, then their row sums), so ``error`` names the first row
    that fails the first failing check, which need not be the batch's first bad row. A row's
    checks do not depend on the other rows: the first bad row is the shortest prefix of the
    batch that fails, found by bisection (log2(rows) updates of copies of ``acc``, on this
    error path only). A sum beyond float64 names the row where the running total leaves the
    range (0c4dca8), and a prefix that stops before it passes; errors that name no row are
    returned as they are (an overflow found when merging Dask's parts is named by
    ``_merge_overflow_row``).
    """
    if error.row is None:
        return error
    passes, fails = 0, error.row - batch.start + 1  # prefix lengths: passes, fails
    while fails - passes > 1:
        mid = (passes + fails) // 2
        try:
            copy.deepcopy(acc).update(_head(batch, mid))
        except InvalidDataError as exc:
            if exc.row is not None:
                fails, error = mid, exc
                continue
        passes = mid  # no bad row among the first mid
    return error


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
    worker processes that lives for this call (its logging silenced: a failed task is raised
    here, not also logged by the workers; its HTTP server on a free port). ``progress(n)`` is
    called on the driver with each finished row group's row count, as the row groups finish.
    When tasks fail, the error raised is that of the first failed row group in file order
    (every row group runs first): the first bad row, as with the local engine.
    """
    import dask

    from distributed import Client, LocalCluster, as_completed

    if client is None and dask.config.get("scheduler-address", None):
        with Client() as own:  # the cluster named by DASK_SCHEDULER_ADDRESS
            return score_dask(files, accumulator_options, batch_rows=batch_rows, client=own,
                              progress=progress)
    if client is None:
        # a cluster of our own: its workers' logs silenced (a failed task is raised here, as
        # one error, not logged as well), and its HTTP server on a free port (the scheduler
        # starts one even without a dashboard; on 8787, another cluster's, it warns on stderr)
        with (LocalCluster(silence_logs=logging.CRITICAL, dashboard_address=":0") as cluster,
              Client(cluster) as own):
            return score_dask(files, accumulator_options, batch_rows=batch_rows, client=own,
                              progress=progress)
    from dask import delayed

    leaves, rows, pieces = [], [], []
    for f in files:
        groups = f.row_groups()
        leaves += [delayed(_score_piece, pure=True)(f, rg, batch_rows, accumulator_options) for rg in groups]
        rows += _piece_rows(f, groups)
        pieces += [(f, rg) for rg in groups]
    if not leaves:
        return ScoreAccumulator(**accumulator_options)
    parts = client.compute(leaves)  # futures: the leaves run now, the merges are sent after
    rows_of = {fut.key: n for fut, n in zip(parts, rows, strict=True)}
    for fut in as_completed(parts):  # every leaf finishes, also after one has failed
        if progress is not None and fut.status == "finished":
            progress(rows_of[fut.key] or 0)
    # the leaves are in file order, and each leaf's rows in row order: the first failed leaf
    # holds the first bad row (whatever the order the tasks ran in)
    failed = next((fut for fut in parts if fut.status != "finished"), None)
    if failed is not None:
        failed.result()  # raises the task's exception
    leaves = parts
    while len(parts) > 1:  # pairwise tree of merges, run on the workers
        merged = [client.submit(_merge, a, b, pure=False) for a, b in zip(parts[0::2], parts[1::2], strict=False)]
        parts = merged + (parts[-1:] if len(parts) % 2 else [])
    try:
        return parts[0].result()
    except InvalidDataError as exc:  # sums beyond float64 that no one row group reached
        raise _merge_overflow_row(leaves, pieces, accumulator_options, batch_rows, exc) from None


def _merge_overflow_row(leaves, pieces, accumulator_options, batch_rows, error):
    """The error naming the first row whose running total leaves float64, in file order, when
    only the merge of the parts (futures ``leaves`` of ``pieces``: (file, row group)) did.

    The sums only grow (weights and losses are >= 0), so the first part whose merge onto all
    earlier parts fails holds that row: the driver merges the parts' accumulators (a few KiB
    each) in order, then scores that part's rows on top of the earlier parts, which names the
    row as the local engine does. Runs on this error path only; ``error`` is returned as it
    is if every row passes (a total that overflows in the tree's order of additions only).
    """
    acc = ScoreAccumulator(**accumulator_options)
    for leaf, (file, row_group) in zip(leaves, pieces, strict=True):
        part = leaf.result()
        try:
            copy.deepcopy(acc).merge(part)
        except InvalidDataError:
            try:
                _score_rows(file, acc, batch_rows, row_group)
            except DataError as exc:
                return exc
            return error
        acc.merge(part)
    return error
