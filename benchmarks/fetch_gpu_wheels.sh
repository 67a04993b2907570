#!/usr/bin/env bash
# Download, on a machine with PyPI, the pure-Python wheels the GPU machine's image lacks, into .whl/
# (ignored by git), so that `device` calls can carry them (see benchmarks/gpu_session.sh):
#   array-api-compat (a crossent dependency), and the peers liger-kernel and cut-cross-entropy
# (skipped when .whl holds them already), and .whl/REVISION (crossent's revision: run this again
# before each GPU session, so that the benchmark rows name the code they measured).
# The image already has torch 2.11, triton 3.6, numpy, click, rich, pytest, hypothesis, scipy.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
wheels=(array-api-compat==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
have_all=1
for w in "${wheels[@]}"; do  # a wheel's file name: the project's name with "_" for "-", then its version
    name=${w%%==*}
    compgen -G ".whl/${name//-/_}-${w##*==}-*.whl" >/dev/null || have_all=0
done
if [ "$have_all" = 1 ]; then
    echo ".whl already holds ${wheels[*]}: no download"
else
    # Into a fresh folder first: a failed (offline) download leaves the previous .whl as it was.
    new=$(mktemp -d .whl.new.XXXXXX)
    trap 'rm -rf "$new"' EXIT
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$new" "${wheels[@]}"
    rm -rf .whl && mv "$new" .whl
fi
# The code's revision, on every run (the code changes more often than the wheels): the GPU machine
# gets .whl but not .git, and benchmarks/gpu_harness.py's crossent_revision reads it there, marking
# it "+dirty" when the code files carried along differ from those it was taken from.
python3 benchmarks/gpu_harness.py record > .whl/REVISION.new
mv .whl/REVISION.new .whl/REVISION
ls -l .whl
cat .whl/REVISION
