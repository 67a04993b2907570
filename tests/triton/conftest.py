"""Triton kernel tests against float64 PyTorch: on the CPU through Triton's interpreter, or compiled
on a CUDA GPU. The same tests run both ways:

    TRITON_INTERPRET=1 pytest tests/triton    # CPU tensors, Triton's interpreter (CI, ``make test``)
    TRITON_INTERPRET=0 pytest tests/triton    # CUDA tensors, kernels compiled for the GPU, plus the
                                              # GPU-only large-shape tests of test_triton_gpu.py

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when the kernels are
decorated). This file sets it to 1 only when the environment leaves it unset
(``os.environ.setdefault``), so an explicit ``TRITON_INTERPRET=0`` wins; if another test module
imported crossent.triton before this file ran, the kernels were built for whatever the environment
said then, and the fixtures below follow what was built (``_launchers.interpreted()``).

Fixtures:

* ``device``: "cpu" when the kernels were built for the interpreter, "cuda" when they were
  compiled and ``torch.cuda.is_available()``; otherwise the test is skipped with the reason
  (torch or triton missing, or compiled kernels on a machine without CUDA). Kernel tests create
  their tensors on it (the float64 oracle runs on the same device).
* ``interpreter``: for the few tests that only mean something under the interpreter (value checks
  done for CPU tensors only, doctests written with CPU tensors); skipped with the reason on CUDA.
* ``cuda_device``: for GPU-only tests (large shapes, CUDA memory statistics); skipped under the
  interpreter.

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
# tests cannot run, and the fixtures below skip each test that asks for a device.
SKIP_REASON = None
INTERPRETED = False
if importlib.util.find_spec("torch") is None:
    SKIP_REASON = "torch is not installed: the Triton kernel tests need it"
elif importlib.util.find_spec("triton") is None:
    SKIP_REASON = "triton is not installed: the Triton kernel tests need it"
else:
    import torch

    from crossent.triton import _launchers

    INTERPRETED = _launchers.interpreted()
    if not INTERPRETED and not torch.cuda.is_available():
        SKIP_REASON = (
            "crossent.triton's kernels were compiled for a GPU (TRITON_INTERPRET was not 1 when "
            "triton was imported) but torch.cuda.is_available() is False: run with "
            "TRITON_INTERPRET=1 on a CPU machine, or TRITON_INTERPRET=0 on a CUDA machine"
        )

INTERPRETER_ONLY = "runs only under TRITON_INTERPRET=1 (CPU tensors)"
CUDA_ONLY = "needs the compiled kernels on a CUDA GPU (TRITON_INTERPRET=0 and torch.cuda.is_available())"


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


@pytest.fixture(scope="session")
def device():
    """Where the kernel tests put their tensors: "cpu" (interpreter) or "cuda" (compiled)."""
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    return "cpu" if INTERPRETED else "cuda"


@pytest.fixture(scope="session")
def interpreter(device):
    """The CPU device, for tests that only mean something under Triton's interpreter."""
    if device != "cpu":
        pytest.skip(INTERPRETER_ONLY)
    return device


@pytest.fixture(scope="session")
def cuda_device(device):
    """The CUDA device, for GPU-only tests."""
    if device != "cuda":
        pytest.skip(CUDA_ONLY)
    return device


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


@pytest.fixture(scope="session")
def sm90_script():
    """``run(path, timeout)``: run one of the sm_90 compile scripts in a subprocess without
    TRITON_INTERPRET (this process's kernels may be interpreter objects) and return its stdout,
    failing with its output when it exits non-zero. Skips when this triton has no ASTSource /
    GPUTarget compile API. Needs no GPU: the target is named, the triton wheel bundles ptxas."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ASTSource/GPUTarget compile API: {e}")

    def run(path, timeout):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, path], capture_output=True, text=True, env=env, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
        return proc.stdout

    return run
