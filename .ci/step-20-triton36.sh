#!/usr/bin/env bash
# Compile every captured Triton launch for sm_90 under Triton 3.6.0 -- the GPU machine's version --
# from a second environment (a venv over this one's packages with only Triton replaced).
# The launches are captured as the CUDA path issues them (benchmarks/launch_capture.py) at the
# DESIGN §5 headline shapes and at small awkward shapes; the step fails on a capture error, any
# compile failure and any register spill. Nothing is left behind (venv, Triton cache and
# temporary files live in one directory removed on exit). The same check under the installed
# Triton (3.9) is tests/test_kernel_compile.py.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${FASTSSL_SECOND_TRITON:-3.6.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "triton==$VERSION"
installed=$("$work/venv/bin/python" -c "import triton; print(triton.__version__)")
if [ "$installed" != "$VERSION" ]; then
    echo "step-20-triton36.sh: expected Triton $VERSION in the second environment, got $installed" >&2
    exit 1
fi

mkdir -p "$work/tmp"
env -u TRITON_INTERPRET TRITON_CACHE_DIR="$work/cache" TMPDIR="$work/tmp" \
    "$work/venv/bin/python" benchmarks/launch_report.py --cases all --check --no-write --quiet
echo "step-20-triton36.sh: ok ($(( $(date +%s) - start )) s)"
