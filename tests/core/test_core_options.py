"""Options given as NumPy (or other ``numbers``) scalars, the bad-label message, and jax arrays in
jax's default 32-bit mode. Values are checked against PyTorch's F.cross_entropy and NumPy float64."""

from __future__ import annotations

import math
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent as ce
from crossent import cpu

RNG = np.random.default_rng(11)
LOGITS = RNG.normal(size=(7, 5)) * 2
LABELS = np.array([0, 4, -100, 2, 1, -100, 3])
LOGITS_3D = RNG.normal(size=(3, 5, 4))  # (N, C, d): PyTorch's layout, classes on axis 1
LABELS_3D = RNG.integers(0, 5, size=(3, 4))


def torch_ce(logits, labels, **kwargs):
    return F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), **kwargs).numpy()


# ---- finding 5: NumPy scalar options -----------------------------------------------------------------


@pytest.mark.parametrize("scalar", [np.float32, np.float16, np.float64, Fraction])
def test_label_smoothing_accepts_real_scalars(scalar):
    eps = scalar(1) / scalar(10) if scalar is Fraction else scalar(0.1)
    got = ce.softmax_cross_entropy(LOGITS, LABELS, ignore_index=-100, label_smoothing=eps)
    expected = torch_ce(LOGITS, LABELS, label_smoothing=float(eps))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    got = ce.binary_cross_entropy_with_logits(LOGITS, (LOGITS > 0).astype(np.float64), label_smoothing=eps)
    t = (LOGITS > 0) * (1 - float(eps)) + float(eps) / 2
    expected = F.binary_cross_entropy_with_logits(torch.from_numpy(LOGITS), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("index", [np.int64(-100), np.int32(-100), np.int16(-100)])
def test_ignore_index_accepts_numpy_integers(index):
    np.testing.assert_allclose(
        ce.softmax_cross_entropy(LOGITS, LABELS, ignore_index=index), torch_ce(LOGITS, LABELS), rtol=1e-12
    )
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True)
    keep = LABELS != -100
    expected = -np.log(probs[keep, LABELS[keep]]).mean()
    np.testing.assert_allclose(ce.log_loss(probs, LABELS, ignore_index=index), expected, rtol=1e-12)


@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-2), np.uint8(1)])
def test_axis_accepts_numpy_integers(axis):
    np.testing.assert_allclose(
        ce.softmax_cross_entropy(LOGITS_3D, LABELS_3D, axis=axis), torch_ce(LOGITS_3D, LABELS_3D), rtol=1e-12
    )
    p = np.exp(LOGITS_3D) / np.exp(LOGITS_3D).sum(1, keepdims=True)
    q = np.roll(p, 1, axis=1)
    np.testing.assert_allclose(ce.kl_divergence(p, q, axis=axis), (p * np.log(p / q)).sum(1), rtol=1e-12)


@pytest.mark.parametrize("base", [np.int64(2), np.float32(2), np.uint8(10)])
def test_base_accepts_numpy_scalars(base):
    expected = torch_ce(LOGITS, LABELS) / math.log(float(base))
    np.testing.assert_allclose(
        ce.softmax_cross_entropy(LOGITS, LABELS, ignore_index=np.int64(-100), base=base), expected, rtol=1e-12
    )
    p = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(ce.entropy(p, base=base), 1.5 * math.log(2) / math.log(float(base)), rtol=1e-12)


def test_z_loss_and_softcap_accept_numpy_floats():
    """Oracle: the formulas in NumPy float64, x <- s tanh(x / s), loss + z lse^2 per valid row."""
    z, cap = np.float32(1e-3), np.float32(3.0)
    x = float(cap) * np.tanh(LOGITS / float(cap))
    keep = LABELS != -100
    lse = np.log(np.exp(x).sum(-1))
    rows = lse - x[np.arange(7), np.where(keep, LABELS, 0)] + float(z) * lse**2
    got = ce.softmax_cross_entropy(LOGITS, LABELS, ignore_index=-100, z_loss=z, softcap=cap)
    np.testing.assert_allclose(got, rows[keep].mean(), rtol=1e-12)
    got = ce.softmax_cross_entropy(LOGITS, LABELS, ignore_index=-100, z_loss=np.float64(0), softcap=np.int64(3))
    np.testing.assert_allclose(got, (rows - float(z) * lse**2)[keep].mean(), rtol=1e-12)


def test_log_loss_eps_accepts_numpy_floats():
    p = np.array([[0.0, 1.0], [0.3, 0.7]])
    got = ce.log_loss(p, np.array([0, 1]), eps=np.float32(1e-3), reduction="none")
    np.testing.assert_allclose(got, [-np.log(float(np.float32(1e-3))), -np.log(0.7)], rtol=1e-12)


@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("label_smoothing", True, TypeError, "label_smoothing must be a float in \\[0, 1\\], got True"),
        ("label_smoothing", np.bool_(True), TypeError, "label_smoothing must be a float"),
        ("label_smoothing", np.float32(1.5), ValueError, "label_smoothing must be in \\[0, 1\\], got 1.5"),
        ("label_smoothing", np.float64("nan"), ValueError, "label_smoothing must be in \\[0, 1\\], got nan"),
        ("label_smoothing", "0.1", TypeError, "label_smoothing must be a float"),
        ("z_loss", np.float32("nan"), ValueError, "z_loss must be a finite non-negative float, got nan"),
        ("z_loss", np.float32(-1), ValueError, "z_loss must be a finite non-negative float"),
        ("z_loss", np.bool_(False), TypeError, "z_loss must be a non-negative float"),
        ("softcap", np.float64("inf"), ValueError, "softcap must be a finite positive float, got inf"),
        ("softcap", np.int64(0), ValueError, "softcap must be a finite positive float, got 0"),
        ("softcap", False, TypeError, "softcap must be None or a positive float"),
        ("ignore_index", np.float64(-100), TypeError, "ignore_index must be None or an int"),
        ("ignore_index", True, TypeError, "ignore_index must be None or an int"),
        ("ignore_index", np.bool_(True), TypeError, "ignore_index must be None or an int"),
        ("axis", np.float64(1.0), TypeError, "axis must be an int"),
        ("axis", True, TypeError, "axis must be an int"),
        ("axis", np.int64(2), ValueError, "axis must be in \\[-2, 2\\) for a 2-d array, got 2"),
        ("base", np.int64(1), ValueError, "base must be a finite positive number other than 1"),
        ("base", np.float32("inf"), ValueError, "base must be a finite positive number other than 1"),
        ("base", True, TypeError, "base must be None"),
    ],
)
def test_bad_scalar_options_still_get_clear_errors(option, value, error, message):
    with pytest.raises(error, match=message):
        ce.softmax_cross_entropy(LOGITS, np.abs(LABELS) % 5, **{option: value})


def test_bad_eps_numpy_scalars_get_clear_errors():
    p = np.array([[0.5, 0.5]])
    with pytest.raises(ValueError, match="eps must be in \\[0, 0.5\\), got 0.7"):
        ce.log_loss(p, np.array([0]), eps=np.float64(0.7))
    with pytest.raises(TypeError, match="eps must be 'auto', None or a float"):
        ce.binary_cross_entropy(p, p, eps=np.bool_(True))


# ---- finding 6: the first invalid label, with its own value ------------------------------------------


@pytest.mark.parametrize(
    ("labels", "ignore_index", "value", "index"),
    [
        ([0, 7, 5], None, 7, 1),
        ([0, 5, -3], None, 5, 1),
        ([0, -3, 5], None, -3, 1),
        ([[0, 1, 2], [-100, 9, -1]], -100, 9, 4),
        ([[0, 1, 2], [-100, -1, 9]], -100, -1, 4),
    ],
)
def test_bad_label_message_names_the_first_bad_index_and_its_value(xp, asxp, labels, ignore_index, value, index):
    labels = np.array(labels)
    logits = np.zeros(labels.shape + (3,))
    allowed = "[0, 3)" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
    expected = re.escape(f"targets must be class indices in {allowed}, got {value} at flat index {index}")
    assert labels.reshape(-1)[index] == value  # the message's index really holds that value
    with pytest.raises(ValueError, match=expected):
        ce.softmax_cross_entropy(asxp(logits), asxp(labels), ignore_index=ignore_index)
    with pytest.raises(ValueError, match=expected):
        ce.log_loss(asxp(logits + 1 / 3), asxp(labels), ignore_index=ignore_index)


def test_cpu_bad_label_message_names_the_first_bad_index_and_its_value():
    logits = np.zeros((3, 3))
    with pytest.raises(ValueError, match=re.escape("got 7 at index 1")):
        cpu.lse_and_nll(logits, np.array([0, 7, -5]))
    with pytest.raises(ValueError, match=re.escape("got -5 at index 1")):
        cpu.lse_and_pick(logits, np.array([0, -5, 7]))


def test_uint_labels_report_their_own_value():
    """The value in the message is the caller's, not one wrapped by a cast to a signed dtype."""
    big = np.array([0, np.iinfo(np.uint64).max], dtype=np.uint64)
    with pytest.raises(ValueError, match=re.escape(f"got {np.iinfo(np.uint64).max} at flat index 1")):
        ce.softmax_cross_entropy(np.zeros((2, 3)), big)


# ---- finding 2: jax arrays with jax's default (x64 off) ------------------------------------------------


@pytest.fixture
def jnp32():
    """jax.numpy with 64-bit types off (jax's default; the core xp fixture turns them on)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    with jax.enable_x64(False):
        assert jnp.asarray([1]).dtype == jnp.int32
        yield jnp


def test_jax_int32_bad_labels_raise_the_clear_value_error(jnp32):
    cases = [
        (lambda: ce.softmax_cross_entropy(jnp32.zeros((2, 3)), jnp32.array([0, 5])), "[0, 3), got 5 at flat index 1"),
        (lambda: ce.softmax_cross_entropy(jnp32.zeros((2, 3)), jnp32.array([0, -5]), ignore_index=-100),
         "[0, 3) or ignore_index=-100, got -5 at flat index 1"),
        (lambda: ce.softmax_cross_entropy(jnp32.zeros((2, 3)), jnp32.array([-1, 0])), "got -1 at flat index 0"),
        (lambda: ce.log_loss(jnp32.full((2, 3), 1 / 3), jnp32.array([0, 5])), "got 5 at flat index 1"),
    ]
    for call, message in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=re.escape(message)):
                call()


def test_jax_int32_labels_give_no_warning_and_the_torch_value(jnp32):
    """No 'int64 ... truncated to int32' UserWarning, and the loss of F.cross_entropy."""
    x = LOGITS.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ce.softmax_cross_entropy(jnp32.asarray(x), jnp32.asarray(LABELS), ignore_index=-100)
        got_ll = ce.log_loss(jnp32.asarray(np.full((7, 5), 0.2, np.float32)), jnp32.asarray(LABELS),
                             ignore_index=np.int64(-100), reduction="sum")
        # an ignore_index outside int32 cannot match any label: every row counts
        got_far = ce.softmax_cross_entropy(jnp32.asarray(x), jnp32.asarray(np.abs(LABELS) % 5),
                                           ignore_index=2**40)
        loss, grad = ce.softmax_cross_entropy_and_grad(jnp32.asarray(x), jnp32.asarray(LABELS), ignore_index=-100)
    assert got.dtype == jnp32.float32
    expected = torch_ce(x.astype(np.float64), LABELS)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(got_ll), 5 * np.log(5), rtol=1e-6)
    np.testing.assert_allclose(float(got_far), torch_ce(x.astype(np.float64), np.abs(LABELS) % 5), rtol=1e-6)
    t = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    F.cross_entropy(t, torch.from_numpy(LABELS)).backward()
    np.testing.assert_allclose(np.asarray(grad), t.grad.numpy(), rtol=1e-5, atol=1e-7)
