"""crossent.triton._partials' kernels compile for an H100 (sm_90) with Triton's real compiler.

Runs triton_compile_vocab_partials_sm90.py in a subprocess without TRITON_INTERPRET (this
process's kernels may be interpreter objects); needs no GPU (target named explicitly, ptxas from
the triton wheel).
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_vocab_partials_sm90.py")


def test_vocab_parallel_kernels_compile_for_sm90(sm90_script):
    out = sm90_script(HELPER, timeout=300)
    lines = re.findall(r"^OK (\S+) ptx_local=(\d+)$", out, re.M)
    assert len(lines) == 12, out
    assert all(local == "0" for _, local in lines), out  # no register spills
