"""Run one linear cross-entropy fwd+bwd and print its peak-RSS growth (run as a subprocess).

usage: python _torch_memory_probe.py IMPL N D V [CHUNK_SIZE]
IMPL is an impl of cet.linear_cross_entropy ("chunked", "reference") or "composition"
(F.cross_entropy(x @ w.T, y)) or "native" (torch.nn.functional.linear_cross_entropy, reference
path).
Prints one line: "<extra_bytes> <logits_bytes> <seconds>", where extra_bytes is the process's
peak resident set during the call (VmHWM, reset just before it) minus its resident set before the
call, after the inputs, their gradient buffers and a small warm-up call exist.
"""

import sys
import time
from pathlib import Path

import torch

import crossent.torch as cet


def main() -> None:
    # The peak-RSS reset and reading of the CPU benchmarks (benchmarks/_cpu.py), so that this test
    # and bench_linear_ce_cpu.py measure alike; imported here, not at module level, so that
    # pytest's doctest collection of this file leaves sys.path alone.
    sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _cpu import peak_rss_bytes, reset_peak_rss

    impl, n, d, v = sys.argv[1], *map(int, sys.argv[2:5])
    chunk_size = int(sys.argv[5]) if len(sys.argv) > 5 else None

    def loss_fn(x, w, y):
        if impl == "composition":
            return torch.nn.functional.cross_entropy(x @ w.T, y)
        if impl == "native":
            return torch.nn.functional.linear_cross_entropy(x, w, y)
        return cet.linear_cross_entropy(x, w, y, impl=impl, chunk_size=chunk_size)

    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,))
    # Warm-up on a small problem (thread pools, allocator caches), and gradient buffers in place.
    small = loss_fn(x[:8], w[:1000], y[:8] % 1000)
    small.backward()
    x.grad.zero_()
    w.grad.zero_()
    before = reset_peak_rss()
    start = time.perf_counter()
    loss = loss_fn(x, w, y)
    loss.backward()
    seconds = time.perf_counter() - start
    extra = peak_rss_bytes() - before
    assert torch.isfinite(loss)
    print(extra, n * v * 4, f"{seconds:.2f}")


if __name__ == "__main__":
    main()
