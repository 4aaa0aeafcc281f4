#!/usr/bin/env bash
# Kept for older notes: the GPU machine's one command is benchmarks/gpu_check.py (see its
# docstring and benchmarks/README.md). This wrapper installs without dependencies (no network
# there) and runs it into $RESULTS (default benchmarks/results/gpu-run/gpu-check).
#
#   bash benchmarks/gpu_validate.sh            # the full check, under 8 minutes
#   bash benchmarks/gpu_validate.sh --only 'time/ntxent'   # extra arguments go to gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/gpu-run/gpu-check}
python3 -m pip install -q --no-deps --no-build-isolation -e .
PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_check.py "$RESULTS" "$@"
