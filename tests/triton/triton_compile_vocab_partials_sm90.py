"""Compile crossent.triton._partials' kernels for an H100 (sm_90) on a machine without a GPU.

The same approach as triton_compile_sm90.py (which covers _kernels): Triton's real compiler
pipeline down to a cubin, for a target named explicitly, so errors the interpreter cannot see
(types of loop-carried values, scalar branches, unsupported constructs) show without a device.
Run by test_triton_vocab_parallel_compile_sm90.py in a subprocess without TRITON_INTERPRET;
prints one line per variant ("OK name ...") and exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys


def main():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from crossent.triton import _partials as P

    target = GPUTarget("cuda", 90, 32)
    failures = []

    def build(name, fn, pointers, consts, floats=(), num_warps=8):
        signature, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg in pointers:
                signature[arg] = pointers[arg]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in floats:
                signature[arg] = "fp32"
            else:
                signature[arg] = "i32"
        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        try:
            src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
            out = triton.compile(src, target=target, options={"num_warps": num_warps})
        except Exception as e:  # report every failing variant, then exit non-zero
            failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            return
        ptx = out.asm["ptx"]
        print(f"OK {name} ptx_local={ptx.count('ld.local') + ptx.count('st.local')}", flush=True)

    for dt in ("bf16", "fp16", "fp32"):
        ptrs = {"logits_ptr": f"*{dt}", "grad_ptr": f"*{dt}", "col_ptr": "*i64", "valid_ptr": "*i8",
                "m_ptr": "*fp32", "s_ptr": "*fp32", "t_ptr": "*fp32", "fsum_ptr": "*fp32",
                "fcount_ptr": "*fp32", "lse_ptr": "*fp32", "g_ptr": "*fp32"}
        for smoothing in (False, True):
            build(f"vp_partials[{dt},smoothing={smoothing}]", P._vp_partials_kernel, ptrs,
                  dict(HAS_SMOOTHING=smoothing, BLOCK=P.MAX_BLOCK))
            build(f"vp_grad[{dt},smoothing={smoothing}]", P._vp_grad_kernel, ptrs,
                  dict(HAS_SMOOTHING=smoothing, HAS_Z_LOSS=True, INTERPRETER=False, BLOCK=P.MAX_BLOCK),
                  floats=("eps", "z_loss"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
