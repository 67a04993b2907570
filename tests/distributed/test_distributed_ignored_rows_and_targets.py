"""Vocab-parallel losses on gloo (CPU), 2 spawned ranks: ignored rows and the targets' check.

- An ignored row contributes 0 whatever its inputs (DESIGN.md): a NaN or inf hidden state there
  leaves the weight and bias gradients finite and equal to those without the row, as on every
  other crossent path.
- Targets that differ between ranks raise the same ValueError on every rank, compared exactly
  (a checksum let [0, 1] and [2, 0] through, and the loss was silently wrong).

The ranks run ``crossent_distributed_workers.check_*`` and report how many comparisons each made.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # spawned children import the worker module by this name

import crossent_distributed_workers as workers  # noqa: E402

pytestmark = pytest.mark.slow  # spawns processes (a few seconds)

JOIN_TIMEOUT_S = 150
WORLD = 2
SIZES = [4, 3]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    """Spawn the ranks once, run every check; each rank's ``{check: count}``."""
    out_dir = tmp_path_factory.mktemp("ranks")
    checks = [("check_nonfinite_ignored_rows", (SIZES,)), ("check_target_agreement", (SIZES,))]
    ctx = mp.start_processes(
        workers.entry,
        args=(WORLD, str(out_dir / "store"), str(out_dir), checks),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{WORLD} ranks did not finish within {JOIN_TIMEOUT_S} s")
    return [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in range(WORLD)]


def test_nonfinite_values_on_ignored_rows_leave_the_gradients_finite(reports):
    # 24 linear cases (NaN/inf x 3 reductions x softcap x bias): loss, input, weight, bias/extra
    # check each; then NaN/inf upstream on ignored rows: logits grad, input grad, weight grad
    assert [report.get("check_nonfinite_ignored_rows") for report in reports] == [24 * 4 + 2 * 3] * WORLD


def test_targets_that_differ_between_ranks_raise_on_every_rank(reports):
    # 5 differing cases x 2 functions, the message naming the first difference, then a good
    # call with agreeing targets (loss and gradient)
    assert [report.get("check_target_agreement") for report in reports] == [5 * 2 + 1 + 2] * WORLD
