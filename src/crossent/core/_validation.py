"""Argument checks shared by the core losses.

Every check raises an exception whose message names the argument, what was allowed and what came
(STYLE.md item 3). Checks that look at values (ranges, NaN) run on the host: core is the reference
layer and always validates, except inside ``jax.jit``, where arrays have no values to look at
(:func:`host_bool`); the public docstrings say so too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from array_api_compat import array_namespace, device, is_array_api_obj, is_numpy_namespace

REDUCTIONS = ("mean", "sum", "none")


def check_array(name: str, x: Any) -> None:
    if not is_array_api_obj(x):
        raise TypeError(
            f"{name} must be an array (numpy, torch, jax, cupy or any Array-API array), "
            f"got {type(x).__name__}"
        )


def namespace(*arrays: Any) -> Any:
    """The Array-API namespace shared by all non-None arrays."""
    present = [a for a in arrays if a is not None]
    try:
        return array_namespace(*present)
    except TypeError as exc:
        kinds = ", ".join(sorted({type(a).__module__ + "." + type(a).__name__ for a in present}))
        raise TypeError(f"all array arguments must come from one array library, got {kinds}") from exc


def check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    return reduction


def _real(value: Any) -> float | None:
    """``float(value)`` for a real number (Python, NumPy or any ``numbers.Real`` scalar), else None.

    Booleans are refused: ``True`` as a smoothing of 1 or a base of 1 is almost surely a mistake.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _integer(value: Any) -> int | None:
    """``int(value)`` for an integer (Python, NumPy or any ``numbers.Integral`` scalar), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def log_base(base: Any) -> float | None:
    """ln(base), or None for nats."""
    if base is None:
        return None
    value = _real(base)
    if value is None:
        raise TypeError(f"base must be None (nats) or a positive number such as 2, got {base!r}")
    if not (math.isfinite(value) and value > 0 and value != 1):
        raise ValueError(f"base must be a finite positive number other than 1, got {base!r}")
    return math.log(value)


def check_unit_interval(name: str, value: Any) -> float:
    number = _real(value)
    if number is None:
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return number


def check_nonnegative_scalar(name: str, value: Any) -> float:
    number = _real(value)
    if number is None:
        raise TypeError(f"{name} must be a non-negative float, got {value!r}")
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be a finite non-negative float, got {value}")
    return number


def check_softcap(softcap: Any) -> float | None:
    if softcap is None:
        return None
    number = _real(softcap)
    if number is None:
        raise TypeError(f"softcap must be None or a positive float, got {softcap!r}")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"softcap must be a finite positive float, got {softcap}")
    return number


def normalize_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    index = _integer(axis)
    if index is None:
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if ndim == 0:
        raise ValueError(f"{name}={axis} needs an array with at least one dimension, got a 0-d array")
    if not -ndim <= index < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim}) for a {ndim}-d array, got {axis}")
    return index % ndim


def check_ignore_index(ignore_index: Any) -> int | None:
    """None, or ignore_index as a Python int (NumPy integers accepted)."""
    if ignore_index is None:
        return None
    index = _integer(ignore_index)
    if index is None:
        raise TypeError(f"ignore_index must be None or an int, got {ignore_index!r}")
    return index


def is_integer_array(xp: Any, x: Any) -> bool:
    return bool(xp.isdtype(x.dtype, "integral"))


def is_float_array(xp: Any, x: Any) -> bool:
    return bool(xp.isdtype(x.dtype, "real floating"))


def compute_dtype(xp: Any, x: Any, name: str) -> Any:
    """float32 for float16/bfloat16 (accumulate in float32 at least), else the input's dtype."""
    if not is_float_array(xp, x):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {x.dtype}")
    if xp.finfo(x.dtype).bits < 32:
        return xp.float32
    return x.dtype


def as_float(xp: Any, x: Any, dtype: Any, name: str) -> Any:
    """x as a floating array of `dtype` (booleans and integers are accepted as numbers)."""
    if xp.isdtype(x.dtype, "complex floating"):
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    return x if x.dtype == dtype else xp.astype(x, dtype)


def host_bool(x: Any) -> bool | None:
    """``bool(x)`` of a 0-d boolean array, or None when it has no value yet.

    Inside ``jax.jit`` arrays are abstract tracers: a check that needs their values cannot run
    there (jax raises a ConcretizationTypeError), so it is skipped and the loss still traces.
    Everywhere else (numpy, torch, eager jax, jax.grad) the checks run as usual.
    """
    try:
        return bool(x)
    except Exception as exc:
        if type(exc).__module__.startswith("jax"):
            return None
        raise


def check_no_nan(xp: Any, name: str, x: Any) -> None:
    if not is_float_array(xp, x):
        return
    if is_numpy_namespace(xp):
        # numpy's min propagates NaN: no mask of x's size (isnan) unless there is one.
        if x.size == 0 or not math.isnan(float(xp.min(x))):
            return
    if host_bool(xp.any(xp.isnan(x))):
        raise ValueError(f"{name} must not contain NaN, got NaN at flat index {_first(xp, xp.isnan(x))}")


def check_in_unit_interval(xp: Any, name: str, x: Any) -> None:
    """Values in [0, 1] and no NaN."""
    check_no_nan(xp, name, x)
    if is_numpy_namespace(xp) and (x.size == 0 or (float(xp.min(x)) >= 0 and float(xp.max(x)) <= 1)):
        return  # no NaN: in range exactly when min and max are, without masks of x's size
    bad = (x < 0) | (x > 1)
    if host_bool(xp.any(bad)):
        lo, hi = float(xp.min(x)), float(xp.max(x))
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values in [{lo:.6g}, {hi:.6g}] "
            f"(first outside at flat index {_first(xp, bad)})"
        )


def check_finite_weights(xp: Any, name: str, w: Any) -> None:
    if is_float_array(xp, w) and host_bool(xp.all(xp.isfinite(w))) is False:
        raise ValueError(f"{name} must be finite (no NaN or inf), got a non-finite value at flat index "
                         f"{_first(xp, ~xp.isfinite(w))}")


def check_class_weight(xp: Any, weight: Any, num_classes: int, dtype: Any) -> Any:
    check_array("weight", weight)
    if tuple(weight.shape) != (num_classes,):
        raise ValueError(
            f"weight must have shape ({num_classes},), one entry per class, got shape {tuple(weight.shape)}"
        )
    weight = as_float(xp, weight, dtype, "weight")
    check_finite_weights(xp, "weight", weight)
    return weight


def check_sample_weight(xp: Any, sample_weight: Any, shape: tuple, dtype: Any) -> Any:
    check_array("sample_weight", sample_weight)
    if tuple(sample_weight.shape) != tuple(shape):
        raise ValueError(
            f"sample_weight must have shape {tuple(shape)} (one entry per row), "
            f"got shape {tuple(sample_weight.shape)}"
        )
    sample_weight = as_float(xp, sample_weight, dtype, "sample_weight")
    check_finite_weights(xp, "sample_weight", sample_weight)
    return sample_weight


def label_dtype(xp: Any) -> Any:
    """The namespace's default indexing dtype: int64, or int32 for jax without ``jax_enable_x64``
    (where asking for int64 would only warn and give int32 anyway)."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is not None:
        try:
            return info().default_dtypes()["indexing"]
        except (AttributeError, KeyError, TypeError):
            pass
    return xp.int64


def check_labels(xp: Any, labels: Any, num_classes: int, ignore_index: int | None) -> Any:
    """Integer class indices in [0, num_classes), or ignore_index (from :func:`check_ignore_index`).

    Returns the labels in the namespace's indexing dtype (:func:`label_dtype`). The error names the
    first invalid label: its flat index and its value.
    """
    dtype = label_dtype(xp)
    checked = labels if labels.dtype == dtype else xp.astype(labels, dtype)
    valid = (checked >= 0) & (checked < num_classes)
    if ignore_index is not None and _fits(xp, ignore_index, dtype):
        valid = valid | (checked == ignore_index)
    if host_bool(xp.all(valid)) is False:
        i = _first(xp, ~valid)
        bad_value = int(xp.reshape(labels, (-1,))[i])  # the caller's value, before any cast
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise ValueError(f"targets must be class indices in {allowed}, got {bad_value} at flat index {i}")
    return checked


def ignored(xp: Any, labels: Any, ignore_index: int | None) -> Any:
    """Boolean mask of the rows whose label is ignore_index (all False for None, or for an
    ignore_index the labels' dtype cannot hold, which no label can then equal)."""
    if ignore_index is None or not _fits(xp, ignore_index, labels.dtype):
        return xp.zeros(labels.shape, dtype=xp.bool, device=device(labels))
    return labels == ignore_index


def _fits(xp: Any, value: int, dtype: Any) -> bool:
    info = xp.iinfo(dtype)
    return int(info.min) <= value <= int(info.max)


def check_eps(xp: Any, eps: Any, input_dtype: Any) -> float:
    """The clip of probabilities: ``"auto"`` is ``finfo(input_dtype).eps``, the machine epsilon of
    the probabilities as given (float16: 9.77e-4, as scikit-learn), not of the float32 they are
    computed in: a float16 probability cannot resolve anything finer."""
    if eps is None:
        return 0.0
    if isinstance(eps, str):
        if eps != "auto":
            raise ValueError(f"eps must be 'auto', None or a float in [0, 0.5), got {eps!r}")
        return float(xp.finfo(input_dtype).eps)
    number = _real(eps)
    if number is None:
        raise TypeError(f"eps must be 'auto', None or a float in [0, 0.5), got {eps!r}")
    if not 0.0 <= number < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    return number


def _first(xp: Any, mask: Any) -> int:
    """Flat index of the first True in mask (for error messages)."""
    flat = xp.reshape(mask, (-1,))
    return int(xp.argmax(xp.astype(flat, xp.int8)))
