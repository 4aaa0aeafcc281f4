#!/usr/bin/env bash
# Compile every captured Triton launch for sm_90 under Triton 3.6.0 -- the GPU machine's version.
# The second Triton comes from, whichever works:
#   1. $FASTSSL_SECOND_PYTHON, a Python whose Triton is that version (e.g. a prepared venv), or
#   2. a venv created here over this environment's packages with only Triton replaced (pip).
# The launches are captured as the CUDA path issues them (benchmarks/launch_capture.py) at the
# DESIGN §5 headline shapes and at small awkward shapes, in that Python, and compiled with its
# Triton; the step fails on a capture error, any compile failure and any register spill, and
# when no second Triton of that version can be had. Nothing is left behind (venv, Triton cache
# and temporary files live in one directory removed on exit). The same check under the
# installed Triton (3.9) is tests/test_kernel_compile.py; tests/test_launch_report_check.py
# runs `launch_report.py --check --other-python` itself when FASTSSL_SECOND_PYTHON is set.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${FASTSSL_SECOND_TRITON:-3.6.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

triton_of() {
    "$1" -c "import triton; print(triton.__version__)" 2>/dev/null || true
}

second=""
if [ -n "${FASTSSL_SECOND_PYTHON:-}" ]; then
    found=$(triton_of "$FASTSSL_SECOND_PYTHON")
    if [ "$found" = "$VERSION" ]; then
        second=$FASTSSL_SECOND_PYTHON
    else
        echo "step-20-triton36.sh: FASTSSL_SECOND_PYTHON=$FASTSSL_SECOND_PYTHON has Triton '${found:-none}', not $VERSION; creating a venv" >&2
    fi
fi
if [ -z "$second" ]; then
    python -m venv --system-site-packages "$work/venv"
    "$work/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "triton==$VERSION"
    second="$work/venv/bin/python"
    found=$(triton_of "$second")
    if [ "$found" != "$VERSION" ]; then
        echo "step-20-triton36.sh: expected Triton $VERSION in the second environment, got '${found:-none}'" >&2
        exit 1
    fi
fi
echo "step-20-triton36.sh: Triton $VERSION from $second"

mkdir -p "$work/tmp"
env -u TRITON_INTERPRET TRITON_CACHE_DIR="$work/cache" TMPDIR="$work/tmp" \
    "$second" benchmarks/launch_report.py --cases all --check --no-write --quiet
echo "step-20-triton36.sh: ok ($(( $(date +%s) - start )) s)"
