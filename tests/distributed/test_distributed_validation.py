"""``validate=`` of the vocab-parallel losses on gloo (CPU), 2 and 3 spawned ranks; the checks that
validation makes across ranks.

- ``validate=False`` (the default for CUDA tensors) gives the same tensors as ``validate=True``
  and the float64 single-process oracle; it issues only the slice sizes' all-gather (in a table
  of the validated size, 17 int64 per rank), the MAX and the SUM all-reduces (and the input
  gradient's in backward), and moves nothing between host and tensors (no
  ``item``/``bool``/``tolist``/``torch.tensor``); an out-of-range target gives NaN on its row;
  ``validate=True`` and the default on CPU tensors keep the table and the targets' check;
- validated: a rank running the forward under ``torch.no_grad()`` while the others record a graph
  raises on every rank (its backward would all-reduce on some ranks only: a hang), over a
  subgroup whose collectives time out after a few seconds, so a regression fails fast;
- validated: target shapes that differ across ranks, with the same number of elements, raise on
  every rank.

The ranks run ``crossent_distributed_workers.check_validate`` and
``check_grad_mode_and_target_shape`` and report how many comparisons each made.
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

SIZES = {2: [0, 9], 3: [5, 0, 4]}  # an empty slice on some rank


@pytest.fixture(scope="module", params=sorted(SIZES), ids=lambda world: f"{world}-ranks")
def reports(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    checks = [("check_validate", (SIZES[world],)), ("check_grad_mode_and_target_shape", ())]
    return world, run_ranks(tmp_path_factory.mktemp(f"ranks{world}"), world, checks)


def test_validate_off_equals_validated_and_oracle_with_no_host_traffic(reports):
    # 4 option cases x (6 logits + 7 linear comparisons), the default schedule, 5 NaN-row checks,
    # 5 error and after-error checks
    world, ranks = reports
    assert [report.get("check_validate") for report in ranks] == [4 * 13 + 1 + 5 + 5] * world


def test_grad_mode_and_target_shape_mismatches_raise_on_every_rank(reports):
    # no_grad on each rank in turn, no_grad everywhere, 2 shape mismatches, a good call after
    world, ranks = reports
    assert [report.get("check_grad_mode_and_target_shape") for report in ranks] == [world + 1 + 2 + 2] * world
