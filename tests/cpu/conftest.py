"""Shared fixture of the crossent.cpu tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["numba", "numpy"])
def path(request, monkeypatch):
    """Which implementation runs: the compiled kernels or the numpy fallback."""
    pytest.importorskip("numba")
    from crossent import cpu

    monkeypatch.setattr(cpu, "ENABLED", request.param == "numba")
    assert cpu.available() is (request.param == "numba")
    return request.param
