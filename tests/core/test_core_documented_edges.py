"""Behaviours the public docstrings document, each pinned against an independent oracle:
softcap unmasks -inf logits (Gemma 2 caps first), a fully masked row gives NaN (as PyTorch),
eps="auto" is the epsilon of the input dtype (as scikit-learn), and value checks are skipped
under jax.jit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_expit
from sklearn.metrics import log_loss as sk_log_loss

import crossent as ce

# ---- finding 3: softcap is applied first, so -inf masks become the finite -softcap ---------------

MASKED = np.array([[0.0, -np.inf, 1.0]])


def capped(x, cap):
    """Gemma 2's soft cap in torch float64 (tanh(-inf) = -1: a masked logit becomes -cap)."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    return cap * torch.tanh(t / cap)


@pytest.mark.parametrize("cap", [30.0, 1e6])
def test_softcap_turns_a_minus_inf_mask_into_a_live_class(xp, asxp, tonp, cap):
    """Documented in softmax_cross_entropy: with softcap the masked class has logit -cap, gets
    eps/K of the smoothing (K counts it) and a finite loss under a positive target; the result is
    F.cross_entropy on the capped logits."""
    x, y = asxp(MASKED), asxp(np.array([2]))
    got = float(tonp(ce.softmax_cross_entropy(x, y, label_smoothing=0.1, softcap=cap)))
    expected = F.cross_entropy(capped(MASKED, cap), torch.tensor([2]), label_smoothing=0.1).item()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert np.isfinite(got)
    soft = np.array([[0.0, 0.5, 0.5]])
    got = float(tonp(ce.softmax_cross_entropy(x, asxp(soft), softcap=cap)))
    expected = F.cross_entropy(capped(MASKED, cap), torch.from_numpy(soft)).item()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # Without a cap the class stays masked: inf for a positive target on it.
    assert float(tonp(ce.softmax_cross_entropy(x, asxp(soft)))) == np.inf


def test_softcap_gradient_is_zero_on_the_unmasked_class_though_its_probability_is_not(xp, asxp, tonp):
    """d(s tanh(x/s))/dx = 0 at x = -inf: torch autograd through the cap agrees."""
    loss, grad = ce.softmax_cross_entropy_and_grad(asxp(MASKED), asxp(np.array([2])), softcap=30.0)
    assert tonp(grad)[0, 1] == 0.0
    t = torch.from_numpy(MASKED.copy()).requires_grad_(True)
    F.cross_entropy(30.0 * torch.tanh(t / 30.0), torch.tensor([2])).backward()
    np.testing.assert_allclose(tonp(grad), t.grad.numpy(), rtol=1e-10, atol=1e-15)
    assert torch.softmax(capped(MASKED, 30.0), -1)[0, 1] > 0


def test_masking_after_capping_keeps_the_mask(xp, asxp, tonp):
    """The documented recipe: cap first, then put -inf on masked classes, and pass no softcap."""
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(6, 9)) * 40
    mask = rng.random((6, 9)) < 0.3
    mask[:, 0] = False
    y = np.zeros(6, dtype=np.int64)
    x = np.where(mask, -np.inf, 30.0 * np.tanh(raw / 30.0))
    got = tonp(ce.softmax_cross_entropy(asxp(x), asxp(y), reduction="none"))
    expected = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), reduction="none").numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    soft = np.where(mask, 0.0, 1.0)
    soft /= soft.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        tonp(ce.softmax_cross_entropy(asxp(x), asxp(soft), reduction="none")),
        -(soft * np.where(mask, 0.0, torch.log_softmax(torch.from_numpy(x), -1).numpy())).sum(-1),
        rtol=1e-10,
    )


def test_softcap_masking_is_documented():
    for f in (ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad):
        doc = " ".join(f.__doc__.split())
        assert "no longer masked" in doc, f.__name__
    assert "then set the masked logits to -inf" in " ".join(ce.softmax_cross_entropy.__doc__.split())


# ---- finding 7: a row of all -inf logits (no class possible) gives NaN, as PyTorch -----------------


def test_fully_masked_row_gives_nan_like_torch(xp, asxp, tonp):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, -np.inf]])
    for layout in ("C", "F") if xp is np else ("C",):  # F order: numpy's Array-API path
        _check_fully_masked_row(asxp, tonp, np.asfortranarray(x) if layout == "F" else x)


def _check_fully_masked_row(asxp, tonp, x):
    y = np.array([0, 1])
    expected = F.cross_entropy(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), reduction="none")
    assert torch.isnan(expected[0]) and torch.isfinite(expected[1])  # the oracle's own behaviour
    soft = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with np.errstate(divide="ignore", invalid="ignore"):  # the numpy Array-API path warns on 0/0
        rows = tonp(ce.softmax_cross_entropy(asxp(x), asxp(y), reduction="none"))
        rows_soft = tonp(ce.softmax_cross_entropy(asxp(x), asxp(soft), reduction="none"))
        loss, grad = ce.softmax_cross_entropy_and_grad(asxp(x), asxp(y), reduction="sum")
        ignored = ce.softmax_cross_entropy(asxp(x), asxp(np.array([-100, 1])), ignore_index=-100, reduction="sum")
    for got in (rows, rows_soft):
        assert np.isnan(got[0])
        np.testing.assert_allclose(got[1], expected[1].item(), rtol=1e-12)
    assert np.isnan(float(tonp(loss))) and np.all(np.isnan(tonp(grad)[0]))
    # Ignoring the row (the documented way out) gives the other row's loss.
    np.testing.assert_allclose(float(tonp(ignored)), expected[1].item(), rtol=1e-12)


def test_fully_masked_row_is_documented():
    for f in (ce.softmax_cross_entropy, ce.softmax_cross_entropy_and_grad):
        doc = " ".join(f.__doc__.split())
        assert "all -inf" in doc and "NaN" in doc, f.__name__


# ---- finding 8: eps="auto" is finfo of the input probabilities' dtype -----------------------------


def test_log_loss_float16_clips_like_sklearn():
    p16 = np.array([[0.0, 1.0], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]], np.float16)
    y = np.array([0, 0, 1, 1])
    got = ce.log_loss(p16, y)
    assert got.dtype == np.float32
    clip = float(np.finfo(np.float16).eps)  # 9.77e-4, as scikit-learn
    truth = -np.log(np.maximum(p16.astype(np.float64)[np.arange(4), y], clip)).mean()
    np.testing.assert_allclose(got, truth, rtol=1e-6)
    # scikit-learn computes in float16 itself: agreement to float16's precision.
    np.testing.assert_allclose(got, sk_log_loss(y, p16, labels=[0, 1]), rtol=2e-3)
    # float32 input: float32's eps, also as scikit-learn.
    p32 = p16.astype(np.float32)
    np.testing.assert_allclose(ce.log_loss(p32, y), sk_log_loss(y, p32, labels=[0, 1]), rtol=1e-6)


def test_binary_cross_entropy_float16_clips_at_float16_eps():
    p16 = np.array([0.0, 1.0, 0.3], np.float16)
    t = np.array([1.0, 0.0, 1.0], np.float16)
    clip = float(np.finfo(np.float16).eps)
    p = np.clip(p16.astype(np.float64), clip, 1 - clip)
    truth = -(t * np.log(p) + (1 - t) * np.log1p(-p))
    got = ce.binary_cross_entropy(p16, t, reduction="none")
    np.testing.assert_allclose(got, truth, rtol=1e-6)
    np.testing.assert_allclose(got[0], 6.931, rtol=1e-3)  # not 15.94 (float32's eps)
    # scikit-learn's binary log_loss on the same float16 probabilities (it computes in float16)
    np.testing.assert_allclose(ce.binary_cross_entropy(p16, t), sk_log_loss(t, p16, labels=[0, 1]), rtol=2e-3)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_eps_auto_of_bfloat16_inputs_is_bfloat16_eps(library):
    p = np.array([[0.0, 1.0], [0.5, 0.5]])
    y = np.array([0, 1])
    if library == "torch":
        probs, labels = torch.tensor(p, dtype=torch.bfloat16), torch.from_numpy(y)
        bce_p, bce_t = probs[:, 0], torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
    else:
        jnp = pytest.importorskip("jax.numpy")
        probs, labels = jnp.asarray(p, dtype=jnp.bfloat16), jnp.asarray(y)
        bce_p, bce_t = probs[:, 0], jnp.asarray([1.0, 1.0], dtype=jnp.bfloat16)
    clip = 2.0**-7  # finfo(bfloat16).eps
    got = np.asarray(ce.log_loss(probs, labels, reduction="none"), dtype=np.float64)
    np.testing.assert_allclose(got, [-np.log(clip), -np.log(0.5)], rtol=1e-6)
    got = np.asarray(ce.binary_cross_entropy(bce_p, bce_t, reduction="none"), dtype=np.float64)
    np.testing.assert_allclose(got, [-np.log(clip), -np.log(0.5)], rtol=1e-6)


# ---- finding 9: the jax.jit exception to validation is in the public docstrings ---------------------


@pytest.mark.parametrize(
    "name",
    ["softmax_cross_entropy", "softmax_cross_entropy_and_grad", "log_loss", "binary_cross_entropy",
     "binary_cross_entropy_with_logits", "entropy", "cross_entropy", "kl_divergence"],
)
def test_skipped_checks_under_jit_are_documented(name):
    assert "jax.jit" in getattr(ce, name).__doc__


def test_checks_are_skipped_under_jit_as_documented():
    """What the docstrings warn about: under jax.jit an out-of-range label raises nothing; its
    row's loss and gradient are NaN (a label too large or negative alike), the other rows' are
    untouched."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x, y = jnp.zeros((3, 3)), jnp.asarray(np.array([0, 5, -3], np.int32))
    with pytest.raises(ValueError, match="got 5 at flat index 1"):
        ce.softmax_cross_entropy(x, y)
    for opts in ({}, {"weight": jnp.ones(3)}, {"label_smoothing": 0.1}):
        rows = jax.jit(lambda a, b, o=opts: ce.softmax_cross_entropy(a, b, reduction="none", **o))(x, y)
        _, grad = jax.jit(lambda a, b, o=opts: ce.softmax_cross_entropy_and_grad(a, b, reduction="none", **o))(x, y)
        np.testing.assert_allclose(rows[0], np.log(3.0), rtol=1e-6)
        assert np.isnan(rows[1:]).all() and np.isnan(grad[1:]).all() and np.isfinite(grad[0]).all()


def test_jit_out_of_range_label_gradient_is_nan_on_its_row_only():
    """Under jax.jit an out-of-range label's row is NaN in jax.grad too (a NaN selected by
    where would leave its derivative 0, and a NaN times the loss selected by where would make
    every row's derivative NaN); the other rows keep theirs, equal to the closed form."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x = jnp.asarray(np.array([[0.1, 0.5, -0.3], [0.2, 0.0, 1.0], [1.0, 2.0, 3.0]], np.float32))
    y = jnp.asarray(np.array([0, 5, 2], np.int32))
    for opts in ({}, {"label_smoothing": 1.0}, {"weight": jnp.asarray([1.0, 2.0, 0.5])}):
        grad = jax.jit(jax.grad(lambda a, o=opts: ce.softmax_cross_entropy(a, y, reduction="sum", **o)))(x)
        _, closed = jax.jit(lambda a, o=opts: ce.softmax_cross_entropy_and_grad(a, y, reduction="sum", **o))(x)
        assert np.isnan(np.asarray(grad)[1]).all() and np.isnan(np.asarray(closed)[1]).all()
        np.testing.assert_allclose(np.asarray(grad)[[0, 2]], np.asarray(closed)[[0, 2]], rtol=1e-6, atol=1e-7)


def test_namespaces_before_the_2024_standard_pick_labels_without_take_along_axis():
    """take_along_axis came with the 2024.12 standard: an older namespace (array_api_strict set
    to 2023.12) picks each row's label by a one-hot sum, with the same results as numpy."""
    strict = pytest.importorskip("array_api_strict")
    x = np.random.default_rng(0).standard_normal((6, 5))
    y = np.array([0, 4, 2, -100, 1, 3])
    w = np.linspace(0.5, 2.0, 5)
    with strict.ArrayAPIStrictFlags(api_version="2023.12"):
        for opts in ({}, {"weight": w}, {"label_smoothing": 0.2, "weight": w}):
            kwargs = {k: strict.asarray(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}
            got = ce.softmax_cross_entropy(strict.asarray(x), strict.asarray(y), ignore_index=-100, reduction="none",
                                           **kwargs)
            want = ce.softmax_cross_entropy(x, y, ignore_index=-100, reduction="none", **opts)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


def test_log_loss_out_of_range_label_under_jit_is_nan_on_its_row():
    """log_loss as softmax_cross_entropy: under jax.jit an out-of-range label (too large or
    negative, not the ignore_index) makes its row NaN; it was a loss of 0 counted in the mean."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    p = jnp.asarray(np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], np.float32))
    for labels in ([0, 3, -100], [0, -1, -100]):
        y = jnp.asarray(np.array(labels, np.int32))
        rows = np.asarray(jax.jit(lambda a, b: ce.log_loss(a, b, reduction="none", ignore_index=-100))(p, y))
        np.testing.assert_allclose(rows[0], np.log(2.0), rtol=1e-6)
        assert np.isnan(rows[1]) and rows[2] == 0.0
        assert np.isnan(float(jax.jit(lambda a, b: ce.log_loss(a, b, ignore_index=-100))(p, y)))


def test_bce_with_logits_autograd_at_a_zero_logit_matches_optax_and_torch():
    """The softplus is logaddexp(x, 0): jax.grad at a logit of exactly 0 (a zero-initialised model)
    is sigma(0) - t = -1/2 or 1/2, as optax's and the closed form (max(x, 0) + log1p(e^-|x|) gave 0
    under jax.grad), and torch's second derivative there is sigma'(0) = 1/4 (it gave 0)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    t = jnp.asarray([1.0, 0.0, 0.3])
    x0 = jnp.zeros(3)
    grad = jax.grad(lambda a: ce.binary_cross_entropy_with_logits(a, t, reduction="sum"))(x0)
    want = jax.grad(lambda a: optax.sigmoid_binary_cross_entropy(a, t).sum())(x0)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), [-0.5, 0.5, 0.2], rtol=1e-6)
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64)
    (g,) = torch.autograd.grad(ce.binary_cross_entropy_with_logits(z, tt, reduction="sum"), z, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), z)
    torch.testing.assert_close(g, torch.tensor([-0.5, 0.5, 0.2], dtype=torch.float64))
    torch.testing.assert_close(h, torch.full((3,), 0.25, dtype=torch.float64))
    for x in (-800.0, -30.0, 30.0, 800.0):  # stable far from 0: -t log sigma(x) - (1 - t) log sigma(-x)
        got = ce.binary_cross_entropy_with_logits(torch.full((3,), x, dtype=torch.float64), tt, reduction="none")
        want = -tt.numpy() * log_expit(x) - (1 - tt.numpy()) * log_expit(-x)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-13, atol=0)


def test_class_weight_gradient_with_a_masked_class_and_smoothing_is_finite():
    """d loss / d weight of a class masked by -inf is 0 with label smoothing (it was NaN: the
    masked term's unselected branch was 0 * -inf), and equals PyTorch's on the other classes."""
    x = torch.tensor([[0.5, -np.inf, 1.0], [0.2, 0.1, -0.3]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad(ce.softmax_cross_entropy(x, y, weight=w, label_smoothing=0.1, reduction="sum"), w)
    assert torch.isfinite(gw).all()
    # the same formula by hand, over the finite classes (crossent's smoothing spreads over them)
    logq = torch.log_softmax(x, 1)
    finite = torch.isfinite(x).to(torch.float64)
    k = finite.sum(1, keepdim=True)
    onehot = F.one_hot(y, 3).to(torch.float64)
    want = (-(0.9 * onehot + 0.1 * finite / k) * torch.where(finite > 0, logq, 0.0)).sum(0)
    torch.testing.assert_close(gw, want, rtol=1e-12, atol=1e-15)


def _numpy_route(monkeypatch, route):
    """Switch core's numpy calls to one route: "numba" (skipped without it), "blocked" (numba as
    if not installed) or "array-api" (the fast paths off)."""
    from crossent import cpu

    if route == "numba":
        pytest.importorskip("numba")
        if not cpu.available():
            pytest.skip("numba's kernels are switched off")
    elif route == "blocked":
        monkeypatch.setattr(cpu, "available", lambda: False)
    else:
        monkeypatch.setattr(cpu, "ENABLED", False)


@pytest.mark.parametrize("route", ["numba", "blocked", "array-api"])
def test_rows_of_weight_zero_with_nonfinite_logits_have_a_nan_gradient_on_every_numpy_route(monkeypatch, route):
    """A kept row weighted 0 (class weight of its label, or sample weight) adds 0 x its gradient:
    NaN where its logits have no finite softmax (all -inf, NaN), as PyTorch's 0 x NaN, on the
    numba kernels as on the blocked and Array-API paths (the kernels gave 0); an ignored row's
    gradient stays exactly 0; a "mean" whose denominator is 0 is 0, with a zero gradient on
    finite rows and 0 x NaN on such rows (the DESIGN rule's one exception)."""
    _numpy_route(monkeypatch, route)
    x = np.array([[-np.inf] * 3, [0.1, 0.2, 0.3], [np.nan, 0.0, 1.0], [0.5, 0.1, 0.0]])
    y = np.array([0, 1, 2, -100])
    with np.errstate(all="ignore"):
        kw = {"ignore_index": -100}
        _, grad = ce.softmax_cross_entropy_and_grad(x, y, weight=np.array([0.0, 1.0, 1.0]), reduction="sum", **kw)
        assert np.isnan(grad[0]).all() and np.isnan(grad[2]).all() and (grad[3] == 0).all()
        _, grad = ce.softmax_cross_entropy_and_grad(x, y, sample_weight=np.array([0.0, 1.0, 1.0, 1.0]),
                                                    reduction="sum", **kw)
        assert np.isnan(grad[0]).all() and (grad[3] == 0).all() and np.isfinite(grad[1]).all()
        loss, grad = ce.softmax_cross_entropy_and_grad(x, y, weight=np.zeros(3), **kw)  # denominator 0
        assert loss == 0 and np.isnan(grad[0]).all() and (grad[[1, 3]] == 0).all()
    xt = torch.from_numpy(x[:2]).requires_grad_()
    F.cross_entropy(xt, torch.from_numpy(y[:2]), weight=torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64),
                    reduction="sum").backward()
    assert torch.isnan(xt.grad[0]).all()


def test_bce_with_logits_autograd_at_infinite_logits_matches_torch():
    """jax.grad and torch autograd at +-inf logits: sigma(x) - t, as F.binary_cross_entropy_with_logits
    and the closed form (the shifted softplus's backward read e^(inf - 0) there: NaN)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x = np.array([np.inf, -np.inf, np.inf, -np.inf, 0.0])
    t = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    want = [0.0, 0.0, 1.0, -1.0, -0.5]
    grad = jax.grad(lambda a: ce.binary_cross_entropy_with_logits(a, jnp.asarray(t), reduction="sum"))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), want)
    xt = torch.from_numpy(x).requires_grad_()
    ce.binary_cross_entropy_with_logits(xt, torch.from_numpy(t), reduction="sum").backward()
    np.testing.assert_array_equal(xt.grad.numpy(), want)
    _, closed = ce.binary_cross_entropy_with_logits_and_grad(x, t, reduction="sum")
    np.testing.assert_array_equal(closed, want)


@pytest.mark.parametrize("route", ["numba", "blocked", "array-api"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}])
def test_probability_target_rows_of_weight_zero_with_nan_logits_have_a_nan_gradient(monkeypatch, route, options):
    """As for class indices: a row of sample weight 0 adds 0 x its gradient, NaN on a NaN row,
    whatever the targets' dtype (float64 targets take the per-block cast) and route."""
    _numpy_route(monkeypatch, route)
    x = np.array([[np.nan, 0.0, 1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    t = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    for targets in (t, t.astype(np.float32)):
        with np.errstate(all="ignore"):
            _, grad = ce.softmax_cross_entropy_and_grad(x, targets, sample_weight=np.array([0.0, 1.0]),
                                                        reduction="sum", **options)
        assert np.isnan(grad[0]).all() and np.isfinite(grad[1]).all()
