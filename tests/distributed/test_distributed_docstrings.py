"""The docstring examples of crossent.distributed run (in a subprocess: they create a process
group of one, which must not leak into the test process)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import doctest
import crossent.distributed.partition as partition
import crossent.distributed.vocab_parallel as vocab_parallel
total = 0
for module in (partition, vocab_parallel):
    result = doctest.testmod(module)
    assert result.failed == 0, (module.__name__, result)
    total += result.attempted
print(total)
"""


def test_docstring_examples():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout.split()[-1]) >= 16  # examples attempted: none were skipped


def test_documented_table_size_is_the_table_size():
    """The README and the module docstring give the step-0 table's size, in both modes; it is
    ``len(_FIELDS)`` (the collectives' tests check that the all-gather sends that many int64)."""
    import re
    from pathlib import Path

    import crossent.distributed.vocab_parallel as vocab_parallel

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (in_readme,) = re.findall(r"carries a (\d+)-number table per rank", readme)
    # the same size with and without validation (the table carries the validate flag)
    validated, fast = re.findall(r"all_gather int64\s+(\d+) W \(not per row\)", vocab_parallel.__doc__)
    assert int(in_readme) == int(validated) == int(fast) == len(vocab_parallel._FIELDS) == 17
    assert "in a 17-number table per rank" in readme
    # the README names step 0b and the host reads of validation, and none without it
    assert re.search(r"all-reduce MIN of the\s+2N int64 targets", readme) and "two host reads per call" in readme
    assert "and no host sync" in readme
