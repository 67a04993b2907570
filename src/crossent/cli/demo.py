"""``crossent demo``: train a softmax classifier on the digits with crossent's loss and gradient.

The training itself is :func:`crossent.demos.digits.train_digits`; this module only parses the
options, shows progress (a rich progress bar on stderr when stderr is a terminal) and prints the
per-epoch training loss and the held-out comparison with scikit-learn on stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

__all__ = ["demo"]


@click.command(name="demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Passes over the training images.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1,
              show_default=True, help="SGD step size.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per SGD step.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-3, show_default=True,
              help="L2 penalty (lambda / 2) ||W||^2 on the weights; scikit-learn gets the same.")
@click.option("--test-size", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              default=0.25, show_default=True, help="Held-out fraction of the 1797 images.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the split, the initialization and the shuffling.")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-epoch lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def demo(epochs: int, lr: float, batch_size: int, weight_decay: float, test_size: float,
         seed: int, quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Train a softmax classifier on scikit-learn's handwritten digits by mini-batch SGD.

    Every step uses only crossent.softmax_cross_entropy_and_grad (the closed-form gradient
    softmax - one-hot), chained to the weights by hand in numpy. Prints the training loss per
    epoch, the held-out cross-entropy in nats and bits and the accuracy, next to scikit-learn's
    LogisticRegression fitted on the same split.
    """
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            "the demo needs scikit-learn: pip install 'crossent[demo]'"
        ) from exc
    from crossent.demos.digits import train_digits

    echo = (lambda *a, **k: None) if (quiet or as_json) else click.echo
    echo("Softmax regression on scikit-learn's handwritten digits (8x8 images, 10 classes),")
    echo(f"mini-batch SGD: {epochs} epochs, batch {batch_size}, lr {lr}, weight decay "
         f"{weight_decay}, seed {seed}.")  # fmt: skip
    echo("Loss and gradient: crossent.softmax_cross_entropy_and_grad (softmax - one-hot).")
    echo("")
    echo("epoch  train loss (nats)")

    def on_epoch(epoch: int, loss: float) -> None:
        # print (not click.echo) so that rich's live display, when shown, puts it above the bar
        if not (quiet or as_json):
            print(f"{epoch:5d}  {loss:.4f}", flush=True)

    kwargs: dict[str, Any] = dict(epochs=epochs, lr=lr, batch_size=batch_size,
                                  weight_decay=weight_decay, test_size=test_size, seed=seed,
                                  on_epoch=on_epoch)  # fmt: skip
    if quiet or as_json or not sys.stderr.isatty():
        result = train_digits(**kwargs)
    else:
        result = _train_with_progress_bar(kwargs)

    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo("")
    click.echo(f"held-out images: {result['n_test']} (trained on {result['n_train']})")
    rows = [
        ("", "crossent SGD", "sklearn LogisticRegression"),
        ("cross-entropy (nats)", f"{result['test_cross_entropy_nats']:.4f}",
         f"{result['sklearn_test_cross_entropy_nats']:.4f}"),
        ("cross-entropy (bits)", f"{result['test_cross_entropy_bits']:.4f}",
         f"{result['sklearn_test_cross_entropy_bits']:.4f}"),
        ("perplexity", f"{result['test_perplexity']:.4f}",
         f"{result['sklearn_test_perplexity']:.4f}"),
        ("accuracy", f"{result['test_accuracy']:.4f}", f"{result['sklearn_test_accuracy']:.4f}"),
    ]  # fmt: skip
    for name, ours, theirs in rows:
        click.echo(f"{name:22s}{ours:>14s}{theirs:>28s}")
    uniform = result["uniform_cross_entropy_nats"]
    click.echo(f"(guessing uniformly: {uniform:.4f} nats = {uniform / 0.6931471805599453:.4f} "
               f"bits; SGD took {result['seconds']:.2f} s for {result['steps']} steps)")  # fmt: skip


def _train_with_progress_bar(kwargs: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from crossent.demos.digits import train_digits

    with Progress(TextColumn("SGD steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:  # fmt: skip
        task = progress.add_task("sgd", total=None)

        def on_batch(step: int, total: int) -> None:
            progress.update(task, completed=step, total=total)

        return train_digits(**kwargs, on_batch=on_batch)
