"""The digits demo: training works, the hand-chained gradient is right, the CLI prints the results.

Oracles: finite differences and torch.autograd for the gradient chained through ``x @ w + b``;
scikit-learn's own ``log_loss`` for the held-out cross-entropy of its LogisticRegression.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("sklearn")

from crossent.cli.demo import demo  # noqa: E402
from crossent.demos.digits import loss_and_grads, train_digits  # noqa: E402


@pytest.fixture(scope="module")
def short_run():
    return train_digits(epochs=4, seed=0)


def test_training_loss_falls_and_beats_guessing(short_run):
    losses = short_run["train_loss"]
    assert len(losses) == 4
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    assert losses[0] < short_run["uniform_cross_entropy_nats"] == pytest.approx(math.log(10))
    assert losses[-1] < 0.6 * losses[0]


def test_held_out_results_are_sane_next_to_sklearn(short_run):
    r = short_run
    assert r["n_train"] + r["n_test"] == 1797 and r["n_features"] == 64 and r["n_classes"] == 10
    assert r["test_accuracy"] > 0.9 and r["sklearn_test_accuracy"] > 0.9
    assert 0 < r["test_cross_entropy_nats"] < 2.5 * r["sklearn_test_cross_entropy_nats"]
    assert r["test_cross_entropy_bits"] == pytest.approx(r["test_cross_entropy_nats"] / math.log(2))
    assert r["test_perplexity"] == pytest.approx(math.exp(r["test_cross_entropy_nats"]))
    assert r["steps"] == 4 * math.ceil(r["n_train"] / 32)


def test_sklearn_number_equals_sklearns_own_log_loss(short_run):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import train_test_split
    from threadpoolctl import threadpool_limits

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0
    model = LogisticRegression(C=short_run["sklearn_C"], max_iter=5000)
    with threadpool_limits(limits=1):  # OpenMP threads only slow this small fit down
        model.fit((x_train - mean) / std, y_train)
    want = log_loss(y_test, model.predict_proba((x_test - mean) / std))
    assert short_run["sklearn_test_cross_entropy_nats"] == pytest.approx(want, rel=1e-9)


def test_gradients_chained_by_hand_equal_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(64, 10)), rng.normal(size=10)
    x, y = rng.normal(size=(29, 64)), rng.integers(0, 10, 29)
    loss, grad_w, grad_b = loss_and_grads(w, b, x, y, 0.01)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    logits = torch.from_numpy(x) @ tw + tb
    ce_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    (ce_loss + 0.005 * (tw * tw).sum()).backward()
    assert loss == pytest.approx(ce_loss.item(), rel=1e-12)
    np.testing.assert_allclose(grad_w, tw.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grad_b, tb.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_gradients_chained_by_hand_equal_finite_differences():
    rng = np.random.default_rng(5)
    w, b = rng.normal(size=(5, 4)), rng.normal(size=4)
    x, y = rng.normal(size=(7, 5)), rng.integers(0, 4, 7)
    lam = 0.1

    def objective(w_, b_):
        return loss_and_grads(w_, b_, x, y, 0.0)[0] + 0.5 * lam * np.sum(w_ * w_)

    _, grad_w, grad_b = loss_and_grads(w, b, x, y, lam)
    h = 1e-6
    for i, j in [(0, 0), (2, 3), (4, 1)]:
        e = np.zeros_like(w)
        e[i, j] = h
        fd = (objective(w + e, b) - objective(w - e, b)) / (2 * h)
        assert grad_w[i, j] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    for k in range(4):
        e = np.zeros_like(b)
        e[k] = h
        fd = (objective(w, b + e) - objective(w, b - e)) / (2 * h)
        assert grad_b[k] == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_callbacks_report_every_epoch_and_step():
    epochs, steps = [], []
    r = train_digits(epochs=2, batch_size=256, seed=1,
                     on_epoch=lambda e, loss: epochs.append((e, loss)),
                     on_batch=lambda s, total: steps.append((s, total)))  # fmt: skip
    assert [e for e, _ in epochs] == [1, 2] and [loss for _, loss in epochs] == r["train_loss"]
    assert [s for s, _ in steps] == list(range(1, r["steps"] + 1))
    assert {total for _, total in steps} == {r["steps"]}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"lr": -0.1}, "lr must be a finite number > 0, got -0.1"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0, got -1.0"),
        ({"test_size": 1.0}, r"test_size must lie in \(0, 1\), got 1.0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_digits(**kwargs)


# ---- the command ------------------------------------------------------------------------------


def test_command_prints_epochs_and_comparison():
    result = CliRunner().invoke(demo, ["--epochs", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    epoch_lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    losses = [float(parts[1]) for parts in epoch_lines if len(parts) == 2]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]
    for label in ("cross-entropy (nats)", "cross-entropy (bits)", "accuracy",
                  "sklearn LogisticRegression", "crossent SGD"):  # fmt: skip
        assert label in out
    nats_line = next(line for line in out.splitlines() if line.startswith("cross-entropy (nats)"))
    ours, theirs = (float(v) for v in nats_line.split()[-2:])
    assert 0 < ours < 2.5 * theirs


def test_command_json_and_quiet():
    runner = CliRunner()
    result = runner.invoke(demo, ["--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["train_loss"]) == 2 and data["test_accuracy"] > 0.9
    quiet = runner.invoke(demo, ["--epochs", "2", "--quiet"])
    assert quiet.exit_code == 0 and "epoch" not in quiet.output
    assert "cross-entropy (bits)" in quiet.output


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--lr", "0"], ["--batch-size", "-3"],
                                  ["--test-size", "1.5"], ["--bogus"]])  # fmt: skip
def test_command_usage_errors_exit_2(args):
    result = CliRunner().invoke(demo, args)
    assert result.exit_code == 2


@pytest.mark.slow
def test_default_demo_finishes_well_within_30_seconds():
    start = time.perf_counter()
    result = CliRunner().invoke(demo, [])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 30, f"the default demo took {elapsed:.1f} s"
