"""Collection rule for the doctests under src/crossent (tests/conftest.py covers tests/)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    """crossent.triton's examples of its public functions (crossent.triton.<name>; the
    launchers' host-side examples run anywhere) run on CUDA tensors, or on CPU tensors through Triton's
    interpreter (TRITON_INTERPRET=1, which `make test` sets before anything imports triton);
    elsewhere they are skipped with that reason, not failed."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    try:
        import torch

        if torch.cuda.is_available():
            return
    except ImportError:
        pass
    skip = pytest.mark.skip(reason="crossent.triton's examples need CUDA or TRITON_INTERPRET=1 (make test sets it)")
    for item in items:
        public = item.name.startswith("crossent.triton.") and item.name.count(".") == 2
        if isinstance(item, pytest.DoctestItem) and public:
            item.add_marker(skip)
