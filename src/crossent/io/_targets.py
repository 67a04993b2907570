"""Turn a target column (class indices or class names) into int64 class indices.

No ``pyarrow.array(...)`` and no ``Array.to_numpy()`` here: both import pandas, which
``crossent score`` must not load. Text is decoded one distinct value at a time (arrow text
through ``pyarrow.compute.dictionary_encode``, numpy text through ``numpy.unique``); numbers
are decoded vectorized.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from ._columns import DataError

__all__ = ["LABEL_MODES", "TargetDecoder", "first_true", "numeric_view"]

# Text labels are read with these strict ASCII patterns, never with float(): float() also
# takes "1_0" (as 10), "1e0", "\u0661" (an Arabic-Indic digit) and the like.
_INTEGER = re.compile(r"^\s*[+-]?[0-9]+\s*$")
_NUMBER = re.compile(
    r"^\s*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)\s*$",
    re.IGNORECASE,
)
_INFINITY = re.compile(r"^[+-]?inf(?:inity)?$", re.IGNORECASE)
_INT64 = np.iinfo(np.int64)

LABEL_MODES = ("auto", "index", "name")

# per-row codes below 0: why a label cannot be decoded (see TargetDecoder._fail)
(_MISSING, _NOT_INTEGER, _AMBIGUOUS, _UNKNOWN_NAME, _OUT_OF_RANGE, _NOT_INDEX,
 _NUMBER_AND_NAME, _OVERFLOW) = range(-1, -9, -1)


@dataclass(frozen=True)
class TargetDecoder:
    """Decodes a target column into class indices in ``[0, len(class_names))``.

    One rule for every file format, decided by each label's value, never by the container
    (CSV text, Parquet, .npz) nor by the first rows of the file:

    - a missing label (null, empty text, NaN) is an error, and so is a number that is not an
      integer (``0.5``, ``inf``); whole-number floats (``1.0``, as pandas writes an integer
      column with missing values) are integers. Text is a number only when it is written as
      one in ASCII (``-3``, ``1.0``, ``2e1``); ``1_0`` or ``\u0661`` are text;
    - ``mode="index"``: every label is a 0-based class index (the position of its score column);
    - ``mode="name"``: every label is a class name (``p_cat -> cat``) or a full score column
      name; an integer label is matched by its text (``1 -> '1'``). Only here is a text label
      such as ``"0.5"`` a class name (of a column ``p_0.5``); a float 0.5 in a binary file is
      a number, never a name, and an integer beyond int64 matches no name;
    - ``mode="auto"``: a label that is not a number is a class name; an integer label is a
      class index, unless some class is named by an integer that differs from its position
      (columns ``p_1..p_5`` name the classes 1..5 at positions 0..4): then an integer label is
      ambiguous and an error that asks for ``mode="index"`` or ``mode="name"``
      (``--labels index|name``). A fractional number (``0.5``) is never an index: an error
      (that suggests ``mode="name"`` when a class is named so).

    ``positional_columns=True`` says that the column names are positions in the file (the
    columns of a plain 2-D .npy array, named ``"0"``, ``"1"``, ...), not names: they neither
    make integer labels ambiguous nor match labels in ``mode="name"``.
    """

    column: str
    class_names: tuple[str, ...]
    column_names: tuple[str, ...]
    mode: str = "auto"
    positional_columns: bool = False

    def __post_init__(self):
        if self.mode not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {self.mode!r}")

    @cached_property
    def integer_names_differ(self) -> bool:
        """True when some class (or column) name is an integer other than its position."""
        groups = (self.class_names,) if self.positional_columns else (
            self.class_names, self.column_names)
        for names in groups:
            for k, name in enumerate(names):
                if _INTEGER.match(name) and int(name) != k:
                    return True
        return False

    def _lookup(self) -> dict[str, int]:
        """Class position of each class name and full column name (class names win)."""
        position = ({} if self.positional_columns
                    else {name: k for k, name in enumerate(self.column_names)})
        position.update({name: k for k, name in enumerate(self.class_names)})
        return position

    def decode(self, values, /, *, start: int = 0, path=None) -> np.ndarray:
        """Class indices (int64) for ``values`` (a pyarrow or numpy 1-D array).

        Raises DataError naming the column and the 0-based data row (``start`` + position) of
        the first label that is missing, not an integer, ambiguous, an unknown class name or an
        index outside ``[0, C)``.
        """
        values = _normalize(values)
        if isinstance(values, pa.Array):
            if _is_text(values.type):
                return self._decode_text_arrow(values, start, path)
            if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
                    or pa.types.is_null(values.type)):
                raise DataError(
                    f"holds {values.type}, expected class indices (integers) or class names "
                    "(text)", path=path, column=self.column,
                )
            if pa.types.is_null(values.type):
                codes = np.full(len(values), _MISSING, np.int64)
                return self._finish(codes, lambda r: None, start, path)
            numbers = numeric_view(values)
            missing = None
            if values.null_count:
                missing = numeric_view(values.is_null().cast(pa.int8())).astype(bool)
            return self._decode_numbers(numbers, missing, start, path)
        if values.dtype.kind in "USO":
            return self._decode_text_numpy(values.astype(str), start, path)
        if values.dtype.kind in "iuf":
            return self._decode_numbers(values, None, start, path)
        raise DataError(
            f"holds {values.dtype}, expected class indices (integers) or class names (text)",
            path=path, column=self.column,
        )

    # ------------------------------------------------------------ numbers

    def _decode_numbers(self, numbers, missing, start, path) -> np.ndarray:
        n = len(numbers)
        codes = np.empty(n, np.int64)
        if numbers.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                nan = np.isnan(numbers)
                whole = np.isfinite(numbers) & (np.floor(numbers) == numbers)
                # beyond int64 a whole float is out of every range; keep the cast defined
                big = np.abs(np.where(whole, numbers, 0)) >= 2.0**62
            ints = np.where(whole & ~big, numbers, -1).astype(np.int64)
            ints[big] = np.iinfo(np.int64).max
        else:
            nan = whole = big = None
            if numbers.dtype == np.uint64:  # only uint64 holds values beyond int64
                big = numbers > np.uint64(_INT64.max)
                ints = np.where(big, np.uint64(0), numbers).astype(np.int64)
            else:
                ints = numbers.astype(np.int64, copy=False)
        codes[:] = self._resolve_integers(ints)
        if big is not None:
            codes[big] = _OUT_OF_RANGE
        if whole is not None:
            codes[~whole] = _NOT_INTEGER
            codes[nan] = _MISSING
        if missing is not None:
            codes[missing] = _MISSING

        def value(r):
            v = numbers[r]
            return int(v) if numbers.dtype.kind in "iu" or float(v).is_integer() else float(v)

        return self._finish(codes, value, start, path)

    def _resolve_integers(self, ints) -> np.ndarray:
        """Codes of integer labels: class positions, or negative error codes."""
        C = len(self.class_names)
        if self.mode == "name":
            # names beyond int64 never equal an int64 label (they are compared as Python ints
            # in _classify, for text labels)
            lookup = {v: k for v, k in self._integer_names.items()
                      if _INT64.min <= v <= _INT64.max}
            if not lookup:
                return np.full(len(ints), _UNKNOWN_NAME, np.int64)
            keys = np.array(sorted(lookup), dtype=np.int64)
            positions = np.array([lookup[k] for k in keys.tolist()], dtype=np.int64)
            at = np.minimum(np.searchsorted(keys, ints), len(keys) - 1)
            return np.where(keys[at] == ints, positions[at], _UNKNOWN_NAME)
        if self.mode == "auto" and self.integer_names_differ:
            return np.full(len(ints), _AMBIGUOUS, np.int64)
        return np.where((ints >= 0) & (ints < C), ints, _OUT_OF_RANGE)

    @cached_property
    def _integer_names(self) -> dict[int, int]:
        """Class position of each name written as a canonical integer (``'7'``, ``'-2'``)."""
        return {int(name): k for name, k in self._lookup().items()
                if _INTEGER.match(name) and str(int(name)) == name}

    def _integer_code(self, number: int) -> int:
        """Code of one integer label of any size (a Python int)."""
        if self.mode == "name":
            return self._integer_names.get(number, _UNKNOWN_NAME)
        if not _INT64.min <= number <= _INT64.max:
            return _OUT_OF_RANGE
        return int(self._resolve_integers(np.array([number], dtype=np.int64))[0])

    # ------------------------------------------------------------ text

    def _classify(self, text: str, lookup: dict[str, int]) -> tuple[int, object]:
        """(code, value shown in errors) of one distinct text label."""
        t = text.strip()
        if not t:
            return _MISSING, None
        named = None if self.mode == "index" else _named(lookup, text)
        if self.mode == "name" and named is not None:
            return named, text
        if not _NUMBER.match(t):  # a name (never parsed with float(): "1_0" is not 10)
            if named is not None:  # mode "auto"
                return named, text
            return (_NOT_INDEX if self.mode == "index" else _UNKNOWN_NAME), text
        if _INTEGER.match(t):
            number = int(t)
        else:
            f = float(t)
            if math.isnan(f):
                return _MISSING, None
            if math.isinf(f) and not _INFINITY.match(t):  # "1e400": beyond float64
                return _OVERFLOW, t
            if not (math.isfinite(f) and f.is_integer()):
                # never an index; a class name only in mode "name" (matched above)
                if self.mode == "auto" and named is not None:
                    return _NUMBER_AND_NAME, text
                return _NOT_INTEGER, f
            number = int(f)
        if (self.mode == "auto" and named is not None and named != number
                and not self.integer_names_differ):
            return _NUMBER_AND_NAME, text  # "1.0" names class 0 but reads as index 1
        return self._integer_code(number), number

    def _decode_distinct(self, distinct, inverse, start, path) -> np.ndarray:
        lookup = self._lookup()
        classified = [self._classify(str(s), lookup) for s in distinct]
        codes = np.array([c for c, _ in classified], dtype=np.int64)[inverse]
        shown = [v for _, v in classified]
        return self._finish(codes, lambda r: shown[int(inverse[r])], start, path)

    def _decode_text_arrow(self, values, start, path) -> np.ndarray:
        import pyarrow.compute as pc  # only text targets load it (12 MiB)

        encoded = pc.dictionary_encode(values, null_encoding="encode")
        distinct = encoded.dictionary.to_pylist()
        inverse = numeric_view(encoded.indices.cast(pa.int64()))
        if None in distinct:  # a null: missing, like an empty field
            distinct = ["" if s is None else s for s in distinct]
        return self._decode_distinct(distinct, inverse, start, path)

    def _decode_text_numpy(self, values, start, path) -> np.ndarray:
        distinct, inverse = np.unique(values, return_inverse=True)
        return self._decode_distinct(distinct.tolist(), inverse.reshape(-1), start, path)

    # ------------------------------------------------------------ errors

    def _finish(self, codes, value, start, path) -> np.ndarray:
        bad = codes < 0
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(self._message(int(codes[row]), value(row)), path=path,
                            column=self.column, row=start + row)
        return codes

    def _message(self, code: int, value) -> str:
        C = len(self.class_names)
        shown = repr(value) if isinstance(value, str) else f"{value}"
        if code == _MISSING:
            return "missing class label"
        if code == _NOT_INTEGER:
            return f"label {shown} is not an integer"
        if code == _OVERFLOW:
            return (f"label {shown} is beyond float64's range (magnitudes up to 1.8e308): "
                    f"expected a class index in [0, {C})"
                    + ("" if self.mode == "index" else " or a class name"))
        if code == _OUT_OF_RANGE and self.mode == "name":
            return f"label {shown} is beyond int64 and names no class"
        if code == _OUT_OF_RANGE:
            return f"label {shown} is not a class index in [0, {C})"
        if code == _NUMBER_AND_NAME:
            return (f"label {shown} is a number and also the class name {shown} (column "
                    f"{self.column_names[_named(self._lookup(), value)]!r}); under --labels auto "
                    "a number is read as a class index: pass --labels name to read labels as "
                    "class names (labels='name' in Python)")
        if code == _NOT_INDEX:
            return (f"label {shown} is not a class index (an integer in [0, {C})), as --labels "
                    "index reads every label")
        if code == _UNKNOWN_NAME:
            return f"label {shown} is not among the classes {_show(self.class_names)}"
        # _AMBIGUOUS
        lookup = self._lookup()
        as_index = (f"class index {value} is column {self.column_names[value]!r}"
                    if 0 <= value < C else f"class index {value} is out of range [0, {C})")
        as_name = (f"class name '{value}' is column {self.column_names[lookup[str(value)]]!r}"
                   if str(value) in lookup else f"no class is named '{value}'")
        hint = ""
        if _looks_positional(self.column_names):
            hint = (" The score columns are named by consecutive integers, as pandas names the "
                    "columns of an array: if those are positions in the file, the labels are "
                    "most likely class indices (--labels index).")
        return (
            f"label {value} is ambiguous: the classes are named by integers that are not their "
            f"positions ({_show(self.class_names)} at 0..{C - 1}), and an integer label may be "
            f"a class index or a class name ({as_index}; {as_name}); pass --labels index or "
            f"--labels name (labels='index' or 'name' in Python).{hint}"
        )


def numeric_view(values: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a numeric arrow array without nulls."""
    kind = values.type
    if pa.types.is_floating(kind):
        dtype = np.dtype(f"f{kind.bit_width // 8}")
    elif pa.types.is_integer(kind):
        dtype = np.dtype(f"{'i' if pa.types.is_signed_integer(kind) else 'u'}{kind.bit_width // 8}")
    else:
        raise TypeError(f"values must be a numeric arrow array, got {kind}")
    data = values.buffers()[1]
    if data is None or len(values) == 0:
        return np.empty(0, dtype)
    return np.frombuffer(data, dtype=dtype, count=len(values), offset=values.offset * dtype.itemsize)


def first_true(mask) -> int:
    """Position of the first true entry of an arrow boolean array without nulls."""
    import pyarrow.compute as pc

    return int(np.argmax(numeric_view(pc.cast(mask, pa.int8()))))


def _named(lookup, text):
    return lookup.get(text, lookup.get(text.strip()))


def _looks_positional(names) -> bool:
    """Consecutive integer names (``'1', '2', '3'``): positions in a file, as pandas names the
    columns of ``pd.DataFrame(np.column_stack([y, P]))``."""
    if not names or not all(_INTEGER.match(n) and str(int(n)) == n for n in names):
        return False
    first = int(names[0])
    return [int(n) for n in names] == list(range(first, first + len(names)))


def _normalize(values):
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = np.asarray(values)
        if values.ndim != 1:
            raise ValueError(f"target values must be 1-D, got shape {values.shape}")
        return values
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_large_string(values.type) or pa.types.is_string_view(values.type):
        values = values.cast(pa.string())
    return values


def _is_text(kind) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _show(names, limit: int = 10) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return f"[{text}, ... ({len(names)} classes)]" if len(names) > limit else f"[{text}]"
