"""Peak memory of `crossent score` follows the batch size, not the file size.

Each measurement runs the command in a fresh subprocess that reports its own peak RSS after
scoring: ``VmHWM`` from /proc/self/status, the high-water mark of this process image's memory.
(``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: Linux carries the forking parent's peak across
exec into it, so under pytest it reports pytest's own ~200 MiB.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

_MEASURE = """
import json, sys
from crossent.cli.main import main
main(sys.argv[1:], standalone_mode=False)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_kib": hwm}), file=sys.stderr)
"""


def write_logits(path, rows: int, classes: int = 16, row_group: int = 131072, seed: int = 0):
    """float32 logits l0..l{classes-1} and int64 labels y, written row group by row group."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, row_group):
        n = min(row_group, rows - start)
        z = rng.standard_normal((n, classes), dtype=np.float32)
        y = rng.integers(0, classes, n)
        table = pa.table({**{f"l{k}": z[:, k] for k in range(classes)}, "y": y})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def peak_rss_bytes(path, *extra):
    cmd = [sys.executable, "-c", _MEASURE, "score", str(path), "--target", "y",
           "--logits", "l*", "--format", "json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    return json.loads(done.stderr.strip().splitlines()[-1])["peak_rss_kib"] * 1024, rows


def test_peak_memory_does_not_grow_with_the_file(tmp_path):
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    write_logits(small, 300_000)
    write_logits(big, 1_500_000)  # 96 MB of float32 logits
    small_rss, n_small = peak_rss_bytes(small)
    big_rss, n_big = peak_rss_bytes(big)
    assert (n_small, n_big) == (300_000, 1_500_000)
    raw_growth = (n_big - n_small) * 16 * 4
    # 5x the rows, 77 MB more logits: the peak may move by allocator noise, not with the data
    assert big_rss - small_rss < 0.15 * raw_growth, (small_rss, big_rss)


@pytest.mark.slow
def test_4m_by_16_float32_under_60_percent_of_raw(tmp_path):
    path = tmp_path / "logits.parquet"
    write_logits(path, 4_000_000)
    raw = 4_000_000 * 16 * 4
    rss, rows = peak_rss_bytes(path)
    assert rows == 4_000_000
    assert rss < 0.6 * raw, f"peak RSS {rss / 2**20:.1f} MiB, raw logits {raw / 2**20:.1f} MiB"
