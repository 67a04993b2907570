"""A language-model loss head split by vocabulary across processes (tensor parallelism).

Each rank holds a contiguous slice of the output layer (rows of W and b; the vocabulary of 1003
classes does not divide evenly, so the slices are uneven) and the same hidden states and targets.
``crossent.distributed.vocab_parallel_linear_cross_entropy`` computes the loss and the gradients
without gathering the logits; rank 0 then computes the single-process loss on the full output
layer with plain PyTorch and prints both, their difference, and the largest difference of the
hidden-state gradient and of its own weight slice's gradient.

Run on the CPU (gloo):

    torchrun --nproc-per-node 2 examples/vocab_parallel.py
    python examples/vocab_parallel.py            # a group of one process, same numbers

Options: ``--dtype float64`` (default float32), ``--rows``, ``--hidden``, ``--vocab``, and
``--repeat K`` to also time K forward+backward steps of both (median; the vocab-parallel time is
the slowest rank's, the single-process one runs on rank 0 while the others wait).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from crossent.distributed import split_vocab, vocab_offsets, vocab_parallel_linear_cross_entropy

IGNORE_INDEX = -100
LABEL_SMOOTHING = 0.1
Z_LOSS = 1e-4
SOFTCAP = 30.0


def single_process_loss(hidden, weight, bias, target):
    """The reference on one process: full logits, softcap, F.cross_entropy, z-loss written out."""
    logits = hidden @ weight.T + bias
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, label_smoothing=LABEL_SMOOTHING)
    counted = target != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    return loss + Z_LOSS * (lse[counted] ** 2).sum() / counted.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--rows", type=int, default=256, help="tokens in the batch")
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--vocab", type=int, default=1003)
    parser.add_argument("--repeat", type=int, default=0, help="time this many steps of each")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    if "RANK" in os.environ:  # started by torchrun: env:// rendezvous
        dist.init_process_group("gloo")
    else:  # plain `python`: a group of one process
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()

    # Every rank builds the same model and batch (in a real model: the same seed or a broadcast).
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, generator=gen, dtype=dtype)
    weight = torch.randn(args.vocab, args.hidden, generator=gen, dtype=dtype) / args.hidden**0.5
    bias = torch.randn(args.vocab, generator=gen, dtype=dtype) * 0.1
    target = torch.randint(0, args.vocab, (args.rows,), generator=gen)
    target[torch.rand(args.rows, generator=gen) < 0.1] = IGNORE_INDEX  # padding tokens

    sizes = split_vocab(args.vocab, world)
    offsets, _ = vocab_offsets(sizes)
    rows = slice(offsets[rank], offsets[rank] + sizes[rank])
    local_weight = weight[rows].clone().requires_grad_()
    local_bias = bias[rows].clone().requires_grad_()
    local_hidden = hidden.clone().requires_grad_()

    def parallel_step():
        loss = vocab_parallel_linear_cross_entropy(
            local_hidden,
            local_weight,
            target,
            local_bias=local_bias,
            ignore_index=IGNORE_INDEX,
            label_smoothing=LABEL_SMOOTHING,
            z_loss=Z_LOSS,
            softcap=SOFTCAP,
        )
        loss.backward()
        return loss

    loss = parallel_step()

    if rank == 0:
        ref_hidden = hidden.clone().requires_grad_()
        ref_weight = weight.clone().requires_grad_()
        reference = single_process_loss(ref_hidden, ref_weight, bias, target)
        reference.backward()
        d_hidden = (local_hidden.grad - ref_hidden.grad).abs().max().item()
        d_weight = (local_weight.grad - ref_weight.grad[rows]).abs().max().item()
        print(
            f"ranks: {world}, vocabulary {args.vocab} split {sizes}, rows {args.rows}, "
            f"hidden {args.hidden}, {args.dtype}"
        )
        print(f"vocab-parallel loss : {loss.item():.8f}")
        print(f"single-process loss : {reference.item():.8f}")
        # one unit in the last place of the loss in its dtype: the two sum in different orders,
        # so a difference of a few units is rounding
        ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(reference.item()) or 1.0))
        difference = abs(loss.item() - reference.item())
        print(f"difference          : {difference:.3e}  ({difference / ulp:.1f} units in the last "
              f"place of {args.dtype} at this loss)")
        print(f"max |d hidden grad| : {d_hidden:.3e}")
        print(f"max |d weight grad| : {d_weight:.3e}  (rank 0's slice)")

    if args.repeat > 0:
        parallel_ms = []
        for _ in range(args.repeat):
            dist.barrier()
            start = time.perf_counter()
            parallel_step()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            parallel_ms.append(1e3 * elapsed.item())
        if rank == 0:
            single_ms = []
            for _ in range(args.repeat):
                ref_hidden = hidden.clone().requires_grad_()
                ref_weight = weight.clone().requires_grad_()
                start = time.perf_counter()
                single_process_loss(ref_hidden, ref_weight, bias, target).backward()
                single_ms.append(1e3 * (time.perf_counter() - start))
            print(
                f"fwd+bwd median of {args.repeat}: vocab-parallel {statistics.median(parallel_ms):.1f} "
                f"ms, single-process {statistics.median(single_ms):.1f} ms "
                f"(threads per process: {torch.get_num_threads()})"
            )
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
