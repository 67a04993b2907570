"""Streaming, mergeable metrics of class predictions: cross-entropy, accuracy, calibration.

``ScoreAccumulator`` takes batches of probabilities or logits with their class indices
(``update``), combines with the accumulators of other parts of the data (``merge``) and gives
the metrics of everything seen (``compute``). It is what ``crossent score`` runs on each batch
of a file, and on each file or row group under ``--engine dask``.
"""

from ._accumulator import InvalidDataError, ScoreAccumulator, ScoreResult

__all__ = ["InvalidDataError", "ScoreAccumulator", "ScoreResult"]
