#!/usr/bin/env bash
# Wheels the device image lacks, for Python 3.12 on x86-64, into .whl/ (ignored by git).
# Run here before scripts/gpu_checks.sh, and name .whl in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for pkg in diffusers==0.42.1 bitsandbytes==0.50.2 datasets==5.2.0 pydantic==2.13.4 pydantic-core==2.46.4 \
           annotated-types typing-inspection tomli-w dill multiprocess; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_24_x86_64 -d .whl "$pkg"
done
ls -la .whl
