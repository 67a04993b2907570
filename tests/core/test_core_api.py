"""The public core API: names and signatures as DESIGN.md lists them, each backend's own array
type back, autograd through torch and jax, the textbook example, and the docstrings' doctests."""

from __future__ import annotations

import doctest
import importlib
import inspect
import math
import pkgutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce

KW = inspect.Parameter.KEYWORD_ONLY
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

SOFTMAX_OPTIONS = {
    "axis": -1,
    "weight": None,
    "sample_weight": None,
    "ignore_index": None,
    "label_smoothing": 0.0,
    "z_loss": 0.0,
    "softcap": None,
    "reduction": "mean",
    "base": None,
}
BCE_LOGITS_OPTIONS = {
    "weight": None,
    "pos_weight": None,
    "label_smoothing": 0.0,
    "reduction": "mean",
    "base": None,
}
CONTRACT = {
    "entropy": (1, {"axis": -1, "base": None}),
    "cross_entropy": (2, {"axis": -1, "base": None}),
    "kl_divergence": (2, {"axis": -1, "base": None}),
    "softmax_cross_entropy": (2, SOFTMAX_OPTIONS),
    "softmax_cross_entropy_and_grad": (2, SOFTMAX_OPTIONS),
    "log_loss": (
        2,
        {
            "axis": -1,
            "eps": "auto",
            "normalize": False,
            "weight": None,
            "sample_weight": None,
            "ignore_index": None,
            "reduction": "mean",
            "base": None,
        },
    ),
    "binary_cross_entropy": (
        2,
        {"eps": "auto", "weight": None, "pos_weight": None, "reduction": "mean", "base": None},
    ),
    "binary_cross_entropy_with_logits": (2, BCE_LOGITS_OPTIONS),
    "binary_cross_entropy_with_logits_and_grad": (2, BCE_LOGITS_OPTIONS),
}


@pytest.mark.parametrize("name", list(CONTRACT))
def test_signature_matches_design(name):
    n_data, options = CONTRACT[name]
    assert name in ce.__all__
    params = list(inspect.signature(getattr(ce, name)).parameters.values())
    data, rest = params[:n_data], params[n_data:]
    assert all(p.kind in POSITIONAL and p.default is p.empty for p in data)
    assert {p.name: p.default for p in rest} == options
    assert all(p.kind is KW for p in rest)


def _backend_array_type(xp, asxp):
    return type(asxp(np.zeros(2)))


def _calls(asxp):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3))
    labels = np.array([0, 2, 1, 2])
    p = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    y = np.array([0.0, 1.0, 0.25, 1.0])
    pb = np.array([0.1, 0.9, 0.5, 0.3])
    return {
        "entropy": lambda **k: ce.entropy(asxp(p), **k),
        "cross_entropy": lambda **k: ce.cross_entropy(asxp(p), asxp(p[::-1].copy()), **k),
        "kl_divergence": lambda **k: ce.kl_divergence(asxp(p), asxp(p[::-1].copy()), **k),
        "softmax_cross_entropy": lambda **k: ce.softmax_cross_entropy(asxp(logits), asxp(labels), **k),
        "log_loss": lambda **k: ce.log_loss(asxp(p), asxp(labels), **k),
        "binary_cross_entropy": lambda **k: ce.binary_cross_entropy(asxp(pb), asxp(y), **k),
        "binary_cross_entropy_with_logits": lambda **k: ce.binary_cross_entropy_with_logits(
            asxp(logits[:, 0]), asxp(y), **k
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "entropy",
        "cross_entropy",
        "kl_divergence",
        "softmax_cross_entropy",
        "log_loss",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
    ],
)
def test_each_backend_gets_its_own_array_type_back(xp, asxp, name):
    array_type = _backend_array_type(xp, asxp)
    f = _calls(asxp)[name]
    results = [f()]
    if name in ("entropy", "cross_entropy", "kl_divergence"):
        assert tuple(results[0].shape) == (4,)
    else:
        results += [f(reduction="sum"), f(reduction="none")]
        assert tuple(results[0].shape) == ()
        assert tuple(results[2].shape) == (4,)
    for r in results:
        if xp is np:
            assert isinstance(r, (np.ndarray, np.generic)), type(r)
        else:
            assert isinstance(r, array_type), type(r)


def test_and_grad_returns_backend_arrays(xp, asxp):
    array_type = _backend_array_type(xp, asxp)
    logits = asxp(np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 1.0]]))
    loss, grad = ce.softmax_cross_entropy_and_grad(logits, asxp(np.array([2, 0])))
    assert tuple(grad.shape) == (2, 3)
    assert isinstance(grad, np.ndarray if xp is np else array_type)
    loss, grad = ce.binary_cross_entropy_with_logits_and_grad(logits, asxp(np.ones((2, 3))))
    assert tuple(grad.shape) == (2, 3)
    assert isinstance(grad, np.ndarray if xp is np else array_type)


def _torch_grad(f, *arrays):
    tensors = [torch.from_numpy(np.array(a, dtype=np.float64)).requires_grad_(True) for a in arrays]
    out = f(*tensors)
    grads = torch.autograd.grad(out, tensors)
    return out.detach().numpy(), [g.numpy() for g in grads]


AUTOGRAD_CASES = {
    # name: (crossent call, the same loss written in torch, its differentiable inputs)
    "softmax_cross_entropy": (
        lambda x: ce.softmax_cross_entropy(x, torch.tensor([0, 2, 1]), label_smoothing=0.1),
        lambda x: F.cross_entropy(x, torch.tensor([0, 2, 1]), label_smoothing=0.1),
        [[[0.5, -1.0, 2.0], [0.0, 0.1, 1.0], [3.0, -2.0, 0.0]]],
    ),
    "log_loss": (
        lambda p: ce.log_loss(p, torch.tensor([0, 2])),
        lambda p: F.nll_loss(torch.log(p), torch.tensor([0, 2])),
        [[[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]]],
    ),
    "binary_cross_entropy": (
        lambda p, y: ce.binary_cross_entropy(p, y),
        lambda p, y: F.binary_cross_entropy(p, y),
        [[0.2, 0.7, 0.4], [0.0, 1.0, 0.3]],
    ),
    "binary_cross_entropy_with_logits": (
        lambda x, y: ce.binary_cross_entropy_with_logits(x, y),
        lambda x, y: F.binary_cross_entropy_with_logits(x, y),
        [[0.2, -3.0, 4.0], [0.0, 1.0, 0.3]],
    ),
    "kl_divergence": (
        lambda p, q: ce.kl_divergence(p, q).sum(),
        lambda p, q: F.kl_div(torch.log(q), p, reduction="sum"),
        [[0.2, 0.3, 0.5], [0.4, 0.4, 0.2]],
    ),
    "cross_entropy": (
        lambda p, q: ce.cross_entropy(p, q).sum(),
        lambda p, q: -(p * torch.log(q)).sum(),
        [[0.2, 0.3, 0.5], [0.4, 0.4, 0.2]],
    ),
    "entropy": (
        lambda p: ce.entropy(p).sum(),
        lambda p: -(p * torch.log(p)).sum(),
        [[0.2, 0.3, 0.5]],
    ),
}


@pytest.mark.parametrize("name", list(AUTOGRAD_CASES))
def test_torch_tensors_stay_differentiable(name):
    ours, theirs, inputs = AUTOGRAD_CASES[name]
    got_value, got_grads = _torch_grad(ours, *inputs)
    want_value, want_grads = _torch_grad(theirs, *inputs)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(AUTOGRAD_CASES))
def test_jax_arrays_stay_differentiable(name):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    ours, theirs, inputs = AUTOGRAD_CASES[name]
    _, want_grads = _torch_grad(theirs, *inputs)

    def to_jax_call(*arrays):  # the crossent call with jax arrays; targets converted once
        converted = {
            "softmax_cross_entropy": lambda x: ce.softmax_cross_entropy(x, jnp.asarray([0, 2, 1]), label_smoothing=0.1),
            "log_loss": lambda p: ce.log_loss(p, jnp.asarray([0, 2])),
        }.get(name)
        if converted is not None:
            return converted(*arrays)
        return ours(*arrays)

    args = [jnp.asarray(np.array(a, dtype=np.float64)) for a in inputs]
    grads = jax.grad(to_jax_call, argnums=tuple(range(len(args))))(*args)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-10, atol=1e-14)


def test_textbook_example(xp, asxp, tonp):
    """True class 2 of 3 (index 1): predicting [0.1, 0.8, 0.1] costs -ln 0.8 = 0.2231 nats,
    predicting [0.7, 0.2, 0.1] costs -ln 0.2 = 1.6094 nats; KL = CE - H."""
    good, bad = [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]
    onehot = asxp(np.array([0.0, 1.0, 0.0]))
    for q, expected in ((good, -math.log(0.8)), (bad, -math.log(0.2))):
        assert round(expected, 4) in (0.2231, 1.6094)
        np.testing.assert_allclose(tonp(ce.cross_entropy(onehot, asxp(np.array(q)))), expected, rtol=1e-12)
        np.testing.assert_allclose(tonp(ce.log_loss(asxp(np.array([q])), asxp(np.array([1])))), expected, rtol=1e-12)
        np.testing.assert_allclose(
            tonp(ce.softmax_cross_entropy(asxp(np.log([q])), asxp(np.array([1])))), expected, rtol=1e-12
        )
        np.testing.assert_allclose(
            tonp(ce.cross_entropy(onehot, asxp(np.array(q)), base=2)), expected / math.log(2), rtol=1e-12
        )
    p = asxp(np.array([0.2, 0.5, 0.3]))
    q = asxp(np.array(good))
    np.testing.assert_allclose(
        tonp(ce.kl_divergence(p, q)),
        tonp(ce.cross_entropy(p, q)) - tonp(ce.entropy(p)),
        rtol=1e-12,
    )


def _core_modules():
    package = importlib.import_module("crossent.core")
    yield package
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        yield importlib.import_module(info.name)


def test_docstring_doctests_pass():
    """The docstrings' examples run (also under --doctest-modules when src/ is collected)."""
    attempted = 0
    for module in _core_modules():
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted > 0


@pytest.mark.parametrize("name", list(CONTRACT))
def test_public_docstrings_give_formula_shapes_and_example(name):
    doc = inspect.getdoc(getattr(ce, name)) or ""
    assert ">>>" in doc, f"{name}: no doctest example"
    assert "log" in doc, f"{name}: no formula"
    assert "shape" in doc.lower() or "[..." in doc, f"{name}: no shapes"


def test_textbook_numbers_are_doctested():
    docs = "\n".join(inspect.getdoc(getattr(ce, name)) or "" for name in CONTRACT)
    assert "0.2231" in docs and "1.6094" in docs


def test_jax_jit_compiles_the_core_functions():
    """Under jax.jit the arrays have no values, so the host-side checks cannot run; the losses
    (and the gradient through jit) must still trace and equal the eager results."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(21)
    x = jnp.asarray(rng.normal(size=(8, 5)))
    y = jnp.asarray(np.where(np.arange(8) == 2, -100, rng.integers(0, 5, size=8)))
    p = jax.nn.softmax(x, axis=-1)
    t = (x > 0).astype(x.dtype)
    calls = {
        "softmax": lambda x, y: ce.softmax_cross_entropy(
            x, y, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=5.0
        ),
        "softmax_and_grad": lambda x, y: ce.softmax_cross_entropy_and_grad(
            x, y, ignore_index=-100, label_smoothing=0.1
        )[1],
        "log_loss": lambda p, y: ce.log_loss(p, y, ignore_index=-100),
        "bce": lambda p, t: ce.binary_cross_entropy(p, t),
        "bce_logits": lambda x, t: ce.binary_cross_entropy_with_logits_and_grad(x, t)[1],
        "kl": lambda p, q: ce.kl_divergence(p, q),
    }
    args = {
        "softmax": (x, y),
        "softmax_and_grad": (x, y),
        "log_loss": (p, y),
        "bce": (p, t),
        "bce_logits": (x, t),
        "kl": (p, p[::-1]),
    }
    for name, f in calls.items():
        np.testing.assert_allclose(
            np.asarray(jax.jit(f)(*args[name])), np.asarray(f(*args[name])), rtol=1e-12, err_msg=name
        )
    grad = jax.jit(jax.grad(lambda x: calls["softmax"](x, y)))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(lambda x: calls["softmax"](x, y))(x)), rtol=1e-12)
