r"""impl="auto" on the CPU: the compiled kernels of :mod:`crossent.cpu` behind autograd.

For float32/float64 CPU logits with class-index targets and no softcap (the common case),
``crossent.torch.cross_entropy`` runs numba kernels on the tensors' own memory
(numpy arrays of their memory, ``_np``: nothing is copied):

- forward without a gradient wanted: :func:`crossent.cpu.lse_and_nll`, one pass over each row
  (online log-sum-exp in float64, the loss ``(m - z_y) + log sum exp(z - m)`` rounded once),
  then :math:`\ell_i = w_{y_i} \mathrm{nll}_i` on the non-ignored rows, summed in float64;
- forward when the logits' gradient is wanted (grad mode on, logits requiring grad, not
  ``inplace_backward``): :func:`crossent.cpu.softmax_minus_onehot` returns the same losses and
  writes the gradient for an upstream gradient of 1 in the same pass,
  :math:`s_i (\mathrm{softmax}(z_i) - \mathrm{onehot}(y_i))` with :math:`s_i = w_{y_i}` ("none",
  "sum") or :math:`w_{y_i} / \sum w` ("mean"; 0 when the denominator is 0, the documented
  deviation); backward hands it on, multiplied by the upstream gradient unless that is 1 (one
  pass over the logits in all, as the Triton kernels do; the gradient is held from forward to
  backward, as torch holds its log-softmax);
- otherwise (``inplace_backward=True``, or a second backward through a retained graph) the
  backward writes :math:`s_i g_i (\ldots)` by the same kernel in one more pass, into the
  logits' own memory for ``inplace_backward``.

With label smoothing eps the smoothing kernels (``crossent.cpu._smoothed_rows``) take both
roles: :math:`\ell_i = (1 - \varepsilon) w_{y_i} \mathrm{nll}_i - \varepsilon S_i / K_i`, with
:math:`S_i = \sum_{j \in F} w_j \log \mathrm{softmax}(z_i)_j` over the K_i finite logits F
(crossent's smoothing), and the gradient
:math:`a_i ((1 - \varepsilon) w_{y_i} (q_i - \mathrm{onehot}(y_i)) + \varepsilon (W_i q_i - w \odot f_i) / K_i)`
with :math:`a_i` 1 ("none", "sum") or :math:`1 / \sum w` ("mean").

Ignored rows get exact zeros whatever their logits (the kernels' ``keep`` flags). A kept row whose
factor is 0 (class weight 0 on its label, an upstream gradient of 0, a "mean" whose denominator is
0) gets 0 times its gradient: zeros, or NaN where its softmax is NaN (all -inf or a NaN logit), as
on the chunked path and in PyTorch. The results equal impl="chunked" (tested to 1e-12 in float64);
only the speed differs: one or two passes over the logits, where the chunked path makes several
through temporaries. A kept row holding +inf has a NaN loss and a NaN gradient row on both, as
``F.cross_entropy`` gives (its softmax is not defined).

Class indices outside ``[0, C)`` (other than ``ignore_index``) raise a ValueError naming
``target`` here too when ``validate=False`` skipped the check (one min/max over the M indices).

Probability targets (targets and class weights that do not require a gradient) take one pass
over the logits for the loss and, when the logits' gradient is wanted (not ``inplace_backward``),
the gradient for an upstream gradient of 1 (otherwise the backward makes that pass):
:math:`\ell_i = -\sum_j t'_{ij} \log \mathrm{softmax}(z_i)_j + \zeta\, \mathrm{lse}_i^2` (a zero
target adds nothing) with :math:`t' = w \odot ((1 - \varepsilon) t + \varepsilon f / K)`, "mean"
dividing by the number of rows, and the gradient
:math:`s_i (\mathrm{softmax}(z_i) \sum_j t'_{ij} - t'_i + 2 \zeta\, \mathrm{lse}_i \mathrm{softmax}(z_i))`,
times the soft cap's derivative. The plain loss (no class weights, smoothing, z-loss or softcap)
runs :func:`crossent.cpu.soft_cross_entropy` / :func:`crossent.cpu.softmax_minus_targets`
(numba); everything else, and every call without numba, runs the blocked numpy pass
``crossent.cpu._blocked.soft_targets`` in the logits' dtype (a few MiB of buffers; float32 losses
summed in float64). When a row's loss is not finite (a -inf or NaN logit under a positive target,
an all -inf row, a +inf logit) the call goes to impl="chunked" instead, whose conventions for such
rows are this layer's (one difference stays: with label smoothing, a row of all -inf logits under
zero targets gives 0 here, with a NaN gradient, as core's numpy paths; "chunked" gives NaN).

A z-loss :math:`\zeta` without label smoothing adds :math:`\zeta\, \mathrm{lse}_i^2` per kept row
(not class-weighted; "mean" over the kept rows) and, to the gradient, :math:`r_i\, \mathrm{lse}_i
\mathrm{softmax}(z_i)` with :math:`r_i = 2 \zeta` (over the kept-row count for "mean") times the
upstream gradient, written by the same kernel (``softmax_minus_onehot``'s ``z_scale``).

Class indices with a softcap, or a z-loss with label smoothing, and every class-index call
without numba, run ``CpuBlockedCrossEntropy``: the row statistics of ``crossent.cpu._blocked.lse_and_nll`` in forward,
the gradient of ``crossent.cpu._blocked.gradient`` in backward (a second pass; in place with
``inplace_backward``). bf16/fp16 logits take impl="chunked".
"""

from __future__ import annotations

import math

import torch

from .._autograd import USE_REFERENCE, first_order_only
from ._reference import safe_divide


def class_index_path(logits2d: torch.Tensor, soft: bool, z_loss: float, softcap: float | None,
                     label_smoothing: float = 0.0) -> str | None:
    """Which CPU pass ``cross_entropy``'s impl="auto" takes for class indices: "kernels" (numba;
    label smoothing or a z-loss, not both; no softcap), "blocked" (``CpuBlockedCrossEntropy``: a
    softcap, a z-loss with label smoothing, or no numba), or None (probability targets; logits
    the passes cannot read in place; the fast paths switched off): impl="chunked"."""
    if soft or not _cpu_array(logits2d):
        return None
    try:
        from crossent import cpu
    except ImportError:
        return None
    if not cpu.enabled():
        return None
    kernels = softcap is None and not (z_loss and label_smoothing) and cpu.available()
    return "kernels" if kernels else "blocked"


def applies_soft(logits2d: torch.Tensor, target2d: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether impl="auto" can try the CPU soft-target passes (``soft_cross_entropy``) on this call:
    float32/float64 contiguous CPU logits, the numpy fast paths switched on (numba is not needed:
    without it every call takes the blocked pass), targets and class weights that do not require
    a gradient (those take impl="reference")."""
    if target2d.requires_grad or (weight is not None and weight.requires_grad):
        return False
    if not _cpu_array(logits2d):
        return False
    try:
        from crossent import cpu
    except ImportError:
        return False
    return cpu.enabled()


def _kernels_take(logits2d: torch.Tensor) -> bool:
    if not _cpu_array(logits2d):
        return False
    try:
        from crossent import cpu
    except ImportError:
        return False
    return cpu.available()


def _cpu_array(logits2d: torch.Tensor) -> bool:
    """Whether crossent.cpu can read ``logits2d`` in place: a non-empty C-contiguous float32 or
    float64 CPU tensor."""
    if logits2d.device.type != "cpu" or logits2d.dtype not in (torch.float32, torch.float64):
        return False
    # A negative-bit view (torch._neg_view, .conj().imag) holds -x in memory: the kernels would
    # read the raw memory (and in place, write it), so such logits take the chunked path.
    return logits2d.is_contiguous() and logits2d.numel() > 0 and not logits2d.is_neg()


def _gradient_buffer(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor like the (C-contiguous CPU) logits ``x`` for the passes to write the
    gradient into: ``torch.empty`` (so ``.grad`` has torch's own, resizable storage, as after
    ``F.cross_entropy``: ``resize_(0)`` frees it), with transparent huge pages asked for on the
    large ones (``_advise_huge_pages``). Without huge pages the first write faults 512 small pages
    per 2 MiB: with plain ``torch.empty`` the loss and gradient pass of ``cet.cross_entropy(x,
    t).backward()`` at 200000 x 1000 float32 (2 shared cores) took 0.77 s against 0.62 s with
    numpy's allocation, which asks for huge pages itself; with the advice it is as fast (one run,
    the two alternated over 11 repeats: medians 0.406 s vs numpy's 0.434 s, minima 0.396 / 0.397 s;
    both buffers get 760 MiB of AnonHugePages)."""
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # not the default device
    _advise_huge_pages(grad)
    return grad


# Below this the buffer cannot hold a 2 MiB huge page once aligned (numpy's threshold: 4 MiB).
_HUGE_PAGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>
_madvise = None  # libc's madvise via ctypes, False where it is not to be had


def _advise_huge_pages(t: torch.Tensor) -> None:
    """``madvise(MADV_HUGEPAGE)`` on the page-aligned part of ``t``'s memory (Linux; nothing
    elsewhere or when the call fails: the memory is then used in small pages, slower to fault)."""
    global _madvise
    nbytes = t.untyped_storage().nbytes()
    if nbytes < _HUGE_PAGE_MIN_BYTES or _madvise is False:
        return
    if _madvise is None:
        _madvise = _load_madvise()
        if _madvise is False:
            return
    import mmap

    page = mmap.PAGESIZE
    start = t.untyped_storage().data_ptr()
    lo = -(-start // page) * page
    hi = (start + nbytes) // page * page
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_HUGEPAGE)  # a failure (e.g. THP off) leaves small pages


def _load_madvise():
    """libc's ``madvise`` as a ctypes function on Linux, else False."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class _TensorMemory:
    """Holds a CPU tensor for the numpy array that ``_np`` makes of its memory (the array's
    ``base``: the tensor lives as long as the array)."""

    def __init__(self, t: torch.Tensor, typestr: str) -> None:
        self.tensor = t
        self.__array_interface__ = {
            "version": 3, "shape": tuple(t.shape), "typestr": typestr, "data": (t.data_ptr(), False),
            "strides": tuple(stride * t.element_size() for stride in t.stride()),
        }


def _np(t: torch.Tensor):
    """A writable numpy array of the CPU tensor ``t``'s own memory, like ``t.numpy()`` except that
    the storage stays resizable: ``Tensor.numpy()`` marks it not resizable for good, so a ``.grad``
    (or the logits) that went through it could not be ``resize_``d or freed in place afterwards,
    as they can after ``F.cross_entropy``. A tensor with the negative (or conjugate) bit set is
    resolved first, into a copy: the view reads raw memory, which holds -t there (``t.numpy()``
    refuses such tensors); logits with it never get here (``_cpu_array``), so nothing written
    through the array is lost."""
    import numpy as np

    if t.device.type != "cpu":
        raise ValueError(f"crossent.cpu reads CPU memory, got a tensor on {t.device}")
    if t.is_neg() or t.is_conj():
        t = t.resolve_conj().resolve_neg()
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dtype=_numpy_dtype(t.dtype))
    return np.asarray(_TensorMemory(t, _numpy_dtype(t.dtype).str))


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np

    return np.dtype({torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64,
                     torch.int32: np.int32, torch.bool: np.bool_}[dtype])


def _reduce(per_row: torch.Tensor, denominator: torch.Tensor, reduction: str) -> torch.Tensor:
    """The float64 loss of the per-row losses: as is, their sum, or their sum / denominator."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return safe_divide(per_row.sum(), denominator)


def _gradient(ctx, grad_output: torch.Tensor, write) -> torch.Tensor:
    """The logits' gradient: row factors s_i = w_i g_i ("none"), w_i g ("sum") or w_i g / den
    ("mean"; 0 when den is 0), from ``ctx.saved_tensors`` = (logits, target, w_row, den);
    ``write(x, target, s, keep, out)`` (numpy arrays; ``keep`` False on the ignored rows, whose
    gradient is exact zeros) writes it into ``out``, the logits' own memory with
    ``ctx.inplace_backward``."""
    logits, target, w_row, denominator = ctx.saved_tensors
    g = _on_kept_rows(ctx, grad_output.to(torch.float64))
    scale = w_row * g if ctx.reduction != "mean" else w_row * safe_divide(g, denominator)
    # The z-loss term's factors (``ctx.z_unit``: those of an upstream gradient of 1), if any.
    z_unit = getattr(ctx, "z_unit", None)
    z_scale = None if z_unit is None else _np((z_unit * g).expand(z_unit.shape).contiguous())
    x = logits.detach()
    grad = x if ctx.inplace_backward else _gradient_buffer(x)
    x_np = _np(x)
    out = x_np if ctx.inplace_backward else _np(grad)  # the same array object: in place
    z_args = () if z_scale is None else (z_scale,)  # the class-index kernels' z-loss term
    write(x_np, _np(target), _np(scale.contiguous()), _keep(ctx.valid, x.shape[0]), out, *z_args)
    if ctx.inplace_backward:
        # The kernel wrote through numpy, behind autograd's back: bump the logits' version so
        # that an op which saved them (exp, sigmoid, ...) raises autograd's in-place error
        # instead of reading the gradient as its output, as the chunked path's torch ops do.
        torch.autograd.graph.increment_version(logits)
    return grad


def _keep(valid: torch.Tensor | None, num_rows: int):
    """The kernels' ``keep`` flags (numpy bool): ``valid``, or every row when it is None."""
    import numpy as np

    return np.ones(num_rows, dtype=bool) if valid is None else _np(valid.contiguous())


def _check_target_range(safe: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class indices (ignored rows already 0) in ``[0, num_classes)``: with ``validate=False``
    nothing checked them, and crossent.cpu would name its own argument (``labels``) or a
    weight lookup fail with an IndexError; one min/max over the M indices."""
    lo, hi = torch.aminmax(safe)
    if int(lo) < 0 or int(hi) >= num_classes:
        bad = (safe < 0) | (safe >= num_classes)
        first = int(safe[bad][0])
        raise ValueError(
            f"target must hold class indices in [0, {num_classes}) or ignore_index={ignore_index}, got {first}"
        )


def _unit_scale(w_row: torch.Tensor, denominator: torch.Tensor, reduction: str) -> torch.Tensor:
    """The row factors s_i of ``_gradient`` for an upstream gradient of 1 (float64)."""
    if reduction != "mean":
        return w_row
    return w_row * safe_divide(torch.ones((), dtype=torch.float64, device=w_row.device), denominator)


def _backward(ctx, grad_output: torch.Tensor, write) -> torch.Tensor:
    """The gradient the forward wrote for an upstream gradient of 1 (``ctx.grad``), handed on
    without a reference kept (autograd may take it as is) and multiplied by ``grad_output``
    unless that is 1 (a CPU tensor: no sync to read it); without one (``inplace_backward``, or a
    second backward through a retained graph), written now by ``_gradient``."""
    grad, ctx.grad = ctx.grad, None
    if grad is None:
        return _gradient(ctx, grad_output, write)
    if not bool((grad_output == 1).all()):
        g = _on_kept_rows(ctx, grad_output.to(grad.dtype))
        grad.mul_(g[:, None] if g.ndim else g)
    return grad


def _on_kept_rows(ctx, g: torch.Tensor) -> torch.Tensor:
    """The upstream gradient ``g`` (a scalar, or per row), 0 on ignored rows (``ctx.valid``;
    None: every row kept): selected, not multiplied, so that a NaN or inf there (``loss /
    seq_len`` with ``seq_len = 0`` on a padded sequence) leaves their gradient 0, as in
    ``F.cross_entropy`` and the chunked path."""
    if ctx.valid is None:
        return g
    return torch.where(ctx.valid, g, torch.zeros((), dtype=g.dtype, device=g.device))


class CpuFastCrossEntropy(torch.autograd.Function):
    """(M, C) logits and (M,) class indices -> the loss, by crossent.cpu's kernels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits, target, weight, ignore_index, reduction, label_smoothing, inplace_backward, grad_enabled,
        z_loss=0.0,
    ):
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target)).to(torch.int64).contiguous()
        _check_target_range(safe, logits.shape[1], ignore_index)
        w_row = valid.to(torch.float64)
        if weight is not None:
            w_row = weight.to(torch.float64)[safe] * w_row
        denominator = w_row.sum()
        eps = float(label_smoothing)
        write = _writer(weight, eps)
        # The row factors of the gradient: w_y (the class-index kernel), or 1 (the smoothing
        # kernel weighs the (1 - eps) term by w_y itself), over the "mean" denominator.
        row_factor = w_row if not eps else valid.to(torch.float64)
        # z-loss (class_index_path: never with smoothing): z lse^2 per kept row, not class-weighted,
        # "mean" over the kept rows; its gradient 2 z lse softmax by the kernel's z_scale.
        z = float(z_loss)
        z_unit = None
        if z:
            n_valid = valid.sum().to(torch.float64)
            z_unit = 2.0 * z * valid.to(torch.float64)
            if reduction == "mean":
                z_unit = z_unit * safe_divide(torch.ones((), dtype=torch.float64, device=n_valid.device), n_valid)
        x = logits.detach()
        # needs_input_grad ignores torch.no_grad(); grad_enabled is taken outside forward.
        ctx.grad = None
        out = None
        if grad_enabled and ctx.needs_input_grad[0] and not inplace_backward:
            # The gradient for an upstream gradient of 1, written in the loss's own pass.
            ctx.grad = _gradient_buffer(x)
            out = _np(ctx.grad)
        stats = write(_np(x), _np(safe), _np(_unit_scale(row_factor, denominator, reduction).contiguous()),
                      _np(valid), out, None if z_unit is None or out is None else _np(z_unit))
        nll = torch.from_numpy(stats[1]).to(torch.float64)
        if eps:
            ce = (1.0 - eps) * w_row * nll if eps < 1.0 else torch.zeros_like(nll)
            per_row = ce - eps * torch.from_numpy(stats[2]).to(torch.float64) / torch.from_numpy(stats[3]).to(
                torch.float64)
            if eps == 1.0:  # a row without a finite logit (lse -inf or NaN): NaN, as at any other eps (as core)
                per_row = torch.where(torch.from_numpy(stats[0]) > -math.inf, per_row, math.nan)
        else:
            per_row = nll * w_row
        # where, not a product: an ignored row adds 0 even when its logits are NaN or -inf
        per_row = torch.where(valid, per_row, 0.0)
        ctx.save_for_backward(logits, safe, row_factor, denominator)
        ctx.valid = None if bool(valid.all()) else valid
        ctx.reduction = reduction
        ctx.inplace_backward = inplace_backward
        ctx.write = write
        ctx.z_unit = z_unit
        loss = _reduce(per_row, denominator, reduction)
        if z:
            lse = torch.from_numpy(stats[0]).to(torch.float64)
            z_row = torch.where(valid, z * lse * lse, 0.0)
            loss = loss + _reduce(z_row, n_valid, reduction)
        return loss.to(logits.dtype)

    @staticmethod
    @first_order_only("cross_entropy (impl='auto', CPU kernels)", USE_REFERENCE)
    def backward(ctx, grad_output):  # type: ignore[override]
        grad = _backward(ctx, grad_output, ctx.write)
        # Gradients for (logits, target, weight, ignore_index, reduction, label_smoothing,
        # inplace_backward, grad_enabled, z_loss).
        return grad, None, None, None, None, None, None, None, None


def _writer(weight: torch.Tensor | None, eps: float):
    """``write(x, target, scale, keep, out, z_scale=None)`` (numpy arrays; ``out`` None: the loss
    alone; ``z_scale``: the z-loss term's row factors, class indices without smoothing) -> the
    kernel's per-row outputs (``[0]`` is lse, ``[1]`` nll; with smoothing ``[2]``, ``[3]`` are S
    and K): the class-index kernels, or the smoothing kernel with the class weights and eps bound."""
    from crossent import cpu

    if not eps:
        def write(x, target, scale, keep, out, z_scale=None):
            if out is None:
                return cpu.lse_and_nll(x, target)
            return cpu.softmax_minus_onehot(x, target, scale, out, keep=keep, z_scale=z_scale)

        return write
    class_weight = None if weight is None else _np(weight.detach().to(torch.float64).contiguous())

    def write_smoothed(x, target, scale, keep, out, z_scale=None):
        return cpu._smoothed_rows(x, target, class_weight, eps, scale if out is not None else None, out, keep)

    return write_smoothed


def soft_cross_entropy(logits2d: torch.Tensor, target2d: torch.Tensor, weight: torch.Tensor | None,
                       label_smoothing: float, z_loss: float, softcap: float | None, reduction: str,
                       inplace_backward: bool) -> torch.Tensor | None:  # fmt: skip
    """The loss of (M, C) logits against (M, C) probability targets by one CPU pass
    (``_soft_pass``), or None when a row's loss is not finite (the caller then takes
    impl="chunked")."""
    x = logits2d.detach()
    t = target2d.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(x.dtype)  # float32/float64 targets of the other dtype: no copy (rounded as read)
    write = _soft_pass(x, weight, label_smoothing, z_loss, softcap)
    if write.numba:
        t = t.contiguous()
    grad = out = scale = None
    if torch.is_grad_enabled() and logits2d.requires_grad and not inplace_backward:
        # The gradient for an upstream gradient of 1, written in the loss's own pass (wasted only
        # when a row's loss is not finite and the chunked path takes over).
        w_row = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        grad = _gradient_buffer(x)
        out, scale = _np(grad), _np(_unit_scale(w_row, w_row.sum(), reduction))
    lse, ce = write(_np(x), _np(t), scale, _keep(None, x.shape[0]) if out is not None else None, out)
    row_loss = torch.from_numpy(ce).to(torch.float64)
    if z_loss:
        lse64 = torch.from_numpy(lse).to(torch.float64)
        row_loss = row_loss + z_loss * lse64 * lse64
    if not bool(torch.isfinite(row_loss).all()):
        return None
    return CpuFastSoftCrossEntropy.apply(logits2d, t, row_loss, reduction, inplace_backward, grad, write)


def _soft_pass(x: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float, z_loss: float,
               softcap: float | None):  # fmt: skip
    """``write(x, t, scale, keep, out)`` (numpy arrays; ``scale``, ``keep`` and ``out`` None: the
    loss alone) -> ``(lse, ce)`` per row, with the finished gradient written into ``out`` for the
    row factors ``scale`` (which also weigh the z-loss term; every row is kept: probability targets
    ignore none): crossent.cpu's numba soft-target kernels for the plain loss (``write.numba``),
    else the blocked numpy pass with the options folded in."""
    from crossent import cpu
    from crossent.cpu import _blocked

    plain = weight is None and not label_smoothing and not z_loss and softcap is None
    if plain and cpu.available():
        def write(x_np, t_np, scale, keep, out):
            if out is None:
                return cpu.soft_cross_entropy(x_np, t_np)
            return cpu.softmax_minus_targets(x_np, t_np, scale, out, keep=keep)

        write.numba = True
        return write
    class_weight = None if weight is None else _np(weight.detach().to(x.dtype).contiguous())

    def write_blocked(x_np, t_np, scale, keep, out):
        return _blocked.soft_targets(x_np, t_np, softcap, smoothing=label_smoothing, class_weight=class_weight,
                                     scale=scale, z_loss=z_loss, out=out)

    write_blocked.numba = False
    return write_blocked


class CpuFastSoftCrossEntropy(torch.autograd.Function):
    """(M, C) logits, (M, C) targets and the (M,) float64 row losses -> the loss ("mean" over
    the M rows). ``grad``: the gradient ``soft_cross_entropy`` wrote with the losses (upstream
    gradient 1), or None: then backward writes it with ``write`` (``_soft_pass``)."""

    @staticmethod
    def forward(ctx, logits, target, row_loss, reduction, inplace_backward, grad, write):  # type: ignore[override]
        w_row = torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device)
        denominator = w_row.sum()
        ctx.save_for_backward(logits, target, w_row, denominator)
        ctx.valid = None  # probability targets: no ignored row
        ctx.reduction = reduction
        ctx.inplace_backward = inplace_backward
        ctx.grad = grad
        ctx.write = write
        return _reduce(row_loss, denominator, reduction).to(logits.dtype)

    @staticmethod
    @first_order_only("cross_entropy (impl='auto', CPU kernels)", USE_REFERENCE)
    def backward(ctx, grad_output):  # type: ignore[override]
        grad = _backward(ctx, grad_output, ctx.write)
        # Gradients for (logits, target, row_loss, reduction, inplace_backward, grad, write).
        return grad, None, None, None, None, None, None


class CpuBlockedCrossEntropy(torch.autograd.Function):
    r"""(M, C) logits and (M,) class indices -> the loss, by crossent.cpu's blocked numpy passes
    (``crossent.cpu._blocked``, in the logits' dtype, a few MiB of buffers): the row statistics in
    forward (:func:`~crossent.cpu._blocked.lse_and_nll`: ``lse``, ``nll`` and, with smoothing,
    :math:`S_i = \sum_{j \in F} w_j \log q_{ij}` and K_i), the gradient in backward
    (:func:`~crossent.cpu._blocked.gradient`, a second pass). The loss of a kept row is
    :math:`(1 - \varepsilon) w_{y_i} \mathrm{nll}_i - \varepsilon S_i / K_i + \zeta\, \mathrm{lse}_i^2`
    on the soft-capped logits, "mean" dividing the cross-entropy by :math:`\sum_i w_{y_i}` and the
    z-loss by the number of kept rows (0 when either is 0), as impl="chunked"."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace_backward
    ):
        from crossent.cpu import _blocked

        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target)).to(torch.int64).contiguous()
        _check_target_range(safe, logits.shape[1], ignore_index)
        x = logits.detach()
        eps = float(label_smoothing)
        class_weight = None if weight is None else _np(weight.detach().to(x.dtype).contiguous())
        keep = _np(valid.contiguous())
        stats = _blocked.lse_and_nll(_np(x), _np(safe), softcap, keep, smoothing=eps > 0.0,
                                     class_weight=class_weight)
        w_row = valid.to(torch.float64)
        if weight is not None:
            w_row = weight.detach().to(torch.float64)[safe] * w_row
        lse = torch.from_numpy(stats.lse).to(torch.float64)
        per_row = w_row * torch.from_numpy(stats.nll).to(torch.float64)
        if eps:
            per_row = (1.0 - eps) * per_row if eps < 1.0 else torch.zeros_like(per_row)
            smoothed = torch.from_numpy(stats.smoothed).to(torch.float64)
            per_row = per_row - eps * smoothed / torch.from_numpy(stats.count).to(torch.float64)
            if eps == 1.0:  # a row without a finite logit (lse -inf or NaN): NaN, as at any other eps
                per_row = torch.where(lse > -math.inf, per_row, math.nan)
        z_row = z_loss * lse * lse if z_loss else None
        # where, not a product: an ignored row adds 0 even when its logits are NaN or -inf
        per_row = torch.where(valid, per_row, 0.0)
        ce_den, n_valid = w_row.sum(), valid.sum().to(torch.float64)
        if z_row is not None:
            z_row = torch.where(valid, z_row, 0.0)
        if reduction == "none":
            loss = per_row if z_row is None else per_row + z_row
        elif reduction == "sum":
            loss = per_row.sum() if z_row is None else per_row.sum() + z_row.sum()
        else:
            loss = safe_divide(per_row.sum(), ce_den)
            if z_row is not None:
                loss = loss + safe_divide(z_row.sum(), n_valid)
        ctx.save_for_backward(logits, safe, w_row, ce_den, n_valid, lse)
        ctx.stats, ctx.keep, ctx.class_weight = stats, keep, class_weight
        ctx.valid = None if bool(valid.all()) else valid
        ctx.options = (reduction, eps, z_loss, softcap, inplace_backward, weight is not None)
        return loss.to(logits.dtype)

    @staticmethod
    @first_order_only("cross_entropy (impl='auto', CPU blocked pass)", USE_REFERENCE)
    def backward(ctx, grad_output):  # type: ignore[override]
        from crossent.cpu import _blocked

        logits, safe, w_row, ce_den, n_valid, lse = ctx.saved_tensors
        reduction, eps, z_loss, softcap, inplace_backward, weighted = ctx.options
        g = _on_kept_rows(ctx, grad_output.to(torch.float64))
        ce_scale = z_scale = g.expand(w_row.shape) if g.ndim == 0 else g
        if reduction == "mean":
            ce_scale = safe_divide(g, ce_den).expand(w_row.shape)
            z_scale = safe_divide(g, n_valid).expand(w_row.shape)
        x = logits.detach()
        grad = x if inplace_backward else _gradient_buffer(x)
        _blocked.gradient(
            _np(x), _np(safe), softcap, ctx.stats,
            row_weight=_np(w_row) if weighted else None, smoothing=eps, class_weight=ctx.class_weight,
            ce_scale=_np(ce_scale.contiguous()),
            z_coef=_np(2.0 * z_loss * z_scale * lse) if z_loss else None,
            keep=ctx.keep, ln_base=None, out=_np(grad),
        )
        if inplace_backward:
            torch.autograd.graph.increment_version(logits)  # as in _gradient
        # Gradients for (logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
        # softcap, inplace_backward).
        return grad, None, None, None, None, None, None, None, None
