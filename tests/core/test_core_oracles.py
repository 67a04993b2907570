"""Core losses against the peers that define them: PyTorch, SciPy, scikit-learn, optax.

Every comparison is in float64 to rtol 1e-10 (DESIGN.md "Semantics"), on every array backend
of the ``xp`` fixture; the oracle always runs on its own library's arrays built from the same
NumPy inputs.
"""

from __future__ import annotations

import importlib.util
import zlib

import numpy as np
import pytest
import scipy.special
import scipy.stats
import sklearn.metrics
import torch
import torch.nn.functional as F

import crossent as ce

RTOL = 1e-10
ATOL = 1e-12
REDUCTIONS = ["mean", "sum", "none"]


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


def rng_for(*key):
    """A generator seeded by the test's own key: reproducible across runs and processes."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def hard_problem(rng, n=8, c=5, ignore=0):
    logits = rng.normal(scale=3.0, size=(n, c))
    labels = rng.integers(0, c, size=n)
    labels[:ignore] = -100
    rng.shuffle(labels)
    return logits, labels


def soft_targets(rng, shape, axis=-1):
    t = rng.random(shape) ** 3  # uneven, some near-zero entries
    return t / t.sum(axis=axis, keepdims=True)


# PyTorch's F.cross_entropy: (N, C) and (N, C, d1, ..., dk) inputs, class axis 1.

HARD_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": -100},
    "weight+ignore": {"weight": True, "ignore_index": -100},
    "smooth": {"label_smoothing": 0.1},
    "smooth+weight": {"label_smoothing": 0.3, "weight": True},
    "smooth+weight+ignore": {"label_smoothing": 0.2, "weight": True, "ignore_index": -100},
    "smooth=1+weight": {"label_smoothing": 1.0, "weight": True},
}
SOFT_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smooth": {"label_smoothing": 0.15},
    "smooth+weight": {"label_smoothing": 0.4, "weight": True},
}


def _split_options(options, c, rng):
    options = dict(options)
    weight = rng.uniform(0.2, 3.0, size=c) if options.pop("weight", False) else None
    return weight, options


def _torch_ce(logits, targets, weight, reduction, options, class_axis=1):
    x = torch.from_numpy(np.moveaxis(logits, class_axis, 1).copy())
    if np.issubdtype(targets.dtype, np.floating):
        t = torch.from_numpy(np.moveaxis(targets, class_axis, 1).copy())
    else:
        t = torch.from_numpy(targets)
    w = None if weight is None else torch.from_numpy(weight)
    return F.cross_entropy(
        x,
        t,
        weight=w,
        reduction=reduction,
        ignore_index=options.get("ignore_index", -100),
        label_smoothing=options.get("label_smoothing", 0.0),
    ).numpy()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(HARD_OPTIONS))
def test_integer_labels_match_torch(xp, asxp, tonp, name, reduction):
    rng = rng_for("hard", name)
    logits, labels = hard_problem(rng, ignore=3 if "ignore" in name else 0)
    weight, options = _split_options(HARD_OPTIONS[name], 5, rng)
    expected = _torch_ce(logits, labels, weight, reduction, options)
    got = ce.softmax_cross_entropy(
        asxp(logits),
        asxp(labels),
        weight=None if weight is None else asxp(weight),
        reduction=reduction,
        **options,
    )
    assert tuple(got.shape) == expected.shape
    close(tonp(got), expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(SOFT_OPTIONS))
def test_soft_targets_match_torch(xp, asxp, tonp, name, reduction):
    rng = rng_for("soft", name)
    logits = rng.normal(scale=2.0, size=(8, 5))
    targets = soft_targets(rng, (8, 5))
    weight, options = _split_options(SOFT_OPTIONS[name], 5, rng)
    expected = _torch_ce(logits, targets, weight, reduction, options)
    got = ce.softmax_cross_entropy(
        asxp(logits),
        asxp(targets),
        weight=None if weight is None else asxp(weight),
        reduction=reduction,
        **options,
    )
    close(tonp(got), expected)


def test_soft_targets_need_not_be_distributions(xp, asxp, tonp):
    """Distillation-style targets (negative, not summing to 1) are used as given, like PyTorch."""
    rng = rng_for("soft-free")
    logits = rng.normal(size=(8, 5))
    targets = rng.normal(size=(8, 5))
    for reduction in REDUCTIONS:
        expected = _torch_ce(logits, targets, None, reduction, {})
        close(tonp(ce.softmax_cross_entropy(asxp(logits), asxp(targets), reduction=reduction)), expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_spatial_inputs_with_axis_1_match_torch(xp, asxp, tonp, kind, reduction):
    """(N, C, d1, d2) inputs with the class axis 1, as PyTorch lays them out; odd sizes."""
    rng = rng_for("kd", kind)
    logits = rng.normal(scale=2.0, size=(3, 5, 4, 7))
    weight = rng.uniform(0.5, 2.0, size=5)
    if kind == "hard":
        targets = rng.integers(0, 5, size=(3, 4, 7))
        targets[0, 1, :3] = -100
        options = {"ignore_index": -100, "label_smoothing": 0.1}
    else:
        targets = soft_targets(rng, (3, 5, 4, 7), axis=1)
        options = {"label_smoothing": 0.1}
    expected = _torch_ce(logits, targets, weight, reduction, options)
    got = ce.softmax_cross_entropy(
        asxp(logits), asxp(targets), axis=1, weight=asxp(weight), reduction=reduction, **options
    )
    assert tuple(got.shape) == expected.shape
    close(tonp(got), expected)


def test_reduction_none_returns_target_shape_for_bt_inputs(xp, asxp, tonp):
    """(B, T, V) logits with (B, T) labels give (B, T) losses under reduction="none"."""
    rng = rng_for("btv")
    logits = rng.normal(size=(2, 3, 11))
    labels = rng.integers(0, 11, size=(2, 3))
    got = ce.softmax_cross_entropy(asxp(logits), asxp(labels), reduction="none")
    assert tuple(got.shape) == (2, 3)
    expected = _torch_ce(logits, labels, None, "none", {}, class_axis=2)
    close(tonp(got), expected)


def test_single_unbatched_row_matches_torch(xp, asxp, tonp):
    logits = np.array([1.0, -2.0, 0.5, 3.0])
    label = np.array(2)
    expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(label)).numpy()
    close(tonp(ce.softmax_cross_entropy(asxp(logits), asxp(label))), expected)


def test_bits_are_nats_over_ln2(xp, asxp, tonp):
    rng = rng_for("bits")
    logits, labels = hard_problem(rng)
    nats = _torch_ce(logits, labels, None, "mean", {})
    got = ce.softmax_cross_entropy(asxp(logits), asxp(labels), base=2)
    close(tonp(got), nats / np.log(2))


# z_loss and softcap: not in PyTorch; a written-out float64 formula is the oracle.


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_adds_z_times_logsumexp_squared_per_valid_row(xp, asxp, tonp, reduction):
    rng = rng_for("z", reduction)
    logits, labels = hard_problem(rng, ignore=3)
    weight = rng.uniform(0.3, 3.0, size=5)
    z = 1e-2
    base = _torch_ce(logits, labels, weight, "none", {"ignore_index": -100})
    lse = scipy.special.logsumexp(logits, axis=-1)
    valid = labels != -100
    z_rows = np.where(valid, z * lse**2, 0.0)
    wy = np.where(valid, weight[np.where(valid, labels, 0)], 0.0)
    expected = {
        "none": base + z_rows,
        "sum": base.sum() + z_rows.sum(),
        "mean": base.sum() / wy.sum() + z_rows.sum() / valid.sum(),
    }[reduction]
    got = ce.softmax_cross_entropy(
        asxp(logits),
        asxp(labels),
        weight=asxp(weight),
        ignore_index=-100,
        z_loss=z,
        reduction=reduction,
    )
    close(tonp(got), expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softcap_applies_tanh_before_everything(xp, asxp, tonp, reduction):
    rng = rng_for("softcap", reduction)
    logits, labels = hard_problem(rng, ignore=2)
    logits *= 10  # so that the cap matters
    cap = 15.0
    capped = cap * np.tanh(logits / cap)
    z = 1e-3
    lse = scipy.special.logsumexp(capped, axis=-1)
    valid = labels != -100
    base = _torch_ce(capped, labels, None, reduction, {"ignore_index": -100, "label_smoothing": 0.1})
    z_rows = np.where(valid, z * lse**2, 0.0)
    z_part = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / valid.sum()}[reduction]
    got = ce.softmax_cross_entropy(
        asxp(logits),
        asxp(labels),
        ignore_index=-100,
        label_smoothing=0.1,
        z_loss=z,
        softcap=cap,
        reduction=reduction,
    )
    close(tonp(got), base + z_part)


# log_loss: scikit-learn's log_loss (which clips to [eps, 1 - eps] with eps = finfo.eps) and
# PyTorch's nll_loss on log-probabilities.


def _probs(rng, n, c, zeros=False):
    p = rng.dirichlet(np.ones(c) * 0.7, size=n)
    if zeros:
        p[0, :] = 0.0
        p[0, 1] = 1.0  # a confident row: clipping at 1 - eps matters
        p[1, 2] = 0.0
        p[1] /= p[1].sum()
    return p


@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_log_loss_matches_sklearn(xp, asxp, tonp, with_sample_weight):
    rng = rng_for("sk", with_sample_weight)
    p = _probs(rng, 8, 5, zeros=True)
    y = rng.integers(0, 5, size=8)
    y[1] = 2  # the true class has probability 0: clipped to eps, finite
    sw = rng.uniform(0.1, 2.0, size=8) if with_sample_weight else None
    kwargs = {} if sw is None else {"sample_weight": sw}
    mean = sklearn.metrics.log_loss(y, y_proba=p, labels=range(5), **kwargs)
    total = sklearn.metrics.log_loss(y, y_proba=p, labels=range(5), normalize=False, **kwargs)
    ours = {} if sw is None else {"sample_weight": asxp(sw)}
    close(tonp(ce.log_loss(asxp(p), asxp(y), **ours)), mean)
    close(tonp(ce.log_loss(asxp(p), asxp(y), reduction="sum", **ours)), total)
    close(tonp(ce.log_loss(asxp(p), asxp(y), base=2, **ours)), mean / np.log(2))


def test_log_loss_matches_sklearn_in_float32(xp, asxp, tonp):
    """eps="auto" is finfo(float32).eps for float32 probabilities, as in scikit-learn."""
    rng = rng_for("sk32")
    p = _probs(rng, 8, 5, zeros=True).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    y = rng.integers(0, 5, size=8)
    y[1] = 2
    expected = sklearn.metrics.log_loss(y, y_proba=p, labels=range(5))
    close(tonp(ce.log_loss(asxp(p), asxp(y))), expected, rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "weight", "ignore", "weight+ignore"])
def test_log_loss_matches_torch_nll_of_log_probs(xp, asxp, tonp, name, reduction):
    rng = rng_for("nll", name)
    p = _probs(rng, 8, 5)
    y = rng.integers(0, 5, size=8)
    if "ignore" in name:
        y[[2, 5]] = -100
    weight = rng.uniform(0.2, 2.0, size=5) if "weight" in name else None
    expected = F.nll_loss(
        torch.log(torch.from_numpy(p)),
        torch.from_numpy(y),
        weight=None if weight is None else torch.from_numpy(weight),
        ignore_index=-100,
        reduction=reduction,
    ).numpy()
    got = ce.log_loss(
        asxp(p),
        asxp(y),
        weight=None if weight is None else asxp(weight),
        ignore_index=-100 if "ignore" in name else None,
        reduction=reduction,
    )
    close(tonp(got), expected)


def test_log_loss_axis_1_matches_torch(xp, asxp, tonp):
    rng = rng_for("nll-kd")
    p = np.moveaxis(_probs(rng, 3 * 4, 5).reshape(3, 4, 5), -1, 1)  # (3, 5, 4)
    y = rng.integers(0, 5, size=(3, 4))
    expected = F.nll_loss(torch.log(torch.from_numpy(p.copy())), torch.from_numpy(y), reduction="none").numpy()
    got = ce.log_loss(asxp(p), asxp(y), axis=1, reduction="none")
    close(tonp(got), expected)


# entropy, cross_entropy, kl_divergence: SciPy and PyTorch's kl_div.


@pytest.mark.parametrize("base", [None, 2])
@pytest.mark.parametrize("axis", [-1, 0])
def test_entropy_matches_scipy(xp, asxp, tonp, axis, base):
    rng = rng_for("H", axis)
    p = soft_targets(rng, (8, 5), axis=axis)
    p = np.where(p < 0.02, 0.0, p)
    p /= p.sum(axis=axis, keepdims=True)
    expected = scipy.stats.entropy(p, axis=axis, base=base)
    close(tonp(ce.entropy(asxp(p), axis=axis, base=base)), expected)
    if base is None:
        close(tonp(ce.entropy(asxp(p), axis=axis)), scipy.special.entr(p).sum(axis=axis))


@pytest.mark.parametrize("base", [None, 2])
def test_kl_divergence_matches_scipy_and_torch(xp, asxp, tonp, base):
    rng = rng_for("KL", base)
    p = soft_targets(rng, (8, 5))
    q = soft_targets(rng, (8, 5))
    p[0, :2] = 0.0  # 0 log 0 = 0
    p[0] /= p[0].sum()
    scale = 1.0 if base is None else np.log(base)
    expected = scipy.special.rel_entr(p, q).sum(-1) / scale
    close(tonp(ce.kl_divergence(asxp(p), asxp(q), base=base)), expected)
    close(expected, scipy.stats.entropy(p, q, axis=-1, base=base))
    torch_kl = F.kl_div(torch.log(torch.from_numpy(q)), torch.from_numpy(p), reduction="none").sum(-1).numpy()
    close(tonp(ce.kl_divergence(asxp(p), asxp(q))), torch_kl)


def test_kl_divergence_axis_0_matches_scipy(xp, asxp, tonp):
    rng = rng_for("KL0")
    p = soft_targets(rng, (8, 5), axis=0)
    q = soft_targets(rng, (8, 5), axis=0)
    close(tonp(ce.kl_divergence(asxp(p), asxp(q), axis=0)), scipy.stats.entropy(p, q, axis=0))


def test_kl_divergence_is_inf_where_p_positive_and_q_zero(xp, asxp, tonp):
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    expected = scipy.special.rel_entr(p, q).sum(-1)
    assert expected[0] == np.inf
    got = tonp(ce.kl_divergence(asxp(p), asxp(q)))
    assert got[0] == np.inf
    close(got[1], 0.0)


@pytest.mark.parametrize("base", [None, 2])
def test_cross_entropy_is_entropy_plus_kl_from_scipy(xp, asxp, tonp, base):
    rng = rng_for("CE", base)
    p = soft_targets(rng, (8, 5))
    q = soft_targets(rng, (8, 5))
    expected = scipy.stats.entropy(p, axis=-1, base=base) + scipy.stats.entropy(p, q, axis=-1, base=base)
    close(tonp(ce.cross_entropy(asxp(p), asxp(q), base=base)), expected)


def test_cross_entropy_of_one_hot_is_nll(xp, asxp, tonp):
    """The one-hot shortcut: H(onehot(y), q) = -log q_y = PyTorch's nll_loss on log q."""
    rng = rng_for("onehot")
    q = _probs(rng, 8, 5)
    y = rng.integers(0, 5, size=8)
    expected = F.nll_loss(torch.log(torch.from_numpy(q)), torch.from_numpy(y), reduction="none").numpy()
    close(tonp(ce.cross_entropy(asxp(np.eye(5)[y]), asxp(q))), expected)


# Binary cross-entropy from probabilities and from logits.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_binary_cross_entropy_matches_torch(xp, asxp, tonp, with_weight, reduction):
    rng = rng_for("bce", with_weight)
    p = rng.uniform(0.0, 1.0, size=(8, 5))
    p[0, 0] = 1e-12  # log1p territory: log(1 - p) must keep its relative accuracy
    p[0, 1] = 1.0 - 1e-9
    y = rng.uniform(0.0, 1.0, size=(8, 5))
    y[0, 0] = 0.0
    y[0, 1] = 1.0
    w = rng.uniform(0.1, 2.0, size=(8, 5)) if with_weight else None
    expected = F.binary_cross_entropy(
        torch.from_numpy(p),
        torch.from_numpy(y),
        weight=None if w is None else torch.from_numpy(w),
        reduction=reduction,
    ).numpy()
    got = ce.binary_cross_entropy(asxp(p), asxp(y), weight=None if w is None else asxp(w), reduction=reduction)
    close(tonp(got), expected)


def test_binary_cross_entropy_pos_weight_and_clipping_match_formula(xp, asxp, tonp, ref):
    """PyTorch's binary_cross_entropy has no pos_weight; the written-out formula is the oracle.
    Probabilities of exactly 0 and 1 are clipped to [eps, 1 - eps] (eps = finfo.eps)."""
    rng = rng_for("bce-pw")
    p = rng.uniform(0.0, 1.0, size=(8, 5))
    p[0, :2] = [0.0, 1.0]
    y = (rng.random((8, 5)) < 0.5).astype(np.float64)
    y[0, :2] = [1.0, 0.0]
    pw = rng.uniform(0.5, 3.0, size=5)
    for reduction in REDUCTIONS:
        got = ce.binary_cross_entropy(asxp(p), asxp(y), pos_weight=asxp(pw), reduction=reduction)
        close(tonp(got), ref.bce(p, y, pos_weight=pw, reduction=reduction))
    got = tonp(ce.binary_cross_entropy(asxp(p), asxp(y), reduction="none"))
    close(got[0, :2], -np.log(np.finfo(np.float64).eps))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "weight", "pos_weight", "both"])
def test_binary_cross_entropy_with_logits_matches_torch(xp, asxp, tonp, name, reduction):
    rng = rng_for("bcel", name)
    x = rng.normal(scale=4.0, size=(4, 2, 5))
    x[0, 0, :3] = [40.0, -40.0, 0.0]
    y = rng.uniform(size=(4, 2, 5))
    w = rng.uniform(0.1, 2.0, size=(2, 1)) if name in ("weight", "both") else None
    pw = rng.uniform(0.5, 3.0, size=5) if name in ("pos_weight", "both") else None
    expected = F.binary_cross_entropy_with_logits(
        torch.from_numpy(x),
        torch.from_numpy(y),
        weight=None if w is None else torch.from_numpy(w),
        pos_weight=None if pw is None else torch.from_numpy(pw),
        reduction=reduction,
    ).numpy()
    got = ce.binary_cross_entropy_with_logits(
        asxp(x),
        asxp(y),
        weight=None if w is None else asxp(w),
        pos_weight=None if pw is None else asxp(pw),
        reduction=reduction,
    )
    close(tonp(got), expected)


def test_binary_cross_entropy_with_logits_label_smoothing(xp, asxp, tonp):
    """label_smoothing eps moves targets to y (1 - eps) + eps / 2; PyTorch's loss on the moved
    targets is the oracle."""
    rng = rng_for("bcel-ls")
    x = rng.normal(scale=3.0, size=(8, 5))
    y = (rng.random((8, 5)) < 0.4).astype(np.float64)
    pw = rng.uniform(0.5, 3.0, size=5)
    eps = 0.2
    for reduction in REDUCTIONS:
        expected = F.binary_cross_entropy_with_logits(
            torch.from_numpy(x),
            torch.from_numpy(y * (1 - eps) + eps / 2),
            pos_weight=torch.from_numpy(pw),
            reduction=reduction,
        ).numpy()
        got = ce.binary_cross_entropy_with_logits(
            asxp(x), asxp(y), pos_weight=asxp(pw), label_smoothing=eps, reduction=reduction
        )
        close(tonp(got), expected)


# optax (JAX), where installed.

HAVE_OPTAX = importlib.util.find_spec("optax") is not None


@pytest.fixture(scope="module")
def optax_jnp():
    if not HAVE_OPTAX:
        pytest.skip("optax is not installed")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    return optax, jnp


def test_optax_softmax_cross_entropy(optax_jnp, xp, asxp, tonp):
    optax, jnp = optax_jnp
    rng = rng_for("optax-soft")
    logits = rng.normal(scale=3.0, size=(8, 5))
    t = soft_targets(rng, (8, 5))
    expected = np.asarray(optax.losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(t)))
    close(tonp(ce.softmax_cross_entropy(asxp(logits), asxp(t), reduction="none")), expected)


def test_optax_integer_labels(optax_jnp, xp, asxp, tonp):
    optax, jnp = optax_jnp
    rng = rng_for("optax-int")
    logits, labels = hard_problem(rng)
    expected = np.asarray(
        optax.losses.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels))
    )
    close(tonp(ce.softmax_cross_entropy(asxp(logits), asxp(labels), reduction="none")), expected)


def test_optax_sigmoid_binary_cross_entropy(optax_jnp, xp, asxp, tonp):
    optax, jnp = optax_jnp
    rng = rng_for("optax-bce")
    x = rng.normal(scale=5.0, size=(8, 5))
    y = rng.uniform(size=(8, 5))
    expected = np.asarray(optax.losses.sigmoid_binary_cross_entropy(jnp.asarray(x), jnp.asarray(y)))
    close(tonp(ce.binary_cross_entropy_with_logits(asxp(x), asxp(y), reduction="none")), expected)


def test_optax_safe_softmax_cross_entropy_under_minus_inf_masks(optax_jnp, xp, asxp, tonp):
    """optax's safe variant gives masked (-inf) classes with zero target a zero contribution,
    which is crossent's documented behaviour."""
    optax, jnp = optax_jnp
    rng = rng_for("optax-safe")
    logits = rng.normal(scale=2.0, size=(8, 5))
    logits[:, 4:] = -np.inf
    logits[0, 1] = -np.inf
    t = soft_targets(rng, (8, 5))
    t[:, 4:] = 0.0
    t[0, 1] = 0.0
    t /= t.sum(-1, keepdims=True)
    expected = np.asarray(optax.losses.safe_softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(t)))
    assert np.all(np.isfinite(expected))
    close(tonp(ce.softmax_cross_entropy(asxp(logits), asxp(t), reduction="none")), expected)
