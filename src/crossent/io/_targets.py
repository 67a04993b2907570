"""Turn a target column (class indices or class names) into int64 class indices.

No ``pyarrow.array(...)`` and no ``Array.to_numpy()`` here: both import pandas, which
``crossent score`` must not load. Arrow text is matched with ``pyarrow.compute`` against a
value set built from raw buffers; numpy text (from .npy/.npz files) with ``numpy.unique``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ._columns import DataError

__all__ = ["TargetDecoder", "first_true", "numeric_view"]

_INTEGER_TEXT = r"^\s*[+-]?[0-9]+\s*$"
_INTEGER = re.compile(_INTEGER_TEXT)


@dataclass(frozen=True)
class TargetDecoder:
    """Decodes a target column into class indices in ``[0, len(class_names))``.

    A numeric column holds class indices (floats must be whole numbers). A text column holds
    class names, matched to ``class_names`` (``p_cat -> cat``) or to the full score column
    names (``column_names``). A text column whose first batch holds only integers that are not
    class names (a CSV file of indices) holds indices: ``mode`` records that decision, made
    once per file set so that every batch and every Dask task decodes alike.
    """

    column: str
    class_names: tuple[str, ...]
    column_names: tuple[str, ...]
    mode: str = "auto"  # "auto" (numeric: indices; text: names) or "index"

    @classmethod
    def for_first_batch(cls, column, class_names, column_names, values) -> TargetDecoder:
        """Pick the decoding of a text column from its first batch of values."""
        decoder = cls(column, tuple(class_names), tuple(column_names))
        values = _normalize(values)
        if isinstance(values, pa.Array):
            if not _is_text(values.type):
                return decoder
            import pyarrow.compute as pc  # text only: a numeric target never loads it (12 MiB)

            seen = pc.unique(values.drop_null()).to_pylist()
        elif values.dtype.kind in "USO":
            seen = [str(v) for v in np.unique(values.astype(str))]
        else:
            return decoder
        known = set(decoder._lookup_names())
        if all(v in known for v in seen):
            return decoder
        if seen and all(_INTEGER.match(v) for v in seen):
            return cls(column, decoder.class_names, decoder.column_names, "index")
        return decoder

    def _lookup_names(self) -> list[str]:
        return list(dict.fromkeys(self.class_names + self.column_names))

    def _lookup_classes(self) -> np.ndarray:
        position = {name: k for k, name in enumerate(self.column_names)}
        position.update({name: k for k, name in enumerate(self.class_names)})
        return np.array([position[name] for name in self._lookup_names()], dtype=np.int64)

    def decode(self, values, /, *, start: int = 0, path=None) -> np.ndarray:
        """Class indices (int64) for ``values`` (a pyarrow or numpy 1-D array).

        Raises DataError naming the column and the 0-based data row (``start`` + position) of
        the first missing value, unknown class name or index outside ``[0, C)``.
        """
        values = _normalize(values)

        def fail(row, message):
            raise DataError(message, path=path, column=self.column, row=start + int(row))

        if isinstance(values, pa.Array):
            if values.null_count:
                fail(first_true(values.is_null()), "missing class label")
            if _is_text(values.type):
                return self._decode_arrow_text(values, fail)
            if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
                raise DataError(
                    f"holds {values.type}, expected class indices (integers) or class names "
                    "(text)", path=path, column=self.column,
                )
            numbers = numeric_view(values)
        elif values.dtype.kind in "USO":
            return self._decode_numpy_text(values.astype(str), fail)
        elif values.dtype.kind in "iuf":
            numbers = values
        else:
            raise DataError(
                f"holds {values.dtype}, expected class indices (integers) or class names (text)",
                path=path, column=self.column,
            )
        return self._check_indices(numbers, fail)

    def _check_indices(self, numbers, fail) -> np.ndarray:
        if numbers.dtype.kind == "f":
            whole = np.floor(numbers) == numbers  # False for NaN and inf
            if not whole.all():
                row = int(np.argmin(whole))
                fail(row, f"class label {float(numbers[row])!r} is not a whole number")
        num_classes = len(self.class_names)
        bad = (numbers < 0) | (numbers >= num_classes)
        if bad.any():
            row = int(np.argmax(bad))
            value = numbers[row]
            value = int(value) if float(value).is_integer() else float(value)
            fail(row, f"label {value} is not a class index in [0, {num_classes})")
        return numbers.astype(np.int64, copy=False)

    def _decode_arrow_text(self, values, fail) -> np.ndarray:
        import pyarrow.compute as pc  # only text targets load it (12 MiB)

        if self.mode == "index":
            ok = pc.match_substring_regex(values, _INTEGER_TEXT)
            if not pc.all(ok).as_py():
                row = first_true(pc.invert(ok))
                fail(row, f"label {values[row].as_py()!r} is neither a class index nor one of "
                          f"the classes {_show(self.class_names)}")
            return self._check_indices(
                numeric_view(pc.cast(pc.utf8_trim_whitespace(values), pa.int64())), fail
            )
        index = pc.index_in(values, value_set=string_array(self._lookup_names()))
        if index.null_count:
            row = first_true(index.is_null())
            fail(row, f"label {values[row].as_py()!r} is not among the classes "
                      f"{_show(self.class_names)}")
        return self._lookup_classes()[numeric_view(index)]

    def _decode_numpy_text(self, values, fail) -> np.ndarray:
        unique, inverse = np.unique(values, return_inverse=True)
        if self.mode == "index":
            codes = np.array([int(u) if _INTEGER.match(u) else -1 for u in unique], np.int64)
            what = "is neither a class index nor one of the classes"
        else:
            lookup = dict(zip(self._lookup_names(), self._lookup_classes(), strict=True))
            codes = np.array([lookup.get(str(u), -1) for u in unique], np.int64)
            what = "is not among the classes"
        out = codes[inverse.reshape(-1)]
        if (out < 0).any():
            row = int(np.argmax(out < 0))
            if self.mode == "index" and _INTEGER.match(values[row]):
                return self._check_indices(out, fail)  # an integer out of range
            fail(row, f"label {str(values[row])!r} {what} {_show(self.class_names)}")
        return self._check_indices(out, fail) if self.mode == "index" else out


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


def string_array(strings) -> pa.Array:
    """An arrow string array built from raw buffers."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    return pa.StringArray.from_buffers(
        len(encoded), pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(encoded))
    )


def first_true(mask) -> int:
    """Position of the first true entry of an arrow boolean array without nulls."""
    import pyarrow.compute as pc

    return int(np.argmax(numeric_view(pc.cast(mask, pa.int8()))))


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
