"""The kernels compile for an H100 (sm_90) with Triton's real compiler, not only interpret.

Runs tests/triton/triton_compile_sm90.py in a subprocess without TRITON_INTERPRET (this process's
kernels are interpreter objects). Needs no GPU: the target is named explicitly and the triton
wheel bundles ptxas. Also pins what the kernel docstrings claim about the generated code: the
bf16 matmul kernels use Hopper's wgmma and a software-pipelined K loop (cp.async).
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_sm90.py")


def test_kernels_compile_for_sm90(sm90_script):
    out = sm90_script(HELPER, timeout=600)
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^OK (\S+) .*$", out, re.M)}
    assert len(lines) == 54, out
    for name in ("lce_forward[bf16]", "lce_forward[bf16,group_m=8]", "lce_grad_tile[bf16,from_logits=False]",
                 "lce_grad_tile[bf16,from_logits=False,group_m=8]",
                 "lce_grad_input[bf16,first=False,last=True]", "lce_grad_weight[bf16,per_row=False]"):
        wgmma = int(re.search(r"wgmma=(\d+)", lines[name]).group(1))
        cp_async = int(re.search(r"cp.async=(\d+)", lines[name]).group(1))
        assert wgmma > 0 and cp_async > 0, lines[name]
    for name in ("lce_forward[bf16,tma]", "lce_grad_tile[bf16,tma]"):
        assert int(re.search(r"tma=(\d+)", lines[name]).group(1)) > 0, lines[name]


REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "benchmarks", "sm90_config_report.py")


def test_default_sweep_configs_compile_clean_for_sm90(sm90_script):
    """Every non-default entry of the benchmark sweeps (gpu_harness.LINEAR_SWEEP, CE_SWEEP,
    ELEMENTWISE_SWEEP) compiles for sm_90 with no register spill, within shared memory, and
    (linear) with wgmma and a pipelined K loop: the GPU session spends no time on configs that
    cannot win."""
    out = sm90_script(REPORT, timeout=900)
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    # 7 linear configs x 5 kernels, 5 CE configs x 2 shapes, 14 elementwise configs x 2 kernels (the
    # last seven, products=2 and 3 with and without tma and where the chunks live, change the
    # schedule, not the tiles: their fused forward and recompute kernels are in the linear rows)
    assert len(rows) == 7 * 5 + 5 * 2 + 14 * 2, out
    assert "all configs OK" in out
