"""examples/vocab_parallel.py under torchrun (2 ranks, gloo on the CPU) prints the same loss as the
single-process computation."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns processes (a few seconds each)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vocab_parallel.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not TORCHRUN.exists(), reason=f"no torchrun next to {sys.executable}")
def test_example_under_torchrun_prints_the_single_process_loss():
    command = [
        str(TORCHRUN),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        str(EXAMPLE),
        "--dtype",
        "float32",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "ranks: 2, vocabulary 1003 split [502, 501]" in out, out
    parallel = float(re.search(r"vocab-parallel loss : (\S+)", out).group(1))
    single = float(re.search(r"single-process loss : (\S+)", out).group(1))
    # float32 sums in another order: a few units of float32 resolution (1.2e-7 relative)
    assert abs(parallel - single) <= 8 * 1.2e-7 * abs(single), out
    grad_gap = float(re.search(r"max \|d hidden grad\| : (\S+)", out).group(1))
    assert grad_gap <= 1e-6, out
