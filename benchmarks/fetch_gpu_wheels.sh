#!/usr/bin/env bash
# Download, on a machine with PyPI, the pure-Python wheels the GPU machine's image lacks, into .whl/
# (ignored by git), so that `device` calls can carry them (see benchmarks/gpu_session.sh):
#   array-api-compat (a crossent dependency), and the peers liger-kernel and cut-cross-entropy.
# The image already has torch 2.11, triton 3.6, numpy, click, rich, pytest, hypothesis, scipy.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
# Into a fresh folder first: a failed (offline) download leaves the previous .whl as it was.
new=$(mktemp -d .whl.new.XXXXXX)
trap 'rm -rf "$new"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$new" array-api-compat==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
rm -rf .whl && mv "$new" .whl
ls -l .whl
