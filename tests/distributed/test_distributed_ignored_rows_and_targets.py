"""Vocab-parallel losses on gloo (CPU), 2 spawned ranks: ignored rows and the targets' check.

- An ignored row contributes 0 whatever its inputs (DESIGN.md): a NaN or inf hidden state there
  leaves the weight and bias gradients finite and equal to those without the row, as on every
  other crossent path.
- Targets that differ between ranks raise the same ValueError on every rank, compared exactly
  (a checksum let [0, 1] and [2, 0] through, and the loss was silently wrong).

The ranks run ``crossent_distributed_workers.check_*`` and report how many comparisons each made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # spawned children import the worker module by this name

from test_distributed_vocab_parallel import run_ranks  # noqa: E402 - spawns and joins the ranks

pytestmark = pytest.mark.slow  # spawns processes (a few seconds)

WORLD = 2
SIZES = [4, 3]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    """Spawn the ranks once, run every check; each rank's ``{check: count}``."""
    checks = [("check_nonfinite_ignored_rows", (SIZES,)), ("check_target_agreement", (SIZES,))]
    return run_ranks(tmp_path_factory.mktemp("ranks"), WORLD, checks)


def test_nonfinite_values_on_ignored_rows_leave_the_gradients_finite(reports):
    # 24 linear cases (NaN/inf x 3 reductions x softcap x bias): loss, input, weight, bias/extra
    # check each; then NaN/inf upstream on ignored rows: logits grad, input grad, weight grad
    assert [report.get("check_nonfinite_ignored_rows") for report in reports] == [24 * 4 + 2 * 3] * WORLD


def test_targets_that_differ_between_ranks_raise_on_every_rank(reports):
    # 5 differing cases x 2 functions, the message naming the first difference, then a good
    # call with agreeing targets (loss and gradient)
    assert [report.get("check_target_agreement") for report in reports] == [5 * 2 + 1 + 2] * WORLD
