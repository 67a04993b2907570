"""Peak memory of linear_cross_entropy, measured in a fresh subprocess (ru_maxrss growth)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = os.path.join(os.path.dirname(__file__), "_torch_memory_probe.py")


def _extra_fraction(impl: str, n: int, d: int, v: int, chunk_size: int | None = None) -> float:
    """Peak-RSS growth of one fwd+bwd as a fraction of the float32 logits' size (n * v * 4)."""
    args = [sys.executable, PROBE, impl, str(n), str(d), str(v)]
    if chunk_size is not None:
        args.append(str(chunk_size))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env, timeout=600)
    extra, logits_bytes, _seconds = out.stdout.split()
    return int(extra) / int(logits_bytes)


def test_chunked_memory_is_a_small_fraction_of_the_logits():
    # 2048 x 50000 float32 logits = 410 MB; blocks of 32 rows (6.4 MB of logits).
    chunked = _extra_fraction("chunked", 2048, 32, 50000, chunk_size=32)
    assert chunked < 0.25, chunked
    # The probe does see the logits when they exist: the plain composition holds them (and
    # their gradient), so the same measurement grows by more than their size.
    composition = _extra_fraction("composition", 1024, 32, 20000)
    assert composition > 1.0, composition


@pytest.mark.slow
def test_issue_shape_grows_peak_memory_by_less_than_a_quarter_of_the_logits():
    # N=4096, D=64, V=100000 float32: the logits would take 1.64 GB; default block size.
    assert _extra_fraction("chunked", 4096, 64, 100000) < 0.25


def test_block_rows_are_bigger_on_accelerators():
    """N * V / 16 logits per block, capped at 4 Mi elements on the CPU and 32 Mi elsewhere (each
    block costs a few dozen kernel launches on a GPU); an explicit chunk_size wins."""
    import torch

    from crossent.torch._chunked import rows_per_block

    assert rows_per_block(8192, 32000, None, torch.device("cpu")) == (1 << 22) // 32000
    assert rows_per_block(8192, 32000, None) == (1 << 22) // 32000
    assert rows_per_block(8192, 32000, None, torch.device("cuda")) == 8192 * 32000 // 16 // 32000
    assert rows_per_block(65536, 128256, None, torch.device("cuda")) == (1 << 25) // 128256
    assert rows_per_block(10, 7, None, torch.device("cuda")) == (1 << 16) // 7
    assert rows_per_block(8192, 32000, 5, torch.device("cuda")) == 5
