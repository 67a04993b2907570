r"""Functional PyTorch losses: drop-ins for ``torch.nn.functional`` plus the fused linear head.

``impl`` picks the implementation of the two softmax losses:

- "reference": the plain composition of torch ops (log-softmax of the full logits), the oracle;
- "chunked": pure PyTorch, row blocks with float32 accumulation and bounded temporaries
  (any device; the fallback everywhere);
- "triton": the GPU kernels of ``crossent.triton`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``); integer targets only;
- "auto": "triton" for CUDA tensors with integer targets when ``import triton`` works; on the
  CPU, for ``cross_entropy`` with contiguous float32/float64 logits, ``crossent.cpu`` behind
  autograd (``_cpu_fast``: same results as "chunked", fewer passes, no temporaries of the logits'
  size): class indices without z-loss or softcap take its numba kernels when numba is installed,
  with a z-loss or softcap or without numba its blocked numpy passes; probability targets take
  those kernels for the plain loss and its blocked numpy pass with class weights, label
  smoothing, z-loss or softcap, or without numba (when a row's loss is not finite, the call goes
  to "chunked"); "reference" for probability targets or class weights that require
  grad (the only implementation that differentiates them; "chunked" and "triton" refuse them with
  a ValueError naming the argument); else "chunked".

Autograd: every implementation gives first-order gradients. Second-order gradients (a backward
with ``create_graph=True`` followed by another backward through the gradient: gradient
penalties, Hessian-vector products) need impl="reference"; the other implementations compute
their gradient outside autograd and raise a RuntimeError instead of returning a gradient without
the loss's curvature. Where it is raised depends on what the implementation keeps for backward:

- at the ``create_graph=True`` backward itself, where no differentiable input is kept:
  ``cross_entropy`` with "triton"; ``linear_cross_entropy`` with "chunked" and a "mean" or
  "sum" reduction (its gradients are computed in the forward), and with "triton" on
  ``memory_budget``'s row schedule;
- at the second backward, through the gradient, otherwise: ``cross_entropy`` with "chunked" and
  "auto"'s CPU kernels; ``linear_cross_entropy`` with "chunked" and "none", and with "triton"
  without ``memory_budget`` (or with one that keeps vocabulary columns).

So under "auto" a ``create_graph=True`` backward whose gradient is never differentiated again
works on the CPU and raises on CUDA for ``cross_entropy``, and the reverse for
``linear_cross_entropy``; use impl="reference" wherever ``create_graph=True`` reaches these
losses. ``torch.func`` transforms (``grad``,
``vmap``, ``jacrev``, ...) likewise work with impl="reference" only (its CPU value checks are
data-dependent control flow, so ``vmap`` over batched targets also needs ``validate=False``);
the other implementations are ``autograd.Function``\ s without ``setup_context`` and torch
refuses them under a transform. Class weights that require grad get a gradient (impl
"reference") for probability targets, as in PyTorch, and also for class indices, where
PyTorch refuses to differentiate them.

Semantics follow DESIGN.md: PyTorch's where PyTorch defines them, plus the documented deviations
(zero-denominator means are 0 with zero gradient; label smoothing over the finite logits of a row;
0 * log 0 = 0 for -inf logits or log-probabilities with zero target mass; bf16/fp16 logits give
a float32 loss; class indices take class weights of any floating dtype, which PyTorch refuses).
Result dtypes with probability targets are PyTorch's: input, target and class weight dtypes
promoted (float32 logits with float64 targets give a float64 loss), on every implementation; the
loss is computed in the input's accumulation dtype and only the reduced loss (or the per-row
vector of "none") is cast, so the CPU kernels still read float64 targets in place.
"""

from __future__ import annotations

import importlib
import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _legacy

from . import _checks, _cpu_fast
from ._chunked import ChunkedCrossEntropy, ChunkedLinearCrossEntropy, rows_per_block
from ._reference import (
    acc_dtype,
    reference_cross_entropy_2d,
    reference_linear_cross_entropy_2d,
    safe_divide,
)

__all__ = [
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "kl_div",
    "linear_cross_entropy",
]


def _legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """Map the deprecated size_average/reduce pair as PyTorch does (with its warning)."""
    if size_average is not None or reduce is not None:
        return _legacy.legacy_get_string(size_average, reduce)
    return reduction


def _check_softmax_options(
    reduction: str,
    impl: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    ignore_index: int,
) -> tuple[str, str, float, float, float | None, int]:
    """The scalar options of the two softmax losses, checked in this order and normalized."""
    return (
        _checks.check_reduction(reduction),
        _checks.check_impl(impl),
        _checks.check_label_smoothing(label_smoothing),
        _checks.check_z_loss(z_loss),
        _checks.check_softcap(softcap),
        _checks.check_ignore_index(ignore_index),
    )


def _check_targets(
    target: torch.Tensor,
    expected: tuple[int, ...],
    context: str,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    num_classes: int,
    ignore_index: int,
    validate: bool | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check class indices or probabilities of shape ``expected`` and the class weights.

    ``context`` completes the shape error ("for <context>, got ..."). Returns the target (class
    indices as int64) and the checked weight.
    """
    soft = target.is_floating_point()
    if tuple(target.shape) != tuple(expected):
        kind = "probabilities" if soft else "class indices"
        raise ValueError(
            f"target ({kind}) must have shape {tuple(expected)} for {context}, "
            f"got {tuple(target.shape)}"
        )
    if not soft and (target.dtype == torch.bool or target.is_complex()):
        raise TypeError(f"target must hold int64 class indices or float probabilities, got {target.dtype}")
    check = _checks.wants_validation(validate, input, target, weight)
    weight = _checks.check_class_weight(weight, num_classes, validate=check)
    if soft:
        _checks.check_prob_target(target, validate=check)
    else:
        target = target.long()
        _checks.check_class_target(target, num_classes, ignore_index, validate=check)
    return target, weight


def _soft_result_dtype(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """The loss dtype for probability targets: F.cross_entropy's promotion of input, target and
    class weight dtypes (float32 logits with float64 targets or weights give a float64 loss, as
    in PyTorch), with input counted as at least float32 (DESIGN.md: bf16/fp16 logits give a
    float32 loss where PyTorch keeps float16 against float16 targets). The implementations
    compute in the input's accumulation dtype (targets read as they are, never copied whole);
    only the reduced loss, or the per-row vector of "none", is cast, and autograd casts the
    gradient back, so ``input``'s gradient keeps ``input``'s dtype, as in PyTorch."""
    dtype = torch.promote_types(acc_dtype(input.dtype), target.dtype)
    return dtype if weight is None else torch.promote_types(dtype, weight.dtype)


def _check_soft_ignore_index(ignore_index: int, target: torch.Tensor, *, any_value: bool) -> None:
    """ignore_index with probability targets, refused where PyTorch refuses it (every impl).

    F.cross_entropy refuses an ignore_index >= 0 with probability targets and accepts a
    negative one, which matches no class (``any_value=False``); F.linear_cross_entropy refuses
    any ignore_index other than its default None (``any_value=True``: crossent's default -100,
    which None means, cannot be told apart from an explicit -100, and is accepted).
    """
    refused = ignore_index != -100 if any_value else ignore_index >= 0
    if refused:
        allowed = "None or the default -100" if any_value else "a negative int such as the default -100"
        raise ValueError(
            f"ignore_index applies to class-index targets only, got ignore_index={ignore_index} "
            f"with probability targets (a {target.dtype} target); leave it at {allowed} (PyTorch "
            f"raises here too)"
        )


def _triton_function(name: str):
    try:
        module = importlib.import_module("crossent.triton")
        fn = getattr(module, name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"impl='triton' needs crossent.triton.{name} and the triton package, which could not "
            f"be loaded ({type(exc).__name__}: {exc}); use impl='chunked' or impl='auto'"
        ) from exc
    return fn


def _outside_compiled_graphs(apply):
    """Run ``apply`` eagerly, as a graph break, when torch.compile traces the caller.

    The chunked functions loop over row blocks whose count depends on data (ignored rows are
    gathered out on the CPU), so they stay out of compiled graphs. ``torch.compiler.disable``
    imports TorchDynamo (1 s and 140 MB), so it is applied on first use, and only once Dynamo is
    loaded: without it nothing can be compiling.
    """
    disabled = []

    def call(*args):
        if "torch._dynamo" not in sys.modules:
            return apply(*args)
        if not disabled:
            disabled.append(torch.compiler.disable(apply))
        return disabled[0](*args)

    return call


_chunked_cross_entropy = _outside_compiled_graphs(ChunkedCrossEntropy.apply)
_chunked_linear_cross_entropy = _outside_compiled_graphs(ChunkedLinearCrossEntropy.apply)
_cpu_fast_cross_entropy = _outside_compiled_graphs(_cpu_fast.CpuFastCrossEntropy.apply)
_cpu_fast_soft_cross_entropy = _outside_compiled_graphs(_cpu_fast.soft_cross_entropy)
_cpu_blocked_cross_entropy = _outside_compiled_graphs(_cpu_fast.CpuBlockedCrossEntropy.apply)


def _resolve_impl(impl: str, device: torch.device, soft: bool, dtype: torch.dtype) -> str:
    if impl == "auto":
        # The kernels take float32/bfloat16/float16 logits and class indices; float64 (a test or
        # a reference computation) and probability targets take the chunked path.
        if (device.type == "cuda" and not soft and dtype != torch.float64
                and _checks.triton_importable()):
            return "triton"
        return "chunked"
    if impl == "triton":
        if soft:
            raise ValueError(
                "impl='triton' supports integer class targets only, got probability targets; "
                "use impl='chunked' or impl='auto'"
            )
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            # Checked here so that the error names this function's argument (crossent.triton's
            # own check names its ``logits``).
            raise TypeError(
                f"input must be float32, bfloat16 or float16 for impl='triton' (float32 "
                f"accumulation), got {dtype}; use impl='chunked' or impl='auto' for {dtype}"
            )
        if not _checks.triton_allowed_on(device):
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got "
                f"tensors on {device}"
            )
    return impl


def _route_differentiable_options(
    impl: str, soft: bool, target: torch.Tensor, weight: torch.Tensor | None
) -> str:
    """impl="reference" when probability targets or class weights require grad (autograd on).

    Only the plain composition of torch ops differentiates them (d loss / d t, d loss / d w):
    "auto" switches to it, "chunked" and "triton" refuse, naming the argument, rather than
    return no gradient for it.
    """
    if not torch.is_grad_enabled():
        return impl
    for name, needs_grad, what in (
        ("target", soft and target.requires_grad, "probability targets"),
        ("weight", weight is not None and weight.requires_grad, "class weights"),
    ):
        if not needs_grad or impl == "reference":
            continue
        if impl == "auto":
            return "reference"
        raise ValueError(
            f"impl={impl!r} does not differentiate {what}, and {name} requires grad; use "
            f"impl='auto' or impl='reference', or pass {name}.detach()"
        )
    return impl


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
    inplace_backward: bool = False,
    validate: bool | None = None,
) -> torch.Tensor:
    r"""Cross-entropy between logits and class indices or class probabilities.

    Drop-in for ``torch.nn.functional.cross_entropy`` (same positional order, legacy
    ``size_average``/``reduce`` included). With :math:`z` the logits of one row (after
    ``softcap``: :math:`z \leftarrow s \tanh(z / s)`), :math:`\mathrm{lse} = \log\sum_c e^{z_c}`,
    class weights :math:`w` and smoothing :math:`\epsilon` spread over the :math:`K` classes whose
    logit is finite:

    .. math::

        \ell = (1-\epsilon)\, w_y (\mathrm{lse} - z_y)
               + \frac{\epsilon}{K} \sum_{c:\, z_c > -\infty} w_c (\mathrm{lse} - z_c)
               + \lambda_z\, \mathrm{lse}^2

    for an integer target :math:`y` (soft targets :math:`t`: :math:`\sum_c w_c t'_c
    (\mathrm{lse} - z_c)` with :math:`t' = (1-\epsilon) t + \epsilon/K`). "mean" divides the
    first two terms' sum by the summed :math:`w_y` of non-ignored rows (by the number of rows for
    soft targets) and the z-loss sum by the number of non-ignored rows; a zero denominator gives 0.

    Args:
        input: logits, shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; class dim 1.
        target: int class indices of shape ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, or float
            probabilities of the input's shape.
        weight: optional class weights, shape ``(C,)`` (a tensor). If it requires grad, impl
            "auto" takes "reference", which differentiates it (see the module docstring).
        size_average, reduce: deprecated, mapped to ``reduction`` as PyTorch does.
        ignore_index: target value whose rows contribute nothing (integer targets); an int,
            NumPy integer or 0-d integer tensor, as PyTorch takes. With probability targets an
            ignore_index >= 0 is a ValueError (PyTorch raises too); a negative one is accepted
            and ignores nothing, as in PyTorch.
        reduction: "mean" | "sum" | "none" ("none" returns the target's shape).
        label_smoothing: epsilon in [0, 1] (like ``z_loss`` and ``softcap``: a Python or NumPy
            real, or a 0-d tensor).
        z_loss: coefficient of the PaLM z-loss :math:`\mathrm{lse}^2`, >= 0.
        softcap: None or s > 0, Gemma 2's logit soft-capping.
        impl: "auto" | "triton" | "chunked" | "reference" (see the module docstring; only
            "reference" supports double backward and ``torch.func`` transforms).
        inplace_backward: write the gradient into ``input``'s memory instead of a new tensor
            (saves one N x C buffer; ``input`` is overwritten, so nothing else may read it
            afterwards). The Triton kernels write it during the forward pass (``input``'s values
            are gone once the loss is returned); "chunked" and the CPU kernels during backward;
            "reference" ignores it. Each write bumps ``input``'s autograd version, so if the op
            that produced ``input`` saved it for its own backward (``exp``, ``sigmoid``, ...),
            autograd raises its in-place error rather than reading the gradient as that output.
        validate: check target values (range, NaN) and class weights. None: on for CPU tensors,
            off for accelerator tensors (the check needs a device-to-host sync).

    Returns:
        float32 loss (float64 for float64 input): a scalar, or the target's shape for "none".
        With probability targets the dtype is PyTorch's promotion of input, target and
        ``weight`` (float32 input with float64 targets or weights: float64), input counted as
        at least float32; ``input``'s gradient keeps ``input``'s dtype. With class indices a
        ``weight`` of another dtype than ``input`` is cast to the accumulation dtype (PyTorch
        raises a RuntimeError there; a deliberate deviation).

    Example (the textbook case: predicted probabilities [0.1, 0.8, 0.1], true class 1):

    >>> import torch, crossent.torch as cet
    >>> logits = torch.tensor([[0.1, 0.8, 0.1]]).log()
    >>> round(cet.cross_entropy(logits, torch.tensor([1])).item(), 4)
    0.2231
    >>> round(cet.cross_entropy(logits, torch.tensor([0])).item(), 4)
    2.3026
    """
    reduction, impl, eps, z_loss, softcap, ignore_index = _check_softmax_options(
        _legacy_reduction(size_average, reduce, reduction),
        impl, label_smoothing, z_loss, softcap, ignore_index,
    )
    _checks.check_floating("input", input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: shape (C,), (N, C) or (N, C, d1, ...)")
    soft = target.is_floating_point()
    if soft:
        _check_soft_ignore_index(ignore_index, target, any_value=False)
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    expected = input.shape if soft else input.shape[:class_dim] + input.shape[class_dim + 1 :]
    target, weight = _check_targets(
        target, expected, f"input of shape {tuple(input.shape)}",
        input, weight, num_classes, ignore_index, validate,
    )

    # (N, C, d1..dk) with class dim 1 -> (M, C), classes last.
    if input.dim() == 1:
        logits2d = input[None]
        target2d = target[None]
    elif input.dim() == 2:  # already (M, C): no view ops (a launch on few rows is mostly host time)
        logits2d, target2d = input, target
    else:
        # Explicit row counts: reshape(-1, 0) is ambiguous when C = 0.
        num_rows = input.shape[0] * math.prod(input.shape[2:])
        logits2d = input.movedim(1, -1).reshape(num_rows, num_classes)
        target2d = target.movedim(1, -1).reshape(num_rows, num_classes) if soft else target.reshape(-1)
    impl = _route_differentiable_options(impl, soft, target, weight)
    if soft and num_classes == 0 and impl in ("auto", "chunked"):
        impl = "reference"  # no class: nothing to chunk (the row-block softmax needs one)
    auto = impl == "auto"
    impl = _resolve_impl(impl, input.device, soft, input.dtype)
    cpu_path = _cpu_fast.class_index_path(logits2d, soft, z_loss, softcap, eps) if auto and impl == "chunked" else None
    if cpu_path is not None:
        impl = "cpu-fast"
    loss = None
    if auto and impl == "chunked" and soft and _cpu_fast.applies_soft(logits2d, target2d, weight):
        # None when a row's loss is not finite: the chunked path then handles the call.
        loss = _cpu_fast_soft_cross_entropy(
            logits2d, target2d, weight, eps, z_loss, softcap, reduction,
            inplace_backward and logits2d.data_ptr() == input.data_ptr(),
        )
    options = dict(
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
        z_loss=z_loss,
        softcap=softcap,
    )
    if loss is not None:
        pass
    elif impl == "reference":
        loss = reference_cross_entropy_2d(logits2d, target2d, **options)
    elif impl == "chunked":
        loss = _chunked_cross_entropy(
            logits2d,
            target2d,
            weight,
            ignore_index,
            reduction,
            eps,
            z_loss,
            softcap,
            rows_per_block(logits2d.shape[0], num_classes, None, logits2d.device),
            inplace_backward and logits2d.data_ptr() == input.data_ptr(),
        )
    elif impl == "cpu-fast" and cpu_path == "blocked":
        loss = _cpu_blocked_cross_entropy(
            logits2d, target2d, weight, ignore_index, reduction, eps, z_loss, softcap,
            inplace_backward and logits2d.data_ptr() == input.data_ptr(),
        )
    elif impl == "cpu-fast":
        loss = _cpu_fast_cross_entropy(
            logits2d, target2d, weight, ignore_index, reduction, eps,
            inplace_backward and logits2d.data_ptr() == input.data_ptr(), torch.is_grad_enabled(), z_loss,
        )
    else:
        # As they are: the kernels take any row stride (a vocabulary padded and sliced, [:, :V])
        # and copy only logits without unit column stride, so that inplace_backward writes into
        # the caller's memory and no N x C copy is made.
        loss = _triton_function("cross_entropy")(
            logits2d, target2d, inplace_backward=inplace_backward, **options
        )
    if soft:
        loss = loss.to(_soft_result_dtype(input, target, weight))
    if reduction == "none":
        return loss.reshape(target.shape if not soft else expected[:class_dim] + expected[class_dim + 1 :])
    return loss


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of ``input @ linear_weight.T + linear_bias`` without holding the logits.

    Equals ``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` with the
    classes last (same semantics, z-loss and softcap as :func:`cross_entropy`), and takes the
    arguments of PyTorch 2.13's ``torch.nn.functional.linear_cross_entropy`` (the same positional
    ones; its keyword-only ones by name), except ``options=`` (torch's chunking switch: a
    TypeError here) and a multi-dimensional ``linear_weight``. With
    impl="chunked" the rows go through in blocks of ``chunk_size`` rows (default: N * V / 16
    logits per block, at most 4 Mi), the gradients of ``input``, ``linear_weight`` and
    ``linear_bias`` accumulate in float32, and the N x V logits are never held: extra memory is a
    few blocks plus float32 gradient buffers of the inputs' sizes.

    Args:
        input: hidden states, shape ``(*, D)`` (e.g. ``(N, D)`` or ``(B, T, D)``).
        linear_weight: ``(V, D)``, the output embedding.
        target: int class indices of shape ``(*)``, or float probabilities of shape ``(*, V)``.
        linear_bias: optional ``(V,)``.
        weight, ignore_index, reduction, label_smoothing, z_loss, softcap, validate: as in
            :func:`cross_entropy`; ``ignore_index=None`` (PyTorch 2.13's default here) means
            -100, as in PyTorch. With probability targets any ignore_index other than None or
            -100 is a ValueError (PyTorch refuses every ignore_index there, -100 included; here
            -100 is the default and cannot be told apart).
        impl: "auto" | "triton" | "chunked" | "reference". Probability targets or class weights
            that require grad take "reference" under "auto" (the others refuse them); only
            "reference" supports double backward and ``torch.func`` transforms (see the module
            docstring).
        chunk_size: rows per block for impl="chunked" (None: N * V / 16 logits per block,
            clamped to [2**16, 2**22]), an int >= 1 (a Python or NumPy int or a 0-d integer
            tensor, as memory_budget; bool is refused). impl="auto" uses it where it picks
            "chunked" and ignores it where it picks another implementation (CUDA: "triton";
            class weights or probability targets that require grad: "reference"), so that one
            call runs on every device; impl="triton" and "reference" refuse it with a
            ValueError.
        memory_budget: for impl="triton": None ("lean", the default: never holds N x V logits)
            or the bytes of workspace allowed for logits ("fast"), an int >= 0. With a "mean" or
            "sum" reduction and room for at least 256 rows of logits, the forward computes the
            loss and both gradients a chunk of rows at a time (cuBLAS products, the CE kernel in
            between); otherwise the kernels keep the gradient of as many vocabulary columns as
            fit. impl="auto" passes it on where it picks "triton" and ignores it where it picks
            another implementation (the CPU, float64, probability targets, class weights that
            require grad), so that one call runs on every device; impl="chunked" and
            "reference" refuse it with a ValueError.

    Returns:
        float32 loss (float64 for float64 input): a scalar, or shape ``(*)`` for "none"; with
        probability targets promoted with the targets' and ``weight``'s dtypes, as in
        :func:`cross_entropy` and PyTorch.

    Example:

    >>> import math, torch, crossent.torch as cet
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])   # 3 classes
    >>> y = torch.tensor([0, 1])
    >>> loss = cet.linear_cross_entropy(x, w, y)
    >>> round(loss.item(), 4), round(math.log(1 + 2 * math.exp(-1)), 4)
    (0.5514, 0.5514)
    """
    if ignore_index is None:  # torch 2.13's default, which it maps to -100
        ignore_index = -100
    reduction, impl, eps, z_loss, softcap, ignore_index = _check_softmax_options(
        reduction, impl, label_smoothing, z_loss, softcap, ignore_index
    )
    _checks.check_floating("input", input)
    _checks.check_floating("linear_weight", linear_weight)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if chunk_size is not None:
        # An int as PyTorch takes one for integer options (as memory_budget and ignore_index):
        # Python or NumPy integers and 0-d integer tensors; bool and floats are refused.
        rows = _checks.index_option(chunk_size)
        if rows is None:
            raise TypeError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        if rows < 1:
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        chunk_size = rows
    if chunk_size is not None and impl in ("triton", "reference"):
        # As memory_budget: an explicit implementation that has no row blocks refuses it rather
        # than ignore it; "auto" ignores it where it does not pick "chunked" (one call for every
        # device), and an explicit "chunked" keeps it (also where it reroutes, e.g. to
        # "reference" for probability targets over 0 classes).
        raise ValueError(
            f"chunk_size applies to impl='chunked' (rows per block), got chunk_size={chunk_size} "
            f"with impl={impl!r}"
        )
    if memory_budget is not None:
        # Checked whatever the route, so that "auto" ignores only a valid budget (see below).
        budget = _checks.index_option(memory_budget)  # NumPy integers and 0-d tensors too
        if budget is None:
            raise TypeError(
                f"memory_budget must be None or an int >= 0 (bytes), got {memory_budget!r}"
            )
        if budget < 0:
            raise ValueError(f"memory_budget must be None or an int >= 0 (bytes), got {memory_budget!r}")
        memory_budget = budget
    if input.dim() < 1:
        raise ValueError("input must have shape (*, D), got a 0-d tensor")
    if linear_weight.dim() != 2:
        raise ValueError(
            f"linear_weight must have shape (V, D), got shape {tuple(linear_weight.shape)}"
        )
    num_classes, dim = linear_weight.shape
    if input.shape[-1] != dim:
        raise ValueError(
            f"input's last dimension must equal linear_weight's D={dim} (linear_weight shape "
            f"{tuple(linear_weight.shape)}), got input shape {tuple(input.shape)}"
        )
    if input.dtype != linear_weight.dtype:
        raise TypeError(
            f"input and linear_weight must have the same dtype, got {input.dtype} and "
            f"{linear_weight.dtype}"
        )
    if linear_bias is not None:
        _checks.check_floating("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (num_classes,):
            raise ValueError(
                f"linear_bias must have shape ({num_classes},), got {tuple(linear_bias.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(
                f"linear_bias must have input's dtype {input.dtype}, got {linear_bias.dtype}"
            )
    soft = target.is_floating_point()
    if soft:
        _check_soft_ignore_index(ignore_index, target, any_value=True)
    lead = tuple(input.shape[:-1])
    expected = lead + (num_classes,) if soft else lead
    target, weight = _check_targets(
        target, expected, f"input of shape {tuple(input.shape)} and {num_classes} classes",
        input, weight, num_classes, ignore_index, validate,
    )

    # Explicit row counts: reshape(-1, 0) is ambiguous when D = 0 or V = 0.
    num_rows = math.prod(lead)
    x2d = input.reshape(num_rows, dim)
    target2d = target.reshape(num_rows, num_classes) if soft else target.reshape(num_rows)
    requested = impl
    impl = _route_differentiable_options(impl, soft, target, weight)
    if soft and num_classes == 0 and impl in ("auto", "chunked"):
        impl = "reference"  # no class: nothing to chunk (the row-block softmax needs one)
    impl = _resolve_impl(impl, input.device, soft, input.dtype)
    if memory_budget is not None and impl != "triton":
        if requested == "auto":
            # "auto" is the portable choice: the budget sizes the triton workspace where auto
            # picks triton, and is ignored where it picks another path (as chunk_size is).
            memory_budget = None
        else:
            raise ValueError(
                f"memory_budget applies to impl='triton' (the fused GPU kernels), got memory_budget="
                f"{memory_budget} with impl={impl!r}"
            )
    options = dict(
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
        z_loss=z_loss,
        softcap=softcap,
    )
    if impl == "reference":
        loss = reference_linear_cross_entropy_2d(
            x2d, linear_weight, target2d, linear_bias=linear_bias, **options
        )
    elif impl == "chunked":
        grad_on = torch.is_grad_enabled()
        needs = (
            grad_on and input.requires_grad,
            grad_on and linear_weight.requires_grad,
            grad_on and linear_bias is not None and linear_bias.requires_grad,
        )
        loss = _chunked_linear_cross_entropy(
            x2d,
            linear_weight,
            linear_bias,
            target2d,
            weight,
            ignore_index,
            reduction,
            eps,
            z_loss,
            softcap,
            rows_per_block(x2d.shape[0], num_classes, chunk_size, x2d.device),
            needs,
        )
    else:
        # As it is: the kernels take any row stride and copy only an input without unit stride
        # along D (no N x D copy of a sliced or row-padded input).
        loss = _triton_function("linear_cross_entropy")(
            x2d, linear_weight, target2d, linear_bias=linear_bias,
            memory_budget=memory_budget, **options
        )
    if soft:
        loss = loss.to(_soft_result_dtype(input, target, weight))
    if reduction == "none":
        return loss.reshape(lead)
    return loss


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    r"""Binary cross-entropy from logits; drop-in for ``F.binary_cross_entropy_with_logits``.

    .. math::

        \ell = w \left[ p\, t\, \mathrm{softplus}(-x) + (1 - t)\, \mathrm{softplus}(x) \right]

    with ``pos_weight`` :math:`p` (broadcast over the last dimension) and elementwise ``weight``
    :math:`w`. A term whose coefficient (:math:`p t` or :math:`1 - t`) is exactly 0 contributes 0
    even at an infinite logit (PyTorch gives NaN at x = -inf, t = 0 and x = +inf, t = 1). "mean"
    divides by the number of elements; an empty input gives 0 (PyTorch: NaN). Targets are not
    range-checked (as in PyTorch); NaN in them is an error when validating.

    Returns a loss of dtype ``promote_types(input, target)`` with bf16/fp16 input counted as
    float32: float32 for float32 input and targets, float64 for float64 input or targets (as in
    PyTorch); ``weight`` and ``pos_weight`` are cast to it whatever their dtype (as in PyTorch).
    ``input``'s gradient keeps ``input``'s dtype. PyTorch instead returns the target's dtype
    when it is narrower (float64 logits with float32 targets: float32; fp16 with fp16: fp16);
    crossent never returns less than the input's precision, or less than float32.

    >>> import torch, crossent.torch as cet
    >>> x = torch.tensor([0.0, 2.0])
    >>> round(cet.binary_cross_entropy_with_logits(x, torch.tensor([1.0, 0.0])).item(), 4)  # (ln 2 + ln(1 + e^2)) / 2
    1.41
    """
    reduction = _checks.check_reduction(_legacy_reduction(size_average, reduce, reduction))
    _checks.check_floating("input", input)
    _checks.check_floating("target", target)
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
        )
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        _checks.check_floating(name, t)
        try:
            torch.broadcast_shapes(t.shape, input.shape)
        except RuntimeError:
            raise ValueError(
                f"{name} must broadcast to the input's shape {tuple(input.shape)}, got "
                f"{tuple(t.shape)}"
            ) from None
    check = _checks.wants_validation(validate, input, target, weight, pos_weight)
    if check:
        for name, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
            if t is not None and _checks.has_nan(t):
                raise ValueError(f"{name} must not contain NaN, got NaN")
    # float32 input with float64 targets computes and returns float64, as F does; never
    # narrower than input's accumulation dtype (PyTorch returns the target's dtype even when
    # narrower, e.g. float32 for float64 logits: a documented deviation). The weights' dtypes
    # do not promote, as in PyTorch: they are cast to it.
    dt = torch.promote_types(acc_dtype(input.dtype), target.dtype)
    x = input.to(dt)
    t = target.to(dt)
    positive = t if pos_weight is None else pos_weight.to(dt) * t
    negative = 1.0 - t
    zero = torch.zeros_like(x)
    loss = torch.where(positive == 0, zero, positive * F.softplus(-x)) + torch.where(
        negative == 0, zero, negative * F.softplus(x)
    )
    if weight is not None:
        loss = loss * weight.to(dt)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return safe_divide(loss.sum(), torch.full((), float(loss.numel()), dtype=dt, device=x.device))


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    r"""KL divergence with log-probabilities as input; drop-in for ``F.kl_div``.

    Pointwise :math:`t (\log t - x)` (``log_target=True``: :math:`e^{t} (t - x)`), where
    ``input`` :math:`x` holds log Q and ``target`` P (or log P). Where the target mass is 0 the
    term is 0 even at :math:`x = -\infty` (PyTorch: NaN), and NaN at a NaN :math:`x` (as in
    PyTorch: NaN propagates); where it is positive and
    :math:`x = -\infty` the term is :math:`+\infty`. Reductions: "batchmean" (sum / batch size,
    the mathematical KL per sample), "mean" (sum / number of elements, PyTorch's default; it
    warns, as F.kl_div does, with a UserWarning that names "batchmean"; not when it comes from the
    legacy ``size_average``/``reduce``, as in PyTorch), "sum", "none"; a zero denominator gives 0.
    ``input`` and ``target`` broadcast as in ``F.kl_div`` (e.g. one target distribution ``(C,)``
    for a batch ``(N, C)``): "none" returns the broadcast shape, "mean" divides by its number of
    elements, "batchmean" by ``input``'s first dimension, and the gradients are summed back to
    each argument's shape.

    Returns a loss of PyTorch's dtype ``promote_types(input, target)`` (float32 with float64:
    float64), with bf16/fp16 input counted as float32 (PyTorch keeps fp16 with fp16 targets);
    each gradient keeps its argument's dtype, as in PyTorch.

    >>> import math, torch, crossent.torch as cet
    >>> p = torch.tensor([[0.5, 0.5]])
    >>> q = torch.tensor([[0.9, 0.1]])
    >>> kl = cet.kl_div(q.log(), p, reduction="batchmean")
    >>> round(kl.item(), 4), round(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), 4)
    (0.5108, 0.5108)
    """
    reduction = _checks.check_reduction(
        _legacy_reduction(size_average, reduce, reduction), ("mean", "batchmean", "sum", "none")
    )
    _checks.check_floating("input", input)
    _checks.check_floating("target", target)
    try:
        torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise ValueError(
            f"target must broadcast with the input's shape {tuple(input.shape)} (as in F.kl_div), "
            f"got {tuple(target.shape)}"
        ) from None
    if _checks.wants_validation(validate, input, target) and _checks.has_nan(target):
        raise ValueError("target must not contain NaN, got NaN")
    if reduction == "mean" and size_average is None and reduce is None:
        # F.kl_div's warning (a UserWarning, only for an explicit or default "mean"), after the
        # argument checks so that a bad argument raises its own error first.
        warnings.warn(
            "kl_div: reduction='mean' divides the summed loss by the number of elements (batch "
            "size times support size), as F.kl_div's 'mean' does; reduction='batchmean' divides "
            "by the batch size only, which is the KL divergence per sample. PyTorch plans to make "
            "'mean' behave as 'batchmean' in a future major release.",
            UserWarning,
            stacklevel=2,
        )
    # PyTorch's promotion of the two dtypes (float32 with float64: float64), input counted as
    # at least float32 (DESIGN.md: bf16/fp16 give float32 where PyTorch keeps fp16 with fp16).
    dt = torch.promote_types(acc_dtype(input.dtype), target.dtype)
    x = input.to(dt)
    t = target.to(dt)
    if x.shape != t.shape:
        # Views; autograd sums input's (and target's) gradient back over the broadcast dims.
        x, t = torch.broadcast_tensors(x, t)
    zero = torch.zeros_like(x)
    # A target mass of 0 adds 0 whatever the finite or infinite log Q; a NaN there stays NaN.
    if log_target:
        empty = (t == -math.inf) & ~torch.isnan(x)
        safe_t = torch.where(empty, zero, t)
        loss = torch.where(empty, zero, torch.exp(safe_t) * (safe_t - x))
    else:
        empty = (t == 0) & ~torch.isnan(x)
        safe_t = torch.where(t == 0, torch.ones_like(t), t)
        loss = torch.where(empty, zero, t * (torch.log(safe_t) - x))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        # input's first dimension, as F.kl_div (also where the target broadcasts input up).
        count = input.shape[0] if input.dim() > 0 else 1
    else:
        count = loss.numel()
    return safe_divide(total, torch.full((), float(count), dtype=dt, device=x.device))
