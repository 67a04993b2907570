"""Vocab-parallel cross-entropy (logits version) with its local math in crossent.triton's kernels.

Two gloo ranks on the CPU run the kernels through Triton's interpreter: the parent sets
CROSSENT_VOCAB_PARALLEL_TRITON=1 (the private switch that lets CPU tensors take the Triton path)
before spawning, and the ranks inherit it with TRITON_INTERPRET=1 (``make test`` sets that for the
whole suite). The checks themselves live in crossent_distributed_workers.check_triton_logits.
Skipped, with the reason, without triton or without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the spawned ranks import the worker module by this name

from test_distributed_vocab_parallel import run_ranks  # noqa: E402 - spawns and joins the ranks

pytestmark = pytest.mark.slow  # spawns processes

SKIP_REASON = None
if importlib.util.find_spec("triton") is None:
    SKIP_REASON = "triton is not installed: the Triton path of vocab_parallel_cross_entropy needs it"
elif os.environ.get("TRITON_INTERPRET") != "1":
    SKIP_REASON = "TRITON_INTERPRET=1 is not set: the ranks could not run the kernels on the CPU"


@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_triton_partials_match_single_process_reference(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSENT_VOCAB_PARALLEL_TRITON", "1")  # inherited by the spawned ranks
        ranks = run_ranks(tmp_path, 2, [("check_triton_logits", ([22, 15], [0, 13]))])
    assert [report["check_triton_logits"] for report in ranks] == [36 * 4 + 3 * 5 + 2 + 4 + 4 + 2 * 3 + 1] * 2
