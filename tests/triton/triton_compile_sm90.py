"""Compile crossent's Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so type
errors in loop-carried values, unsupported constructs or bad dot shapes would only show on a GPU.
This script runs the real compiler pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas
bundled in the triton wheel) for a target named explicitly, which needs no device. Arguments are
described the way the JIT describes them at run time: a unit stride is the constant 1 and
pointers, row strides and sizes divisible by 16 carry that divisibility.

Run by tests/triton/test_triton_compile_sm90.py in a subprocess without TRITON_INTERPRET; prints
one line per kernel variant ("OK name wgmma=.. cp.async=..") and exits 1 if any failed.
"""

from __future__ import annotations

import sys


def main():
    from _sm90 import compiler

    from crossent.triton import _kernels as K

    def report(name, out):
        ptx = out.asm["ptx"]
        print(f"OK {name} wgmma={ptx.count('wgmma.mma_async')} cp.async={ptx.count('cp.async')} "
              f"tma={ptx.count('cp.async.bulk.tensor')} "
              f"ptx_local={ptx.count('ld.local') + ptx.count('st.local')} shared={out.metadata.shared}", flush=True)

    compile_variant, failures = compiler(report)

    def build(*args, **kwargs):
        # Row strides and the sizes the kernels tile by are multiples of 16 in practice.
        return compile_variant(*args, divisible=lambda arg: arg.startswith("stride_") or arg in ("n_dim", "n_store"),
                               **kwargs)

    for dt in ("bf16", "fp32"):
        ce_ptrs = {"logits_ptr": f"*{dt}", "grad_ptr": f"*{dt}", "target_ptr": "*i64", "weight_ptr": "*fp32",
                   "n_valid_ptr": "*i64", "total_weight_ptr": "*fp32", "loss_ptr": "*fp32"}
        every = dict(MEAN=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SOFTCAP=True,
                     WRITE_GRAD=True)
        z_only = dict(every, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_SOFTCAP=False)
        grid = dict(PERSISTENT=False, REVERSE=True, INTERPRETER=False)
        build(f"ce_forward[{dt},single32k,z_loss]", K._ce_forward_kernel, ce_ptrs,
              dict(z_only, **grid, SINGLE_BLOCK=True, BLOCK=32768), floats=("eps", "z_loss", "cap"),
              num_warps=16)
        build(f"ce_forward[{dt},single8k]", K._ce_forward_kernel, ce_ptrs,
              dict(every, **grid, SINGLE_BLOCK=True, BLOCK=8192), floats=("eps", "z_loss", "cap"),
              num_warps=8)
        build(f"ce_forward[{dt},streamed]", K._ce_forward_kernel, ce_ptrs,
              dict(every, **grid, SINGLE_BLOCK=False, BLOCK=8192), floats=("eps", "z_loss", "cap"),
              num_warps=16)
        build(f"ce_forward[{dt},streamed,persistent,forward-order]", K._ce_forward_kernel, ce_ptrs,
              dict(every, SINGLE_BLOCK=False, PERSISTENT=True, REVERSE=False, INTERPRETER=False, BLOCK=8192),
              floats=("eps", "z_loss", "cap"), num_warps=16)
        for skip in (False, True):
            build(f"scale_rows[{dt}" + (",skip_ignored]" if skip else "]"), K._scale_rows_kernel,
                  {"grad_ptr": f"*{dt}", "scale_ptr": "*fp32", "target_ptr": "*i64"},
                  dict(SKIP_IGNORED=skip, INTERPRETER=False, BLOCK=8192), num_warps=16)
        build(f"gather_rows[{dt}]", K._gather_rows_kernel,
              {"src_ptr": f"*{dt}", "rows_ptr": "*i64", "n_valid_ptr": "*i64", "out_ptr": f"*{dt}"},
              dict(BLOCK_M=32, BLOCK_D=128), num_warps=4)
        build(f"scatter_rows[{dt}]", K._scatter_rows_kernel,
              {"src_ptr": "*fp32", "rows_ptr": "*i64", "out_ptr": f"*{dt}"},
              dict(INTERPRETER=False, BLOCK_M=32, BLOCK_D=128), num_warps=4)

        ptrs = {"e_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "rows_ptr": "*i64",
                "n_valid_ptr": "*i64", "target_ptr": "*i64", "weight_ptr": "*fp32", "partial_ptr": "*fp32",
                "store_ptr": f"*{dt}", "total_weight_ptr": "*fp32", "loss_ptr": "*fp32", "coef_ptr": "*fp32",
                "g_ptr": f"*{dt}", "gout_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": f"*{dt}",
                "dw_ptr": f"*{dt}", "db_ptr": f"*{dt}"}
        tiles = dict(INTERPRETER=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                     BLOCK_K=32 if dt == "fp32" else 64)
        opts = dict(HAS_BIAS=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True)
        for group in (0, 8):
            build(f"lce_forward[{dt}" + (f",group_m={group}]" if group else "]"), K._lce_forward_kernel, ptrs,
                  dict(**opts, **tiles, STORE_LOGITS=True, BLOCK_M=128, BLOCK_V=128, GROUP_M=group, TMA=False),
                  floats=("cap",))
        # LinearTiles.tma: E and W through tensor descriptors (TMA bulk copies).
        bk = tiles["BLOCK_K"]
        build(f"lce_forward[{dt},tma]", K._lce_forward_kernel,
              dict(ptrs, e_ptr=f"tensordesc<{dt}[128, {bk}]>", w_ptr=f"tensordesc<{dt}[128, {bk}]>"),
              dict(**opts, **tiles, STORE_LOGITS=True, BLOCK_M=128, BLOCK_V=128, GROUP_M=8, TMA=True),
              floats=("cap",))
        build(f"lce_combine[{dt}]", K._lce_combine_kernel, ptrs,
              dict(MEAN=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, BLOCK_M=128),
              floats=("eps", "z_loss"), num_warps=4)
        # The JIT turns an integer argument equal to 1 into a compile-time constant, so integer
        # parameters must not be used as tensors: `n_splits.to(tl.int64)` failed to compile this
        # way on an H100 (few vocabulary tiles: one split).
        ones = dict(n_splits=1, n_rows=1)
        build(f"lce_forward[{dt},n_rows=1]", K._lce_forward_kernel, ptrs,
              dict(**opts, **tiles, STORE_LOGITS=True, BLOCK_M=128, BLOCK_V=128, GROUP_M=8, TMA=False, n_rows=1),
              floats=("cap",))
        build(f"lce_combine[{dt},n_splits=1,n_rows=1]", K._lce_combine_kernel, ptrs,
              dict(MEAN=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, BLOCK_M=128, **ones),
              floats=("eps", "z_loss"), num_warps=4)
        build(f"lce_grad_tile[{dt},tma]", K._lce_grad_tile_kernel,
              dict(ptrs, e_ptr=f"tensordesc<{dt}[128, {bk}]>", w_ptr=f"tensordesc<{dt}[128, {bk}]>"),
              dict(**opts, **tiles, FROM_LOGITS=False, BLOCK_M=128, BLOCK_V=128, GROUP_M=8, TMA=True),
              floats=("cap",))
        for from_logits, group, raw in ((False, 0, False), (True, 0, False), (False, 8, False), (True, 0, True)):
            build(f"lce_grad_tile[{dt},from_logits={from_logits}" + (f",group_m={group}" if group else "")
                  + (",raw_logits=True]" if raw else "]"),
                  K._lce_grad_tile_kernel, ptrs,
                  dict(**opts, **tiles, FROM_LOGITS=from_logits, BLOCK_M=128, BLOCK_V=128, GROUP_M=group,
                       RAW_LOGITS=raw, TMA=False),
                  floats=("cap",))
        for first in (True, False):
            build(f"lce_stats[{dt},first={first}]", K._lce_stats_kernel,
                  dict(ptrs, x_ptr=f"*{dt}", stats_ptr="*fp32"),
                  dict(FIRST=first, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True, BLOCK_M=16, BLOCK_V=512),
                  floats=("cap",), num_warps=4)
        # Sweep knobs of the elementwise kernels between cuBLAS products (LinearTiles.stats_*,
        # grad_*): other tiles than the defaults still compile.
        build(f"lce_stats[{dt},32x256,8 warps]", K._lce_stats_kernel, dict(ptrs, x_ptr=f"*{dt}", stats_ptr="*fp32"),
              dict(FIRST=False, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True, BLOCK_M=32, BLOCK_V=256),
              floats=("cap",), num_warps=8)
        build(f"lce_grad_tile[{dt},raw_logits=True,64x256,4 warps]", K._lce_grad_tile_kernel, ptrs,
              dict(**opts, **tiles, FROM_LOGITS=True, BLOCK_M=64, BLOCK_V=256, GROUP_M=0, RAW_LOGITS=True),
              floats=("cap",), num_warps=4)
        for first, last in ((True, False), (False, True)):
            build(f"lce_grad_input[{dt},first={first},last={last}]", K._lce_grad_input_kernel, ptrs,
                  dict(**tiles, FIRST=first, LAST=last, BLOCK_M=128, BLOCK_D=128))
        for per_row in (False, True):
            build(f"lce_grad_weight[{dt},per_row={per_row}]", K._lce_grad_weight_kernel, ptrs,
                  dict(**tiles, PER_ROW_SCALE=per_row, HAS_WEIGHT_GRAD=True, HAS_BIAS_GRAD=True,
                       BLOCK_V=128, BLOCK_D=128))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
