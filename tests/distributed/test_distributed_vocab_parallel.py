"""Vocab-parallel cross-entropy on gloo (CPU) with 2 and 3 spawned ranks, against float64 oracles.

Process start-up (a fresh interpreter importing torch per rank) dominates, so each world size
spawns once (a module-scoped fixture) and runs every check inside the ranks
(crossent_distributed_workers.py); the tests below read what each rank reported. Waits are bounded:
the process group has a 30 s collective timeout and the parent joins with a deadline, then kills
the ranks it started.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # spawned children import the worker module by this name

import crossent_distributed_workers as workers  # noqa: E402

from crossent.distributed import (  # noqa: E402
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.slow  # spawns processes (a few seconds each)

JOIN_TIMEOUT_S = 150

# Per world size: uneven slices for the option grid, slices with an empty one for the edge cases,
# and whether the grid runs every (bias, softcap) head of the linear version for every option case.
PLANS = {
    2: {"grid": ([22, 15], True), "special": ([0, 13],), "faults": ([7, 4],)},
    3: {"grid": ([13, 9, 15], False), "special": ([11, 0, 8],), "faults": ([5, 2, 4],)},
}


def run_ranks(out_dir: Path, world: int, checks: list) -> list[dict]:
    """Spawn ``world`` gloo ranks running ``checks`` in order; return each rank's report."""
    ctx = mp.start_processes(
        workers.entry,
        args=(world, str(out_dir / "store"), str(out_dir), checks),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world} ranks did not finish within {JOIN_TIMEOUT_S} s")
    return [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module", params=sorted(PLANS), ids=lambda world: f"{world}-ranks")
def reports(request, tmp_path_factory):
    world = request.param
    checks = [
        ("check_grid", PLANS[world]["grid"]),
        ("check_special", PLANS[world]["special"]),
        ("check_faults", PLANS[world]["faults"]),
        ("check_schedule_and_groups", ()),
        ("check_random_splits", ()),
    ]
    out_dir = tmp_path_factory.mktemp(f"ranks{world}")
    return world, run_ranks(out_dir, world, checks)


def test_every_option_matches_single_process_float64(reports):
    world, ranks = reports
    # 36 option cases (reduction x ignore x label_smoothing x z_loss), each: the logits version
    # (loss and grad; + F.cross_entropy's own reduction for the 12 cases without z_loss), and the
    # linear version (loss, input grad, weight grad, + bias grad) with 4 (bias, softcap) heads per
    # case, or with 3 ranks one head per case, cycling
    logits = 36 * 2 + 12
    linear = 36 * (4 * 3 + 2) if PLANS[world]["grid"][1] else 36 * 3 + 18
    assert [report["check_grid"] for report in ranks] == [logits + linear] * world


def test_masked_classes_zero_denominators_nan_and_bfloat16(reports):
    """Includes the bfloat16 input gradient of the linear version over many chunks: rounded once,
    its error is within 1.05x of single-process bfloat16 autograd's."""
    world, ranks = reports
    assert [report["check_special"] for report in ranks] == [39] * world


def test_faults_raise_the_same_error_on_every_rank(reports):
    world, ranks = reports
    assert [report["check_faults"] for report in ranks] == [16 + 2] * world


def test_collectives_follow_the_documented_schedule_and_group(reports):
    world, ranks = reports
    assert [report["check_schedule_and_groups"] for report in ranks] == [16 + 1 + 2] * world


def test_random_partitions_with_empty_slices(reports):
    world, ranks = reports
    assert [report["check_random_splits"] for report in ranks] == [8 * 6] * world


def test_without_process_group_is_a_clear_error():
    assert not torch.distributed.is_initialized()
    logits = torch.zeros(2, 3)
    target = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(logits, target)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_linear_cross_entropy(logits, torch.zeros(4, 3), target)
