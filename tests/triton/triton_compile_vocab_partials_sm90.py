"""Compile crossent.triton._partials' kernels for an H100 (sm_90) on a machine without a GPU.

The same approach as triton_compile_sm90.py (which covers _kernels): Triton's real compiler
pipeline down to a cubin, for a target named explicitly, so errors the interpreter cannot see
(types of loop-carried values, scalar branches, unsupported constructs) show without a device.
Run by test_triton_vocab_parallel_compile_sm90.py in a subprocess without TRITON_INTERPRET;
prints one line per variant ("OK name ...") and exits 1 if any failed.
"""

from __future__ import annotations

import sys


def main():
    from _sm90 import compiler

    from crossent.triton import _partials as P

    def report(name, out):
        ptx = out.asm["ptx"]
        print(f"OK {name} ptx_local={ptx.count('ld.local') + ptx.count('st.local')}", flush=True)

    build, failures = compiler(report)

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
