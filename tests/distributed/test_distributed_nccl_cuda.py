"""Vocab-parallel losses on a CUDA GPU over NCCL: one rank holding the whole vocabulary.

One GPU allows one NCCL rank (NCCL refuses two ranks on one device), so this checks what the
gloo tests on the CPU cannot: the CUDA path itself. The logits version's local math runs in
crossent.triton's compiled kernels, the collectives run over NCCL, and the linear version's input
gradient is summed in float32 (``torch.mm(out_dtype=)`` where this PyTorch has it). Results are
compared with F.cross_entropy on the same CUDA tensors: in float32 to 1e-5, and in bfloat16 the
gradient errors against the float64 truth stay within those of PyTorch's own bfloat16 autograd.
On CUDA ``validate`` defaults to False: both versions run forward and backward without a host
sync (``torch.cuda.set_sync_debug_mode("error")``). Skipped, with the reason, without a CUDA GPU,
NCCL or triton.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SKIP_REASON = None
if not torch.cuda.is_available():
    SKIP_REASON = "needs a CUDA GPU"
elif not dist.is_nccl_available():
    SKIP_REASON = "needs torch.distributed with NCCL"
elif importlib.util.find_spec("triton") is None:
    SKIP_REASON = "needs triton (the CUDA path of the logits version)"

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


@pytest.fixture(scope="module")
def nccl(tmp_path_factory):
    store = tmp_path_factory.mktemp("nccl") / "store"
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("options", [
    {},
    {"reduction": "sum", "label_smoothing": 0.1},
    {"reduction": "none", "z_loss": 1e-3},
])  # fmt: skip
def test_logits_version_float32_matches_torch(nccl, options):
    from crossent.distributed import vocab_parallel_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(257, 4099, device="cuda", generator=gen) * 3
    t = torch.randint(0, 4099, (257,), device="cuda", generator=gen)
    t[::7] = -100
    x = z.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, t, **options)
    (loss.sum() if loss.ndim else loss).backward()
    zl = options.get("z_loss", 0.0)
    opts = {k: v for k, v in options.items() if k != "z_loss"}
    r = z.clone().requires_grad_()
    ref = F.cross_entropy(r, t, **opts)
    if zl:
        valid = t != -100
        ref = ref + zl * torch.logsumexp(r, dim=1) ** 2 * valid
    (ref.sum() if ref.ndim else ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-5, atol=1e-7)


def test_bfloat16_gradients_no_worse_than_torch(nccl):
    from crossent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(1)
    e = torch.randn(512, 256, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(32003, 256, device="cuda", generator=gen) / 16).to(torch.bfloat16)
    t = torch.randint(0, 32003, (512,), device="cuda", generator=gen)
    t[::10] = -100

    def grads(fn, *args):
        leaves = [a.clone().requires_grad_() for a in args]
        fn(*leaves).backward()
        return [leaf.grad for leaf in leaves]

    truth = grads(lambda a, b: F.cross_entropy(a @ b.T, t), e.double(), w.double())
    eager = grads(lambda a, b: F.cross_entropy((a @ b.T).float(), t), e, w)
    ours = grads(lambda a, b: vocab_parallel_linear_cross_entropy(a, b, t), e, w)
    for i in range(2):
        assert _rel(ours[i], truth[i]) <= 1.1 * _rel(eager[i], truth[i]) + 1e-6, (i, _rel(ours[i], truth[i]))

    z = (e @ w.T).detach()
    truth_z = grads(lambda a: F.cross_entropy(a, t), z.double())[0]
    eager_z = grads(lambda a: F.cross_entropy(a.float(), t), z)[0]
    ours_z = grads(lambda a: vocab_parallel_cross_entropy(a, t), z)[0]
    assert ours_z.dtype == torch.bfloat16
    assert _rel(ours_z, truth_z) <= 1.1 * _rel(eager_z, truth_z) + 1e-6


def test_default_on_cuda_makes_no_host_sync(nccl):
    """On CUDA ``validate`` defaults to False: forward and backward of both versions run under
    ``torch.cuda.set_sync_debug_mode("error")`` (any synchronizing CUDA call raises), with the
    tensors of ``validate=True``; that one does synchronize (the positive control)."""
    from crossent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(2)
    z = torch.randn(65, 1003, device="cuda", generator=gen) * 2
    e = torch.randn(65, 48, device="cuda", generator=gen)
    w = torch.randn(1003, 48, device="cuda", generator=gen) / 4
    t = torch.randint(0, 1003, (65,), device="cuda", generator=gen)
    t[::5] = -100

    def step(**validate):
        x = z.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, t, label_smoothing=0.1, **validate)
        loss.backward()
        a, b = e.clone().requires_grad_(), w.clone().requires_grad_()
        linear = vocab_parallel_linear_cross_entropy(a, b, t, z_loss=1e-4, softcap=20.0, **validate)
        linear.backward()
        return [loss.detach(), x.grad, linear.detach(), a.grad, b.grad]

    step()  # warm-up: the NCCL communicator, Triton's compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        quiet = step()
        with pytest.raises(RuntimeError, match="synchroniz"):
            step(validate=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    checked = step(validate=True)
    for got, want in zip(quiet, checked, strict=True):
        torch.testing.assert_close(got, want)  # the same math; cuBLAS may pick other kernels
