"""Argument checks shared by the PyTorch functions.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, what was
allowed and what came. Checks that read tensor *values* (targets in range, NaN in weights) need
the data on the host; they are always on for CPU tensors (no device sync) and opt-in with
``validate=True`` for accelerator tensors (DESIGN.md, "Semantics").
"""

from __future__ import annotations

import math
import numbers
import operator
import os

import numpy as np
import torch

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "chunked", "reference")


def check_reduction(reduction: object, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def check_impl(impl: object) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def real_option(value: object) -> float | None:
    """A real scalar option as a Python float, as PyTorch accepts one: a Python or NumPy int or
    float (``numbers.Real``) or a 0-d integer/floating tensor; None for anything else, bool
    included (it is almost always a slip for another argument). Shared with crossent.distributed."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
            return float(value.item())
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def index_option(value: object) -> int | None:
    """An integer option as a Python int, as PyTorch accepts one: a Python or NumPy int
    (``operator.index``) or a 0-d integer tensor; None for anything else (bool, floats)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            return int(value.item())
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _real_scalar(name: str, value: object, expected: str) -> float:
    """``real_option(value)``, or a TypeError naming the option."""
    real = real_option(value)
    if real is None:
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    return real


def check_label_smoothing(label_smoothing: object) -> float:
    value = _real_scalar("label_smoothing", label_smoothing, "a float in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {value}")
    return value


def check_z_loss(z_loss: object) -> float:
    value = _real_scalar("z_loss", z_loss, "a finite float >= 0")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {value}")
    return value


def check_softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    value = _real_scalar("softcap", softcap, "None or a finite float > 0")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {value}")
    return value


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_ignore_index(ignore_index: object) -> int:
    """An integer as PyTorch takes one (``index_option``); bool and floats are refused, and so
    is a value outside the int64 range (PyTorch: ValueError "Overflow when unpacking long
    long"; the comparison with the int64 targets would raise a bare OverflowError, or for
    2**63 .. 2**64 - 1 silently match no target)."""
    index = index_option(ignore_index)
    if index is None:
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not INT64_MIN <= index <= INT64_MAX:
        raise ValueError(
            f"ignore_index must be an int in the int64 range [-2**63, 2**63 - 1], as PyTorch "
            f"takes, got {index}"
        )
    return index


def check_floating(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def wants_validation(validate: bool | None, *tensors: torch.Tensor | None) -> bool:
    """``validate=None`` means: check values when every tensor lives on the CPU (no sync); else
    ``validate`` must be a bool (a truthy string such as "no" is refused, not read as True)."""
    if validate is not None:
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be None, True or False, got {validate!r}")
        return validate
    # Non-tensors are left to the type checks that follow (they name the argument).
    return all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in tensors)


def check_class_weight(
    weight: torch.Tensor | None, num_classes: int, *, validate: bool
) -> torch.Tensor | None:
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be None or a 1-D floating-point torch.Tensor, got {type(weight).__name__}")
    check_floating("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"weight must be a 1-D tensor with one entry per class ({num_classes}), "
            f"got shape {tuple(weight.shape)}"
        )
    if validate and has_nan(weight):
        raise ValueError("weight must not contain NaN, got a NaN class weight")
    return weight


def check_class_target(
    target: torch.Tensor, num_classes: int, ignore_index: int, *, validate: bool
) -> None:
    """Integer targets lie in [0, num_classes) or equal ignore_index."""
    if not validate or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        first = target[bad].flatten()[0]
        raise ValueError(
            f"target must hold class indices in [0, {num_classes}) or "
            f"ignore_index={ignore_index}, got {int(first)}"
        )


def has_nan(t: torch.Tensor) -> bool:
    """Whether floating ``t`` holds a NaN: its minimum is NaN (torch's min propagates NaN), so
    no mask of ``t``'s size is formed (``isnan(t).any()`` held one: 25% of float32 logits)."""
    return t.numel() > 0 and bool(torch.isnan(t.min()))


def check_prob_target(target: torch.Tensor, *, validate: bool) -> None:
    """Probability targets are not range-checked (as in PyTorch), but NaN is an error."""
    if validate and has_nan(target):
        raise ValueError("target must not contain NaN, got NaN in the class probabilities")


def triton_allowed_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under its interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
