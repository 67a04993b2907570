"""Turn a target column (class indices or class names) into int64 class indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ._columns import DataError

__all__ = ["TargetDecoder"]

_INTEGER_TEXT = r"^\s*[+-]?[0-9]+\s*$"


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
        values = _as_arrow(values)
        if not _is_text(values.type) or len(values) == 0:
            return decoder
        import pyarrow.compute as pc  # text only: a numeric target never loads it (12 MiB)

        values = values.drop_null()
        known = pc.is_in(values, value_set=pa.array(decoder._lookup_names(), pa.string()))
        if pc.all(known).as_py() is not False:
            return decoder
        if pc.all(pc.match_substring_regex(values, _INTEGER_TEXT)).as_py() is not False:
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
        values = _as_arrow(values)
        num_classes = len(self.class_names)

        def fail(mask, what):
            row = first_true(mask)
            value = values[row].as_py()
            raise DataError(what(value), path=path, column=self.column, row=start + row)

        if values.null_count:
            fail(values.is_null(), lambda v: "missing class label")
        kind = values.type
        if _is_text(kind):
            import pyarrow.compute as pc  # only text targets load it (12 MiB)
        if _is_text(kind) and self.mode != "index":
            names = self._lookup_names()
            index = pc.index_in(values, value_set=pa.array(names, pa.string()))
            if index.null_count:
                fail(
                    index.is_null(),
                    lambda v: f"label {v!r} is not among the classes {_show(self.class_names)}",
                )
            return self._lookup_classes()[numeric_view(index)]
        if _is_text(kind):
            ok = pc.match_substring_regex(values, _INTEGER_TEXT)
            if not pc.all(ok).as_py():
                fail(
                    pc.invert(ok),
                    lambda v: f"label {v!r} is neither a class index nor one of the classes "
                    f"{_show(self.class_names)}",
                )
            values = pc.cast(pc.utf8_trim_whitespace(values), pa.int64())
        elif pa.types.is_floating(kind):
            floats = numeric_view(values)
            whole = np.floor(floats) == floats  # False for NaN and inf
            if not whole.all():
                row = int(np.argmin(whole))
                raise DataError(f"class label {float(floats[row])!r} is not a whole number",
                                path=path, column=self.column, row=start + row)
        elif not pa.types.is_integer(kind):
            raise DataError(
                f"holds {kind}, expected class indices (integers) or class names (text)",
                path=path,
                column=self.column,
            )
        out = numeric_view(values)
        bad = (out < 0) | (out >= num_classes)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"label {int(out[row])} is not a class index in [0, {num_classes})",
                path=path,
                column=self.column,
                row=start + row,
            )
        return out.astype(np.int64, copy=False)


def numeric_view(values: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a numeric arrow array without nulls.

    (``pa.Array.to_numpy`` imports pandas, which ``crossent score`` must not load.)
    """
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


def _as_arrow(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = np.asarray(values)
        if values.dtype.kind == "S":
            values = values.astype(str)
        values = pa.array(values)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_large_string(values.type) or pa.types.is_string_view(values.type):
        values = values.cast(pa.string())
    return values


def _is_text(kind) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def first_true(mask) -> int:
    """Position of the first true (or null) entry of an arrow boolean array."""
    import pyarrow.compute as pc

    return int(pc.index(mask.fill_null(True), True).as_py())


def _show(names, limit: int = 10) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return f"[{text}, ... ({len(names)} classes)]" if len(names) > limit else f"[{text}]"
