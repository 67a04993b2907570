#!/usr/bin/env bash
# One step of a GPU session, run on the device machine from the repository root, carrying .whl/
# (made here first by `bash benchmarks/fetch_gpu_wheels.sh`). Each step fits one 10-minute call:
#
#   bash benchmarks/gpu_session.sh check    # the Triton kernel tests compiled on CUDA (TRITON_INTERPRET=0),
#                                           #   the GPU-only tests, and the vocab-parallel losses over NCCL
#   bash benchmarks/gpu_session.sh ce       # CE on logits: crossent configs vs torch, Liger (both shapes)
#   bash benchmarks/gpu_session.sh linear   # fused linear CE: crossent's defaults (lean, fast, and both
#                                           #   with every row through the products) vs torch,
#                                           #   torch.compile, Liger, Cut Cross-Entropy, three bare
#                                           #   matmuls (both shapes); sweeps: --tiles elementwise-sweep
#                                           #   --impls crossent-triton-lean,bare-matmuls (schedules and
#                                           #   tiles of the lean default), --tiles default-sweep (tiles of
#                                           #   the Triton matmul kernels: products=0 and fast's Triton schedule)
#   bash benchmarks/gpu_session.sh profile  # kernel-by-kernel time, host time and idle gaps per call
#                                           #   (lean, fast 1000 MiB, CE; benchmarks/profile_gpu_kernels.py)
#
# Results land in $OUT (the device tool brings them back): STEP.log, env.txt (with crossent's
# revision) and the CSVs (a crossent_rev column), which are then merged into benchmarks/results/
# here by column name (a plain `tail >>` shifts the columns where the headers differ):
#   python benchmarks/gpu_harness.py merge FILES_AT/gpu_linear_cross_entropy.csv \
#       benchmarks/results/gpu_linear_cross_entropy.csv
# Run fetch_gpu_wheels.sh again before a session: it rewrites .whl/REVISION for the code as
# it is now. Extra arguments after STEP go to the script.
set -uo pipefail
step=${1:?usage: gpu_session.sh check|ce|linear|profile [extra args]}
shift
case $step in
    check|ce|linear|profile) ;;
    *) echo "unknown step $step: expected check, ce, linear or profile" >&2; exit 2 ;;
esac
OUT=${OUT:-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
else
    echo "no .whl/*.whl: run 'bash benchmarks/fetch_gpu_wheels.sh' here and carry .whl (the image lacks array-api-compat)" >&2
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# Fail in seconds, not after a machine start's worth of steps, when crossent cannot import.
python3 -c 'import crossent, crossent.torch, crossent.triton' 2>&1 | tee "$OUT/import.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "crossent does not import here (see $OUT/import.log): no step run" >&2; exit 3
fi
{
    date -u +%FT%TZ
    # git here or, without .git, the .whl/REVISION that fetch_gpu_wheels.sh wrote (see crossent_revision)
    echo "crossent $(python3 benchmarks/gpu_harness.py revision)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
    python3 -m pip list 2>/dev/null | grep -Ei '^(liger|cut|array.api)' || true
} > "$OUT/env.txt" 2>&1
case $step in
    check)
        # The sm_90 compile tests need no GPU (CI runs them): not on the GPU's clock.
        python3 -m pytest -q -p no:cacheprovider -rfEs --maxfail 10 --timeout 300 --durations 25 \
            --ignore tests/triton/test_triton_bench_harness.py \
            --ignore tests/triton/test_triton_compile_sm90.py \
            --ignore tests/triton/test_triton_vocab_parallel_compile_sm90.py \
            tests/triton tests/torch/test_torch_triton_dispatch.py \
            tests/distributed/test_distributed_nccl_cuda.py "$@" 2>&1 | tee "$OUT/check.log" ;;
    ce)
        python3 benchmarks/bench_gpu_cross_entropy.py --configs default-sweep --max-minutes 7.5 \
            --out "$OUT/gpu_cross_entropy.csv" "$@" 2>&1 | tee "$OUT/ce.log" ;;
    linear)
        python3 benchmarks/bench_gpu_linear_cross_entropy.py --tiles default --max-minutes 7.5 \
            --out "$OUT/gpu_linear_cross_entropy.csv" "$@" 2>&1 | tee "$OUT/linear.log" ;;
    profile)
        python3 benchmarks/profile_gpu_kernels.py --fast-budget-mib 1000 \
            --out "$OUT/gpu_profile_kernels.txt" "$@" 2>&1 | tee "$OUT/profile.log" ;;
    *)
        echo "unknown step $step: expected check, ce, linear or profile" >&2; exit 2 ;;
esac
