"""Two fixes of the vocab-parallel losses on gloo (CPU), 2 spawned ranks.

- Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the linear version's backward recomputes
  the logits under forward's autocast state: its loss is eager autocast's and its gradients'
  errors against float64 are at most 1.5x eager autocast's (``F.linear`` under the same autocast,
  gradients by autograd). Before, they were ~3x larger and the bias gradient did not sum to 0.
- A ``validate`` that differs across ranks: step 0's all-gather has the same size in both modes
  and carries the flag, so the validating rank raises a ValueError naming ``validate``; the other
  rank's next collective times out (a RuntimeError), where a size mismatch in gloo aborted it.

The ranks run ``crossent_distributed_workers.check_autocast_linear`` and
``check_validate_mismatch`` and report how many comparisons each made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # spawned children import the worker module by this name

from test_distributed_vocab_parallel import run_ranks  # noqa: E402 - spawns and joins the ranks

pytestmark = pytest.mark.slow  # spawns processes (about 15 s: two rounds wait for a 5 s timeout)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    checks = [("check_autocast_linear", ()), ("check_validate_mismatch", ())]
    return run_ranks(tmp_path_factory.mktemp("ranks2"), 2, checks)


def test_linear_under_autocast_has_the_gradients_of_its_loss(reports):
    # 3 cases x (loss + input and weight grads) + 2 bias grads + the bias gradient's sum
    assert [report.get("check_autocast_linear") for report in reports] == [3 * 3 + 2 + 1] * 2


def test_validate_differing_across_ranks_raises_on_the_validating_rank(reports):
    # two mismatched rounds (logits, then linear with None), then a call on every rank
    assert [report.get("check_validate_mismatch") for report in reports] == [3] * 2
