"""``ignore_index`` outside the int64 range in crossent.distributed, in a process group of one (in
a subprocess: the group must not leak into the test process): the ValueError crossent.torch gives
("ignore_index must be an int in the int64 range [-2**63, 2**63 - 1], as PyTorch takes, got
...", with the function and rank in front), for both losses, validated (through the step-0
table) or not (raised before any collective). Before: 2**70 and -2**63 - 1 were a bare
OverflowError, 2**63 (np.uint64 too) a ValueError "Overflow when unpacking long long", or with
validate=False silently accepted, matching no target. The range's ends ignore their rows as
F.cross_entropy does (the oracle)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, os, tempfile
import numpy as np
import torch, torch.distributed as dist
import torch.nn.functional as F
from crossent.distributed import vocab_parallel_cross_entropy as vpce
from crossent.distributed import vocab_parallel_linear_cross_entropy as vplce

store = os.path.join(tempfile.mkdtemp(), "store")
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
g = torch.Generator().manual_seed(0)
x = torch.randn(7, 5, generator=g, dtype=torch.float64)
e = torch.randn(7, 3, generator=g, dtype=torch.float64)
w = torch.randn(5, 3, generator=g, dtype=torch.float64)
t = torch.randint(0, 5, (7,), generator=g)
out = {"errors": {}, "ends": {}}
bad = {"2**70": 2**70, "2**63": 2**63, "np.uint64(2**63)": np.uint64(2**63), "-2**63-1": -(2**63) - 1,
       "2**64-1": 2**64 - 1, "-2**80": -(2**80)}
for label, value in bad.items():
    for validate in (None, True, False):
        for name, fn in (("ce", lambda **k: vpce(x, t, **k)), ("linear", lambda **k: vplce(e, w, t, **k))):
            try:
                fn(ignore_index=value, validate=validate)
                got = None
            except Exception as exc:
                got = [type(exc).__name__, str(exc)]
            out["errors"][f"{label}/{validate}/{name}"] = [str(int(value)), got]
for label, value in {"max": 2**63 - 1, "min": -(2**63), "np_max": np.int64(2**63 - 1)}.items():
    y = t.clone()
    y[[1, 4]] = int(value)
    for validate in (None, False):
        for reduction in ("none", "mean", "sum"):
            want = F.cross_entropy(x, y, ignore_index=int(value), reduction=reduction)
            got = vpce(x, y, ignore_index=value, reduction=reduction, validate=validate)
            got_lin = vplce(e, w, y, ignore_index=value, reduction=reduction, validate=validate)
            want_lin = F.cross_entropy(e @ w.T, y, ignore_index=int(value), reduction=reduction)
            out["ends"][f"{label}/{validate}/{reduction}"] = [
                (got - want).abs().max().item(), (got_lin - want_lin).abs().max().item(),
            ]
dist.destroy_process_group()
print(json.dumps(out))
"""

NAMES = {"ce": "vocab_parallel_cross_entropy", "linear": "vocab_parallel_linear_cross_entropy"}


def test_ignore_index_outside_int64_is_the_value_error_of_crossent_torch():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out["errors"]) == 6 * 3 * 2
    for key, (value, got) in out["errors"].items():
        validate, name = key.split("/")[1:]
        assert got is not None, key
        kind, text = got
        assert kind == "ValueError", (key, got)
        head = (f"{NAMES[name]}: rank 0: ignore_index must be an int in the int64 range "
                f"[-2**63, 2**63 - 1], as PyTorch takes, got {value}")
        assert text.startswith(head), (key, text)
        tail = "(raised on every rank)" if validate != "False" else "(validate=False: raised on this rank only"
        assert tail in text, (key, text)
    assert len(out["ends"]) == 3 * 2 * 3
    for key, (ce, linear) in out["ends"].items():
        assert ce <= 1e-12 and linear <= 1e-12, (key, ce, linear)
