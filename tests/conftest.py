"""Shared fixtures: the array backends every core test runs over.

``xp`` is the array namespace of one backend (numpy, array_api_strict, torch on the CPU in
float64, jax with 64-bit floats enabled when jax imports). ``asxp`` turns a NumPy array into an
array of the current backend with the same dtype; ``tonp`` turns any backend's array back into
NumPy. Inputs are built in NumPy float64 and converted, so every backend sees the same numbers.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

# jax compiles every primitive for every new shape (about 0.1 s each on a busy CPU), which makes
# it by far the slowest backend here; the tests' arrays are tiny, so XLA's optimizer buys nothing.
# Must be set before jax creates its CPU client; an explicit XLA_FLAGS from the caller wins.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def pytest_configure(config):
    # Once the jax backend below has started (its CPU client runs threads), jax warns at every
    # os.fork() in this process; tests elsewhere fork children that never touch jax (the CPU
    # kernels' fork-safety test, multiprocessing workers), and under filterwarnings = error the
    # warning would fail them depending on test order. Only this one message is silenced.
    config.addinivalue_line("filterwarnings", r"ignore:os\.fork\(\) was called\.:RuntimeWarning")


BACKENDS = ["numpy", "array_api_strict", "torch"]
if importlib.util.find_spec("jax") is not None:
    BACKENDS.append("jax")


def _namespace(name: str):
    if name == "numpy":
        return np
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    if name == "torch":
        return pytest.importorskip("torch")
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp
    raise AssertionError(name)


def to_numpy(a) -> np.ndarray:
    """Any backend's array (or a Python scalar) as a NumPy array, detached from autograd."""
    if hasattr(a, "detach"):  # torch
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("array_api_strict"):
        return np.from_dlpack(a)
    return np.asarray(a)


@pytest.fixture(scope="session", params=BACKENDS)
def xp(request):
    """The array namespace of one backend (torch tensors are CPU float64 when built by asxp)."""
    return _namespace(request.param)


@pytest.fixture(scope="session")
def asxp(xp):
    """Convert a NumPy array to the backend's array type, keeping its dtype."""

    def convert(a):
        a = np.asarray(a)
        if xp.__name__ == "torch":
            return xp.from_numpy(np.array(a, order="C", copy=True))
        return xp.asarray(a)

    return convert


@pytest.fixture(scope="session")
def tonp():
    """Convert any backend's array back to NumPy."""
    return to_numpy


@pytest.fixture(params=["numba", "no-numba"])
def cpu_route(request, monkeypatch):
    """crossent.cpu's compiled kernels ("numba"), or its numpy fallback as when numba is not
    installed ("no-numba"), with the CPU fast path on."""
    from crossent import cpu

    if request.param == "numba":
        pytest.importorskip("numba")
        monkeypatch.setattr(cpu, "_numba_importable", None)
    else:
        monkeypatch.setattr(cpu, "_numba_importable", False)
    monkeypatch.setattr(cpu, "ENABLED", True)
    assert cpu.available() is (request.param == "numba")
    return request.param
