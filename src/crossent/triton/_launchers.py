"""Host launchers (layer 2 of 4): argument checks, grid, block sizes and warps, workspaces.

Host waits. The cross-entropy launchers (``cross_entropy_forward``, ``scale_rows_``) never read a
CUDA tensor's value on the host: denominators, the number of non-ignored rows and the compacted
row order are device tensors that the kernels load themselves (no ``.item()``, no data-dependent
shapes). The linear launchers have one deliberate wait: cuBLAS takes a product's row count from
the host, so for the products to skip the ignored rows the number of non-ignored rows is sent to
the host (``HostCount``: queued at the start of the forward, waited on behind queued work, then
used for data-dependent shapes such as ``rows[:n]``): on the lean path (no vocabulary columns
stored) with ``LinearTiles.products=1`` (the default: the backward, and the forward, under
``torch.no_grad`` too, when it has more than ``FORWARD_CHUNKS_BEFORE_COUNT`` vocabulary chunks)
or 2 and 3 (the backward), and on the fast row schedule with more than one chunk of rows.
``CROSSENT_TRITON_LINEAR_HOST_COUNT=0`` (``HOST_COUNT_ENV``) turns it off, as CUDA graph capture
does: every row then goes through the products and no launch waits for the GPU. Only CPU
tensors (the interpreter) get their target range and weights checked by value, where that costs
no sync.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os

import torch
import triton

from . import _kernels as K

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")

#: Workspace of the "lean" linear cross-entropy: one (rows x chunk) gradient tile per vocabulary
#: chunk. 56 MiB keeps the lean mode's extra memory under N*D*4 B (the float32 dE accumulator)
#: + 64 MiB (measured on an H100 with 3584-column chunks: 129.2 MiB extra at N 8192, D 2304,
#: limit 136; 184.2 MiB at D 4096, limit 192); bigger chunks mean fewer read-modify-write passes
#: over the dE accumulator. The forward's workspace adds the accumulator's bytes less the gathered
#: rows' (``lean_forward_bytes``), and the backward's first chunks live in the dW output
#: (``lean_backward_chunks``): neither raises that peak.
LEAN_WORKSPACE_BYTES = 56 * 2**20


def interpreted() -> bool:
    """True when the kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return type(K._ce_forward_kernel).__name__ == "InterpretedFunction"


# ------------------------------------------------------------------------------------------------
# Validation that needs no host sync (shapes, dtypes, option values; target ranges on CPU only).
# ------------------------------------------------------------------------------------------------


def python_scalars(label_smoothing, z_loss, softcap, ignore_index):
    """The scalar options as Python float / int (NumPy scalars and other ``numbers.Real`` /
    ``numbers.Integral`` values, as PyTorch takes them); anything else (``bool`` included) is
    returned as it came, for ``_check_options`` to refuse by name."""

    def real(v):
        return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v

    def integral(v):
        return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v

    return real(label_smoothing), real(z_loss), None if softcap is None else real(softcap), integral(ignore_index)


def _check_options(reduction, label_smoothing, z_loss, softcap, ignore_index):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"z_loss must be a float, got {type(z_loss).__name__}")
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be None or a float, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0.0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        # The kernels and the int64 targets take int64 (PyTorch refuses the rest too): outside
        # it ``target != ignore_index`` raised a bare OverflowError, or 2**63 .. 2**64 - 1
        # went to the kernels as uint64 and matched no target.
        raise ValueError(
            f"ignore_index must be an int in the int64 range [-2**63, 2**63 - 1], as PyTorch "
            f"takes, got {ignore_index}"
        )


def _check_device(name, tensor, device):
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device} like the input, got {tensor.device}")


def _check_runnable(device):
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreted():
        return
    raise ValueError(
        f"impl='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported), got tensors on {device}"
    )


def _check_target(target, n_rows, n_classes, ignore_index, device):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.ndim != 1 or target.shape[0] != n_rows:
        raise ValueError(f"target must have shape ({n_rows},), got {tuple(target.shape)}")
    _check_device("target", target, device)
    # Widen before comparing: in a narrow dtype ``target != ignore_index`` wraps ignore_index
    # (-100 is 156 in uint8), which would let an out-of-range label pass as "ignored".
    target = target.to(torch.int64).contiguous()
    if target.device.type == "cpu" and target.numel():
        # CPU tensors cost no sync to check (DESIGN.md: validation always on for CPU tensors).
        _check_target_values(target, n_classes, ignore_index)
    return target


def _check_target_values(target, n_classes, ignore_index):
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target must be in [0, {n_classes}) or ignore_index={ignore_index}; "
            f"target[{i}] = {int(target[i])}"
        )


def _check_class_weight(weight, n_classes, device):
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be None or a torch.Tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor, got dtype {weight.dtype}")
    if weight.ndim != 1 or weight.shape[0] != n_classes:
        raise ValueError(f"weight must have shape ({n_classes},), got {tuple(weight.shape)}")
    _check_device("weight", weight, device)
    if weight.device.type == "cpu":
        _check_weight_values(weight)
    return weight.detach().to(torch.float32).contiguous()


def _check_weight_values(weight):
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite, got NaN or inf")


def _check_float(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16 for impl='triton' (float32 "
            f"accumulation), got {tensor.dtype}; use impl='chunked' for float64"
        )


# ------------------------------------------------------------------------------------------------
# Denominators of "mean" on the device: the kernels scale by their reciprocals (_mean_scales).
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Denominators:
    """What "mean" divides by, as device tensors the kernels load (no host sync): ``n_valid``
    (int64, the non-ignored rows: the z-loss's denominator) and ``total_weight`` (float32
    sum_i w_{t_i} over them, or ``n_valid`` itself without class weights). None for "sum" and
    "none", whose kernels scale by 1 and read neither. Two torch ops without class weights,
    none for "sum"/"none": the launch of a call on few rows is mostly host time."""

    n_valid: torch.Tensor | None
    total_weight: torch.Tensor | None

    @property
    def mean(self):
        return self.n_valid is not None

    def pointers(self, dummy):
        """The two kernel arguments (``dummy``, any tensor, for those not read)."""
        if self.n_valid is None:
            return dummy, dummy
        return self.n_valid, self.total_weight


def _denominators(target, weight, ignore_index, n_classes, reduction, valid=None):
    """``Denominators`` of ``target`` (and class ``weight``) for ``reduction``; ``valid`` is
    ``target != ignore_index`` when the caller has it already."""
    if reduction != "mean":
        return Denominators(None, None)
    valid = valid if valid is not None else target != ignore_index
    n_valid = valid.sum()
    if weight is None:
        return Denominators(n_valid, n_valid)
    safe = target.clamp(0, max(n_classes - 1, 0))
    return Denominators(n_valid, torch.where(valid, weight[safe], 0.0).sum())


# ------------------------------------------------------------------------------------------------
# Cross-entropy on materialized logits.
# ------------------------------------------------------------------------------------------------


#: Rows of at most this many columns are held in registers by one program (read once);
#: longer rows are streamed twice in LOOP_BLOCK-column steps. Measured on an H100 (Triton 3.6,
#: bf16, fwd+bwd, benchmarks/results/gpu_cross_entropy.csv): at 32768 x 32000 the register-held
#: row (32768 lanes, 16 warps, 40 bytes spilled) took 2.656 ms, streaming it (limit 16384)
#: 2.205 ms; rows of 128256 columns stream either way.
SINGLE_BLOCK_MAX = 16384
LOOP_BLOCK = 8192

#: Environment variables that override the fixed kernel configurations for one call (read at
#: every call, never cached), so a benchmark can time several configurations in one process.
#: Unset (the default) means the fixed defaults below: results stay deterministic per config.
CE_CONFIG_ENV = "CROSSENT_TRITON_CE_CONFIG"
LINEAR_TILES_ENV = "CROSSENT_TRITON_LINEAR_TILES"
#: "0" turns off the skipping of ignored rows in the cuBLAS products (lean forward and backward,
#: the fast row schedule; ``HostCount``): every row goes through them and the host never waits
#: for the row count. "1" (or unset) is the default; anything else is refused. Read by each
#: forward call.
HOST_COUNT_ENV = "CROSSENT_TRITON_LINEAR_HOST_COUNT"


def _is_pow2(v):
    return v > 0 and v & (v - 1) == 0


def _parse_config(var, text, fields, positional, checks):
    """Parse ``text`` (the value of environment variable ``var``) into {field: int}.

    Items are comma-separated: either ``len(positional)`` bare integers first (in that order),
    or ``key=value`` items (any of ``fields``), or both. ``checks[key](v)`` returns None when
    ``v`` is acceptable, else a description of what is expected. Errors name the variable, the
    item, what is expected and what came.
    """
    items = [i.strip() for i in text.split(",") if i.strip()]
    out = {}
    bare = [i for i in items if "=" not in i]
    if bare and not positional:
        raise ValueError(f"{var} must be comma-separated key=value items (keys: {', '.join(fields)}), got {text!r}")
    if bare and (len(bare) != len(positional) or any("=" in i for i in items[: len(bare)])):
        raise ValueError(
            f"{var} must start with {len(positional)} comma-separated integers "
            f"({','.join(positional)}) or use key=value items only (keys: {', '.join(fields)}), "
            f"got {text!r}"
        )
    for key, item in zip(positional[: len(bare)], bare, strict=True):
        out[key] = item
    for item in items[len(bare):]:
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in fields:
            raise ValueError(f"{var}: unknown key {key!r} in {text!r}; known keys: {', '.join(fields)}")
        if key in out:
            raise ValueError(f"{var}: {key} given twice in {text!r}")
        out[key] = value.strip()
    for key, value in out.items():
        try:
            v = int(value)
        except ValueError:
            raise ValueError(f"{var}: {key} must be an integer, got {value!r} (in {text!r})") from None
        problem = checks[key](v)
        if problem:
            raise ValueError(f"{var}: {key} must be {problem}, got {v} (in {text!r})")
        out[key] = v
    return out


def _pow2_in(lo, hi):
    return lambda v: None if _is_pow2(v) and lo <= v <= hi else f"a power of two in [{lo}, {hi}]"


def _int_in(lo, hi):
    return lambda v: None if lo <= v <= hi else f"an integer in [{lo}, {hi}]"


@dataclasses.dataclass(frozen=True)
class CEConfig:
    """Launch configuration of the one-program-per-row cross-entropy kernel (see ``_row_block``).

    Each row is still reduced by one program in column-block order. ``persistent`` and
    ``reverse`` change only which program takes a row and the order of the gradient stores: no
    bit changes. The block sizes and warps change how a block's max and sum-exp are split across
    threads, so the last bits of the loss may differ between such configs; any one config is
    deterministic run to run.
    """

    single_max: int = SINGLE_BLOCK_MAX  # rows up to this many columns (power of 2) stay in registers
    loop_block: int = LOOP_BLOCK  # columns per step of a streamed (long) row
    loop_warps: int = 16  # warps of a streamed-row program
    single_warps: int = 0  # warps of a single-block program; 0: by block size (4 / 8 / 16)
    # 0: one program per row. k > 0: k * (number of SMs) programs, each looping over rows
    # pid, pid + P, ...: at most that many rows are in flight, which bounds the working set of
    # the second pass (132 x 256 KiB = 33 MiB for 128256 bf16 columns, k = 1) below an H100's
    # 50 MB L2; one program per row lets 2 programs of 16 warps share an SM (64 registers), i.e.
    # 264 rows = 67 MiB in flight, more than L2 holds.
    persistent: int = 0
    # Streamed rows: the second pass visits the column blocks last to first, so it starts with
    # the blocks the first pass read most recently (the likeliest still in L2). The gradient of
    # an element does not depend on the order: results are bit-identical either way.
    reverse: int = 1


_CE_FIELDS = ("single_max", "loop_block", "loop_warps", "single_warps", "persistent", "reverse")
_CE_CHECKS = dict(
    single_max=_pow2_in(16, 65536),
    loop_block=_pow2_in(16, 65536),
    loop_warps=_pow2_in(1, 32),
    single_warps=lambda v: None if v == 0 or (_is_pow2(v) and v <= 32) else "0 or a power of two <= 32",
    persistent=_int_in(0, 64),
    reverse=_int_in(0, 1),
)


def parse_ce_config(text, default=None):
    """CEConfig from ``key=value`` items (``CROSSENT_TRITON_CE_CONFIG``), the rest from ``default``.

    >>> parse_ce_config("loop_block=4096,loop_warps=8,persistent=1")
    CEConfig(single_max=16384, loop_block=4096, loop_warps=8, single_warps=0, persistent=1, reverse=1)
    """
    default = default if default is not None else CEConfig()
    values = _parse_config(CE_CONFIG_ENV, text, _CE_FIELDS, (), _CE_CHECKS)
    return dataclasses.replace(default, **values)


def ce_config():
    """The CE launch configuration of this call: the defaults (``SINGLE_BLOCK_MAX``,
    ``LOOP_BLOCK``: module globals, read now), overridden by ``CROSSENT_TRITON_CE_CONFIG``."""
    return _ce_config(os.environ.get(CE_CONFIG_ENV, ""), SINGLE_BLOCK_MAX, LOOP_BLOCK)


@functools.lru_cache(maxsize=64)
def _ce_config(text, single_max, loop_block):
    # Cached (CEConfig is frozen): a launch on few rows is mostly host time.
    default = CEConfig(single_max=single_max, loop_block=loop_block)
    return parse_ce_config(text, default) if text.strip() else default


def next_pow2(n):
    """The least power of two >= ``n`` (>= 1), in plain Python: ``triton.next_power_of_2`` is a
    constexpr function whose call costs several microseconds of host time per launch."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _row_block(n_cols, softcap=False, smoothing=False, config=None):
    """(BLOCK, num_warps, single_block) for one-program-per-row kernels over ``n_cols`` columns.

    Rows that fit one block are loaded once and kept in registers, so the logits are read once.
    What fits without spilling depends on the options; ptxas (sm_90a, bf16, 16 warps) reports
    for a 32768-column block 128 registers and no spill with no option or z-loss only, but
    spills with a softcap or label smoothing, which fit at 16384 columns (99-128 registers)
    and, both together, only as 8192-column steps. Longer rows (e.g. 128256) are streamed in
    LOOP_BLOCK steps by 16-warp programs (58-64 registers): big programs keep few rows in flight
    (two per SM by registers, 264 x 256 KiB on an H100, somewhat more than its 50 MB L2; see
    ``CEConfig.persistent`` to bound it), so the second pass over a row (run in reverse block
    order) tends to hit L2 rather than HBM. Short rows use fewer warps.
    ``config`` (a CEConfig; default ``ce_config()``) overrides the block limits and warps.
    """
    config = config if config is not None else ce_config()
    limit = config.single_max
    if softcap and smoothing:
        limit = min(limit, config.loop_block)
    elif softcap or smoothing:
        limit = min(limit, config.single_max // 2)
    block = next_pow2(max(n_cols, 16))
    if block <= limit:
        warps = config.single_warps or (4 if block <= 2048 else (8 if block <= 8192 else 16))
        return block, warps, True
    return config.loop_block, config.loop_warps, False


def _sm_count(device):
    """Streaming multiprocessors of ``device`` (host-side property, no sync); 2 under the
    interpreter, so that the persistent-grid path loops over several rows per program in tests."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


@dataclasses.dataclass
class CEForward:
    loss: torch.Tensor  # float32 scalar, or (M,) for "none"
    grad: torch.Tensor | None  # (M, C) gradient for an upstream gradient of 1 (0 on ignored rows)
    target: torch.Tensor  # (M,) int64, contiguous: backward skips the ignored rows (``scale_rows_``)


def cross_entropy_forward(
    logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
    inplace_backward, write_grad,
):
    """Check arguments, launch ``_ce_forward_kernel`` and reduce the per-row losses."""
    _check_float("logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (rows, classes), got shape {tuple(logits.shape)}")
    _check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    device = logits.device
    _check_runnable(device)
    n_rows, n_cols = logits.shape
    target = _check_target(target, n_rows, n_cols, ignore_index, device)
    weight = _check_class_weight(weight, n_cols, device)

    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    grad = None
    if write_grad and inplace_backward and x is logits and n_rows > 1 and n_cols > 0 and abs(x.stride(0)) < n_cols:
        # Rows that share memory (an expand()ed row, an overlapping as_strided view): a row's
        # gradient would overwrite logits another row still has to read. PyTorch refuses such
        # in-place writes too.
        raise ValueError(
            f"inplace_backward=True needs logits whose rows do not overlap in memory, got shape "
            f"{tuple(logits.shape)} with strides {tuple(logits.stride())}; pass logits.contiguous() or "
            "inplace_backward=False"
        )
    if write_grad:
        # In place: a detached alias of the logits (a tensor object of its own, sharing their
        # memory), so that autograd can hand it on as is; returning the input tensor itself made
        # AccumulateGrad copy it for a leaf (an N x C copy: 3.7 vs 2.3 ms at 8192 x 128256 on H100).
        grad = x.detach() if inplace_backward else torch.empty_like(x, memory_format=torch.contiguous_format)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_cols == 0:
        # No class to score: ignored rows give 0, any other target is out of range (NaN).
        row_loss = torch.where(target != ignore_index, float("nan"), 0.0).to(torch.float32)
    else:
        den = _denominators(target, weight, ignore_index, n_cols, reduction)
        _launch_ce(x, grad, target, weight, den, row_loss, ignore_index, label_smoothing, z_loss, softcap)
    loss = row_loss if reduction == "none" else row_loss.sum()
    return CEForward(loss, grad, target)


def _launch_ce(x, grad, target, weight, den, row_loss, ignore_index, label_smoothing, z_loss, softcap):
    """``_ce_forward_kernel`` over the rows of ``x`` (M, C), unit column stride: per-row losses
    into ``row_loss`` (M,) and, unless ``grad`` is None, the gradient (upstream 1) into ``grad``
    (may be ``x`` itself). ``den`` (``Denominators``) may come from more rows than ``x`` has (a
    chunk of a larger batch: see ``linear_rows_forward``)."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    config = ce_config()
    block, warps, single = _row_block(n_cols, softcap is not None, label_smoothing > 0.0, config)
    g = grad if grad is not None else x
    # One program per row, or (persistent) a grid of k programs per SM looping over rows.
    grid = n_rows
    if config.persistent:
        grid = min(n_rows, config.persistent * _sm_count(x.device))
    K._ce_forward_kernel[(grid,)](
        x, x.stride(0), g, g.stride(0), target,
        weight if weight is not None else row_loss, *den.pointers(row_loss), row_loss,
        n_rows, n_cols, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        MEAN=den.mean,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_Z_LOSS=z_loss > 0.0,
        HAS_SOFTCAP=softcap is not None,
        WRITE_GRAD=grad is not None,
        SINGLE_BLOCK=single,
        PERSISTENT=bool(config.persistent),
        REVERSE=bool(config.reverse),
        INTERPRETER=interpreted(),
        BLOCK=block,
        num_warps=warps,
    )


def scale_rows_(grad, grad_output, target=None, ignore_index=0):
    """In place ``grad *= grad_output`` (scalar, or per row for "none"); rows scaled by 1 skipped,
    and, given ``target`` ((M,) integers), the rows whose target is ``ignore_index``: their
    gradient, 0 from the forward, stays 0 whatever the upstream gradient (NaN and inf included).
    The skip is decided on the device per row (one target load): no extra pass, no host sync."""
    n_rows, n_cols = grad.shape
    if n_rows == 0 or n_cols == 0:
        return grad
    g = grad_output.detach()
    stride = 0 if g.ndim == 0 else g.stride(0)
    block, warps, _ = _row_block(n_cols)
    K._scale_rows_kernel[(n_rows,)](
        grad, grad.stride(0), g, stride, target if target is not None else g, ignore_index, n_cols,
        SKIP_IGNORED=target is not None, INTERPRETER=interpreted(), BLOCK=block, num_warps=warps,
    )
    return grad


# ------------------------------------------------------------------------------------------------
# Fused linear cross-entropy.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearTiles:
    """Tile shapes of the fused linear kernels (one config, no autotuning: see ``linear_tiles``)."""

    block_m: int  # rows of E per program (forward, gradient tile, dE)
    block_v: int  # vocabulary columns per program (forward, gradient tile, dW)
    block_k: int  # depth of one tl.dot step in every K loop
    block_d: int  # columns of dE / dW per program
    num_warps: int
    num_stages: int
    programs: int  # forward programs wanted in flight: sets the number of vocabulary splits
    # Program order of the forward and gradient-tile kernels (grids: row blocks x vocabulary
    # splits / chunk tiles). 0 = row blocks fastest: the ~132 programs in flight span all 64 row
    # blocks (N 8192) and 2 column blocks, so every step re-reads all of E (38 MB at D 2304, 67 MB
    # at D 4096: more than the 50 MB L2 of an H100, i.e. from HBM). g > 0 = groups of g row blocks
    # times every column block: in flight, g row blocks of E and the columns' W tiles (8 x 16 at
    # g = 8 in the forward: ~24 MB per step). Only which program computes which tile changes:
    # results are bit-identical (tested).
    group_m: int = 0
    # "lean" vocabulary columns per workspace step (multiple of block_v; forward and backward, the
    # backward's steps in dW being wider: ``scratch_dw``); 0 = the most that fits the workspace
    # (LEAN_WORKSPACE_BYTES; the forward's: ``lean_forward_bytes``). The dW kernel's grid is
    # (D / block_d) x (chunk / block_v) tiles per step, and (ptxas, sm_90) 2 of its CTAs fit an
    # SM: 264 slots on an H100. At the Gemma-2 shape
    # (N 8192, D 2304, chunk 3072) that is 18 x 24 = 432 tiles, 1.6 waves (82% efficiency), at
    # every one of the 84 steps; chunk 3584 gives 504 = 95% (but Llama-3's D 4096: 768 = 97% at
    # 3072, 896 = 85% at 3584: the best chunk depends on D). Bigger chunks also mean fewer
    # read-modify-write passes over the float32 dE accumulator. The chunk sets where dE's float32
    # partial sums are added, so it changes dE's rounding (deterministically: fixed per config).
    chunk: int = 0
    # "lean" schedule. 1: forward and backward per vocabulary chunk with cuBLAS products (torch.mm)
    # and Triton kernels for the elementwise work between them (``_stats_from_products``,
    # ``linear_backward_products``); the backward's products take the non-ignored rows only
    # (``HostCount``). 2: the backward of 1 after the fused Triton forward (``_lce_forward_kernel``:
    # logits tiles reduced to row statistics in registers, never stored; ignored row blocks skipped
    # on the device), for a GPU to compare. 3: as 2, and in the backward the logits recomputed by
    # the Triton gradient-tile kernel (tl.dot, G formed in registers: no elementwise pass), dE
    # and dW by cuBLAS on the non-ignored rows (without the row count on the host, as 1). 0:
    # Triton kernels throughout (backward: recompute fused with the gradient tile, dE, dW).
    products: int = 1
    # The elementwise kernels between the cuBLAS products (``products=1``): the forward's
    # ``_lce_stats_kernel`` (stats_m rows x stats_v columns per step, stats_warps warps; a grid of
    # N / stats_m programs per chunk) and the backward's gradient tile (grad_m x grad_v, grad_warps;
    # 0 = block_m, block_v, num_warps). Profiled on an H100 at the Gemma-2 shape they move the
    # N x V logits at 1.35 TB/s (stats) and 1.55 TB/s (gradient) of the ~3 TB/s the copy reaches
    # (benchmarks/results/gpu_profile_kernels.txt): the tiles are knobs for a sweep. The
    # gradient tile is elementwise: its size changes no bit (tested). The stats tile sets how a
    # step's sum-exp is split across threads, so the last bits may differ between stats tiles
    # (each one deterministic).
    stats_m: int = 16
    stats_v: int = 512
    stats_warps: int = 4
    grad_m: int = 0
    grad_v: int = 0
    grad_warps: int = 0
    # 1: the fused Triton forward kernel (products 0, 2, 3 and the "fast" Triton schedule) and the
    # products=3 backward's recompute kernel read E and W through tensor descriptors (Hopper's TMA
    # bulk copies) instead of per-thread loads; E is read in the compacted row order (the forward
    # gathers an (M, D) copy; the backward reads its gathered E'), since TMA cannot gather rows.
    # Needs 16-byte aligned rows (D * itemsize % 16 == 0); otherwise ignored.
    tma: int = 0
    # "lean" with cuBLAS products (products 1 to 3): where the logits chunks live.
    # wide_forward=1: the forward's chunks (products=1) take the workspace plus the bytes the
    # backward's float32 dE accumulator will take, less those of the gathered E' (at most N*D*elt;
    # ``lean_forward_bytes``): the lean bound N*D*4 B + 64 MiB still holds, with 5888 instead of
    # 3584 columns per chunk at N 8192 (bf16): 40 forward chunks instead of 72 at V 256000.
    # scratch_dw=1: the backward's chunks live in the part of the dW output not yet written
    # (``lean_backward_chunks``): a chunk of w columns over M' rows fits behind dW's first w
    # unwritten rows while w (M' + D) <= D times the columns left, so the first chunks are wide
    # (60928 columns at M' 7373, D 2304) and shrink as dW fills up; the last ones take the
    # workspace. At the Gemma-2 shape (10% ignored) 15 steps instead of 65 (Llama-3: 9, not 33):
    # fewer read-modify-write passes over the float32 dE accumulator (~6.8 GB less traffic at
    # Gemma-2) and fewer launches. Both change where float32 partial sums are added (the rounding
    # of dE and of the loss; deterministic). 0 for both: the schedule measured until 2026-11-22.
    wide_forward: int = 1
    scratch_dw: int = 1


_LINEAR_FIELDS = ("block_m", "block_v", "block_k", "block_d", "num_warps", "num_stages", "programs",
                  "group_m", "chunk", "products", "stats_m", "stats_v", "stats_warps", "grad_m", "grad_v",
                  "grad_warps", "tma", "wide_forward", "scratch_dw")
_LINEAR_POSITIONAL = _LINEAR_FIELDS[:6]
_LINEAR_CHECKS = dict(
    block_m=_pow2_in(16, 512),
    block_v=_pow2_in(16, 512),
    block_k=_pow2_in(16, 256),
    block_d=_pow2_in(16, 512),
    num_warps=_pow2_in(1, 32),
    num_stages=_int_in(1, 8),
    programs=_int_in(1, 1 << 20),
    group_m=_int_in(0, 1 << 16),
    chunk=_int_in(0, 1 << 24),
    products=_int_in(0, 3),
    tma=_int_in(0, 1),
    wide_forward=_int_in(0, 1),
    scratch_dw=_int_in(0, 1),
    stats_m=_pow2_in(2, 256),
    stats_v=_pow2_in(16, 8192),
    stats_warps=_pow2_in(1, 32),
    grad_m=lambda v: None if v == 0 or (_is_pow2(v) and 2 <= v <= 512) else "0 or a power of two in [2, 512]",
    grad_v=lambda v: None if v == 0 or (_is_pow2(v) and 16 <= v <= 8192) else "0 or a power of two in [16, 8192]",
    grad_warps=lambda v: None if v == 0 or (_is_pow2(v) and v <= 32) else "0 or a power of two <= 32",
)


def parse_linear_tiles(text, default):
    """LinearTiles from ``CROSSENT_TRITON_LINEAR_TILES`` text, unspecified fields from ``default``.

    Either six integers ``block_m,block_v,block_k,block_d,num_warps,num_stages`` first, or
    ``key=value`` items (keys: the LinearTiles fields), or both:

    >>> t = parse_linear_tiles("128,256,64,128,8,4,group_m=8", LinearTiles(128, 128, 64, 128, 8, 3, 1024))
    >>> (t.block_v, t.num_stages, t.programs, t.group_m, t.chunk)
    (256, 4, 1024, 8, 0)
    """
    values = _parse_config(LINEAR_TILES_ENV, text, _LINEAR_FIELDS, _LINEAR_POSITIONAL, _LINEAR_CHECKS)
    tiles = dataclasses.replace(default, **values)
    if tiles.chunk % tiles.block_v:
        raise ValueError(
            f"{LINEAR_TILES_ENV}: chunk must be 0 or a multiple of block_v={tiles.block_v}, "
            f"got {tiles.chunk} (in {text!r})"
        )
    return tiles


def linear_tiles(dtype):
    """Tiles for Hopper-class GPUs, fixed per dtype.

    128x128 output tiles with a 64-deep K step (32 for float32, to keep three pipeline stages of
    operands within shared memory) and 8 warps hold the float32 accumulator in 64 registers per
    thread and give wgmma-sized products. A single config (rather than ``triton.autotune``) keeps
    the K-loop order, hence the rounding of every sum, identical run to run and machine to
    machine: results are deterministic, which autotuning across BLOCK_K would break.
    (``CROSSENT_TRITON_LINEAR_TILES`` overrides it per call, for benchmarking: see ``plan_linear``.)
    """
    if dtype == torch.float32:
        return LinearTiles(128, 128, 32, 128, 8, 3, 1024)
    # Measured on an H100 (Triton 3.6, bf16, fwd+bwd, 10% ignored; the 8-config sweep in
    # benchmarks/results/gpu_linear_cross_entropy.csv): 4 stages, grouped program order (8 row
    # blocks) and 3584-column backward chunks were the fastest at both DESIGN shapes, lean and
    # fast: 81.3 ms vs 94.3 ms for (128,128,64,128,8,3) at 8192x2304x256000, 73.8 vs 81.5 ms at
    # 8192x4096x128256. The chunk comes from LEAN_WORKSPACE_BYTES (56 MiB: 3584 at N = 8192).
    return LinearTiles(128, 128, 64, 128, 8, 4, 1024, group_m=8)


def tiles_for_call(dtype):
    """``linear_tiles(dtype)``, overridden by ``CROSSENT_TRITON_LINEAR_TILES`` when set (read now:
    a benchmark may change it between calls). The override applies to every dtype."""
    tiles = linear_tiles(dtype)
    text = os.environ.get(LINEAR_TILES_ENV, "")
    return parse_linear_tiles(text, tiles) if text.strip() else tiles


@dataclasses.dataclass
class LinearPlan:
    n_rows: int
    n_vocab: int
    n_dim: int
    tiles: LinearTiles
    n_splits: int
    tiles_per_split: int
    chunk: int  # vocabulary columns recomputed per backward step ("lean")
    n_store: int  # vocabulary columns whose logits the forward keeps ("fast"); 0 in lean mode


def lean_chunk(n_rows, n_vocab, elt, tiles, workspace_bytes=None):
    """Vocabulary columns per "lean" step for ``n_rows`` rows of ``elt``-byte logits: the most
    that fit ``workspace_bytes`` (default ``LEAN_WORKSPACE_BYTES``), a multiple of
    ``tiles.block_v`` (or ``tiles.chunk``, a benchmark override), no more than the vocabulary
    needs."""
    nbytes = LEAN_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    chunk = max(tiles.block_v, nbytes // (max(n_rows, 1) * elt) // tiles.block_v * tiles.block_v)
    if tiles.chunk:
        chunk = tiles.chunk  # a benchmark override (see LinearTiles.chunk)
    return min(chunk, triton.cdiv(n_vocab, tiles.block_v) * tiles.block_v)


def lean_forward_bytes(n_rows, n_dim, elt, tiles):
    """Workspace bytes of the lean forward with cuBLAS products: ``LEAN_WORKSPACE_BYTES``, and
    with ``tiles.wide_forward`` the bytes of the backward's float32 (N, D) dE accumulator (not
    allocated yet) less the most the gathered non-ignored rows E' take (N*D*elt): the forward's
    peak stays within the lean bound N*D*4 B + 64 MiB. At N 8192, D 2304 in bf16: 92 MiB, 5888
    columns per chunk (3584 in 56 MiB):

    >>> t = linear_tiles(torch.bfloat16)
    >>> nbytes = lean_forward_bytes(8192, 2304, 2, t)
    >>> nbytes // 2**20, lean_chunk(8192, 256000, 2, t, nbytes), lean_chunk(8192, 256000, 2, t)
    (92, 5888, 3584)
    """
    extra = n_rows * n_dim * (4 - elt) if tiles.wide_forward else 0
    return LEAN_WORKSPACE_BYTES + extra


def lean_forward_chunks(n_rows, n_valid, n_vocab, n_dim, elt, tiles):
    """Columns per step of the lean forward (cuBLAS products): ``(all_rows, valid_rows)``, the
    chunk over every row (the first ``FORWARD_CHUNKS_BEFORE_COUNT`` steps, whose (N, chunk)
    workspace is allocated first) and the chunk over the ``n_valid`` non-ignored rows after the
    count (no narrower, within that workspace): both ``lean_chunk`` in ``lean_forward_bytes``.

    >>> lean_forward_chunks(8192, 7373, 256000, 2304, 2, linear_tiles(torch.bfloat16))
    (5888, 6528)
    """
    nbytes = lean_forward_bytes(n_rows, n_dim, elt, tiles)
    first = lean_chunk(n_rows, n_vocab, elt, tiles, nbytes)
    fits = n_rows * min(first, n_vocab) // max(n_valid, 1) // tiles.block_v * tiles.block_v
    return first, max(first, min(lean_chunk(n_valid, n_vocab, elt, tiles, nbytes), fits))


def lean_backward_chunks(m, n_vocab, n_dim, elt, tiles, scratch):
    """The lean backward's vocabulary steps over ``m`` rows: ``[(start, width, in_dw), ...]`` in
    column order.

    With ``scratch`` (dW wanted and ``tiles.scratch_dw``) the first steps keep their logits /
    gradient chunk in the unwritten part of the (V, D) dW output: step [s, s + w) writes
    dW[s : s + w] (its first w*D elements past s*D) and reads its chunk from the last m*w elements
    of dW's storage (start rounded down to 16 bytes), apart from it while
    w (m + D) <= (V - s) D - 16/elt. Each step takes the widest such multiple of ``block_v``, as
    long as it is no narrower than the workspace's chunk (``lean_chunk``); the columns left after
    that go through the workspace, ``lean_chunk`` at a time. At the Gemma-2 shape with 10% of the
    rows ignored (M' 7373, V 256000, D 2304, bf16), 11 steps in dW, then 4 in the workspace:

    >>> steps = lean_backward_chunks(7373, 256000, 2304, 2, linear_tiles(torch.bfloat16), True)
    >>> [w for _, w, _ in steps[:3]], len(steps), sum(in_dw for *_, in_dw in steps), steps[-1]
    ([60928, 46336, 35328], 15, 11, (254720, 1280, False))
    """
    regular = lean_chunk(m, n_vocab, elt, tiles)
    align = max(1, 16 // elt)
    chunks, start = [], 0
    while scratch and start < n_vocab:
        width = ((n_vocab - start) * n_dim - align) // (m + n_dim) // tiles.block_v * tiles.block_v
        if width < regular or width <= 0:
            break
        chunks.append((start, width, True))
        start += width
    while start < n_vocab:
        width = min(regular, n_vocab - start)
        chunks.append((start, width, False))
        start += width
    return chunks


def _dw_scratch(d_w, m, width):
    """The (m, width) chunk buffer of a ``lean_backward_chunks`` step that lives in dW: the last
    m*width elements of its storage, the start rounded down to 16 bytes."""
    align = max(1, 16 // d_w.element_size())
    offset = (d_w.numel() - m * width) // align * align
    return d_w.view(-1)[offset : offset + m * width]


def plan_linear(n_rows, n_vocab, n_dim, dtype, memory_budget, need_grad):
    tiles = tiles_for_call(dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    n_m_blocks = triton.cdiv(max(n_rows, 1), tiles.block_m)
    n_v_tiles = triton.cdiv(n_vocab, tiles.block_v)
    # Vocabulary splits: enough (row block, split) programs to fill the GPU several times over
    # even when rows are few; chosen from the shape only, so the combine order is deterministic.
    n_splits = max(1, min(n_v_tiles, triton.cdiv(tiles.programs, n_m_blocks)))
    per_split = triton.cdiv(n_v_tiles, n_splits)
    n_splits = triton.cdiv(n_v_tiles, per_split)
    row_bytes = max(n_rows, 1) * elt
    chunk = lean_chunk(n_rows, n_vocab, elt, tiles)
    n_store = 0
    if need_grad and memory_budget:
        if n_vocab * row_bytes <= memory_budget:
            n_store = n_vocab
        else:
            # Keep whole chunks of logits while the rest still fits one recompute chunk.
            n_store = max(0, (memory_budget - chunk * row_bytes) // row_bytes) // chunk * chunk
            n_store = min(n_store, n_vocab)
    return LinearPlan(n_rows, n_vocab, n_dim, tiles, n_splits, per_split, chunk, n_store)


def _tma_operands(inp, linear_weight, rows, tiles):
    """The E and W arguments of the kernels that compute logits tiles: ``(inp, linear_weight)``,
    or with ``tiles.tma`` tensor descriptors of E in the compacted order (gathered by ``rows``;
    None: ``inp`` is in that order already) and of W. TMA needs 16-byte aligned rows (and base
    addresses); otherwise the plain pointers."""
    elt = inp.element_size()
    aligned = all((t.stride(0) * elt) % 16 == 0 and t.data_ptr() % 16 == 0 and t.stride(1) == 1
                  for t in (inp, linear_weight)) and (inp.shape[1] * elt) % 16 == 0
    if not (tiles.tma and aligned):
        return inp, linear_weight
    from triton.tools.tensor_descriptor import TensorDescriptor

    e_compact = inp.index_select(0, rows) if rows is not None else inp
    return (TensorDescriptor.from_tensor(e_compact, [tiles.block_m, tiles.block_k]),
            TensorDescriptor.from_tensor(linear_weight, [tiles.block_v, tiles.block_k]))


def _option_flags(linear_bias, weight, label_smoothing, softcap):
    """The loss-option constexprs of the linear kernels."""
    return dict(
        HAS_BIAS=linear_bias is not None,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SOFTCAP=softcap is not None,
    )


def _dot_args(dtype):
    # tf32 would lose float32 precision: float32 inputs take the exact ("ieee") product.
    return dict(
        INTERPRETER=interpreted(),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


@dataclasses.dataclass
class HostCount:
    """A device int64 scalar (the number of non-ignored rows) on its way to the host.

    cuBLAS takes a product's row count from the host, so the cuBLAS products can skip the ignored
    rows only if the host knows how many are left. ``start`` (at the start of the forward) queues
    the copy into pinned memory and records an event right behind it, without waiting; ``get``
    waits on that event: in the lean forward after its first ``FORWARD_CHUNKS_BEFORE_COUNT``
    vocabulary chunks are queued, in the fast row schedule after its first chunk of rows, in the
    lean backward (passed long before). Whenever the wait returns, the GPU still has the work queued
    after the event (those chunks), so it never runs dry, unlike with ``.item()`` before the first
    product, which drains the queue. Under CUDA graph capture neither
    copy nor wait is allowed: ``start`` returns None and ``get`` None, and the products take every
    row (ignored rows then have G = 0); the same with ``CROSSENT_TRITON_LINEAR_HOST_COUNT=0``."""

    value: torch.Tensor
    event: torch.cuda.Event | None

    @classmethod
    def start(cls, n):
        if n.device.type != "cuda":
            return cls(n.detach().clone(), None)  # on the host already: nothing to wait for
        # The copy runs on the current stream of n's device: the event goes right behind it there,
        # whichever device is current.
        with torch.cuda.device(n.device):
            if torch.cuda.is_current_stream_capturing():
                return None
            host = torch.empty((), dtype=n.dtype, pin_memory=True)
            host.copy_(n, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return cls(host, event)

    def get(self):
        """The count as an int, or None under CUDA graph capture."""
        if self.event is not None:
            if torch.cuda.is_current_stream_capturing():
                return None
            self.event.synchronize()
        return int(self.value)


def _valid_first(valid):
    """Row indices (int64), the non-ignored rows first and each group in its own order: a stable
    sort on the device, no host sync (the compacted order every linear path uses)."""
    return torch.argsort((~valid).to(torch.int8), stable=True)


def _host_count(n_valid):
    """``HostCount.start(n_valid)``, or None with ``CROSSENT_TRITON_LINEAR_HOST_COUNT=0``."""
    value = os.environ.get(HOST_COUNT_ENV, "1").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{HOST_COUNT_ENV} must be 0 (every row through the products) or 1 (the "
                         f"default), got {value!r}")
    return None if value == "0" else HostCount.start(n_valid)


def _gather_rows(src, rows, n_valid):
    """``src[rows]`` (contiguous), with the rows from position ``n_valid`` (a device int64
    scalar) on zero and not read (``_gather_rows_kernel``): the bytes of ``index_select``, less
    the ignored rows' reads."""
    n_rows, n_dim = rows.shape[0], src.shape[1]
    out = torch.empty(n_rows, n_dim, dtype=src.dtype, device=src.device)
    if n_rows and n_dim:
        block_m, block_d = 32, 128
        K._gather_rows_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(n_dim, block_d))](
            src, src.stride(0), rows, n_valid, out, n_rows, n_dim, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    return out


def _scatter_rows(src, rows, n_src, out):
    """``out[rows[i]] = src[i]`` for ``i < n_src``, 0 on the other rows (``_scatter_rows_kernel``;
    ``src`` and ``out`` contiguous, ``rows`` a permutation of out's rows)."""
    n_rows, n_dim = out.shape
    block_m, block_d = 32, 128
    K._scatter_rows_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(n_dim, block_d))](
        src, rows, n_src, out, n_rows, n_dim,
        INTERPRETER=interpreted(), BLOCK_M=block_m, BLOCK_D=block_d,
    )


@dataclasses.dataclass
class LinearForward:
    loss: torch.Tensor
    rows: torch.Tensor  # (M,) int64: non-ignored rows first, original order kept (stable)
    n_valid: torch.Tensor  # int64 scalar on the device
    coef: torch.Tensor  # float32 (5, M): max, log sum-exp shift, A, B, C; compacted row order
    store: torch.Tensor | None  # (M, n_store) gradient of the stored logits ("fast"), or None
    count: HostCount | None  # n_valid on its way to the host, for the backward's cuBLAS products
    plan: LinearPlan
    target: torch.Tensor
    weight: torch.Tensor | None
    operands: tuple | None  # (input, linear_weight, linear_bias) as the kernels read them
    ignore_index: int


def check_linear(
    inp, linear_weight, target, linear_bias, weight, ignore_index, reduction,
    label_smoothing, z_loss, softcap, memory_budget,
):
    """Checked ``(input, linear_weight, target, linear_bias, weight)`` of a linear CE call (the
    call's order), with unit stride along D (and along V for the bias)."""
    _check_float("input", inp)
    _check_float("linear_weight", linear_weight)
    if inp.ndim != 2:
        raise ValueError(f"input must be 2-D (rows, features) here, got shape {tuple(inp.shape)}")
    if linear_weight.ndim != 2 or linear_weight.shape[1] != inp.shape[1]:
        raise ValueError(
            f"linear_weight must have shape (V, {inp.shape[1]}), got {tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != inp.dtype:
        raise TypeError(
            f"linear_weight must have the dtype of input ({inp.dtype}), got {linear_weight.dtype}"
        )
    if linear_weight.shape[0] == 0:
        raise ValueError("linear_weight must have at least one row (class), got shape (0, D)")
    _check_options(reduction, label_smoothing, z_loss, softcap, ignore_index)
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0
    ):
        raise ValueError(f"memory_budget must be None or an int >= 0 (bytes), got {memory_budget!r}")
    device = inp.device
    _check_runnable(device)
    _check_device("linear_weight", linear_weight, device)
    n_rows, n_dim = inp.shape
    n_vocab = linear_weight.shape[0]
    if linear_bias is not None:
        _check_float("linear_bias", linear_bias)
        if linear_bias.shape != (n_vocab,):
            raise ValueError(f"linear_bias must have shape ({n_vocab},), got {tuple(linear_bias.shape)}")
        _check_device("linear_bias", linear_bias, device)
    target = _check_target(target, n_rows, n_vocab, ignore_index, device)
    weight = _check_class_weight(weight, n_vocab, device)
    # The kernels assume unit stride along D (and along V for the bias): copy the rare layouts
    # without it (e.g. a head stored transposed) instead of compiling slow strided loads.
    if inp.stride(1) != 1:
        inp = inp.contiguous()
    if linear_weight.stride(1) != 1:
        linear_weight = linear_weight.contiguous()
    if linear_bias is not None:
        linear_bias = linear_bias.contiguous()
    return inp, linear_weight, target, linear_bias, weight


def linear_forward(
    inp, linear_weight, target, linear_bias, weight, ignore_index, reduction,
    label_smoothing, z_loss, softcap, memory_budget, need_grad,
):
    """Forward kernels (split statistics, combine) on ``check_linear``'s arguments; "fast": the
    gradients of as many vocabulary columns as the budget holds, stored."""
    device = inp.device
    n_rows, n_dim = inp.shape
    n_vocab = linear_weight.shape[0]

    plan = plan_linear(n_rows, n_vocab, n_dim, inp.dtype, memory_budget, need_grad)
    t = plan.tiles
    valid = target != ignore_index
    den = _denominators(target, weight, ignore_index, n_vocab, reduction, valid)
    # Compaction without a host sync: a stable sort puts the valid rows first, in order; the
    # kernels read n_valid from the device and skip every row block past it.
    rows = _valid_first(valid)
    n_valid = den.n_valid if den.mean else valid.sum()
    # The row count on its way to the host, for the cuBLAS products of the lean forward (after its
    # first chunks) and backward.
    cublas = bool(t.products and plan.n_store == 0 and n_rows)
    count = _host_count(n_valid) if cublas and (need_grad or t.products == 1) else None
    row_loss = torch.zeros(n_rows, dtype=torch.float32, device=device)
    coef = torch.zeros(5, n_rows, dtype=torch.float32, device=device)
    store = None
    if plan.n_store:
        store = torch.empty(n_rows, plan.n_store, dtype=inp.dtype, device=device)
    if n_rows:
        dummy = row_loss
        n_m_blocks = triton.cdiv(n_rows, t.block_m)
        flags = _option_flags(linear_bias, weight, label_smoothing, softcap)
        cap = float(softcap) if softcap is not None else 1.0
        n_splits = plan.n_splits
        if t.products == 1 and store is None:
            # Lean with cuBLAS products: the logits chunk by chunk, folded into one split
            # (products 2 and 3: the fused Triton forward below).
            n_splits = 1
            partial = _stats_from_products(inp, linear_weight, linear_bias, rows, n_valid, target, weight,
                                           plan, softcap, label_smoothing, count)
        else:
            partial = torch.empty(6, n_splits, n_rows, dtype=torch.float32, device=device)
            e_arg, w_arg = _tma_operands(inp, linear_weight, rows, t)
            K._lce_forward_kernel[(n_m_blocks, n_splits)](
                e_arg, inp.stride(0),
                w_arg, linear_weight.stride(0),
                linear_bias if linear_bias is not None else dummy,
                rows, n_valid, target, weight if weight is not None else dummy,
                partial, store if store is not None else dummy, plan.n_store, plan.n_store,
                n_rows, n_vocab, n_dim, plan.tiles_per_split, cap,
                STORE_LOGITS=store is not None,
                BLOCK_M=t.block_m, BLOCK_V=t.block_v, BLOCK_K=t.block_k, GROUP_M=t.group_m,
                TMA=e_arg is not inp,
                num_warps=t.num_warps, num_stages=t.num_stages,
                **flags, **_dot_args(inp.dtype),
            )
        K._lce_combine_kernel[(n_m_blocks,)](
            partial, rows, n_valid, target, weight if weight is not None else dummy,
            den.pointers(dummy)[1], row_loss, coef, n_rows, n_splits, n_vocab,
            float(label_smoothing), float(z_loss),
            MEAN=den.mean,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0.0,
            HAS_Z_LOSS=z_loss > 0.0,
            BLOCK_M=t.block_m,
            num_warps=4,
        )
        if store is not None:
            # "fast": turn the stored logits into their gradient now, in place (elementwise).
            K._lce_grad_tile_kernel[(n_m_blocks, triton.cdiv(plan.n_store, t.block_v))](
                inp, 0, linear_weight, 0, dummy,
                rows, n_valid, target, weight if weight is not None else dummy, coef,
                store, store.stride(0), 0, plan.n_store, n_rows, n_vocab, n_dim, cap,
                FROM_LOGITS=True,
                BLOCK_M=t.block_m, BLOCK_V=t.block_v, BLOCK_K=t.block_k, GROUP_M=0,
                num_warps=t.num_warps,
                **flags, **_dot_args(inp.dtype),
            )
    loss = row_loss if reduction == "none" else row_loss.sum()
    return LinearForward(loss, rows, n_valid, coef, store, count, plan, target, weight,
                         (inp, linear_weight, linear_bias), ignore_index)


# ------------------------------------------------------------------------------------------------
# "fast" row schedule: cuBLAS for the three products, the CE kernel in place between them.
# ------------------------------------------------------------------------------------------------

#: "fast" (a memory_budget) takes the row schedule when the budget holds the logits of at least
#: this many rows (of every row when there are fewer); smaller budgets keep the Triton schedule,
#: which stores some vocabulary columns' gradients instead (``plan_linear``).
ROW_SCHEDULE_MIN_ROWS = 256


def plan_rows(n_rows, n_vocab, dtype, memory_budget, reduction, need_grad):
    """Rows per chunk of the "fast" row schedule (``linear_rows_forward``), or 0 where it does not
    apply: no budget, no gradient wanted, ``reduction="none"`` (its per-row upstream gradient
    comes after dW has summed the rows), or a budget below ``ROW_SCHEDULE_MIN_ROWS`` rows of
    logits. Chunks are as even as the budget allows (8192 rows, 3 fit -> 2731, 2731, 2730)."""
    if not (memory_budget and need_grad) or reduction == "none" or n_rows == 0:
        return 0
    elt = torch.empty((), dtype=dtype).element_size()
    fit = memory_budget // (n_vocab * elt)
    if fit < min(ROW_SCHEDULE_MIN_ROWS, n_rows):
        return 0
    return triton.cdiv(n_rows, triton.cdiv(n_rows, fit))


@dataclasses.dataclass
class LinearRows:
    """Forward of the row schedule: the loss, and the gradients for an upstream gradient of 1."""

    loss: torch.Tensor
    grads: tuple  # (d_input, d_linear_weight, d_linear_bias), None where not wanted
    target: torch.Tensor  # (M,) int64: ``scale_grads_`` leaves dE's ignored rows at 0
    ignore_index: int
    any_kept: torch.Tensor | None = None  # bool scalar on the device (dW or db wanted): a row is kept


def linear_rows_forward(
    inp, linear_weight, target, linear_bias, weight, ignore_index, reduction,
    label_smoothing, z_loss, softcap, rows, needs,
):
    """Loss and gradients of the checked arguments, ``rows`` rows at a time (``plan_rows``).

    Per chunk of rows r: X_r = E_r W^T (+ b) by cuBLAS into a (rows, V) buffer, the CE kernel
    turns X_r into G_r = dL/dX_r in place (the scales of the whole batch), then dW (+)= G_r^T E_r
    and dE_r = G_r W (one product: float32 accumulation, rounded once); three products in all
    (2NDV flops each), as eager PyTorch, with (rows x V) logits instead of (N x V).
    dW is summed over the chunks in the weight's dtype (cuBLAS adds in float32 and rounds once per
    chunk: k chunks round k times; a float32 (V, D) accumulator would cost V*D*4 bytes, more
    than the budgets this schedule is for). ``reduction`` is "mean" or "sum"; backward multiplies
    the gradients by the upstream scalar (``scale_rows_``).

    Ignored rows: with more than one chunk, the rows are taken in the compacted order (the
    non-ignored first, gathered into an (N, D) buffer: N*D elements beyond the budget; the
    ignored ones zero there, ``_gather_rows_kernel``) and the
    number of non-ignored rows is sent to the host when the forward starts (``HostCount``). The
    first chunk is queued without it; before the second, the host waits for that count, which the
    GPU passed before the first chunk's products (still queued or running, so the GPU never runs
    dry), and the chunks stop at the last non-ignored row. dE is written over each chunk's
    gathered rows once they are used, then scattered back to the rows' order with zeros on the
    ignored rows (``_scatter_rows_kernel``). One chunk only (the budget holds every row), under
    CUDA graph capture or with ``CROSSENT_TRITON_LINEAR_HOST_COUNT=0``, ignored rows go through the
    products in their own order, with G = 0; when dW is wanted, from a copy of the chunk's input
    rows with the ignored ones zeroed (in the chunk's rows of the dE output, which dE overwrites
    after dW's product; a (rows, D) buffer without dE), since G^T E would give 0 * NaN = NaN for a
    NaN or inf hidden state there: one extra read and write of E's rows per call.
    An ignored row contributes 0 whatever its input (DESIGN.md): dW and db are those of the
    non-ignored rows, dE is 0 on the ignored rows.
    """
    need_input, need_weight, need_bias = needs
    device = inp.device
    n_rows, n_dim = inp.shape
    n_vocab = linear_weight.shape[0]
    valid = target != ignore_index
    den = _denominators(target, weight, ignore_index, n_vocab, reduction, valid)
    count = None
    if rows < n_rows:
        n_kept = den.n_valid if den.mean else valid.sum()  # on the device
        count = _host_count(n_kept)
    row_loss = torch.zeros(n_rows, dtype=torch.float32, device=device)
    d_inp = torch.empty_like(inp, memory_format=torch.contiguous_format) if need_input else None
    d_w = torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if need_weight else None
    d_b = torch.zeros(n_vocab, dtype=torch.float32, device=device) if need_bias else None
    # cuBLAS adds the bias in the operands' dtype (as torch.nn.functional.linear requires).
    bias = linear_bias.to(inp.dtype) if linear_bias is not None else None
    masked = None  # where the chunk's input rows go with the ignored ones zeroed (no count)
    if count is not None:
        order = _valid_first(valid)
        e_all, t_all = _gather_rows(inp, order, n_kept), target[order]
    else:
        e_all, t_all = inp, target
        if d_w is not None:
            masked = d_inp if d_inp is not None else torch.empty(rows, n_dim, dtype=inp.dtype, device=device)
    buf = torch.empty(rows, n_vocab, dtype=inp.dtype, device=device)
    w_t = linear_weight.T
    start, end = 0, n_rows
    while start < end:
        stop = min(start + rows, end)
        e = e_all[start:stop]
        if masked is not None:
            # dW = G^T E multiplies the ignored rows' G = 0 by their input: zero it (NaN/inf
            # hidden states of padding), in the rows of dE that this chunk writes last.
            dest = masked[start:stop] if masked is d_inp else masked[: stop - start]
            e = torch.where(valid[start:stop, None], e, e.new_zeros(()), out=dest)
        x = buf[: stop - start]
        if bias is None:
            torch.mm(e, w_t, out=x)
        else:
            torch.addmm(bias, e, w_t, out=x)
        _launch_ce(x, x, t_all[start:stop], weight, den, row_loss[start:stop], ignore_index,
                   label_smoothing, z_loss, softcap)
        if d_w is not None:
            if start == 0:
                torch.mm(x.T, e, out=d_w)
            else:
                d_w.addmm_(x.T, e)
        if d_b is not None:
            d_b += x.sum(0, dtype=torch.float32)
        if d_inp is not None:
            # Compacted: over the gathered rows just used (the products above are queued first).
            torch.mm(x, linear_weight, out=e if count is not None else d_inp[start:stop])
        if start == 0 and count is not None:
            n_valid = count.get()
            end = n_rows if n_valid is None else max(n_valid, stop)
        start = stop
    if count is not None and d_inp is not None:
        _scatter_rows(e_all, order, n_rows if n_valid is None else n_valid, d_inp)
    if d_b is not None:
        d_b = d_b.to(linear_bias.dtype)
    any_kept = valid.any() if d_w is not None or d_b is not None else None
    return LinearRows(row_loss.sum(), (d_inp, d_w, d_b), target, ignore_index, any_kept)


def scale_grads_(grads, grad_output, target, ignore_index, any_kept=None):
    """``g *= grad_output`` (a scalar on the device) for each gradient of ``grads`` (dE, dW, db)
    that is not None; no memory is touched when it is 1, nor on the rows of dE whose ``target``
    is ``ignore_index`` (they stay 0 for a NaN or inf upstream gradient: ``scale_rows_``). dW and
    db, sums over the kept rows, are scaled by 0 when ``any_kept`` (a device bool) is False: 0,
    not 0 * NaN."""
    out = []
    weight_scale = grad_output
    if any_kept is not None and (grads[1] is not None or grads[2] is not None):
        weight_scale = torch.where(any_kept, grad_output, torch.zeros((), dtype=grad_output.dtype,
                                                                       device=grad_output.device))
    for i, g in enumerate(grads):
        if g is not None and g.numel():
            flat = g.view(-1, g.shape[-1]) if g.ndim > 1 else g.view(1, -1)
            if i == 0:
                scale_rows_(flat, grad_output, target, ignore_index)
            else:
                scale_rows_(flat, weight_scale)
        out.append(g)
    return tuple(out)


#: The lean forward with cuBLAS products queues this many vocabulary chunks over every row before
#: it waits for the number of non-ignored rows (``HostCount``); the other chunks take those rows
#: only. The queued chunks are work the GPU still has when the wait returns (about 1 ms at the
#: DESIGN shapes), so that it does not run dry while the host gathers the rows and goes on.
FORWARD_CHUNKS_BEFORE_COUNT = 4


def _stats_from_products(inp, linear_weight, linear_bias, rows, n_valid, target, weight, plan, softcap,
                         label_smoothing, count):
    """Forward statistics of the lean schedule with cuBLAS products (``LinearTiles.products``):
    per vocabulary chunk (``lean_forward_chunks``), X_c = E W_c^T (+ b_c)
    by cuBLAS (in the input dtype, as eager PyTorch's logits), folded by ``_lce_stats_kernel``
    into float32 [6, 1, n_rows] statistics (one split, compacted order) for
    ``_lce_combine_kernel``. The first ``FORWARD_CHUNKS_BEFORE_COUNT`` chunks take every row;
    then, given the host ``count`` of non-ignored rows, the others take those rows only, gathered
    in the compacted order (an (M', D) buffer, freed on return), in wider chunks."""
    n_rows, n_vocab = inp.shape[0], linear_weight.shape[0]
    t = plan.tiles
    elt = inp.element_size()
    chunk, _ = lean_forward_chunks(n_rows, n_rows, n_vocab, inp.shape[1], elt, t)
    stats = torch.empty(6, 1, n_rows, dtype=torch.float32, device=inp.device)
    workspace = torch.empty(n_rows * min(chunk, n_vocab), dtype=inp.dtype, device=inp.device)
    bias = linear_bias.to(inp.dtype) if linear_bias is not None else None
    block_m, block_v, warps = t.stats_m, t.stats_v, t.stats_warps
    e, x_rows, x_target = inp, rows, target
    start, i = 0, 0
    while start < n_vocab:
        if i == FORWARD_CHUNKS_BEFORE_COUNT and count is not None:
            n = count.get()
            if n == 0:
                break  # no row left to fold: the combine kernel makes every loss 0
            if n is not None and n < n_rows:
                # Compacted from here on: row r of X is compacted row r, read as itself; fewer
                # rows, wider chunks in the same workspace.
                e, x_target = inp.index_select(0, rows[:n]), target[rows[:n]]
                x_rows = torch.arange(n, device=inp.device)
                _, chunk = lean_forward_chunks(n_rows, n, n_vocab, inp.shape[1], elt, t)
        width = min(chunk, n_vocab - start)
        x = _chunk_logits(workspace, e, linear_weight, bias, start, width)
        K._lce_stats_kernel[(triton.cdiv(e.shape[0], block_m),)](
            x, x.stride(0), x_rows, n_valid, x_target, weight if weight is not None else stats, stats,
            start, width, n_rows, n_vocab, float(softcap) if softcap is not None else 1.0,
            FIRST=start == 0,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0.0,
            HAS_SOFTCAP=softcap is not None,
            BLOCK_M=block_m, BLOCK_V=block_v,
            num_warps=warps,
        )
        start, i = start + width, i + 1
    return stats


def _chunk_logits(workspace, inp, linear_weight, bias, start, width):
    """``inp @ linear_weight[start:start+width].T (+ bias[...])`` by cuBLAS into the first
    ``n_rows * width`` elements of ``workspace``, as a contiguous (n_rows, width) view."""
    x = workspace[: inp.shape[0] * width].view(inp.shape[0], width)
    w_t = linear_weight[start : start + width].T
    if bias is None:
        return torch.mm(inp, w_t, out=x)
    return torch.addmm(bias[start : start + width], inp, w_t, out=x)


def linear_backward(
    fwd, grad_output, inp, linear_weight, linear_bias, label_smoothing, softcap,
    need_input, need_weight, need_bias,
):
    """dE, dW, db for the upstream gradient ``grad_output`` (scalar, or (M,) for "none").

    Vocabulary chunks in a fixed order: the stored ("fast") columns first as one chunk, then
    chunks of ``plan.chunk`` columns whose gradient tile is recomputed into a bounded workspace.
    Per chunk: dE (+)= g * G @ W_chunk into a float32 accumulator, dW_chunk = G^T E.
    """
    plan, t = fwd.plan, fwd.plan.tiles
    n_rows, n_vocab, n_dim = plan.n_rows, plan.n_vocab, plan.n_dim
    device = inp.device
    if t.products and fwd.store is None and n_rows and (need_input or need_weight or need_bias):
        return linear_backward_products(
            fwd, grad_output, inp, linear_weight, linear_bias, label_smoothing, softcap,
            need_input, need_weight, need_bias,
        )
    d_inp = torch.zeros_like(inp, memory_format=torch.contiguous_format) if need_input else None
    d_w = None
    if need_weight:
        d_w = torch.empty_like(linear_weight, memory_format=torch.contiguous_format)
    d_b = torch.empty_like(linear_bias, memory_format=torch.contiguous_format) if need_bias else None
    if not n_rows or not (need_input or need_weight or need_bias):
        if d_w is not None:
            d_w.zero_()
        if d_b is not None:
            d_b.zero_()
        return d_inp, d_w, d_b
    g_out = grad_output.detach()
    per_row = g_out.ndim == 1
    g_stride = g_out.stride(0) if per_row else 0
    chunks = []
    if fwd.store is not None:
        chunks.append((0, plan.n_store, fwd.store))
    for start in range(plan.n_store, n_vocab, plan.chunk):
        chunks.append((start, min(plan.chunk, n_vocab - start), None))
    workspace = None
    if any(buf is None for _, _, buf in chunks):
        workspace = torch.empty(n_rows, plan.chunk, dtype=inp.dtype, device=device)
    acc = None
    if need_input and len(chunks) > 1:
        acc = torch.empty(n_rows, n_dim, dtype=torch.float32, device=device)
    dummy = fwd.coef
    weight = fwd.weight
    cap = float(softcap) if softcap is not None else 1.0
    n_m_blocks = triton.cdiv(n_rows, t.block_m)
    dot = _dot_args(inp.dtype)
    for i, (start, width, buf) in enumerate(chunks):
        if buf is None:
            buf = workspace
            K._lce_grad_tile_kernel[(n_m_blocks, triton.cdiv(width, t.block_v))](
                inp, inp.stride(0),
                linear_weight, linear_weight.stride(0),
                linear_bias if linear_bias is not None else dummy,
                fwd.rows, fwd.n_valid, fwd.target, weight if weight is not None else dummy,
                fwd.coef, buf, buf.stride(0), start, width, n_rows, n_vocab, n_dim, cap,
                FROM_LOGITS=False,
                **_option_flags(linear_bias, weight, label_smoothing, softcap),
                BLOCK_M=t.block_m, BLOCK_V=t.block_v, BLOCK_K=t.block_k, GROUP_M=t.group_m,
                num_warps=t.num_warps, num_stages=t.num_stages,
                **dot,
            )
        if need_input:
            K._lce_grad_input_kernel[(triton.cdiv(n_dim, t.block_d), n_m_blocks)](
                buf, buf.stride(0), linear_weight, linear_weight.stride(0),
                fwd.rows, fwd.n_valid, g_out, g_stride,
                acc if acc is not None else dummy, d_inp, start, width, n_dim,
                FIRST=i == 0, LAST=i == len(chunks) - 1,
                BLOCK_M=t.block_m, BLOCK_D=t.block_d, BLOCK_K=t.block_k,
                num_warps=t.num_warps, num_stages=t.num_stages,
                **dot,
            )
        if need_weight or need_bias:
            d_blocks = triton.cdiv(n_dim, t.block_d) if need_weight else 1
            K._lce_grad_weight_kernel[(d_blocks, triton.cdiv(width, t.block_v))](
                buf, buf.stride(0), inp, inp.stride(0),
                fwd.rows, fwd.n_valid, g_out, g_stride,
                d_w if d_w is not None else dummy, d_b if d_b is not None else dummy,
                start, width, n_dim,
                PER_ROW_SCALE=per_row,
                HAS_WEIGHT_GRAD=d_w is not None,
                HAS_BIAS_GRAD=d_b is not None,
                BLOCK_V=t.block_v, BLOCK_D=t.block_d, BLOCK_K=t.block_k,
                num_warps=t.num_warps, num_stages=t.num_stages,
                **dot,
            )
    return d_inp, d_w, d_b


def _addmm_float32_(acc, a, b):
    """``acc += a @ b`` with ``acc`` float32 and ``a``, ``b`` in a lower precision: the product
    is summed in float32 and added without rounding to the operands' dtype (cuBLAS with a
    float32 output, ``torch.addmm(out_dtype=)``, PyTorch >= 2.8 on CUDA); elsewhere (the CPU
    interpreter tests) the operands are upcast, which is exact."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear_backward_products(
    fwd, grad_output, inp, linear_weight, linear_bias, label_smoothing, softcap,
    need_input, need_weight, need_bias,
):
    """The "lean" backward with cuBLAS products (``LinearTiles.products``); as ``linear_backward``.

    The products take the M' non-ignored rows only, their count read on the host through
    ``fwd.count`` (``HostCount``): E' = E[rows[:M']] gathered into the first M' rows of the dE
    output buffer (so it costs no memory beyond the outputs). Per vocabulary chunk c
    (``lean_backward_chunks``: the first in the unwritten part of the dW output, the rest
    ``lean_chunk`` columns for M' rows in the bounded workspace, so fewer rows give wider
    chunks): X_c = E' W_c^T (+ b_c) by cuBLAS into the chunk's buffer (rounded to the input dtype,
    as eager PyTorch's logits); ``_lce_grad_tile_kernel``
    (``FROM_LOGITS``, ``RAW_LOGITS``) turns it into G_c in place from the forward's row statistics
    (their coefficients times the upstream gradient), then by cuBLAS dE' += G_c W_c into a float32
    accumulator (``_addmm_float32_``), dW_c = G_c^T E' (one rounding) and db_c = the column sums of
    G_c. ``_scatter_rows_kernel`` puts dE' back in the rows' order with zeros on the ignored rows.
    ``products=3``: G_c straight from ``_lce_grad_tile_kernel`` recomputing the logits itself
    (tl.dot in float32; with ``tma`` through descriptors of E' and W), no cuBLAS X_c and no
    elementwise pass. Without a count (CUDA graph capture) M' = M: every row in its own order,
    ignored rows with G = 0 (statistics m = +inf, A = B = C = 0, whatever the upstream gradient
    there), X_c by cuBLAS in any case, from a copy of E whose ignored rows are zeroed (in the dE
    output: one extra read and write of E), so that their NaN or inf hidden states neither make
    G NaN nor reach dW: an ignored row contributes 0 whatever its input (DESIGN.md).
    """
    plan, t = fwd.plan, fwd.plan.tiles
    n_rows, n_vocab, n_dim = plan.n_rows, plan.n_vocab, plan.n_dim
    device, dtype = inp.device, inp.dtype
    n_valid = fwd.count.get() if fwd.count is not None else None
    compact = n_valid is not None and n_valid < n_rows
    m = n_valid if compact else n_rows
    d_inp = torch.empty_like(inp, memory_format=torch.contiguous_format) if need_input else None
    d_w = torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if need_weight else None
    d_b = torch.empty(n_vocab, dtype=torch.float32, device=device) if need_bias else None
    if m == 0:
        for g in (d_inp, d_w, d_b):
            if g is not None:
                g.zero_()
        return d_inp, d_w, None if d_b is None else d_b.to(linear_bias.dtype)
    # G = A p - B [j == t] - C w (times the softcap's derivative) is linear in (A, B, C): scaling
    # them by the upstream gradient (a scalar, or per row for "none") scales G without another
    # pass over it. The forward's statistics are in the compacted order.
    g_out = grad_output.detach().to(torch.float32)
    if compact:
        sel = fwd.rows[:m]
        coef = fwd.coef[:, :m].clone()
        coef[2:] *= g_out[sel] if g_out.ndim else g_out
        target = fwd.target[sel]
        # E' in the first m rows of the dE buffer: dE' is accumulated in float32 apart from it.
        e = d_inp[:m] if d_inp is not None else torch.empty(m, n_dim, dtype=dtype, device=device)
        torch.index_select(inp, 0, sel, out=e)
    else:
        # Row statistics moved from the compacted order to the rows' own order.
        compacted = fwd.coef.clone()
        compacted[0].masked_fill_(torch.arange(n_rows, device=device) >= fwd.n_valid, float("inf"))
        coef = torch.empty_like(compacted).index_copy_(1, fwd.rows, compacted)
        valid = fwd.target != fwd.ignore_index
        # Selected, not multiplied: 0 * NaN (a NaN or inf upstream gradient on an ignored row, or
        # as the scalar) would make the ignored rows' G NaN.
        coef[2:] = torch.where(valid, coef[2:] * g_out, 0.0)
        target, e = fwd.target, inp
        if n_valid is None:
            # No count (CUDA graph capture): every row goes through the products, ignored ones
            # too. Their input is zeroed in a copy (in the dE output, or a buffer of its own as in
            # the compacted case), so that a NaN or inf hidden state there gives finite logits,
            # hence G = 0 exactly (m = +inf, A = B = C = 0), and adds nothing to dW = G^T E.
            e = d_inp if d_inp is not None else torch.empty(n_rows, n_dim, dtype=dtype, device=device)
            torch.where(valid[:, None], inp, inp.new_zeros(()), out=e)
    every_row = torch.arange(m, device=device)
    n_all = torch.full((), m, dtype=torch.int64, device=device)
    # Fewer rows, wider chunks in the same workspace: fewer passes over the dE accumulator; the
    # first chunks in the unwritten part of dW, wider still.
    chunks = lean_backward_chunks(m, n_vocab, n_dim, inp.element_size(), t, need_weight and t.scratch_dw)
    acc = None
    if need_input and (compact or len(chunks) > 1):
        acc = torch.zeros(m, n_dim, dtype=torch.float32, device=device)
    bias = linear_bias.to(dtype) if linear_bias is not None else None
    workspace = None  # allocated for the first step that is not in dW
    weight = fwd.weight
    grad_m, grad_v, grad_warps = t.grad_m or t.block_m, t.grad_v or t.block_v, t.grad_warps or t.num_warps
    n_m_blocks = triton.cdiv(m, grad_m)
    # products=3: G by the Triton kernel that recomputes the logits (compacted rows: fwd.rows,
    # fwd.n_valid; all of them are written only when the count is known on the host).
    fused = t.products == 3 and n_valid is not None
    cap = float(softcap) if softcap is not None else 1.0
    if fused:
        # With tma: descriptors of E' (gathered above, or every row in order when none is
        # ignored) and W; otherwise the kernel gathers E's rows through fwd.rows itself.
        e_desc, w_desc = _tma_operands(e, linear_weight, None, t)
        tma = e_desc is not e
        e_arg, w_arg = (e_desc, w_desc) if tma else (inp, linear_weight)
    for start, width, in_dw in chunks:
        if in_dw:
            buf = _dw_scratch(d_w, m, width)
        else:
            if workspace is None:
                workspace = torch.empty(m * max(w for _, w, d in chunks if not d), dtype=dtype, device=device)
            buf = workspace
        w_c = linear_weight[start : start + width]
        if fused:
            x = buf[: m * width].view(m, width)
            K._lce_grad_tile_kernel[(triton.cdiv(m, t.block_m), triton.cdiv(width, t.block_v))](
                e_arg, inp.stride(0), w_arg, linear_weight.stride(0),
                linear_bias if linear_bias is not None else coef,
                fwd.rows, fwd.n_valid, fwd.target, weight if weight is not None else coef, coef,
                x, x.stride(0), start, width, coef.shape[1], n_vocab, n_dim, cap,
                FROM_LOGITS=False,
                **_option_flags(linear_bias, weight, label_smoothing, softcap),
                BLOCK_M=t.block_m, BLOCK_V=t.block_v, BLOCK_K=t.block_k, GROUP_M=t.group_m,
                TMA=tma,
                num_warps=t.num_warps, num_stages=t.num_stages,
                **_dot_args(dtype),
            )
        else:
            x = _chunk_logits(buf, e, linear_weight, bias, start, width)
            K._lce_grad_tile_kernel[(n_m_blocks, triton.cdiv(width, grad_v))](
                inp, 0, linear_weight, 0, coef,
                every_row, n_all, target, weight if weight is not None else coef, coef,
                x, x.stride(0), start, width, m, n_vocab, n_dim, cap,
                FROM_LOGITS=True,
                **_option_flags(None, weight, label_smoothing, softcap),  # the bias is in X already
                BLOCK_M=grad_m, BLOCK_V=grad_v, BLOCK_K=t.block_k, GROUP_M=0,
                RAW_LOGITS=True,
                num_warps=grad_warps,
                **_dot_args(dtype),
            )
        if need_weight:
            torch.mm(x.T, e, out=d_w[start : start + width])
        if need_bias:
            torch.sum(x, 0, dtype=torch.float32, out=d_b[start : start + width])
        if need_input:
            # Last: with one chunk and no accumulator dE overwrites E, which may live in its buffer.
            if acc is None:
                torch.mm(x, w_c, out=d_inp)
            else:
                _addmm_float32_(acc, x, w_c)
    del workspace, buf, x
    if compact and d_inp is not None:
        _scatter_rows(acc, fwd.rows, m, d_inp)
    elif acc is not None:
        d_inp.copy_(acc)
    if d_b is not None:
        d_b = d_b.to(linear_bias.dtype)
    return d_inp, d_w, d_b
