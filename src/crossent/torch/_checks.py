"""Argument checks shared by the PyTorch functions.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, what was
allowed and what came. Checks that read tensor *values* (targets in range, NaN in weights) need
the data on the host; they are always on for CPU tensors (no device sync) and opt-in with
``validate=True`` for accelerator tensors (DESIGN.md, "Semantics").
"""

from __future__ import annotations

import math
import os

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


def check_label_smoothing(label_smoothing: object) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    value = float(label_smoothing)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return value


def check_z_loss(z_loss: object) -> float:
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    value = float(z_loss)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss}")
    return value


def check_softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    value = float(softcap)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap}")
    return value


def check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return ignore_index


def check_floating(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def wants_validation(validate: bool | None, *tensors: torch.Tensor | None) -> bool:
    """``validate=None`` means: check values when every tensor lives on the CPU (no sync)."""
    if validate is not None:
        return bool(validate)
    return all(t is None or t.device.type == "cpu" for t in tensors)


def check_class_weight(
    weight: torch.Tensor | None, num_classes: int, *, validate: bool
) -> torch.Tensor | None:
    if weight is None:
        return None
    check_floating("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"weight must be a 1-D tensor with one entry per class ({num_classes}), "
            f"got shape {tuple(weight.shape)}"
        )
    if validate and bool(torch.isnan(weight).any()):
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


def check_prob_target(target: torch.Tensor, *, validate: bool) -> None:
    """Probability targets are not range-checked (as in PyTorch), but NaN is an error."""
    if validate and bool(torch.isnan(target).any()):
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
