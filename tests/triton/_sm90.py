"""Shared by the sm_90 compile scripts: describe a kernel's arguments the way the JIT does at run
time and run Triton's real compiler for an H100 (sm_90), which needs no device.

A unit stride is the constant 1; pointers (and the integer arguments ``divisible`` names) carry a
divisibility by 16; every variant that fails is reported and counted, so a script can print all of
them and exit non-zero at the end.
"""

from __future__ import annotations

import os


def compiler(report):
    """(build, failures): ``build(name, fn, pointers, consts, ...)`` compiles one variant and calls
    ``report(name, compiled)`` on success; ``failures`` lists the names that did not compile."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    failures = []

    def build(name, fn, pointers, consts, floats=(), num_warps=8, num_stages=3, divisible=lambda arg: False):
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
                if divisible(arg):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        try:
            src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
            out = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
        except Exception as e:  # report every failing variant, then exit non-zero
            failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            return
        report(name, out)

    return build, failures
