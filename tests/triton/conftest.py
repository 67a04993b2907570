"""Triton kernels on the CPU through Triton's interpreter, checked against float64 PyTorch.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when the kernels are
decorated); the CI command sets it for the whole suite and this file sets it again defensively.
Every test here is skipped, with the reason, when triton is not importable or the kernels were
compiled for a GPU instead of the interpreter.

``reference`` is the oracle: F.cross_entropy in float64 on the softcapped logits, plus the z-loss
written out (PyTorch has no z-loss): z * logsumexp(x)**2 per non-ignored row, summed, or divided by
the number of non-ignored rows for "mean".
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# A conftest cannot skip (pytest turns that into a collection error): it records why the kernel
# tests cannot run and marks them skipped in pytest_collection_modifyitems.
SKIP_REASON = None
if importlib.util.find_spec("torch") is None:
    SKIP_REASON = "torch is not installed: the Triton kernel tests need it"
elif importlib.util.find_spec("triton") is None:
    SKIP_REASON = "triton is not installed: the Triton kernel tests need it"
else:
    from crossent.triton import _launchers

    if not _launchers.interpreted():
        SKIP_REASON = (
            "crossent.triton was imported before TRITON_INTERPRET=1 was set, so its kernels "
            "target a GPU; run the suite with TRITON_INTERPRET=1 in the environment"
        )

KERNEL_TESTS = ("test_triton_cross_entropy.py", "test_triton_linear_cross_entropy.py")


def pytest_collection_modifyitems(items):
    here = os.path.dirname(__file__)
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.triton)
        # NumPy (inside the interpreter) warns on IEEE events the kernels rely on: exp(-inf),
        # inf - inf in -inf rows, log(0) of an all -inf row. Only those warnings are allowed.
        item.add_marker(
            pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
        )
        if SKIP_REASON and os.path.basename(str(item.fspath)) in KERNEL_TESTS:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def reference(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The loss by plain PyTorch ops, in the dtype of ``logits`` (float64 for the oracle)."""
    import torch
    import torch.nn.functional as F

    x = logits
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(
        x, target, weight=None if weight is None else weight.to(x.dtype),
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
    if z_loss:
        valid = target != ignore_index
        zl = z_loss * torch.logsumexp(x, dim=-1) ** 2 * valid
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            loss = loss + zl.sum() / valid.sum()
    return loss


@pytest.fixture(scope="session")
def ref():
    return reference
