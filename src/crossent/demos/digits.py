r"""Softmax regression on scikit-learn's handwritten digits, trained with crossent's gradient.

The model maps an image's 64 standardized pixels :math:`x` to 10 logits :math:`z = x W + b`. Each
step of mini-batch SGD calls :func:`crossent.softmax_cross_entropy_and_grad` once, which returns
the mean cross-entropy of the batch and its closed-form gradient with respect to the logits,

.. math::

    G = \frac{\partial \bar\ell}{\partial Z} = \frac{1}{B}\left(\mathrm{softmax}(Z) - Y\right),
    \qquad Y = \mathrm{onehot}(y),

and the chain rule through :math:`Z = X W + b` is written out by hand in numpy:

.. math::

    \frac{\partial \bar\ell}{\partial W} = X^\top G + \lambda W, \qquad
    \frac{\partial \bar\ell}{\partial b} = \mathbf{1}^\top G

(:math:`\lambda` is an L2 penalty :math:`\tfrac{\lambda}{2}\lVert W \rVert^2`, the counterpart of
scikit-learn's default regularization). No autograd anywhere. The held-out cross-entropy is
compared with scikit-learn's :class:`~sklearn.linear_model.LogisticRegression` (multinomial,
L-BFGS) fitted on the same split, whose logits are its ``decision_function``.

Needs scikit-learn (the ``crossent[demo]`` extra); the data ships with it (1797 8x8 images).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import crossent as ce

__all__ = ["loss_and_grads", "train_digits"]


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale every pixel to zero mean and unit variance on the training images (constant pixels,
    such as the always-blank corners, are only centred)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    return (train - mean) / std, (test - mean) / std


def loss_and_grads(
    w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, weight_decay: float
) -> tuple[float, np.ndarray, np.ndarray]:
    r"""Mean cross-entropy of ``softmax(x @ w + b)`` against ``y`` and its gradients in ``w``, ``b``.

    The loss returned is the cross-entropy alone; the gradient of ``w`` includes the L2 term
    :math:`\lambda W`. Shapes: ``w`` ``[features, classes]``, ``b`` ``[classes]``, ``x``
    ``[batch, features]``, ``y`` ``[batch]`` integer labels.

    >>> w, b = np.zeros((2, 3)), np.zeros(3)
    >>> loss, gw, gb = loss_and_grads(w, b, np.array([[1.0, 2.0]]), np.array([0]), 0.0)
    >>> round(loss, 4), gb.round(4).tolist()  # ln 3; softmax - onehot = [1/3 - 1, 1/3, 1/3]
    (1.0986, [-0.6667, 0.3333, 0.3333])
    """
    loss, g = ce.softmax_cross_entropy_and_grad(x @ w + b, y)  # g = (softmax - onehot) / batch
    # Chain rule through logits = x @ w + b, by hand.
    grad_w = x.T @ g + weight_decay * w
    grad_b = g.sum(axis=0)
    return float(loss), grad_w, grad_b


def train_digits(
    *,
    epochs: int = 30,
    lr: float = 0.1,
    batch_size: int = 32,
    weight_decay: float = 1e-3,
    test_size: float = 0.25,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    r"""Train a softmax classifier on the digits by mini-batch SGD; return the measurements.

    The split is stratified and seeded; batches are reshuffled every epoch with the same seed.
    The training loss of an epoch is the mean cross-entropy (nats) of the whole training set
    after that epoch, computed with :func:`crossent.softmax_cross_entropy` (no penalty term).

    Args:
      epochs: passes over the training set (>= 1).
      lr: SGD step size (> 0).
      batch_size: images per step (>= 1).
      weight_decay: L2 coefficient :math:`\lambda` on ``W`` (>= 0).
      test_size: held-out fraction of the 1797 images, in (0, 1).
      seed: seeds the split, the initialization and the shuffling.
      on_epoch: called as ``on_epoch(epoch, train_loss)`` after each epoch (epoch from 1).
      on_batch: called as ``on_batch(step, total_steps)`` after each SGD step (step from 1).

    Returns:
      A dict with ``train_loss`` (one float per epoch), ``test_cross_entropy_nats``,
      ``test_cross_entropy_bits``, ``test_perplexity``, ``test_accuracy``, the same four for
      scikit-learn's LogisticRegression as ``sklearn_*``, ``uniform_cross_entropy_nats``
      (``ln 10``, the loss of guessing), the sizes ``n_train``, ``n_test``, ``n_features``,
      ``n_classes``, ``steps`` and the wall time ``seconds`` (SGD part only).

    Example:
      >>> r = train_digits(epochs=3, seed=0)
      >>> r["train_loss"][-1] < r["train_loss"][0] < r["uniform_cross_entropy_nats"]
      True
      >>> r["test_accuracy"] > 0.9
      True
    """
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must lie in (0, 1), got {test_size!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits demo needs scikit-learn: pip install 'crossent[demo]'"
        ) from exc

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    x_train, x_test = _standardize(x_train, x_test)
    n_train, n_features = x_train.shape
    n_classes = int(labels.max()) + 1

    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.01, size=(n_features, n_classes))
    b = np.zeros(n_classes)

    train_loss: list[float] = []
    steps = 0
    total_steps = epochs * -(-n_train // batch_size)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n_train)
        for begin in range(0, n_train, batch_size):
            rows = order[begin : begin + batch_size]
            _, grad_w, grad_b = loss_and_grads(w, b, x_train[rows], y_train[rows], weight_decay)
            w -= lr * grad_w
            b -= lr * grad_b
            steps += 1
            if on_batch is not None:
                on_batch(steps, total_steps)
        loss = float(ce.softmax_cross_entropy(x_train @ w + b, y_train))
        train_loss.append(loss)
        if on_epoch is not None:
            on_epoch(epoch, loss)
    seconds = time.perf_counter() - start

    test_logits = x_test @ w + b
    result: dict[str, Any] = {
        "train_loss": train_loss,
        **_held_out("test", test_logits, y_test),
        "uniform_cross_entropy_nats": math.log(n_classes),
        "n_train": int(n_train),
        "n_test": int(x_test.shape[0]),
        "n_features": int(n_features),
        "n_classes": n_classes,
        "steps": steps,
        "seconds": seconds,
    }

    # The comparison: the same model class, fitted to convergence by L-BFGS. Its C is matched to
    # weight_decay where that is positive: sklearn minimizes ||W||^2 / 2 + C * sum of losses,
    # i.e. n_train * C = 1 / weight_decay per mean loss.
    c = 1.0 / (weight_decay * n_train) if weight_decay > 0 else 1e6
    # One thread: on 1347 x 64 inputs OpenMP/BLAS threads only add overhead, and on a loaded
    # machine their spin-waits made this fit 40x slower (5 s instead of 0.13 s).
    with threadpool_limits(limits=1):
        reference = LogisticRegression(C=c, max_iter=5000).fit(x_train, y_train)
    result.update(_held_out("sklearn_test", reference.decision_function(x_test), y_test))
    result["sklearn_C"] = c
    return result


def _held_out(prefix: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    nats = float(ce.softmax_cross_entropy(logits, labels))
    return {
        f"{prefix}_cross_entropy_nats": nats,
        f"{prefix}_cross_entropy_bits": float(ce.softmax_cross_entropy(logits, labels, base=2)),
        f"{prefix}_perplexity": math.exp(nats),
        f"{prefix}_accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)),
    }
