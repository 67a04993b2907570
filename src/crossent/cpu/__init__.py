"""Fast path for numpy arrays on the CPU: row-wise log-sum-exp, the picked logit and the gradient.

:func:`crossent.softmax_cross_entropy` calls into this module for numpy logits with integer
labels (the loss of row i is ``lse[i] - picked[i]``) and with probability targets
(:func:`soft_cross_entropy`, :func:`softmax_minus_targets`). With numba installed (the ``crossent[fast]``
extra) the work is done by compiled kernels that run over the rows in parallel, read each row
from memory once and allocate nothing of the logits' size. Without numba, the same functions run
blocked numpy code in float64 (slower, about as much extra memory as one block of rows).

Label smoothing on class indices has kernels of its own (:func:`_smoothed_rows`). Calls of
:func:`crossent.softmax_cross_entropy` that no kernel takes (no numba; a softcap; a z-loss with
label smoothing or with probability targets; probability targets with class weights or label
smoothing) run ``crossent.cpu._blocked``
instead: the Array-API path's arithmetic, in the logits' dtype, a block of rows at a time (within a
few ulps of it, a confident row's small loss kept; a few MiB of extra memory instead of several
copies of the logits).

The kernels are compiled on first use and cached on disk (numba ``cache=True``), so
``import crossent`` does not import numba. Set ``crossent.cpu.ENABLED = False`` or the
environment variable ``CROSSENT_CPU_FAST=0`` to switch both off (:func:`enabled` and
:func:`available` return False; the numpy code is then used here, and
:func:`crossent.softmax_cross_entropy` takes its Array-API path).
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from typing import Any

import numpy as np

__all__ = ["available", "enabled", "lse_and_nll", "lse_and_pick", "soft_cross_entropy", "softmax_minus_onehot",
           "softmax_minus_targets"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# numpy fallback: rows per block are chosen so that a block's temporaries stay near this size.
_BLOCK_BYTES = 1024 * 1024

ENABLED = True
"""Set to False to switch the numpy fast paths off, the kernels and the blocked path alike
(:func:`enabled` and :func:`available` return False; e.g. to time the Array-API path)."""

_numba_importable: bool | None = None
# Inputs with fewer elements run serially: starting the thread pool costs more than the work.
_PARALLEL_MIN_ELEMENTS = 1 << 16
# The process that first ran a parallel kernel. A process forked from it must not use numba's
# thread pool (GNU OpenMP is not fork-safe: numba terminates such a child), so it runs serially.
_parallel_pid: int | None = None
# Whether numba's threading layer is "workqueue", which aborts the process on concurrent use from
# several threads; None until a parallel kernel has run (``_serialized``).
_workqueue: bool | None = None
_parallel_lock = threading.Lock()


def enabled() -> bool:
    """Whether the numpy fast paths are switched on: :data:`ENABLED` is true and the environment
    variable ``CROSSENT_CPU_FAST`` is not ``"0"`` (the compiled kernels also need numba:
    :func:`available`; the blocked numpy path of :func:`crossent.softmax_cross_entropy` does not).

    >>> isinstance(enabled(), bool)
    True
    """
    return ENABLED and os.environ.get("CROSSENT_CPU_FAST", "1") != "0"


def available() -> bool:
    """Whether the compiled (numba) kernels can be used.

    True when numba imports and the fast paths are :func:`enabled`.
    The import is tried once per process; this call does not compile anything.

    >>> isinstance(available(), bool)
    True
    """
    global _numba_importable
    if not enabled():
        return False
    if _numba_importable is None:
        try:
            import numba  # noqa: F401
        except ImportError:
            _numba_importable = False
        else:
            _numba_importable = True
    return _numba_importable


def _kernel(name: str, dtype: np.dtype, size: int) -> Any:
    """The compiled kernel ``name`` for ``dtype``: parallel over rows, or serial for small inputs
    and in a process forked after the parallel kernels ran. Under numba's workqueue threading
    layer (where neither TBB nor OpenMP is available) the parallel kernels are called one at a
    time (``_serialized``): that layer terminates the process when two threads enter it at once."""
    global _parallel_pid
    kernels = importlib.import_module("crossent.cpu._kernels")
    suffix = "_f32" if dtype == np.float32 else "_f64"
    pid = os.getpid()
    if size < _PARALLEL_MIN_ELEMENTS or (_parallel_pid is not None and _parallel_pid != pid):
        return getattr(kernels, name + suffix + "_serial")
    _parallel_pid = pid
    kernel = getattr(kernels, name + suffix)
    if _workqueue is False:
        return kernel
    return functools.partial(_serialized, kernel)


def _serialized(kernel: Any, *args: Any) -> Any:
    """``kernel(*args)`` under ``_parallel_lock``. numba names its threading layer only once a
    parallel kernel has run (``numba.threading_layer()`` raises before), so the first calls are
    serialized whatever the layer; after one, only the workqueue layer's are."""
    global _workqueue
    with _parallel_lock:
        result = kernel(*args)
        if _workqueue is None:
            import numba

            try:
                _workqueue = numba.threading_layer() == "workqueue"
            except ValueError:  # not started (e.g. a kernel that ran no parallel region)
                pass
    return result


def _check_logits(logits: object) -> np.ndarray:
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"logits must be a numpy.ndarray, got {type(logits).__name__}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"logits must have dtype float32 or float64, got {logits.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {logits.shape}")
    if not logits.flags.c_contiguous:
        raise ValueError(
            "logits must be C-contiguous (rows laid out one after another), got strides "
            f"{logits.strides} for shape {logits.shape}; pass np.ascontiguousarray(logits)"
        )
    return logits


def _check_labels(labels: object, n: int, c: int) -> np.ndarray:
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a numpy.ndarray, got {type(labels).__name__}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match logits, got {labels.shape}")
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= c:
            i = int(np.argmax((labels < 0) | (labels >= c)))  # the first invalid label
            raise ValueError(
                f"labels must lie in [0, {c}) (the number of classes), got {int(labels[i])} at index {i}"
            )
    return np.ascontiguousarray(labels, dtype=np.int64)


def _lse_pick_nll(logits: object, labels: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = _check_logits(logits)
    n, c = logits.shape
    labels = _check_labels(labels, n, c)
    lse, picked, nll = (np.empty(n, dtype=logits.dtype) for _ in range(3))
    if n == 0:
        return lse, picked, nll
    if available():
        _kernel("lse_pick_nll", logits.dtype, logits.size)(logits, labels, lse, picked, nll)
    else:
        _lse_pick_nll_numpy(logits, labels, lse, picked, nll)
    return lse, picked, nll


def lse_and_pick(logits: np.ndarray, labels: np.ndarray, /) -> tuple[np.ndarray, np.ndarray]:
    r"""Row-wise log-sum-exp of the logits and the logit of each row's label.

    .. math::

        \mathrm{lse}_i = \log \sum_j e^{x_{ij}}
                       = m_i + \log \sum_j e^{x_{ij} - m_i},\quad m_i = \max_j x_{ij},
        \qquad \mathrm{picked}_i = x_{i, y_i},

    so that :math:`\mathrm{lse}_i - \mathrm{picked}_i` is row i's softmax cross-entropy in nats
    (:func:`lse_and_nll` gives that difference without the rounding of ``lse`` in between).
    The sum of exponentials is accumulated in float64. The shift :math:`m_i` is taken as 0 when
    it is not finite, as in :func:`crossent.softmax_cross_entropy`: a row whose entries are all
    ``-inf`` gives ``-inf``, a row holding ``+inf`` gives ``+inf``, and NaN anywhere in a row gives
    NaN.

    Args:
      logits: ``[N, C]`` C-contiguous numpy array of float32 or float64.
      labels: ``[N]`` integer array, every entry in ``[0, C)``.

    Returns:
      ``(lse, picked)``: two ``[N]`` arrays of the logits' dtype.

    Raises:
      TypeError, ValueError: naming the argument, for anything else.

    >>> x = np.log(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]))
    >>> lse, picked = lse_and_pick(x, np.array([1, 1]))
    >>> np.round(lse - picked, 4)  # -ln 0.8, -ln 0.2
    array([0.2231, 1.6094])
    """
    lse, picked, _ = _lse_pick_nll(logits, labels)
    return lse, picked


def lse_and_nll(logits: np.ndarray, labels: np.ndarray, /) -> tuple[np.ndarray, np.ndarray]:
    r"""Row-wise log-sum-exp and softmax cross-entropy (negative log-likelihood) of the labels.

    .. math::

        \mathrm{nll}_i = -\log \mathrm{softmax}(x_i)_{y_i}
                       = (m_i - x_{i, y_i}) + \log \sum_j e^{x_{ij} - m_i},
        \qquad m_i = \max_j x_{ij},

    evaluated in float64 in that order and rounded once: the first term is exact, and the log of
    the sum is ``log1p`` of the terms below the maximum when one entry attains it. So the loss is
    accurate relative to its own size even when it is far below ``|lse|`` (float32 logits near
    1e4, confident rows), where ``lse - picked`` from :func:`lse_and_pick` would have lost it to
    the rounding of ``lse``. Conventions for -inf, +inf and NaN as in :func:`lse_and_pick`
    (``nll = lse - x_{i, y_i}`` in IEEE arithmetic there: +inf on a -inf label logit), except
    that a row holding +inf has ``nll`` NaN whatever its label, as ``F.cross_entropy`` gives
    (its log-softmax is NaN across such a row).

    Args:
      logits: ``[N, C]`` C-contiguous numpy array of float32 or float64.
      labels: ``[N]`` integer array, every entry in ``[0, C)``.

    Returns:
      ``(lse, nll)``: two ``[N]`` arrays of the logits' dtype.

    >>> x = np.array([[1e4, 1e4 - 20.0, 1e4 - 30.0]], dtype=np.float32)
    >>> lse, nll = lse_and_nll(x, np.array([0]))
    >>> print(f"{nll[0]:.6e} = {np.exp(-20.0) + np.exp(-30.0):.6e}")  # lse - picked would give 0
    2.061247e-09 = 2.061247e-09
    """
    lse, _, nll = _lse_pick_nll(logits, labels)
    return lse, nll


def softmax_minus_onehot(
    logits: np.ndarray,
    labels: np.ndarray,
    scale: float | np.ndarray,
    out: np.ndarray,
    /,
    *,
    keep: np.ndarray | None = None,
    z_scale: float | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Write the scaled gradient of softmax cross-entropy into ``out``; return ``(lse, nll)``.

    .. math::

        \mathrm{out}_{ij} = s_i \left(\mathrm{softmax}(x_i)_j - [j = y_i]\right)
            + r_i\, \mathrm{lse}_i\, \mathrm{softmax}(x_i)_j,
        \qquad \mathrm{softmax}(x_i)_j = e^{x_{ij} - \mathrm{lse}_i},

    which is :math:`\partial / \partial x_{ij}` of :math:`s_i \ell_i + \tfrac{r_i}{2}
    \mathrm{lse}_i^2` for :math:`\ell_i = \mathrm{lse}_i - x_{i, y_i}`: with ``z_scale`` r (None:
    0), a z-loss :math:`z\, \mathrm{lse}^2` weighted by :math:`t_i` in the sum has :math:`r_i = 2 z
    t_i`; a row with :math:`r_i = 0` gets :math:`s_i (\mathrm{softmax} - \mathrm{onehot})` to the
    bit. Ignored rows get exact zeros whatever their logits: by default the rows with :math:`s_i =
    0` (and :math:`r_i = 0`); with ``keep``, the rows where it is False, and a kept row with
    :math:`s_i = r_i = 0` gets the product in IEEE arithmetic (zeros, or NaN where its softmax is
    NaN: a NaN or ``+inf`` logit, or all ``-inf``; e.g. a class weight of 0 on such a row, as in
    PyTorch). A kept row holding ``+inf`` has no softmax: its ``nll`` and its whole gradient row
    are NaN whatever :math:`s_i` and :math:`r_i`, as in ``F.cross_entropy``.
    The row's log-sum-exp is computed in float64 and used unrounded; the returned ``lse`` and
    ``nll`` equal :func:`lse_and_nll`'s, so one call gives both the loss and its gradient.

    Args:
      logits: ``[N, C]`` C-contiguous numpy array of float32 or float64.
      labels: ``[N]`` integer array, every entry in ``[0, C)``.
      scale: a real number (every row) or an ``[N]`` array of per-row factors, e.g.
        ``weight[labels] / weight[labels].sum()`` for a weighted mean.
      out: ``[N, C]`` C-contiguous array of the logits' dtype; may be ``logits`` itself, or a
        view of exactly its memory (in place), but must not overlap it otherwise.
      keep: None, or an ``[N]`` bool array: False marks an ignored row (exact zeros).
      z_scale: None, a real number (every row) or an ``[N]`` array: the z-loss term's factors r.

    Returns:
      ``(lse, nll)``: two ``[N]`` arrays of the logits' dtype.

    >>> x = np.array([[0.0, 0.0], [0.0, np.log(3.0)]])
    >>> g = np.empty_like(x)
    >>> lse, nll = softmax_minus_onehot(x, np.array([0, 1]), 0.5, g)
    >>> g
    array([[-0.25 ,  0.25 ],
           [ 0.125, -0.125]])
    >>> np.round(nll, 4)  # ln 2, ln(4/3)
    array([0.6931, 0.2877])
    """
    logits = _check_logits(logits)
    n, c = logits.shape
    labels = _check_labels(labels, n, c)
    _check_out(out, logits)
    scale_rows = _scale_rows(scale, n)
    z_rows = np.zeros(n) if z_scale is None else _scale_rows(z_scale, n, "z_scale")
    keep_rows = _keep_rows(keep, (scale_rows != 0.0) | (z_rows != 0.0), n)
    lse = np.empty(n, dtype=logits.dtype)
    nll = np.empty(n, dtype=logits.dtype)
    if n == 0:
        return lse, nll
    if available():
        kernel = _kernel("softmax_minus_onehot", logits.dtype, logits.size)
        kernel(logits, labels, np.ascontiguousarray(scale_rows), np.ascontiguousarray(z_rows), keep_rows, out,
               lse, nll)
    else:
        _softmax_minus_onehot_numpy(logits, labels, scale_rows, z_rows, keep_rows, out, lse, nll)
    return lse, nll


def _check_targets(targets: object, logits: np.ndarray) -> np.ndarray:
    if not isinstance(targets, np.ndarray):
        raise TypeError(f"targets must be a numpy.ndarray, got {type(targets).__name__}")
    if targets.dtype.kind != "f":
        raise TypeError(f"targets must be floating-point weights (probabilities), got dtype {targets.dtype}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the shape of logits {logits.shape}, got {targets.shape}")
    if targets.dtype in (np.float32, np.float64) and targets.flags.c_contiguous:
        return targets  # the kernels round each entry to the logits' dtype as they read it
    return np.ascontiguousarray(targets, dtype=logits.dtype)


def soft_cross_entropy(logits: np.ndarray, targets: np.ndarray, /) -> tuple[np.ndarray, np.ndarray]:
    r"""Row-wise log-sum-exp and cross-entropy against soft targets (e.g. probabilities).

    .. math::

        \mathrm{ce}_i = -\sum_j t_{ij} \log \mathrm{softmax}(x_i)_j
                      = \sum_j t_{ij} (m_i - x_{ij}) + \log\Big(\sum_j e^{x_{ij} - m_i}\Big)
                        \sum_j t_{ij},

    accumulated in float64 and rounded once; a zero target contributes nothing, also on a
    ``-inf`` logit (0 log 0 = 0), and the targets are used as given (not renormalized). A row
    whose maximum is not finite follows :func:`crossent.softmax_cross_entropy`'s arithmetic
    (shift 0): an all ``-inf`` row gives 0 against zero targets and NaN against positive ones; a
    row holding ``+inf`` gives NaN (and, in :func:`softmax_minus_targets`, a NaN gradient row unless
    ignored), as ``F.cross_entropy`` does.

    Args:
      logits: ``[N, C]`` C-contiguous numpy array of float32 or float64.
      targets: ``[N, C]`` floating array, taken as if converted to the logits' dtype (C-contiguous
        float32 or float64 targets are read in place, other ones copied).

    Returns:
      ``(lse, ce)``: two ``[N]`` arrays of the logits' dtype.

    >>> x = np.log(np.array([[0.25, 0.25, 0.5]]))
    >>> lse, ce = soft_cross_entropy(x, np.array([[0.0, 0.5, 0.5]]))
    >>> np.round(ce, 4)  # 0.5 ln 4 + 0.5 ln 2
    array([1.0397])
    """
    logits = _check_logits(logits)
    targets = _check_targets(targets, logits)
    n = logits.shape[0]
    lse = np.empty(n, dtype=logits.dtype)
    ce = np.empty(n, dtype=logits.dtype)
    if n == 0:
        return lse, ce
    if available():
        unused = np.empty((n, 0), dtype=logits.dtype)  # stands in for the gradient (read-only logits could not)
        _kernel("soft_ce", logits.dtype, logits.size)(logits, targets, unused, lse, ce)
    else:
        _soft_numpy(logits, targets, None, None, None, lse, ce)
    return lse, ce


def softmax_minus_targets(
    logits: np.ndarray,
    targets: np.ndarray,
    scale: float | np.ndarray,
    out: np.ndarray,
    /,
    *,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Write the scaled gradient of soft-target cross-entropy into ``out``; return ``(lse, ce)``.

    .. math::

        \mathrm{out}_{ij} = s_i \Big(\mathrm{softmax}(x_i)_j \sum_k t_{ik} - t_{ij}\Big),

    :math:`s_i\, \partial \mathrm{ce}_i / \partial x_{ij}` (``softmax - t`` for a distribution).
    Ignored rows get exact zeros, as in :func:`softmax_minus_onehot` (by default the rows with
    :math:`s_i = 0`; with ``keep``, the rows where it is False). ``(lse, ce)`` equal
    :func:`soft_cross_entropy`'s.

    Args:
      logits: ``[N, C]`` C-contiguous numpy array of float32 or float64.
      targets: ``[N, C]`` floating array, taken as if converted to the logits' dtype (C-contiguous
        float32 or float64 targets are read in place, other ones copied).
      scale: a real number or an ``[N]`` array of per-row factors.
      out: ``[N, C]`` C-contiguous array of the logits' dtype; may be ``logits`` or ``targets``
        itself (or a view of exactly the memory of either), but must not overlap them otherwise.
      keep: None, or an ``[N]`` bool array: False marks an ignored row (exact zeros).

    Returns:
      ``(lse, ce)``: two ``[N]`` arrays of the logits' dtype.

    >>> x = np.zeros((1, 2))
    >>> g = np.empty_like(x)
    >>> _ = softmax_minus_targets(x, np.array([[0.75, 0.25]]), 2.0, g)
    >>> g
    array([[-0.5,  0.5]])
    """
    logits = _check_logits(logits)
    targets = _check_targets(targets, logits)
    n = logits.shape[0]
    _check_out(out, logits)
    # The kernels read a row's targets before writing its gradient, entry by entry: out may be
    # the targets' own memory, but a shifted overlap would race between rows.
    _check_no_overlap(out, targets, "targets")
    scale_rows = _scale_rows(scale, n)
    keep_rows = _keep_rows(keep, scale_rows != 0.0, n)
    lse = np.empty(n, dtype=logits.dtype)
    ce = np.empty(n, dtype=logits.dtype)
    if n == 0:
        return lse, ce
    if available():
        kernel = _kernel("softmax_minus_targets", logits.dtype, logits.size)
        kernel(logits, targets, np.ascontiguousarray(scale_rows), keep_rows, out, lse, ce)
    else:
        _soft_numpy(logits, targets, scale_rows, keep_rows, out, lse, ce)
    return lse, ce


def _smoothed_rows(
    logits: np.ndarray,
    labels: np.ndarray,
    class_weight: np.ndarray | None,
    smoothing: float,
    scale: np.ndarray | None = None,
    out: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    r"""Label smoothing on class indices, by the compiled kernels (numba required: callers check
    :func:`available`): per row ``(lse, nll, smoothed, count, weight_sum)`` in the logits' dtype,
    where over the entries F whose logit is finite ``count`` = K = \|F\| (1 if none),
    ``weight_sum`` = :math:`\sum_{j \in F} w_j` and ``smoothed`` = :math:`\sum_{j \in F} w_j
    \log q_j` (``w`` = ``class_weight``, 1 when None), accumulated in float64. The row's loss is
    then :math:`(1 - \varepsilon) w_y \mathrm{nll} - \varepsilon\, \mathrm{smoothed} / K`
    (crossent's smoothing, spread over the finite logits). With ``out`` (and the row factors
    ``scale``), also its gradient in the same pass:
    :math:`a_i ((1 - \varepsilon) w_y (q - \mathrm{onehot}(y)) + \varepsilon (W q - w \odot f) / K)`,
    exact zeros on the ignored rows as in :func:`softmax_minus_onehot` (``keep``)."""
    logits = _check_logits(logits)
    n, c = logits.shape
    labels = _check_labels(labels, n, c)
    weight = np.ones(c) if class_weight is None else np.ascontiguousarray(class_weight, dtype=np.float64)
    if weight.shape != (c,):
        raise ValueError(f"class_weight must have shape ({c},), got {weight.shape}")
    want_grad = out is not None
    if want_grad:
        _check_out(out, logits)
        scale_rows = np.ascontiguousarray(_scale_rows(scale, n))
        keep_rows = _keep_rows(keep, scale_rows != 0.0, n)
    else:
        # A writable dummy the kernel never writes (read-only logits could not stand in for it).
        out, scale_rows, keep_rows = np.empty((n, 0), dtype=logits.dtype), np.zeros(n), np.zeros(n, dtype=bool)
    stats = tuple(np.empty(n, dtype=logits.dtype) for _ in range(5))
    if n:
        kernel = _kernel("smoothed", logits.dtype, logits.size)
        kernel(logits, labels, weight, float(smoothing), scale_rows, keep_rows, out, *stats, want_grad)
    return stats


def _check_out(out: object, logits: np.ndarray) -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != logits.shape or out.dtype != logits.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous {logits.dtype} array of shape {logits.shape} like logits, "
            f"got a {'C-contiguous' if out.flags.c_contiguous else 'non-contiguous'} "
            f"{out.dtype} array of shape {out.shape}"
        )
    if not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    _check_no_overlap(out, logits, "logits")


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are the same array or views of exactly the same elements (data
    pointer, shape and strides)."""
    return a is b or (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
                      and a.shape == b.shape and a.strides == b.strides)


def _check_no_overlap(out: np.ndarray, other: np.ndarray, name: str) -> None:
    """``out`` is ``other``'s memory exactly (in place) or does not overlap it."""
    if not _same_memory(out, other) and np.shares_memory(out, other):
        raise ValueError(f"out must be {name} itself or not overlap it, got a partial overlap")


def _keep_rows(keep: object, nonzero: np.ndarray, n: int) -> np.ndarray:
    """The kernels' per-row flags (C-contiguous bool, False: an ignored row, exact zeros):
    ``keep``, or by default ``nonzero`` (the rows with a factor that is not 0)."""
    if keep is None:
        return np.ascontiguousarray(nonzero)
    if not isinstance(keep, np.ndarray) or keep.dtype != np.bool_:
        kind = keep.dtype if isinstance(keep, np.ndarray) else type(keep).__name__
        raise TypeError(f"keep must be None or a numpy bool array, got {kind}")
    if keep.shape != (n,):
        raise ValueError(f"keep must have shape ({n},), got {keep.shape}")
    return np.ascontiguousarray(keep)


def _scale_rows(scale: float | np.ndarray, n: int, name: str = "scale") -> np.ndarray:
    try:
        scale_rows = np.asarray(scale)
    except (TypeError, ValueError):  # e.g. a ragged list
        scale_rows = np.asarray(None)
    if scale_rows.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must be a real number or an array of real numbers, got {type(scale).__name__}"
            + (f" of dtype {scale_rows.dtype}" if scale_rows.ndim else f" {scale!r}")
        )
    scale_rows = scale_rows.astype(np.float64, copy=False)
    if scale_rows.ndim == 0:
        return np.full(n, scale_rows, dtype=np.float64)
    if scale_rows.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {scale_rows.shape}")
    return scale_rows


# ---------------------------------------------------------------------------------------------
# numpy fallback (no numba): the same math, a block of rows at a time.


def _block_rows(c: int) -> int:
    return max(1, _BLOCK_BYTES // (8 * max(c, 1)))


def _block_lse_parts(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shift, log_s) in float64 for each row of a 2-D block (C >= 1), as the kernels form them:
    lse = shift + log_s, shift the row maximum over non-NaN entries; for a row whose maximum is
    not finite, shift is that maximum (NaN if the row holds a NaN) and log_s = 0."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.fmax.reduce(block, axis=1).astype(np.float64)
        finite = np.isfinite(m)
        shift = np.where(finite, m, 0.0)
        d = block - shift[:, None]  # float64
        top = d >= 0.0
        at_max = top.sum(axis=1).astype(np.float64)
        np.exp(d, out=d)
        d[top] = 0.0
        rest = d.sum(axis=1)
        log_s = np.where(at_max == 1.0, np.log1p(rest), np.log(at_max + rest))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shift[bad] = np.where(np.isnan(block[bad]).any(axis=1), np.nan, m[bad])
        log_s[bad] = 0.0
    return shift, log_s


def _lse_pick_nll_numpy(
    logits: np.ndarray, labels: np.ndarray, lse: np.ndarray, picked: np.ndarray, nll: np.ndarray
) -> None:
    n, c = logits.shape
    step = _block_rows(c)
    for start in range(0, n, step):
        stop = min(start + step, n)
        shift, log_s = _block_lse_parts(logits[start:stop])
        x_label = logits[np.arange(start, stop), labels[start:stop]].astype(np.float64)
        with np.errstate(invalid="ignore"):
            lse[start:stop] = shift + log_s
            picked[start:stop] = x_label
            nll[start:stop] = np.where(shift == np.inf, np.nan, (shift - x_label) + log_s)


def _softmax_minus_onehot_numpy(
    logits: np.ndarray,
    labels: np.ndarray,
    scale: np.ndarray,
    z_scale: np.ndarray,
    keep: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    nll: np.ndarray,
) -> None:
    n, c = logits.shape
    step = _block_rows(c)
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = logits[start:stop]
        block_labels = labels[start:stop]
        rows = np.arange(stop - start)
        shift, log_s = _block_lse_parts(block)
        x_label = block[rows, block_labels].astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            block_lse = shift + log_s
            lse[start:stop] = block_lse
            plus_inf = shift == np.inf  # a +inf logit: NaN loss and gradient row (_kernels._nll)
            nll[start:stop] = np.where(plus_inf, np.nan, (shift - x_label) + log_s)
            # (x - shift) - log_s as the kernels form it: x - lse, lse rounded at the logits'
            # magnitude, would lose log_s beyond |x| ~ 1e16 (and digits of it from ~1e8).
            p = np.exp((block - shift[:, None]) - log_s[:, None], dtype=np.float64)
            r = z_scale[start:stop]
            z_rows = r != 0.0
            z_term = (r * block_lse)[z_rows, None] * p[z_rows] if z_rows.any() else None
            p[rows, block_labels] -= 1.0
            p *= scale[start:stop, None]
            if z_term is not None:
                p[z_rows] += z_term
        p[plus_inf] = np.nan
        p[_zero_rows(keep[start:stop], scale[start:stop], block_lse, r)] = 0.0
        out[start:stop] = p


def _zero_rows(keep: np.ndarray, scale: np.ndarray, lse: np.ndarray, z_scale: np.ndarray | None = None) -> np.ndarray:
    """The rows whose gradient the kernels write as exact zeros (``_kernels._zero_grad``,
    ``_zero_grad_z``): the ignored ones, and a == 0 (and r == 0) where lse is finite (the product
    is 0 there anyway)."""
    zero = scale == 0.0
    if z_scale is not None:
        zero &= z_scale == 0.0
    return ~keep | (zero & np.isfinite(lse))


def _soft_numpy(
    logits: np.ndarray,
    targets: np.ndarray,
    scale: np.ndarray | None,
    keep: np.ndarray | None,
    out: np.ndarray | None,
    lse: np.ndarray,
    ce: np.ndarray,
) -> None:
    """:func:`soft_cross_entropy` (``out`` None) or :func:`softmax_minus_targets` in blocked numpy,
    with the kernels' conventions (shift 0 for a row whose maximum is not finite)."""
    n, c = logits.shape
    if c == 0:  # as the kernels: an empty sum, lse = log 0 (no gradient entries to write)
        lse[:] = -np.inf
        ce[:] = 0.0
        return
    step = _block_rows(c)
    for start in range(0, n, step):
        stop = min(start + step, n)
        x = logits[start:stop].astype(np.float64)
        t = targets[start:stop].astype(logits.dtype, copy=False).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            m = np.max(x, axis=1, keepdims=True)
            shift = np.where(np.isfinite(m), m, 0.0)
            e = np.exp(x - shift)
            s = e.sum(axis=1, keepdims=True)
            log_s = np.log(s)
            # 0 log 0 = 0 on an infinite logit; a NaN logit keeps its NaN.
            counted = (t != 0.0) | ~np.isinf(x)
            # A +inf logit (and no NaN): NaN loss and gradient row, as in PyTorch (_kernels._nll).
            plus_inf = m[:, 0] == np.inf  # np.max gives NaN where a NaN is in the row
            ce[start:stop] = np.where(
                plus_inf, np.nan, -np.sum(np.where(counted, t * ((x - shift) - log_s), 0.0), axis=1))
            block_lse = (shift + log_s)[:, 0]
            lse[start:stop] = block_lse
            if out is not None:
                g = t.sum(axis=1, keepdims=True) * (e / s) - t
                g *= scale[start:stop, None]
                g[plus_inf] = np.nan
                g[_zero_rows(keep[start:stop], scale[start:stop], block_lse)] = 0.0
                out[start:stop] = g
