"""Argument checks shared by the core losses.

Every check raises an exception whose message names the argument, what was allowed and what came
(STYLE.md item 3). Checks that look at values (ranges, NaN) run on the host: core is the reference
layer and always validates, except inside ``jax.jit``, where arrays have no values to look at
(:func:`host_bool`).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace, device, is_array_api_obj

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


def log_base(base: Any) -> float | None:
    """ln(base), or None for nats."""
    if base is None:
        return None
    if isinstance(base, bool) or not isinstance(base, int | float):
        raise TypeError(f"base must be None (nats) or a positive number such as 2, got {base!r}")
    if not (math.isfinite(base) and base > 0 and base != 1):
        raise ValueError(f"base must be a finite positive number other than 1, got {base!r}")
    return math.log(base)


def check_unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_nonnegative_scalar(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a non-negative float, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite non-negative float, got {value}")
    return float(value)


def check_softcap(softcap: Any) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, int | float):
        raise TypeError(f"softcap must be None or a positive float, got {softcap!r}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite positive float, got {softcap}")
    return float(softcap)


def normalize_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if ndim == 0:
        raise ValueError(f"{name}={axis} needs an array with at least one dimension, got a 0-d array")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim}) for a {ndim}-d array, got {axis}")
    return axis % ndim


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
    if is_float_array(xp, x) and host_bool(xp.any(xp.isnan(x))):
        raise ValueError(f"{name} must not contain NaN, got NaN at flat index {_first(xp, xp.isnan(x))}")


def check_in_unit_interval(xp: Any, name: str, x: Any) -> None:
    """Values in [0, 1] and no NaN."""
    check_no_nan(xp, name, x)
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


def check_labels(xp: Any, labels: Any, num_classes: int, ignore_index: int | None) -> Any:
    """Integer class indices in [0, num_classes), or ignore_index. Returns int64 labels."""
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be None or an int, got {ignore_index!r}")
    labels = xp.astype(labels, xp.int64) if labels.dtype != xp.int64 else labels
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid = valid | (labels == ignore_index)
    if host_bool(xp.all(valid)) is False:
        bad_value = int(xp.min(xp.where(valid, xp.asarray(2**62, dtype=xp.int64, device=device(labels)),
                                        labels)))
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise ValueError(
            f"targets must be class indices in {allowed}, got {bad_value} "
            f"at flat index {_first(xp, ~valid)}"
        )
    return labels


def check_eps(xp: Any, eps: Any, dtype: Any) -> float:
    if eps is None:
        return 0.0
    if isinstance(eps, str):
        if eps != "auto":
            raise ValueError(f"eps must be 'auto', None or a float in [0, 0.5), got {eps!r}")
        return float(xp.finfo(dtype).eps)
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise TypeError(f"eps must be 'auto', None or a float in [0, 0.5), got {eps!r}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    return float(eps)


def _first(xp: Any, mask: Any) -> int:
    """Flat index of the first True in mask (for error messages)."""
    flat = xp.reshape(mask, (-1,))
    return int(xp.argmax(xp.astype(flat, xp.int8)))
