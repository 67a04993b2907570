"""Drop-in option types and the second-order error of crossent.distributed, in a process group of
one (in a subprocess: the group must not leak into the test process), against float64 PyTorch.

- NumPy scalars and 0-d tensors as ``ignore_index``, ``label_smoothing``, ``z_loss``, ``softcap``
  give the loss of the Python numbers (and F.cross_entropy's where torch has the option); bool and
  floats for ``ignore_index`` are refused by name;
- a second backward through a gradient taken with ``create_graph=True`` raises a RuntimeError
  (torch's once_differentiable let it through: the upstream gradient was a constant 1);
- ``label_smoothing=1`` with a target on a -inf logit gives crossent.core's finite loss (the
  target has no mass), not 0 * inf = NaN.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, tempfile
import numpy as np
import torch, torch.distributed as dist
import torch.nn.functional as F
from crossent.distributed import vocab_parallel_cross_entropy as vpce
from crossent.distributed import vocab_parallel_linear_cross_entropy as vplce

store = os.path.join(tempfile.mkdtemp(), "store")
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
out = {}
g = torch.Generator().manual_seed(0)
x0 = torch.randn(7, 5, generator=g, dtype=torch.float64)
t = torch.randint(0, 5, (7,), generator=g)
t[2] = 1
e0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
w0 = torch.randn(5, 3, generator=g, dtype=torch.float64)

got = vpce(x0, t, ignore_index=np.int64(1), label_smoothing=np.float32(0.1), reduction="none")
want = F.cross_entropy(x0, t, ignore_index=1, label_smoothing=np.float32(0.1), reduction="none")
out["np_scalars_vs_torch"] = (got - want).abs().max().item()
got = vpce(x0, t, ignore_index=torch.tensor(1), label_smoothing=torch.tensor(0.25), z_loss=np.float64(0.5))
want = vpce(x0, t, ignore_index=1, label_smoothing=0.25, z_loss=0.5)
out["tensor_scalars_vs_floats"] = (got - want).abs().item()
got = vplce(e0, w0, t, ignore_index=np.int32(1), softcap=np.float32(2.0), z_loss=np.float32(0.5))
z = 2.0 * torch.tanh(e0 @ w0.T / 2.0)
valid = t != 1
want = F.cross_entropy(z, t, ignore_index=1) + float(np.float32(0.5)) * torch.logsumexp(z, -1)[valid].pow(2).mean()
out["linear_np_scalars_vs_composition"] = (got - want).abs().item()

errors = {}
for name, kwargs in {
    "ignore_bool": {"ignore_index": True},
    "ignore_float": {"ignore_index": 1.0},
    "ignore_float_tensor": {"ignore_index": torch.tensor(1.0)},
    "smoothing_bool": {"label_smoothing": np.bool_(True)},
    "smoothing_range": {"label_smoothing": np.float32(1.5)},
}.items():
    try:
        vpce(x0, t, **kwargs)
        errors[name] = None
    except (TypeError, ValueError) as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
out["errors"] = errors

second = {}
x = x0.clone().requires_grad_()
(gx,) = torch.autograd.grad(vpce(x, t), x, create_graph=True)
xr = x0.clone().requires_grad_()
(gr,) = torch.autograd.grad(F.cross_entropy(xr, t), xr)
out["first_order_vs_torch"] = (gx.detach() - gr).abs().max().item()
e, w = e0.clone().requires_grad_(), w0.clone().requires_grad_()
(ge,) = torch.autograd.grad(vplce(e, w, t), e, create_graph=True)
for name, fn in {
    "ce_backward": lambda: (100 * gx.pow(2).sum() + x.sum()).backward(),
    "ce_grad": lambda: torch.autograd.grad(gx.pow(2).sum(), x),
    "linear_backward": lambda: ge.pow(2).sum().backward(),
    "linear_grad_w": lambda: torch.autograd.grad(ge.pow(2).sum(), w),
}.items():
    try:
        fn()
        second[name] = None
    except RuntimeError as exc:
        second[name] = str(exc)
out["second_order"] = second

# label_smoothing=1 with the target on a -inf logit: the target has no mass, 0 (not 0 * inf).
import crossent as ce
xm = np.array([[0.5, -1.0, -np.inf, 2.0], [0.1, 0.2, 0.3, -np.inf]])
ym = np.array([2, 0])
want = ce.softmax_cross_entropy(xm, ym, label_smoothing=1.0, reduction="none")
got = vpce(torch.from_numpy(xm), torch.from_numpy(ym), label_smoothing=1.0, reduction="none")
out["full_smoothing_minus_inf_target"] = [got.tolist(), want.tolist()]
dist.destroy_process_group()
print(json.dumps(out))
"""


def _run() -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_numpy_scalar_options_and_second_order_error():
    out = _run()
    assert out["np_scalars_vs_torch"] <= 1e-12
    assert out["tensor_scalars_vs_floats"] == 0.0
    assert out["linear_np_scalars_vs_composition"] <= 1e-12
    errors = out["errors"]
    expected = {
        "ignore_bool": "TypeError: vocab_parallel_cross_entropy: rank 0: ignore_index must be an int, got True",
        "ignore_float": "TypeError: vocab_parallel_cross_entropy: rank 0: ignore_index must be an int, got 1.0",
        "ignore_float_tensor": "ignore_index must be an int, got tensor(1.)",
        "smoothing_bool": "TypeError: vocab_parallel_cross_entropy: rank 0: label_smoothing must be a float",
        "smoothing_range":
            "ValueError: vocab_parallel_cross_entropy: rank 0: label_smoothing must be in [0, 1], got 1.5",
    }
    for name, text in expected.items():
        assert errors[name] and text in errors[name], (name, errors[name])
    assert out["first_order_vs_torch"] <= 1e-12
    got, want = out["full_smoothing_minus_inf_target"]
    assert all(math.isfinite(v) for v in want)
    assert got == pytest.approx(want, rel=1e-12)
    second = out["second_order"]
    for name, fn in (
        ("ce_backward", "vocab_parallel_cross_entropy"),
        ("ce_grad", "vocab_parallel_cross_entropy"),
        ("linear_backward", "vocab_parallel_linear_cross_entropy"),
        ("linear_grad_w", "vocab_parallel_linear_cross_entropy"),
    ):
        assert second[name] and f"{fn} cannot be differentiated twice" in second[name], (name, second[name])
