"""Column selection: comma lists and globs over a file's columns, and class names from them."""

from __future__ import annotations

import fnmatch
import os
from collections import Counter

__all__ = ["DataError", "class_names_from_columns", "duplicated_column", "resolve_columns"]

_GLOB_CHARS = frozenset("*?[")
_SEPARATORS = "_-.:/ "


class DataError(ValueError):
    """A prediction file that cannot be scored as asked: a missing column, a bad value.

    ``column`` names the offending column (or None), ``row`` is the 0-based data row
    within ``path`` (or None when the problem is not tied to a row).
    """

    def __init__(self, message: str, *, path=None, column=None, row=None):
        where = []
        if path is not None:
            where.append(str(path))
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"data row {row}")
        super().__init__(": ".join([", ".join(where), message]) if where else message)
        self.path = path
        self.column = column
        self.row = row


def resolve_columns(spec, available, /, *, option: str = "columns", path=None) -> list[str]:
    """Resolve a column spec (``"a,b,c"`` or a glob ``"p_*"``) against ``available``.

    Each comma-separated item is either an exact column name or a glob (``*``, ``?``,
    ``[...]``; a column named exactly like the item wins over the glob); a list or tuple gives
    exact names; a glob's matches keep the file's column order (``l0, l1, ..., l15``, never
    sorted as text). Items are concatenated in the order given; a column selected twice is an
    error (ValueError), as is an item that matches nothing (DataError). A selected name that
    the file holds more than once is a DataError naming it (``duplicated_column``); duplicated
    names that are not selected do not matter.

    >>> resolve_columns("l*", ["y", "l0", "l1", "l2", "l10", "l11"])
    ['l0', 'l1', 'l2', 'l10', 'l11']
    >>> resolve_columns("p_b, p_a", ["p_a", "p_b"])
    ['p_b', 'p_a']
    """
    available = list(available)
    counts = Counter(available)
    if isinstance(spec, (list, tuple)):  # exact names (already resolved elsewhere)
        items = [str(x) for x in spec]
    elif isinstance(spec, str) and spec.strip():
        items = [part.strip() for part in spec.split(",")]
    else:
        raise ValueError(f"{option} must be a comma list or a glob of column names, got {spec!r}")
    chosen: list[str] = []
    for item in items:
        if not item:
            raise ValueError(f"{option} has an empty item: {spec!r}")
        if item in available:  # an exact name wins, even one with glob characters ("p[0]")
            matches = [item]
        elif isinstance(spec, str) and _GLOB_CHARS.intersection(item):
            matches = [name for name in available if fnmatch.fnmatchcase(name, item)]
            if not matches:
                raise DataError(
                    f"{option} pattern {item!r} matches no column; the file has {_show(available)}",
                    path=path,
                )
        else:
            raise DataError(
                f"{option}: no column {item!r} in the file; it has {_show(available)}", path=path
            )
        for name in dict.fromkeys(matches):  # a duplicated name matches once, then fails below
            if counts[name] > 1:
                raise duplicated_column(name, counts[name], path=path)
            if name in chosen:
                raise ValueError(f"{option} selects column {name!r} twice ({spec!r})")
            chosen.append(name)
    return chosen


def duplicated_column(name, count: int, /, *, path=None) -> DataError:
    """The error for a selected column whose name the file holds ``count`` (> 1) times.

    >>> str(duplicated_column("p1", 2, path="a.csv"))
    "a.csv, column 'p1': the file has 2 columns named 'p1'"
    """
    return DataError(f"the file has {count} columns named {name!r}", path=path, column=name)


def class_names_from_columns(columns, /) -> list[str]:
    """Class names for score columns: the part that differs between the column names.

    A prefix (or suffix) shared by all columns is removed when it ends (starts) at a separator
    (``_ - . : /`` or space), so ``p_cat, p_dog`` name the classes ``cat, dog`` and
    ``cat_prob, dog_prob`` likewise; otherwise the column names are the class names.

    >>> class_names_from_columns(["p_cat", "p_car", "p_dog"])
    ['cat', 'car', 'dog']
    >>> class_names_from_columns(["cat.prob", "dog.prob"])
    ['cat', 'dog']
    >>> class_names_from_columns(["logit0", "logit1"])
    ['logit0', 'logit1']
    """
    names = [str(c) for c in columns]
    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)
    cut = max(prefix.rfind(sep) for sep in _SEPARATORS) + 1
    suffix = os.path.commonprefix([n[cut:][::-1] for n in names])[::-1]
    seps = [suffix.find(sep) for sep in _SEPARATORS if sep in suffix]
    tail = len(suffix) - min(seps) if seps else 0
    stripped = [n[cut : len(n) - tail] for n in names]
    if any(not s for s in stripped) or len(set(stripped)) != len(stripped):
        return names
    return stripped


def _show(names, limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names)} columns)"
    return f"[{shown}]"
