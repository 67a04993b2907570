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
