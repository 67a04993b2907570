"""Static sm_90 (H100) report of crossent's kernel configurations, on a machine without a GPU.

For every candidate configuration of the benchmark sweeps (gpu_harness.LINEAR_SWEEP and
CE_SWEEP, or those given with --tiles / --configs) this compiles, with Triton's real compiler for
sm_90 (tests/triton/_sm90.py: TTIR -> PTX -> cubin with the ptxas bundled in the triton wheel),
the kernels the benchmark runs (bf16, no loss options, as in the benchmarks):

* linear: forward (statistics; ``+store``: fast mode's variant) and gradient tile (lean), both with
  the config's group_m, dE (a middle chunk: FIRST=False, LAST=False) and dW;
* CE: the row kernel at 128256 and 32000 columns (the DESIGN.md shapes) with the config's block,
  warps, persistence and pass order;
* elementwise (gpu_harness.ELEMENTWISE_SWEEP, or --elementwise): the two kernels between the
  cuBLAS products of the lean default, the stats kernel and the gradient tile (raw logits), with
  the config's stats_* and grad_* tiles, and their grids per vocabulary chunk at N 8192;

and reports per kernel: registers per thread and spill stores (``ptxas -v`` on the PTX), shared
memory (Triton's dynamic allocation), whether wgmma is used, whether the K loop is
software-pipelined (asynchronous copies: cp.async or TMA bulk copies in the PTX), the CTAs that
fit one SM (registers: 64K per SM; shared memory: 228 KB per SM, 1 KB reserved per CTA; 64
warps), and, for the linear kernels, the grid size and its wave efficiency on 132 SMs at the
Gemma-2 (N 8192, D 2304, V 256000) and Llama-3 (8192, 4096, 128256) shapes: programs /
(waves x slots), where slots = 132 x CTAs per SM. A config is OK when every kernel compiles,
spills nothing and fits shared memory, and (linear) every matmul kernel uses wgmma with a
pipelined K loop. Exit status 1 if any config other than "default" is not OK (the default is
reported, and measured by the sweeps, whatever it is).

    python benchmarks/sm90_config_report.py                  # the default sweeps
    python benchmarks/sm90_config_report.py --tiles "128,256,64,128,8,3;256,128,64,128,8,3" --configs ""
    python benchmarks/sm90_config_report.py --all-options    # linear forward with every loss option too

Needs triton (3.6+) and torch (CPU build is enough); no GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "triton"))
sys.path.insert(0, os.path.join(ROOT, "src"))
os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real kernels, not interpreted

import gpu_harness as H  # noqa: E402

SMS = 132  # H100 SXM
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}
CE_COLUMNS = {"8192x128256": 128256, "32768x32000": 32000}


def ctas_per_sm(regs, warps, smem):
    """CTAs of ``warps`` warps using ``regs`` registers per thread and ``smem`` bytes that fit one
    SM (registers allocated per warp in units of 256, i.e. per thread in multiples of 8)."""
    regs_alloc = max(8, math.ceil(regs / 8) * 8)
    by_regs = REGS_PER_SM // (regs_alloc * 32 * warps)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)
    by_warps = MAX_WARPS_PER_SM // warps
    return max(0, min(by_regs, by_smem, by_warps, 32))


def wave_efficiency(programs, slots):
    if programs <= 0 or slots <= 0:
        return float("nan")
    waves = math.ceil(programs / slots)
    return programs / (waves * slots)


def ptxas_usage(ptx):
    """(registers, spill-store bytes) from ``ptxas -v`` for sm_90a on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the ptxas Triton itself runs for sm_90 (it differs across versions)
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    log = proc.stdout + proc.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    return regs, spill


def describe(out, warps):
    ptx = out.asm["ptx"]
    regs, spill = ptxas_usage(ptx)
    smem = int(out.metadata.shared)
    return dict(
        regs=regs, spill=spill, smem=smem, wgmma=ptx.count("wgmma.mma_async") > 0,
        pipelined=("cp.async" in ptx) or ("cp.async.bulk" in ptx), ctas=ctas_per_sm(regs, warps, smem),
    )


def _ce_launch(L, config, n_cols):
    """What decides the compiled CE kernel and its grid at ``n_cols`` columns under ``config``."""
    block, warps, single = L._row_block(n_cols, config=config)
    return block, warps, single, config.persistent, single or config.reverse


def _elementwise_report(configs, K, build, compiled, ptrs, emit):
    """Rows for the lean default's elementwise kernels under each (label, LinearTiles) of
    ``configs``; True when every config but "default" compiles without spills."""
    emit()
    emit("## Lean default's elementwise kernels, bf16, sm_90 (between the cuBLAS products)")
    emit()
    emit("| config | kernel | tile | warps | regs | spill | CTAs/SM | programs per chunk (N 8192, 3584 columns; "
         "wave eff.) | ok |")
    emit("|---|---|---|---|---|---|---|---|---|")
    n_rows, chunk = SHAPES["gemma2"][0], 3584
    ok_all = True
    for label, t in configs:
        grad_m, grad_v, grad_warps = t.grad_m or t.block_m, t.grad_v or t.block_v, t.grad_warps or t.num_warps
        variants = [
            ("stats", K._lce_stats_kernel, dict(ptrs, x_ptr="*bf16", stats_ptr="*fp32"),
             dict(FIRST=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_SOFTCAP=False,
                  BLOCK_M=t.stats_m, BLOCK_V=t.stats_v),
             t.stats_warps, (t.stats_m, t.stats_v), math.ceil(n_rows / t.stats_m)),
            ("grad_tile(raw logits)", K._lce_grad_tile_kernel, ptrs,
             dict(HAS_BIAS=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_SOFTCAP=False, INTERPRETER=False,
                  DOT_PRECISION="tf32", BLOCK_K=t.block_k, FROM_LOGITS=True, RAW_LOGITS=True, TMA=False,
                  BLOCK_M=grad_m, BLOCK_V=grad_v, GROUP_M=0),
             grad_warps, (grad_m, grad_v), math.ceil(n_rows / grad_m) * math.ceil(chunk / grad_v)),
        ]
        for kname, fn, kptrs, consts, warps, tile, programs in variants:
            name = f"elementwise:{label}:{kname}"
            build(name, fn, kptrs, consts, floats=("cap",), num_warps=warps,
                  divisible=lambda a: a.startswith("stride_"))
            if name not in compiled:
                emit(f"| `{label}` | {kname} | {tile[0]}x{tile[1]} | {warps} | compile failed | | | | no |")
                ok_all = ok_all and label == H.DEFAULT_CONFIG
                continue
            u = describe(compiled.pop(name), warps)
            ok = u["spill"] == 0 and u["ctas"] > 0
            ok_all = ok_all and (ok or label == H.DEFAULT_CONFIG)
            eff = wave_efficiency(programs, SMS * u["ctas"])
            emit(f"| `{label}` | {kname} | {tile[0]}x{tile[1]} | {warps} | {u['regs']} | {u['spill']} | "
                 f"{u['ctas']} | {programs} ({eff:.0%}) | {'yes' if ok else 'NO'} |")
    return ok_all


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", default="default-sweep",
                        help="';'-separated CROSSENT_TRITON_LINEAR_TILES values, 'default-sweep', or '' for none")
    parser.add_argument("--configs", default="default-sweep",
                        help="';'-separated CROSSENT_TRITON_CE_CONFIG values, 'default-sweep', or '' for none")
    parser.add_argument("--elementwise", default="default-sweep",
                        help="';'-separated CROSSENT_TRITON_LINEAR_TILES values for the lean default's "
                             "elementwise kernels, 'default-sweep' (gpu_harness.ELEMENTWISE_SWEEP), or '' for none")
    parser.add_argument("--all-options", action="store_true",
                        help="also compile the linear forward and gradient tile with every loss option on")
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)

    import torch
    from _sm90 import compiler

    from crossent.triton import _kernels as K
    from crossent.triton import _launchers as L

    base = L.linear_tiles(torch.bfloat16)
    tiles = []
    if args.tiles.strip():
        for c in H.parse_configs(args.tiles, "--tiles", H.LINEAR_SWEEP,
                                 lambda c: L.parse_linear_tiles(c, base)):
            tiles.append((c, base if c == H.DEFAULT_CONFIG else L.parse_linear_tiles(c, base)))
    elementwise = []
    if args.elementwise.strip():
        for c in H.parse_configs(args.elementwise, "--elementwise", H.ELEMENTWISE_SWEEP,
                                 lambda c: L.parse_linear_tiles(c, base)):
            elementwise.append((c, base if c == H.DEFAULT_CONFIG else L.parse_linear_tiles(c, base)))
    ces = []
    if args.configs.strip():
        for c in H.parse_configs(args.configs, "--configs", H.CE_SWEEP, L.parse_ce_config):
            ces.append((c, L.CEConfig() if c == H.DEFAULT_CONFIG else L.parse_ce_config(c)))

    compiled = {}
    build, _ = compiler(lambda name, out: compiled.__setitem__(name, out))  # failures: rows marked no
    lines = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    ok_all = True
    ptrs = {"e_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "rows_ptr": "*i64", "n_valid_ptr": "*i64",
            "target_ptr": "*i64", "weight_ptr": "*fp32", "partial_ptr": "*fp32", "store_ptr": "*bf16",
            "coef_ptr": "*fp32", "g_ptr": "*bf16", "gout_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16",
            "dw_ptr": "*bf16", "db_ptr": "*bf16"}

    def divisible(arg):
        return arg.startswith("stride_") or arg in ("n_dim", "n_store")

    if tiles:
        emit("## Linear cross-entropy kernels, bf16, sm_90 (regs/thread, spill bytes, smem KiB, CTAs/SM)")
        emit()
        emit("| config | kernel | regs | spill | smem KiB | wgmma | pipelined | CTAs/SM | "
             "programs gemma2 (wave eff.) | programs llama3 (wave eff.) | ok |")
        emit("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, t in tiles:
        plain = dict(HAS_BIAS=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_SOFTCAP=False)
        every = dict(HAS_BIAS=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True)
        dot = dict(INTERPRETER=False, DOT_PRECISION="tf32", BLOCK_K=t.block_k)
        kern = dict(num_warps=t.num_warps, num_stages=t.num_stages, divisible=divisible)
        tma = dict(TMA=bool(t.tma))
        variants = [
            ("forward", K._lce_forward_kernel,
             dict(**plain, **dot, **tma, STORE_LOGITS=False, BLOCK_M=t.block_m, BLOCK_V=t.block_v,
                  GROUP_M=t.group_m), ("cap",)),
            ("forward+store", K._lce_forward_kernel,
             dict(**plain, **dot, **tma, STORE_LOGITS=True, BLOCK_M=t.block_m, BLOCK_V=t.block_v,
                  GROUP_M=t.group_m), ("cap",)),
            ("grad_tile", K._lce_grad_tile_kernel,
             dict(**plain, **dot, **tma, FROM_LOGITS=False, BLOCK_M=t.block_m, BLOCK_V=t.block_v,
                  GROUP_M=t.group_m), ("cap",)),
            ("dE", K._lce_grad_input_kernel,
             dict(**dot, FIRST=False, LAST=False, BLOCK_M=t.block_m, BLOCK_D=t.block_d), ()),
            ("dW", K._lce_grad_weight_kernel,
             dict(**dot, PER_ROW_SCALE=False, HAS_WEIGHT_GRAD=True, HAS_BIAS_GRAD=False,
                  BLOCK_V=t.block_v, BLOCK_D=t.block_d), ()),
        ]
        if args.all_options:
            variants += [
                ("forward[all options]", K._lce_forward_kernel,
                 dict(**every, **dot, **tma, STORE_LOGITS=True, BLOCK_M=t.block_m, BLOCK_V=t.block_v,
                      GROUP_M=t.group_m), ("cap",)),
                ("grad_tile[all options]", K._lce_grad_tile_kernel,
                 dict(**every, **dot, **tma, FROM_LOGITS=False, BLOCK_M=t.block_m, BLOCK_V=t.block_v,
                      GROUP_M=t.group_m), ("cap",)),
            ]
        os.environ[L.LINEAR_TILES_ENV] = label if label != H.DEFAULT_CONFIG else ""
        plans = {k: L.plan_linear(n, v, d, torch.bfloat16, None, True) for k, (n, d, v) in SHAPES.items()}
        os.environ.pop(L.LINEAR_TILES_ENV, None)
        config_ok = True
        # With tma=1 the forward kernel takes tensor descriptors of E and W (block rows x BLOCK_K).
        desc = dict(ptrs, e_ptr=f"tensordesc<bf16[{t.block_m}, {t.block_k}]>",
                    w_ptr=f"tensordesc<bf16[{t.block_v}, {t.block_k}]>")
        for kname, fn, consts, floats in variants:
            name = f"{label}:{kname}"
            build(name, fn, desc if consts.get("TMA") else ptrs, consts, floats=floats, **kern)
            if name not in compiled:
                emit(f"| `{label}` | {kname} | compile failed | | | | | | | | no |")
                config_ok = False
                continue
            u = describe(compiled.pop(name), t.num_warps)
            waves = []
            for key, (n, d, _v) in SHAPES.items():
                p = plans[key]
                n_m = math.ceil(n / t.block_m)
                programs = {
                    "forward": n_m * p.n_splits, "grad_tile": n_m * math.ceil(p.chunk / t.block_v),
                    "dE": math.ceil(d / t.block_d) * n_m,
                    "dW": math.ceil(d / t.block_d) * math.ceil(p.chunk / t.block_v),
                }.get(kname.split("[")[0].replace("+store", ""))
                eff = wave_efficiency(programs, SMS * u["ctas"]) if programs else float("nan")
                waves.append("-" if programs is None else f"{programs} ({eff:.0%})" + (
                    f", chunk {p.chunk}" if kname in ("dW",) else ""))
            # every linear kernel is a matmul: it must use wgmma with a pipelined K loop
            ok = (u["spill"] == 0 and u["smem"] + SMEM_RESERVED_PER_CTA <= SMEM_PER_SM and u["ctas"] > 0
                  and u["wgmma"] and u["pipelined"])
            config_ok = config_ok and ok
            emit(f"| `{label}` | {kname} | {u['regs']} | {u['spill']} | {u['smem'] / 1024:.0f} | "
                 f"{'yes' if u['wgmma'] else 'NO'} | {'yes' if u['pipelined'] else 'NO'} | {u['ctas']} | "
                 f"{waves[0]} | {waves[1]} | {'yes' if ok else 'NO'} |")
        ok_all = ok_all and (config_ok or label == H.DEFAULT_CONFIG)

    if ces:
        emit()
        emit("## CE row kernel, bf16, sm_90, no options, gradient written (regs/thread, spill bytes)")
        emit()
        emit("| config | shape | block | warps | path | regs | spill | smem B | CTAs/SM | rows in flight "
             "(MiB of logits) | ok |")
        emit("|---|---|---|---|---|---|---|---|---|---|---|")
    ce_ptrs = {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "target_ptr": "*i64", "weight_ptr": "*fp32",
               "n_valid_ptr": "*i64", "total_weight_ptr": "*fp32", "loss_ptr": "*fp32"}
    for label, c in ces:
        for shape, n_cols in CE_COLUMNS.items():
            block, warps, single = L._row_block(n_cols, config=c)
            consts = dict(MEAN=True, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_Z_LOSS=False, HAS_SOFTCAP=False,
                          WRITE_GRAD=True, SINGLE_BLOCK=single, PERSISTENT=bool(c.persistent),
                          REVERSE=bool(c.reverse), INTERPRETER=False, BLOCK=block)
            name = f"{label}:{shape}"
            build(name, K._ce_forward_kernel, ce_ptrs, consts, floats=("eps", "z_loss", "cap"),
                  num_warps=warps, divisible=lambda a: a.startswith("stride_"))
            if name not in compiled:
                emit(f"| `{label}` | {shape} | {block} | {warps} | | compile failed | | | | | no |")
                ok_all = False
                continue
            u = describe(compiled.pop(name), warps)
            n_rows = int(shape.split("x")[0])
            flight = min(n_rows, SMS * (min(c.persistent, u["ctas"]) if c.persistent else u["ctas"]))
            ok = u["spill"] == 0 and u["ctas"] > 0
            # A config that launches the default's kernel at this shape is the default here.
            same = label != H.DEFAULT_CONFIG and _ce_launch(L, c, n_cols) == _ce_launch(L, L.CEConfig(), n_cols)
            ok_all = ok_all and (ok or label == H.DEFAULT_CONFIG or same)
            emit(f"| `{label}` | {shape} | {block} | {warps} | {'registers' if single else 'streamed'} | "
                 f"{u['regs']} | {u['spill']} | {u['smem']} | {u['ctas']} | "
                 f"{flight} ({flight * n_cols * 2 / 2**20:.0f}) | {'yes' if ok else 'NO'}"
                 f"{' (= default here)' if same else ''} |")
    if elementwise:
        ok_all = _elementwise_report(elementwise, K, build, compiled, ptrs, emit) and ok_all
    emit()
    emit("all configs OK (default aside)" if ok_all else "some configs are NOT OK (see the ok column)")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
