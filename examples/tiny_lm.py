"""A tiny next-byte language model trained with ``crossent.torch.linear_cross_entropy``.

The text is Python's own standard library source (docstring-rich modules such as ``textwrap``,
``argparse`` and ``difflib``, found through ``sysconfig``), so nothing is downloaded. The model
reads bytes (vocabulary 256) with a small causal Transformer; its output head is the fused
linear cross-entropy, so the (batch x context x 256) logits are never held during training.

Per epoch it prints the mean training loss, the held-out loss, perplexity (e^loss) and bits
per byte (loss / ln 2), next to the held-out bits per byte of a unigram byte model fitted on the
training bytes (what a model that ignores context achieves), and it writes a loss-curve PNG.

    python examples/tiny_lm.py                      # about 1 minute on 2 idle CPU cores
    python examples/tiny_lm.py --epochs 1 --steps-per-epoch 10 --plot /tmp/curve.png
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

import crossent.torch as cet

MODULES = ["textwrap", "argparse", "difflib", "fractions", "heapq", "shlex", "string", "bisect"]


def load_stdlib_text(max_bytes: int) -> bytes:
    """The sources of MODULES, concatenated (at most max_bytes)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for name in MODULES:
        path = stdlib / f"{name}.py"
        if path.exists():
            chunks.append(path.read_bytes())
    data = b"\n".join(chunks)
    if len(data) < 10_000:
        raise RuntimeError(f"found only {len(data)} bytes of standard-library source in {stdlib}")
    return data[:max_bytes]


class TinyByteLM(nn.Module):
    """Byte embedding + learned positions + a causal Transformer encoder; returns hidden states.

    The output projection ``self.head`` is applied by the loss (linear_cross_entropy), not here.
    """

    def __init__(self, context: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.norm(h)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        return cet.linear_cross_entropy(
            self(tokens), self.head.weight, targets, linear_bias=self.head.bias,
            reduction=reduction,
        )


def batches(data: torch.Tensor, context: int, batch_size: int, gen: torch.Generator):
    """Random windows: inputs data[i : i + context], targets shifted by one byte."""
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(context + 1)
        window = data[idx]
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def held_out_loss(model: TinyByteLM, data: torch.Tensor, context: int) -> float:
    """Mean next-byte loss (nats) over consecutive windows covering the held-out bytes."""
    model.eval()
    n = (len(data) - 1) // context
    x = data[: n * context].view(n, context)
    y = data[1 : n * context + 1].view(n, context)
    total = 0.0
    for s in range(0, n, 64):
        total += model.loss(x[s : s + 64], y[s : s + 64], reduction="sum").item()
    model.train()
    return total / (n * context)


def unigram_bits_per_byte(train: torch.Tensor, test: torch.Tensor) -> float:
    """Held-out cross-entropy (bits/byte) of byte frequencies fitted on train (add-one)."""
    counts = torch.bincount(train, minlength=256).double() + 1.0
    logq = (counts / counts.sum()).log()
    return float(-logq[test].mean() / math.log(2))


def plot_curve(path: str, step_losses: list[float], epoch_points: list[tuple[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(step_losses) + 1), [v / math.log(2) for v in step_losses],
            lw=0.8, label="train (per step)")
    if epoch_points:
        steps, losses = zip(*epoch_points, strict=True)
        ax.plot(steps, [v / math.log(2) for v in losses], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("tiny byte LM, loss = crossent.torch.linear_cross_entropy")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=96)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-bytes", type=int, default=400_000)
    p.add_argument("--held-out-bytes", type=int, default=16_384,
                   help="evaluate on at most this many held-out bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch intra-op threads")
    p.add_argument("--plot", default="out/tiny_lm_loss.png",
                   help="where to write the loss-curve PNG (default: out/, git-ignored)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    raw = load_stdlib_text(args.max_bytes)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    train, test = data[:split], data[split : split + args.held_out_bytes + 1]
    print(f"text: {len(raw)} bytes of Python {sys.version.split()[0]} stdlib source "
          f"({', '.join(MODULES)}); train {len(train)}, held-out {len(test)}")
    unigram = unigram_bits_per_byte(train, test)
    print(f"baselines: uniform 8.000 bits/byte, unigram {unigram:.3f} bits/byte (held-out)")

    model = TinyByteLM(args.context, args.dim, args.layers, args.heads)
    total_steps = args.epochs * args.steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(total_steps, 1),
                                                pct_start=0.1)
    stream = batches(train, args.context, args.batch_size, torch.Generator().manual_seed(args.seed))
    step_losses: list[float] = []
    epoch_points: list[tuple[int, float]] = []
    history = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_sum = 0.0
        for _ in range(args.steps_per_epoch):
            x, y = next(stream)
            loss = model.loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step_losses.append(loss.item())
            epoch_sum += step_losses[-1]
        test_loss = held_out_loss(model, test, args.context)
        epoch_points.append((len(step_losses), test_loss))
        row = dict(
            epoch=epoch,
            train_loss=epoch_sum / max(args.steps_per_epoch, 1),
            held_out_loss=test_loss,
            perplexity=math.exp(test_loss),
            bits_per_byte=test_loss / math.log(2),
        )
        history.append(row)
        print(f"epoch {epoch}: train loss {row['train_loss']:.4f} nats | held-out loss "
              f"{test_loss:.4f} nats, perplexity {row['perplexity']:.3f}, "
              f"{row['bits_per_byte']:.3f} bits/byte | {time.perf_counter() - start:.0f} s")
    plot_curve(args.plot, step_losses, epoch_points)
    print(f"loss curve: {args.plot}")
    return dict(history=history, unigram_bits_per_byte=unigram, plot=args.plot)


if __name__ == "__main__":
    main()
