"""Readers for prediction files (Parquet, CSV, .npy, .npz), one batch of rows at a time.

Peak memory follows the batch size, not the file size:
- Parquet: ``ParquetFile(path, pre_buffer=False).iter_batches(...)`` reads one row group's
  selected columns at a time (with pre-buffering pyarrow would read the whole file up front);
- CSV: ``pyarrow.csv.open_csv`` parses block by block, only the selected columns; a
  ``.csv.gz`` / ``.csv.bz2`` / ``.csv.zst`` / ``.csv.lz4`` file is decompressed as a stream.
  Text is UTF-8 (a byte-order mark is skipped); numbers in it are parsed as float64 (a
  number beyond its range, ``1e400``, is an error at its row; ``inf`` and ``-inf`` are
  infinities);
- .npy / .npz: the array header is parsed with ``numpy.lib.format`` and rows are read from
  the file (or the zip member) sequentially into a batch buffer; no memory map, whose pages
  would stay resident and count against the process. A Fortran-ordered (column-major) 2-D
  array stores each column whole, one after the other: each batch reads its rows of every
  column with one positioned read per column (``os.pread``), from the file itself for an
  ``.npy`` file or a stored (``np.savez``) member, and from a temporary file that the member is
  first decompressed into, chunk by chunk, for a compressed (``np.savez_compressed``) member.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import itertools
import math
import os
import re
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ._columns import DataError, class_names_from_columns, duplicated_column, resolve_columns
from ._targets import LABEL_MODES, TargetDecoder, first_true, numeric_view

__all__ = ["MAX_BATCH_ROWS", "Batch", "PredictionFile", "expand_paths", "open_predictions"]

FORMATS = ("parquet", "csv", "npy", "npz")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".npy": "npy", ".npz": "npz"}
# compressed CSV: suffix -> pyarrow codec (decompressed as a stream, in bounded memory)
_CSV_CODECS = {".csv.gz": "gzip", ".csv.bz2": "bz2", ".csv.zst": "zstd", ".csv.lz4": "lz4"}
SUFFIXES = tuple(_SUFFIXES) + tuple(_CSV_CODECS)
# CSV text carries no dtype: rows written from float32 arrays sum to 1 within float32's
# tolerance, so text is held to that tolerance (its numbers are parsed as float64)
TEXT_TOLERANCE = math.sqrt(float(np.finfo(np.float32).eps))
# the largest batch: Arrow takes batch sizes as int64
MAX_BATCH_ROWS = 2**63 - 1


@dataclass(frozen=True)
class Batch:
    """Rows ``start .. start + n - 1`` (0-based data rows of ``path``) of a prediction file.

    ``scores``: ``[n, C]`` probabilities or logits, column-major, in the file's precision
    (float16 or float32 when every score column has it, else float64: float64, integer and text
    columns); ``targets``: ``[n]`` int64 class indices in ``[0, C)``; ``sample_weight``: ``[n]``
    float64 or None; ``tolerance``: the row-sum tolerance of probabilities read from text
    (``TEXT_TOLERANCE``), None for binary files (held to their own dtype's).
    """

    scores: np.ndarray
    targets: np.ndarray
    sample_weight: np.ndarray | None
    start: int
    path: str
    tolerance: float | None = None


@dataclass(frozen=True)
class _Matrix:
    """A 2-D member of an .npz file (or a subarray field of an .npy record) used as K columns."""

    name: str
    width: int


@dataclass(frozen=True)
class PredictionFile:
    """An opened (resolved, not held open) prediction file; picklable for Dask tasks.

    Holds the resolved score columns (``score_columns``, one per class, in class order), their
    class names, the target decoder and the optional sample-weight column. ``batches()`` opens
    the file and yields ``Batch`` objects.
    """

    path: str
    format: str
    score_columns: tuple[str, ...]
    class_names: tuple[str, ...]
    target: TargetDecoder
    sample_weight: str | None
    score_dtype: np.dtype
    num_rows: int | None
    text: bool = False  # scores parsed from text (CSV): no dtype of their own
    # row-sum tolerance of mixed float16/float32 columns (see _score_tolerance), else None
    tolerance: float | None = None
    _sources: tuple = field(default=(), repr=False)  # columns to read (names or _Matrix)
    # the score columns as the caller gave them (a comma list or glob): resolved again in each
    # file of a directory or glob (``with_path``)
    score_spec: str | tuple | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.score_columns)

    def with_path(self, path: str) -> PredictionFile:
        """The same column selection applied to another file of the same layout.

        The score columns are resolved again in that file (a glob may match other columns
        there): they must be this file's columns, else a DataError names both files. When they
        are the same columns in another order, they are read in this file's order (a class is
        its column's name). The file is read by its own suffix (a directory may mix formats)
        and its labels are decoded as this file's.
        """
        names = [s.name if isinstance(s, _Matrix) else s for s in self._sources]
        spec = names if self.score_spec is None else self.score_spec
        options = {"target": self.target.column, "sample_weight": self.sample_weight,
                   "labels": self.target.mode}
        other = open_predictions(path, scores=spec, **options)
        if (other.score_columns != self.score_columns
                and sorted(other.score_columns) == sorted(self.score_columns)):
            other = open_predictions(path, scores=names, **options)  # the same, reordered
        if other.score_columns != self.score_columns:
            raise DataError(
                f"score columns {spec!r} select {list(other.score_columns)} in this file, but "
                f"{list(self.score_columns)} in {self.path}; every file must have the same "
                "score columns",
                path=path,
            )
        return other

    def row_groups(self) -> list[tuple[int, int]]:
        """``(row group index, first data row)`` of each Parquet row group (Dask tasks)."""
        if self.format != "parquet":
            return [(-1, 0)]
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(self.path, pre_buffer=False).metadata
        starts, row = [], 0
        for i in range(meta.num_row_groups):
            starts.append((i, row))
            row += meta.row_group(i).num_rows
        return starts

    def batches(self, batch_rows: int = 65536, *, row_group=None) -> Iterator[Batch]:
        """Yield the file's rows as ``Batch`` objects of at most ``batch_rows`` rows.

        ``row_group=(index, first_row)`` reads one Parquet row group only. A bad value (a
        missing score, an undecodable label) raises a DataError at the first such row, after
        the rows before it have been yielded as a batch: the checks on the yielded rows (a
        ``ScoreAccumulator``'s) see them first, so the first bad row of the file is reported
        whatever the batch size.
        """
        if not isinstance(batch_rows, int) or not 1 <= batch_rows <= MAX_BATCH_ROWS:
            raise ValueError(f"batch_rows must be an integer in [1, {MAX_BATCH_ROWS}], got "
                             f"{batch_rows!r}")
        reader = _READERS[self.format]
        columns = list(self._sources) + [self.target.column]
        if self.sample_weight is not None:
            columns.append(self.sample_weight)
        for start, data in reader(self, columns, batch_rows, row_group):
            batch, error = self._checked_batch(start, data)
            if batch is not None:
                yield batch
            if error is not None:
                raise error

    def _checked_batch(self, start: int, data: dict) -> tuple[Batch | None, DataError | None]:
        """``(batch, None)``, or, when a row is bad, ``(the rows before it or None, the error)``.

        Each check (each score column, the target, the weight) finds its own first bad row;
        the error is that of the smallest row (on a tie, the first check in that order).
        """
        errors = []

        def checked(convert, *args):
            try:
                return convert(*args)
            except DataError as exc:
                if exc.row is None:  # a column that holds no numbers at all: no row's fault
                    raise
                errors.append(exc)
                return None

        n = len(data[self.target.column])
        # column-major [n, C]: each column is one contiguous copy, and the metrics' reductions
        # over a short class axis run much faster in this layout
        scores = np.empty((self.num_classes, n), dtype=self.score_dtype).T
        k = 0
        for source in self._sources:
            if isinstance(source, _Matrix):
                scores[:, k : k + source.width] = data[source.name]
                k += source.width
            else:
                column = checked(self._numbers, data[source], source, start)
                if column is not None:
                    scores[:, k] = column
                k += 1
        targets = checked(lambda v: self.target.decode(v, start=start, path=self.path),
                          data[self.target.column])
        weight = None
        if self.sample_weight is not None:
            weight = checked(self._numbers, data[self.sample_weight], self.sample_weight, start)
            if weight is not None:
                weight = weight.astype(np.float64, copy=False)
        if errors:
            first = min(errors, key=lambda e: e.row)
            cut = first.row - start
            if cut == 0:
                return None, first
            # the rows before the first bad one pass every check here: read them again alone
            head = {name: values.slice(0, cut) if isinstance(values, pa.Array) else values[:cut]
                    for name, values in data.items()}
            return self._checked_batch(start, head)[0], first
        return Batch(scores, targets, weight, start, self.path,
                     TEXT_TOLERANCE if self.text else self.tolerance), None

    def _numbers(self, values, name: str, start: int) -> np.ndarray:
        if isinstance(values, pa.Array):
            if values.null_count:
                row = first_true(values.is_null())
                raise DataError("missing value", path=self.path, column=name, row=start + row)
            if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
                raise DataError(f"holds {values.type}, expected numbers", path=self.path, column=name)
            return numeric_view(values)
        values = np.asarray(values)
        if values.dtype.kind not in "iuf":
            raise DataError(f"holds {values.dtype}, expected numbers", path=self.path, column=name)
        return values


def expand_paths(path: str, *, suffixes=(".parquet", ".pq")) -> list[str]:
    """The files named by ``path``: itself, the matching files of a directory, or a glob.

    Only files count: a sub-directory (``part.parquet/`` as Spark writes) is skipped, in a
    directory as in a glob. An existing file or directory is taken as named, before any glob
    reading: ``run[1].csv`` is that file, never ``run1.csv``.
    """
    if os.path.isfile(path):
        found = [path]
    elif os.path.isdir(path):
        found = sorted(
            os.path.join(path, f) for f in os.listdir(path)
            if f.lower().endswith(tuple(suffixes)) and os.path.isfile(os.path.join(path, f))
        )
    elif any(c in path for c in "*?["):
        found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
    else:
        found = []
    if not found:
        raise FileNotFoundError(f"PATH {path!r} names no file ({', '.join(suffixes)})")
    return found


def detect_format(path: str) -> str:
    """The reader for ``path``, from its suffix (case-insensitive).

    >>> detect_format("preds.PARQUET"), detect_format("preds.csv.gz"), detect_format("x.npz")
    ('parquet', 'csv', 'npz')
    """
    lower = os.fspath(path).lower()
    if lower.endswith(tuple(_CSV_CODECS)):
        return "csv"
    suffix = os.path.splitext(lower)[1]
    if suffix not in _SUFFIXES:
        raise ValueError(f"PATH must end in one of {list(SUFFIXES)}, got {os.fspath(path)!r}")
    return _SUFFIXES[suffix]


def _csv_codec(path) -> str | None:
    lower = os.fspath(path).lower()
    return next((c for s, c in _CSV_CODECS.items() if lower.endswith(s)), None)


def open_predictions(
    path,
    /,
    *,
    target: str,
    scores,
    sample_weight: str | None = None,
    format: str | None = None,
    labels: str = "auto",
) -> PredictionFile:
    """Open a prediction file: resolve the columns and how the target is decoded.

    ``scores`` is a comma list or glob of columns, one per class (``"p_*"``); ``target`` names
    the column of class indices or class names (matched to the score column names,
    ``p_cat -> cat``); ``sample_weight`` optionally names a column of row weights.
    ``labels`` is ``"auto"``, ``"index"`` or ``"name"`` (see ``TargetDecoder``): one rule for
    every format, decided by each label's value. Nothing is read beyond the header.
    Raises ValueError for contradictory arguments (a weight column that is the target, a
    column selected twice) and DataError for the file (a missing column, or a selected column
    whose name the file holds twice).

    >>> import numpy as np, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "pred.npz")
    >>> np.savez(path, probs=np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]), y=np.array([1, 1]))
    >>> f = open_predictions(path, target="y", scores="probs")
    >>> batch = next(f.batches())
    >>> f.score_columns, batch.targets.tolist()
    (('probs[0]', 'probs[1]', 'probs[2]'), [1, 1])
    """
    path = os.fspath(path)
    format = detect_format(path) if format is None else format
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if sample_weight is not None and sample_weight == target:
        raise ValueError(f"the sample weight column {sample_weight!r} is the target column; "
                         "name a column of row weights")
    available, kinds, num_rows, positional = _SCHEMA[format](path)
    sources = resolve_columns(scores, available, option="score columns", path=path)
    score_columns, dtypes = [], []
    for name in sources:
        kind = kinds[name]
        if isinstance(kind, _Shaped):
            raise DataError(
                f"score columns: array {name!r} has shape {kind.shape}; scores are a 2-D "
                "[rows, classes] array or 1-D columns", path=path,
            )
        if isinstance(kind, tuple):  # a matrix: (dtype, width)
            score_columns += [f"{name}[{k}]" for k in range(kind[1])]
            dtypes.append(np.dtype(kind[0]))
        else:
            score_columns.append(name)
            dtypes.append(kind)
    for option, name in (("target", target), ("sample weight", sample_weight)):
        if name is None:
            continue
        if name not in available:
            raise DataError(f"{option}: no column {name!r} in the file", path=path)
        if available.count(name) > 1:
            raise duplicated_column(name, available.count(name), path=path)
        kind = kinds[name]
        if isinstance(kind, (tuple, _Shaped)):
            shape = kind.shape if isinstance(kind, _Shaped) else (num_rows, kind[1])
            raise DataError(
                f"{option}: array {name!r} has shape {shape}, expected a 1-D array of "
                f"{num_rows} values (save {name}.ravel())", path=path,
            )
        if name in sources:
            raise ValueError(f"{option} column {name!r} is also selected as a score column")
    if len(score_columns) < 2:
        raise ValueError(f"score columns must select at least 2 columns, got {score_columns}")
    text = format == "csv"
    score_dtype = _score_dtype(dtypes, path, sources)
    matrix = any(isinstance(kinds[s], tuple) for s in sources)
    # an .npz matrix's columns and a plain 2-D .npy's columns ("0", "1", ...: positions in
    # the array, not names) name the classes by their positions among the score columns
    names = (
        [str(k) for k in range(len(score_columns))]
        if matrix or positional
        else class_names_from_columns(score_columns)
    )
    sources = tuple(_Matrix(s, kinds[s][1]) if isinstance(kinds[s], tuple) else s for s in sources)
    opened = PredictionFile(
        path,
        format,
        tuple(score_columns),
        tuple(names),
        TargetDecoder(target, tuple(names), tuple(score_columns), labels,
                      positional_columns=positional),
        sample_weight,
        score_dtype,
        num_rows,
        text,
        None if text else _score_tolerance(dtypes),
        sources,
        tuple(scores) if isinstance(scores, list) else scores,
    )
    return opened


def _score_tolerance(dtypes) -> float | None:
    """Row-sum tolerance of score columns of mixed dtypes: that of the coarsest float dtype
    among them (float16's for float16 and float32 columns), the widest tolerance. A row of
    float16 values can only be expected to sum to 1 within float16's rounding, even when the
    batch holds it as float32 (or float64, beside integer columns, which are exact and add no
    tolerance of their own). None when all score columns have one dtype: the batch dtype's
    own tolerance applies."""
    kinds = {np.dtype(dt) for dt in dtypes}
    floats = {dt for dt in kinds if dt.kind == "f"}
    if len(kinds) < 2 or not floats:
        return None
    return max(math.sqrt(float(np.finfo(dt).eps)) for dt in floats)


def _score_dtype(dtypes, path, sources) -> np.dtype:
    """The batch dtype: the file's own float16 or float32 (whose eps and tolerance apply to
    its probabilities), float64 for float64, integer or mixed columns."""
    for name, dt in zip(sources, dtypes, strict=True):
        if not isinstance(dt, np.dtype) or dt.kind not in "iuf":
            raise DataError(f"holds {dt}, expected numbers", path=path, column=name)
    if all(np.dtype(dt) == np.float16 for dt in dtypes):
        return np.dtype(np.float16)
    if all(np.dtype(dt).kind == "f" and np.dtype(dt).itemsize <= 4 for dt in dtypes):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


# ---------------------------------------------------------------- Parquet


def _parquet_schema(path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable Parquet file ({exc})", path=path) from None
    schema = pf.schema_arrow
    kinds = {}
    for f in schema:
        kinds[f.name] = _numpy_dtype(f.type)
    return schema.names, kinds, pf.metadata.num_rows, False


_PARQUET_BUFFER = 1 << 16
_PARQUET_THREADS = False  # decoding threads hold more batches at once (+10-25 MiB measured)


def _numpy_dtype(kind):
    """The numpy dtype of a numeric arrow type, else the type's name (without pandas)."""
    if pa.types.is_floating(kind) or pa.types.is_integer(kind):
        letter = "f" if pa.types.is_floating(kind) else "i" if pa.types.is_signed_integer(kind) else "u"
        return np.dtype(f"{letter}{kind.bit_width // 8}")
    return str(kind)


def _parquet_batches(opened, columns, batch_rows, row_group):
    import pyarrow.parquet as pq

    names = [c.name if isinstance(c, _Matrix) else c for c in columns]
    # pre_buffer=False: do not read the whole file up front; buffer_size: stream each column
    # chunk through a small buffer instead of reading the chunk whole (peak memory then follows
    # the batch, not the row group)
    pf = pq.ParquetFile(opened.path, pre_buffer=False, buffer_size=_PARQUET_BUFFER)
    start = 0
    groups = None
    if row_group is not None:
        groups, start = [row_group[0]], row_group[1]
    for rb in pf.iter_batches(batch_size=batch_rows, columns=names, row_groups=groups,
                              use_threads=_PARQUET_THREADS):
        yield start, {name: rb.column(name) for name in names}
        start += rb.num_rows


# ---------------------------------------------------------------- CSV

# first bytes of files that are not CSV text, for a clear message when one is named .csv
_MAGIC = {
    b"PAR1": "a Parquet file (name it .parquet)",
    b"PK\x03\x04": "a zip archive (an .npz file? name it .npz)",
    b"\x93NUMPY": "an .npy array (name it .npy)",
    b"\x1f\x8b": "gzip-compressed (name it .csv.gz)",
    b"BZh": "bzip2-compressed (name it .csv.bz2)",
    b"\x28\xb5\x2f\xfd": "zstd-compressed (name it .csv.zst)",
    b"\x04\x22\x4d\x18": "lz4-compressed (name it .csv.lz4)",
}
_HEAD_BYTES = 1 << 22  # at most 4 MiB of lines after the header, to estimate the row size


def _csv_stream(path):
    """The file's bytes, decompressed when its suffix names a codec (``.csv.gz``)."""
    codec = _csv_codec(path)
    try:
        if codec is None:
            return open(path, "rb")
        return pa.input_stream(os.fspath(path), compression=codec)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot open the CSV file ({exc})", path=path) from None


def _csv_text(path, errors="strict"):
    """The file as text: UTF-8 with an optional byte-order mark, rows split as csv does."""
    return io.TextIOWrapper(_readable(_csv_stream(path)), encoding="utf-8-sig", errors=errors,
                            newline="")


def _readable(f):
    """A Python binary stream (lines, iteration) over a file or a pyarrow stream.

    Every ``pa.NativeFile`` is wrapped: some (``CompressedInputStream``) are ``io.IOBase``
    instances, but their ``readline`` raises ``io.UnsupportedOperation``.
    """
    if isinstance(f, pa.NativeFile) or not isinstance(f, io.IOBase):
        return io.BufferedReader(_ArrowRaw(f))
    return f


class _ArrowRaw(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream (for io.TextIOWrapper)."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self):
        return True

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        data = self.stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self):
        self.stream.close()
        super().close()


def _csv_header(path):
    """``(column names, mean bytes per line)`` of the CSV file at ``path``.

    The header row is parsed by Python's csv module over the text as Arrow reads it: lines end
    in ``\\n``, ``\\r\\n`` or ``\\r`` alone (old Mac exports), and a quoted name may hold a line
    break or a comma. The bytes per line, from up to 64 lines after the header, size the blocks.
    """
    try:
        with _csv_stream(path) as f:
            data = bytearray()
            while b"\n" not in data and b"\r" not in data:  # the first line, however long
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                data += chunk
            data += f.read(_HEAD_BYTES)
    except (pa.ArrowException, OSError, EOFError) as exc:  # e.g. a corrupt .gz
        raise DataError(f"cannot read the CSV file ({exc})", path=path) from None
    data = bytes(data)
    for magic, what in _MAGIC.items():
        if data.startswith(magic):
            raise DataError(f"not CSV text: the file is {what}", path=path)
    header, text = _csv_header_row(path)
    bad = next((i for i, ch in enumerate(text) if "\udc80" <= ch <= "\udcff"), None)
    if bad is not None:  # a byte that is not UTF-8, kept by surrogateescape
        column = len(text[:bad].encode("utf-8", "surrogateescape")) + 1
        raise DataError(
            f"line 1 (the header) is not UTF-8 text: byte {ord(text[bad]) - 0xDC00:#04x} at "
            f"column {column}", path=path,
        )
    if not header:
        raise DataError("empty CSV file (no header line)", path=path)
    skip = len(text.encode("utf-8", "surrogateescape"))
    if data.startswith(codecs.BOM_UTF8):
        skip += len(codecs.BOM_UTF8)
    lines = re.split(rb"\r\n|\r|\n", data[skip:])[:64]
    row_bytes = max(1.0, sum(len(x) + 1 for x in lines) / max(1, sum(1 for x in lines if x)))
    return header, row_bytes


def _csv_header_row(path) -> tuple[list[str], str]:
    """The header row's fields (``[]`` for a blank first line or an empty file) and its text
    (bytes that are not UTF-8 kept as lone surrogates, ``surrogateescape``)."""
    taken = []

    def lines(f):
        for line in f:
            taken.append(line)
            yield line

    limit = csv.field_size_limit()
    csv.field_size_limit(_CSV_MAX_BLOCK)  # a header name as long as Arrow takes
    try:
        with _csv_text(path, errors="surrogateescape") as f:
            header = next(csv.reader(lines(f)), [])  # csv reads no line beyond the row
    except csv.Error as exc:
        raise DataError(f"line 1 (the header) is not a CSV row: {exc}", path=path) from None
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise DataError(f"cannot read the CSV file ({exc})", path=path) from None
    finally:
        csv.field_size_limit(limit)
    return header, "".join(taken)


def _csv_schema(path):
    header, _ = _csv_header(path)
    return header, {name: np.dtype(np.float64) for name in header}, None, False


def _csv_batches(opened, columns, batch_rows, row_group):
    """Batches of a CSV file (``_csv_parsed_batches``), with overflows found.

    Arrow parses a number beyond float64's range (``1e400``, ``-1e400``) as an infinity, as
    it parses ``inf`` and ``-inf``: the batch would then hold a value the file does not (a
    ``-1e400`` logit would mask its class, as ``-inf`` does). Where a number column of a batch
    holds an infinity, the text of its rows is looked up (``_CsvRows``, one forward pass over
    the file, only for files that hold infinities); an infinity not written as one
    (``_INFINITY``) is a DataError at its row, raised after the rows before it are yielded.
    """
    names = list(dict.fromkeys(columns))
    numbers = [name for name in names if name != opened.target.column]
    texts = None
    try:
        for start, data in _csv_parsed_batches(opened, columns, batch_rows, row_group):
            infinite = _infinite(data, numbers)
            if infinite:
                if texts is None:
                    texts = _CsvRows(opened.path)
                error = _overflow(texts, start, infinite)
                if error is not None:
                    cut = error.row - start
                    if cut:
                        yield start, {name: values.slice(0, cut) for name, values in data.items()}
                    raise error
            yield start, data
    finally:
        if texts is not None:
            texts.close()


# text that Arrow reads as an infinite float64: inf or infinity in any case, signed or not,
# blanks around it (Arrow trims them); any other text read as an infinity is an overflow
_INFINITY = re.compile(r"\s*[+-]?inf(?:inity)?\s*", re.IGNORECASE)


def _infinite(data, names) -> dict[str, np.ndarray]:
    """``{column: mask of its +-inf values}`` for the columns of ``names`` that hold one."""
    found = {}
    for name in names:
        values = data[name]
        infinite = np.isinf(numeric_view(values))
        if values.null_count:  # a null's slot holds no value
            infinite &= ~numeric_view(values.is_null().cast(pa.int8())).astype(bool)
        if infinite.any():
            found[name] = infinite
    return found


def _overflow(texts, start, infinite) -> DataError | None:
    """The error of the first batch row holding a number beyond float64's range (``infinite``:
    ``_infinite``'s masks; on a tie, the leftmost column); None when every infinity is
    written as one."""
    names = sorted(infinite, key=texts.header.index)
    positions = [texts.header.index(name) for name in names]
    # (row, column) of each infinity, row by row, left to right
    rows, columns = np.nonzero(np.stack([infinite[name] for name in names], axis=1))
    limit = csv.field_size_limit()
    csv.field_size_limit(2 * _CSV_MAX_BLOCK)  # the longest field Arrow reads
    try:
        lines = texts.rows(start, start + int(rows[-1]) + 1)
        at, fields = -1, None
        for r, c in zip(rows.tolist(), columns.tolist(), strict=True):
            if r != at:
                fields = next(itertools.islice(lines, r - at - 1, None), None)
                at = r
            if fields is None:  # the csv module ends before Arrow did: nothing to compare
                return None
            k = positions[c]
            text = fields[k] if k < len(fields) else ""
            if not _INFINITY.fullmatch(text):
                return DataError(
                    f"{text.strip()!r} is beyond float64's range (magnitudes up to 1.8e308): "
                    "expected a number in that range, or inf / -inf written as such",
                    path=texts.path, column=names[c], row=start + r,
                )
    except csv.Error as exc:
        return DataError(f"cannot parse the CSV file: {exc}", path=texts.path,
                         row=texts.next_row)
    finally:
        csv.field_size_limit(limit)
    return None


class _CsvRows:
    """The fields of a CSV file's data rows, read forward by Python's csv module; rows are
    numbered as ``_first_row`` and Arrow number them (blank lines skipped). Asked for rows
    in increasing order (as ``_csv_batches`` yields them), the file is read once. The caller
    sets ``csv.field_size_limit``."""

    def __init__(self, path):
        self.path = path
        self.file = _csv_text(path, errors="replace")
        self.reader = csv.reader(self.file)
        limit = csv.field_size_limit()
        csv.field_size_limit(2 * _CSV_MAX_BLOCK)
        try:
            self.header = next(self.reader, [])
        except csv.Error:  # read as the header was already: not expected
            self.header = []
        finally:
            csv.field_size_limit(limit)
        self.next_row = 0  # the data row read next

    def rows(self, start, stop):
        """The fields of data rows ``start .. stop - 1`` (fewer where the file ends)."""
        if start < self.next_row:  # a row already passed: read again from the start
            self.close()
            self.__init__(self.path)
        for fields in self.reader:
            if not fields:  # a blank line
                continue
            self.next_row += 1
            if self.next_row > start:
                yield fields
            if self.next_row >= stop:
                return

    def close(self):
        self.file.close()


def _csv_parsed_batches(opened, columns, batch_rows, row_group):
    """Batches of a CSV file, parsed by Arrow one block at a time.

    The block size is estimated from the first lines (``batch_rows`` rows of their mean size).
    A later row longer than that (a long text cell, a wider row) makes Arrow fail with a
    "straddling object" error: the file is then read again from the start with blocks 4 times
    larger (up to ``_CSV_MAX_BLOCK``), skipping the rows already yielded. That costs time (a
    re-read of those rows), only on such files; memory follows the block, so the longest row.
    The rows, their values and their numbers are the same at every block size.

    A row that Arrow cannot read (a value that is not a number, a ragged row) fails its whole
    block: the rows of the block before it are then parsed again on their own and yielded
    before its error is raised (``_csv_rows_before``), so that the first bad row of the file
    is reported whatever the block size.
    """
    header, row_bytes = _csv_header(opened.path)
    names = list(dict.fromkeys(columns))
    types = {name: pa.float64() for name in names}
    types[opened.target.column] = pa.string()  # decoded by value (see TargetDecoder)
    block = int(min(max(batch_rows * row_bytes, 1 << 16), _CSV_MAX_BLOCK))
    done = 0  # data rows yielded
    while True:
        seen = 0  # data rows parsed in this pass
        try:
            for rb in _csv_record_batches(opened.path, header, names, types, block):
                for offset in range(max(0, done - seen), rb.num_rows, batch_rows):
                    part = rb.slice(offset, batch_rows)
                    yield seen + offset, {name: part.column(name) for name in names}
                    done = seen + offset + part.num_rows
                seen += rb.num_rows
            return
        except _Straddling as exc:
            if block >= _CSV_MAX_BLOCK:
                error = _long_row_error(opened.path, block, str(exc))
                yield from _csv_rows_before(opened, header, names, types, batch_rows, done, error)
            block = min(4 * block, _CSV_MAX_BLOCK)
        except DataError as exc:
            yield from _csv_rows_before(opened, header, names, types, batch_rows, done, exc)


def _csv_rows_before(opened, header, names, types, batch_rows, first, error):
    """Yield data rows ``first .. error.row - 1`` as ``_csv_batches`` does, then raise ``error``.

    Arrow failed on the block holding ``error.row`` without yielding its earlier rows: their
    text (with the header's) is read again and parsed by Arrow alone, in memory (at most that
    block). A bad row among them raises its own error instead, after the rows before it.
    """
    if error.row is None or error.row <= first:
        raise error
    data = _csv_rows_bytes(opened.path, first, error.row)
    seen = first
    try:
        for rb in _csv_record_batches(opened.path, header, names, types, len(data) + 1,
                                      source=pa.BufferReader(data)):
            for offset in range(0, rb.num_rows, batch_rows):
                part = rb.slice(offset, batch_rows)
                yield seen + offset, {name: part.column(name) for name in names}
            seen += rb.num_rows
    except DataError as earlier:
        if earlier.row is None or not seen <= earlier.row < error.row:
            raise error from None
        yield from _csv_rows_before(opened, header, names, types, batch_rows, seen, earlier)
    raise error


def _csv_rows_bytes(path, first, stop) -> bytes:
    """The header and data rows ``first .. stop - 1`` of the CSV file, as its bytes (blank
    lines left out; rows counted as ``_first_row`` and Arrow count them)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2 * _CSV_MAX_BLOCK)
    taken, parts = [], []

    def lines(f):
        for line in f:
            taken.append(line)
            yield line

    try:
        with _csv_text(path, errors="surrogateescape") as f:
            rows = csv.reader(lines(f))
            number = -1  # the header
            for row in rows:  # csv.reader reads no line beyond the row it returns
                text = "".join(taken)
                taken.clear()
                if number >= 0 and not row:
                    continue
                if number < 0 or first <= number:
                    parts.append(text if text.endswith(("\n", "\r")) else text + "\n")
                number += 1
                if number >= stop:
                    break
    except csv.Error as exc:
        raise DataError(f"cannot parse the CSV file: {exc}", path=path, row=max(number, 0)) from None
    finally:
        csv.field_size_limit(limit)
    return "".join(parts).encode("utf-8", "surrogateescape")


# the largest block, 256 MiB: a row must fit in two (Arrow carries a partial row into the next
# block). A file with an unclosed quote fails only at this size, so it bounds memory there too.
_CSV_MAX_BLOCK = 1 << 28


class _Straddling(Exception):
    """A CSV row longer than the block size (Arrow's "straddling object" error)."""


def _csv_record_batches(path, header, names, types, block, *, source=None):
    """Arrow record batches of the CSV file at ``path`` (the columns ``names``), read in
    blocks of ``block`` bytes; a row too long for the block raises ``_Straddling``.
    ``source``: read these bytes instead (rows of the file at ``path``, which errors name)."""
    import pyarrow.csv as pcsv

    if source is None:
        codec = _csv_codec(path)
        source = path if codec is None else pa.input_stream(path, compression=codec)
    try:
        reader = pcsv.open_csv(
            source,
            read_options=pcsv.ReadOptions(block_size=block, use_threads=False),
            convert_options=pcsv.ConvertOptions(include_columns=names, column_types=types),
        )
    except pa.ArrowInvalid as exc:
        raise _arrow_csv_error(exc, path, header) from None
    except (pa.ArrowException, OSError, EOFError) as exc:  # a codec error: truncated, corrupt
        raise DataError(f"cannot read the CSV file ({exc})", path=path) from None
    while True:
        try:
            rb = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            raise _arrow_csv_error(exc, path, header) from None
        except (pa.ArrowException, OSError, EOFError) as exc:  # anywhere in the stream
            raise DataError(f"cannot read the CSV file ({exc})", path=path) from None
        yield rb


def _arrow_csv_error(exc, path, header) -> Exception:
    if "straddling object" in str(exc):
        return _Straddling(str(exc))
    return _csv_error(exc, path, header)


def _long_row_error(path, block, message) -> DataError:
    """A row longer than the largest block: names the first row of more than ``block`` bytes
    (a field that long stops the scan at its row)."""
    try:
        found = _first_row(path, lambda row: _row_bytes(row) > block, field_limit=block)
    except DataError as exc:
        if exc.row is None or "field larger than field limit" not in str(exc):
            raise
        found = (exc.row, None)
    if found is None:
        return DataError(f"cannot parse the CSV file: {message.strip()}", path=path)
    return DataError(f"is longer than {block:,} bytes, the longest row the CSV reader takes",
                     path=path, row=found[0])


def _row_bytes(fields) -> int:
    """The bytes of a CSV row's fields and separators (quotes not counted)."""
    return sum(len(f.encode("utf-8", "replace")) for f in fields) + len(fields) - 1


_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): .*invalid value '(.*)'")
_CSV_UTF8 = re.compile(r"invalid UTF8", re.IGNORECASE)
_CSV_RAGGED = re.compile(r"Expected (\d+) columns, got (\d+)")


def _csv_error(exc, path, header) -> DataError:
    """A CSV parse error, with the column and 0-based data row found by rescanning the file.

    (Arrow names the column by position and counts rows in its own way, or not at all; the
    scan runs only on this error path. Data rows are counted as Arrow does: blank lines are
    skipped.)
    """
    message = str(exc)
    try:
        return _csv_error_at_row(message, path, header)
    except (pa.ArrowException, OSError, EOFError) as scan:  # the rescan hit a codec error
        return DataError(f"cannot read the CSV file ({scan})", path=path)


def _csv_error_at_row(message, path, header) -> DataError:
    match = _CSV_CONVERSION.search(message)
    if _CSV_UTF8.search(message) or (match and "\ufffd" in match.group(2)):
        return _utf8_error(path, header)
    if match and int(match.group(1)) < len(header):
        k, value = int(match.group(1)), match.group(2)
        found = _first_row(path, lambda row: k < len(row) and row[k] == value)
        if found is not None:
            return DataError(f"{value!r} is not a number", path=path, column=header[k],
                             row=found[0])
    ragged = _CSV_RAGGED.search(message)
    if ragged:
        found = _first_row(path, lambda row: len(row) != len(header))
        if found is not None:
            return DataError(
                f"has {len(found[1])} fields, expected {len(header)} (one per header column)",
                path=path, row=found[0],
            )
    return DataError(f"cannot parse the CSV file: {message.strip()}", path=path)


def _first_row(path, match, *, field_limit=None, errors="replace"):
    """``(0-based data row, fields)`` of the first non-blank row after the header for which
    ``match(fields)`` is true, or None.

    Python's csv module refuses fields longer than ``csv.field_size_limit()`` (128 KiB by
    default), which Arrow reads: the limit is set to ``field_limit`` (default: two of the
    largest blocks, the longest row Arrow reads) for the scan and then put back. A longer field
    (an unclosed quote?) is a DataError at its row.
    """
    limit = csv.field_size_limit()
    csv.field_size_limit(2 * _CSV_MAX_BLOCK if field_limit is None else field_limit)
    number = 0
    try:
        with _csv_text(path, errors=errors) as f:
            rows = csv.reader(f)
            next(rows, None)
            for row in rows:
                if not row:
                    continue
                if match(row):
                    return number, row
                number += 1
    except csv.Error as exc:
        raise DataError(f"cannot parse the CSV file: {exc}", path=path, row=number) from None
    finally:
        csv.field_size_limit(limit)
    return None


def _utf8_error(path, header) -> DataError:
    """The first data row holding a byte that is not UTF-8 text, naming its column.

    Rows are split by Python's csv module as Arrow splits them (lines end in ``\\n``,
    ``\\r\\n`` or ``\\r`` alone; a quoted field may hold line breaks; blank lines are no rows),
    and the bytes are kept (``surrogateescape``) to show the value as written.
    """
    def undecodable(fields):
        return any(_bad_byte(field) is not None for field in fields)

    found = _first_row(path, undecodable, errors="surrogateescape")
    if found is None:
        return DataError("the CSV file is not UTF-8 text", path=path)
    row, fields = found
    k = next(k for k, field in enumerate(fields) if _bad_byte(field) is not None)
    raw = fields[k].encode("utf-8", "surrogateescape")
    at = _bad_byte(fields[k])
    return DataError(
        f"not UTF-8 text: byte {raw[at]:#04x} at byte {at + 1} of the value {raw!r} (field "
        f"{k + 1} of the row); expected UTF-8 text", path=path,
        column=header[k] if k < len(header) else None, row=row,
    )


def _bad_byte(field: str) -> int | None:
    """The 0-based byte offset of the first byte of ``field`` that is not UTF-8 (read with
    ``surrogateescape``), or None."""
    bad = next((i for i, ch in enumerate(field) if "\udc80" <= ch <= "\udcff"), None)
    if bad is None:
        return None
    return len(field[:bad].encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------- .npy / .npz


@dataclass(frozen=True)
class _ArrayMember:
    name: str  # member name in the .npz ("" for an .npy file)
    shape: tuple
    dtype: np.dtype
    fortran: bool


@dataclass(frozen=True)
class _Shaped:
    """An array (or record field) whose shape cannot be a column or a [rows, classes] matrix."""

    shape: tuple


def _read_header(f, path, name):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise DataError(f"not a readable .npy array {name!r} ({exc})", path=path) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # a corrupt zip member
        raise DataError(f"array {name!r}: cannot read it ({exc}); the file is corrupt",
                        path=path) from None
    if dtype.hasobject:
        raise DataError(f"array {name!r} holds Python objects; only plain arrays are read",
                        path=path)
    return _ArrayMember(name, tuple(shape), dtype, fortran)


def _npy_members(path, fmt):
    if fmt == "npy":
        with open(path, "rb") as f:
            return [_read_header(f, path, "")]
    members = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as f:
                        members.append(_read_header(f, path, info.filename[:-4]))
    except zipfile.BadZipFile as exc:
        raise DataError(f"not a readable .npz file ({exc})", path=path) from None
    return members


def _npy_columns(members, path):
    """Columns of .npy/.npz members: 1-D arrays, 2-D matrices, record fields."""
    names, kinds, where, rows = [], {}, {}, set()
    for m in members:
        if not m.shape:
            continue
        rows.add(m.shape[0])
        if m.dtype.names and len(m.shape) == 1:
            # records: each field is a column (a subarray field is a matrix)
            for fname in m.dtype.names:
                sub = m.dtype.fields[fname][0]
                if len(sub.shape) == 1:
                    kinds[fname] = (sub.base, sub.shape[0])
                elif sub.shape:
                    kinds[fname] = _Shaped((m.shape[0], *sub.shape))
                else:
                    kinds[fname] = sub
                names.append(fname)
                where[fname] = (m, fname)
        elif m.dtype.names or m.dtype.subdtype is not None:
            raise DataError(f"array {m.name or 'of the .npy file'!r} has shape {m.shape} and "
                            f"dtype {m.dtype}; records are read from 1-D arrays", path=path)
        elif len(m.shape) == 1:
            names.append(m.name)
            kinds[m.name] = m.dtype
            where[m.name] = (m, None)
        elif len(m.shape) == 2 and m.name:
            names.append(m.name)
            kinds[m.name] = (m.dtype, m.shape[1])
            where[m.name] = (m, None)
        elif len(m.shape) == 2:  # a plain 2-D .npy: columns "0", "1", ...
            for k in range(m.shape[1]):
                names.append(str(k))
                kinds[str(k)] = m.dtype
                where[str(k)] = (m, k)
        elif m.name:  # 3-D or more: named, so that selecting it gives a clear shape error
            names.append(m.name)
            kinds[m.name] = _Shaped(m.shape)
            where[m.name] = (m, None)
        else:
            raise DataError(f"the .npy array has shape {m.shape}; expected a 1-D record "
                            "array or a 2-D [rows, columns] array", path=path)
    if len(rows) > 1:
        raise DataError(f"arrays have different numbers of rows {sorted(rows)}", path=path)
    return names, kinds, where, (rows.pop() if rows else 0)


def _npy_schema(path, fmt):
    members = _npy_members(path, fmt)
    names, kinds, _, rows = _npy_columns(members, path)
    # a plain 2-D .npy: its columns are named by their positions ("0", "1", ...)
    positional = fmt == "npy" and len(members[0].shape) == 2 and not members[0].dtype.names
    return names, kinds, rows, positional


def _npy_batches(opened, columns, batch_rows, row_group):
    path, fmt = opened.path, opened.format
    members = _npy_members(path, fmt)
    _, kinds, where, num_rows = _npy_columns(members, path)
    wanted = [c.name if isinstance(c, _Matrix) else c for c in columns]
    needed = {}
    for name in wanted:
        member = where[name][0]
        needed.setdefault(member.name, member)
    with _MemberStreams(path, fmt, needed.values()) as streams:
        for start in range(0, num_rows, batch_rows):
            n = min(batch_rows, num_rows - start)
            chunks = {m: streams.read(m, start, n) for m in needed}
            data = {}
            for name in wanted:
                member, key = where[name]
                chunk = chunks[member.name]
                if member.dtype.names:
                    col = chunk[key]
                elif key is None:
                    col = chunk
                else:
                    col = chunk[:, key]
                if col.dtype.kind == "S":
                    col = col.astype(str)
                data[name] = col
            yield start, data


class _MemberStreams:
    """Row readers over the arrays of an .npy or .npz file: sequential for C-ordered arrays,
    one positioned read per column and batch for Fortran-ordered 2-D arrays (``_Columns``)."""

    def __init__(self, path, fmt, members):
        self.path, self.fmt, self.members = path, fmt, {m.name: m for m in members}
        self.files, self.zip = {}, None

    def __enter__(self):
        try:
            if self.fmt == "npz":
                self.zip = zipfile.ZipFile(self.path)
            for m in self.members.values():
                if m.fortran and len(m.shape) > 1:
                    self.files[m.name] = _Columns(self.path, self.zip, m)
                    continue
                f = self.zip.open(m.name + ".npy") if self.zip else open(self.path, "rb")
                self.files[m.name] = f
                _read_header(f, self.path, m.name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def read(self, name, start, n):
        m, f = self.members[name], self.files[name]
        if isinstance(f, _Columns):
            return f.read(start, n)
        row_shape = m.shape[1:]
        count = n * int(np.prod(row_shape, dtype=np.int64))
        out = np.empty((n, *row_shape), dtype=m.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8)) if count else memoryview(b"")
        got = 0
        while got < len(view):
            try:
                k = f.readinto(view[got:])
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # bad CRC-32, ...
                raise DataError(f"array {name!r}: cannot read it ({exc}); the file is corrupt",
                                path=self.path) from None
            if not k:
                row_bytes = max(1, len(view) // max(1, n))
                raise DataError(f"array {name!r} ends early, at data row {start + got // row_bytes}",
                                path=self.path)
            got += k
        return out

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()
        self.files = {}
        if self.zip:
            self.zip.close()


class _Columns:
    """Rows of a Fortran-ordered ``[N, C]`` array, read column by column.

    Column k of rows ``start .. start + n - 1`` is the ``n * itemsize`` bytes at
    ``data + (k * N + start) * itemsize``: each batch reads them with one ``os.pread`` per
    column into a column-major ``[n, C]`` buffer, so memory follows the batch. The bytes are
    read from the file itself (an .npy file, or a stored .npz member, whose data start is
    found from its zip local header, and whose CRC-32 is checked first in one sequential pass),
    or from an anonymous temporary file that a compressed member is first decompressed into,
    256 KiB at a time (in TMPDIR; on a tmpfs it counts as memory).
    """

    _CHUNK = 1 << 18  # 1 MiB chunks peaked at 4 MiB (zlib buffers); 256 KiB at 1 MiB

    def __init__(self, path, zf, member):
        self.path, self.member = path, member
        self.rows, self.width = member.shape[0], int(np.prod(member.shape[1:], dtype=np.int64))
        self.file = None
        if zf is None:
            self.file = open(path, "rb")
            _read_header(self.file, path, member.name)
            self.offset = self.file.tell()
            return
        info = zf.getinfo(member.name + ".npy")
        try:
            with zf.open(info) as f:
                _read_header(f, path, member.name)
                header = f.tell()
                if info.compress_type == zipfile.ZIP_STORED:
                    self.file = open(path, "rb")
                    local = os.pread(self.file.fileno(), 30, info.header_offset)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise DataError(f"array {member.name!r}: bad zip local header", path=path)
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    data = info.header_offset + 30 + name_len + extra_len
                    _check_crc(self.file.fileno(), data, info, path, member.name)
                    self.offset = data + header
                    return
                self.file = self._decompress(f, info)
                self.offset = 0
        except BaseException:
            self.close()
            raise

    def _decompress(self, f, info):
        """The rest of the member ``f``, decompressed into an anonymous temporary file (zipfile
        checks the member's CRC-32 as it reaches the end)."""
        name = self.member.name
        try:
            out = tempfile.TemporaryFile()
        except OSError as exc:
            raise self._temporary_error(info, exc) from None
        try:
            while True:
                try:
                    chunk = f.read(self._CHUNK)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                    raise DataError(f"array {name!r}: cannot decompress it ({exc}); the file is "
                                    "corrupt", path=self.path) from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise self._temporary_error(info, exc) from None
            try:
                out.flush()
            except OSError as exc:
                raise self._temporary_error(info, exc) from None
        except BaseException:
            out.close()
            raise
        return out

    def _temporary_error(self, info, exc) -> DataError:
        return DataError(
            f"array {self.member.name!r}: a compressed column-major (Fortran-ordered) array is "
            f"decompressed into a temporary file first ({info.file_size:,} bytes), and writing "
            f"it in {tempfile.gettempdir()} failed ({exc.strerror or exc}); set TMPDIR to a "
            "folder with room, or save the array C-ordered (np.ascontiguousarray) or with "
            "np.savez", path=self.path,
        )

    def read(self, start, n):
        m, itemsize = self.member, self.member.dtype.itemsize
        out = np.empty((self.width, n), dtype=m.dtype)  # row k: column k of the batch
        fd = self.file.fileno()
        for k in range(self.width):
            want = memoryview(out[k].view(np.uint8))
            got = _pread_into(fd, want, self.offset + (k * self.rows + start) * itemsize)
            if got < want.nbytes:
                raise DataError(f"array {m.name!r} ends early, at data row {start + got // itemsize}"
                                f" of column {k}", path=self.path)
        return out.T  # [n, C], column-major

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _check_crc(fd, at, info, path, name) -> None:
    """Check a stored zip member's CRC-32 in one sequential pass over its bytes.

    The column-wise positioned reads of ``_Columns`` do not visit the member in file order, so
    zipfile cannot check the CRC-32 on the way; this pass reads the member once more (256 KiB
    at a time: time, not memory) before any batch is read.
    """
    buffer = memoryview(bytearray(_Columns._CHUNK))
    crc, left = 0, info.file_size
    while left:
        got = _pread_into(fd, buffer[: min(len(buffer), left)], at)
        if not got:
            raise DataError(f"array {name!r} ends early: the zip member is truncated", path=path)
        crc = zlib.crc32(buffer[:got], crc)
        at += got
        left -= got
    if crc != info.CRC:
        raise DataError(f"array {name!r}: bad CRC-32 of the zip member ({crc:#010x}, expected "
                        f"{info.CRC:#010x}); the file is corrupt", path=path)


def _pread_into(fd, view, at) -> int:
    """Read ``len(view)`` bytes at offset ``at`` into ``view``; returns the count (short at EOF)."""
    got = 0
    while got < view.nbytes:
        if hasattr(os, "preadv"):
            k = os.preadv(fd, [view[got:]], at + got)
        else:  # no preadv (some platforms): read, then copy
            data = os.pread(fd, view.nbytes - got, at + got)
            view[got : got + len(data)] = data
            k = len(data)
        if not k:
            break
        got += k
    return got


_SCHEMA = {
    "parquet": _parquet_schema,
    "csv": _csv_schema,
    "npy": lambda p: _npy_schema(p, "npy"),
    "npz": lambda p: _npy_schema(p, "npz"),
}
_READERS = {
    "parquet": _parquet_batches,
    "csv": _csv_batches,
    "npy": _npy_batches,
    "npz": _npy_batches,
}
