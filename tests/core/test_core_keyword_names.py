"""DESIGN.md's public API names are a contract ("tests outside this repo call them"): every core
function takes its array arguments by the names it lists, as keywords too, with the same result
as positionally. A deliberate departure from STYLE.md item 2 (data arguments positional-only),
which DESIGN.md's signatures (``ce.entropy(p, *, axis=-1, base=None)``) do not show: a caller
writing ``ce.log_loss(probs=p, targets=y)`` from the contract would get a TypeError."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import crossent as ce

RNG = np.random.default_rng(5)
LOGITS = RNG.standard_normal((6, 4))
PROBS = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
LABELS = np.array([0, 1, 2, 3, 0, 1])
BINARY_P = np.array([0.2, 0.7, 0.9])
BINARY_Y = np.array([0.0, 1.0, 1.0])

# DESIGN.md, "Public API": the function, its array arguments by name, in order.
CASES = [
    (ce.entropy, {"p": PROBS}),
    (ce.cross_entropy, {"p": PROBS, "q": PROBS[::-1].copy()}),
    (ce.kl_divergence, {"p": PROBS, "q": PROBS[::-1].copy()}),
    (ce.softmax_cross_entropy, {"logits": LOGITS, "targets": LABELS}),
    (ce.softmax_cross_entropy_and_grad, {"logits": LOGITS, "targets": PROBS}),
    (ce.log_loss, {"probs": PROBS, "targets": LABELS}),
    (ce.binary_cross_entropy, {"probs": BINARY_P, "targets": BINARY_Y}),
    (ce.binary_cross_entropy_with_logits, {"logits": BINARY_P - 0.5, "targets": BINARY_Y}),
    (ce.binary_cross_entropy_with_logits_and_grad, {"logits": BINARY_P - 0.5, "targets": BINARY_Y}),
]


@pytest.mark.parametrize(("f", "arrays"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_array_arguments_by_design_names(f, arrays):
    params = list(inspect.signature(f).parameters.values())
    assert [p.name for p in params[: len(arrays)]] == list(arrays)
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[: len(arrays)])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[len(arrays):])
    by_position = f(*arrays.values())
    by_name = f(**arrays)
    for a, b in zip(np.atleast_1d(by_position) if not isinstance(by_position, tuple) else by_position,
                    np.atleast_1d(by_name) if not isinstance(by_name, tuple) else by_name, strict=True):
        np.testing.assert_array_equal(a, b)


# The *_and_grad functions take no reduction="none" (no gradient of an unreduced loss): those
# pairs are left out of the parametrization rather than generated and skipped.
_WITH_GRAD = (ce.softmax_cross_entropy_and_grad, ce.binary_cross_entropy_with_logits_and_grad)
REDUCTION_CASES = [
    pytest.param(f, arrays, reduction, id=f"{f.__name__}-{reduction}")
    for f, arrays in CASES[3:]
    for reduction in ("mean", "sum", "none")
    if not (f in _WITH_GRAD and reduction == "none")
]


@pytest.mark.parametrize(("f", "arrays", "reduction"), REDUCTION_CASES)
def test_numpy_losses_are_arrays_for_every_reduction(f, arrays, reduction):
    """A reduced numpy loss is a 0-d ndarray for "sum" as for "mean" (numpy's sum returned a
    NumPy scalar there), as the docstrings say; "none" keeps the batch shape."""
    out = f(*arrays.values(), reduction=reduction)
    loss = out[0] if isinstance(out, tuple) else out
    assert type(loss) is np.ndarray
    assert loss.ndim == (0 if reduction != "none" else len(next(iter(arrays.values())).shape) - (
        1 if f in (ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad, ce.log_loss) else 0))
