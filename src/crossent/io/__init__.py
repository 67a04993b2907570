"""Readers of prediction files (Parquet, CSV, .npy, .npz) that yield batches of rows.

``open_predictions(path, target=..., scores=...)`` resolves the columns (a comma list or a
glob that keeps the file's column order) and how the target column is decoded (class indices,
or class names matched to the score column names: ``p_cat -> cat``); ``.batches(n)`` then
yields ``Batch`` objects of at most n rows, so memory follows the batch size, not the file.
"""

from ._columns import DataError, class_names_from_columns, resolve_columns
from ._readers import Batch, PredictionFile, detect_format, expand_paths, open_predictions
from ._targets import TargetDecoder

__all__ = [
    "Batch",
    "DataError",
    "PredictionFile",
    "TargetDecoder",
    "class_names_from_columns",
    "detect_format",
    "expand_paths",
    "open_predictions",
    "resolve_columns",
]
