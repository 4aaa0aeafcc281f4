#!/usr/bin/env bash
# GPU validation in bounded steps (each well under 10 minutes on an H100), for a machine with
# no network: install without dependencies, run the `gpu` test lane, then the benchmark suite
# one family at a time. Results go to $RESULTS (default benchmarks/results/gpu-run).
#
#   bash benchmarks/gpu_validate.sh tests            # install + gpu lane + kernel tests
#   bash benchmarks/gpu_validate.sh bench ntxent     # one benchmark file (ntxent, decorrelation,
#                                                    # swav, dino, wmse)
#   bash benchmarks/gpu_validate.sh render           # merge nothing; render every JSON present
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/gpu-run}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || python3 -m pip install --no-deps --no-build-isolation -e .

case "${1:-tests}" in
tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/device.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee -a "$RESULTS/device.txt"
    git rev-parse HEAD | tee -a "$RESULTS/device.txt"
    # The gpu lane first (compiled kernels), then everything else that touches a kernel.
    python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$RESULTS/gpu-lane.xml" 2>&1 \
        | tee "$RESULTS/gpu-lane.log"
    ;;
bench)
    family=${2:?family: ntxent, decorrelation, swav, dino or wmse}
    python3 -m pytest "benchmarks/test_bench_${family}.py" -q --benchmark-only \
        --benchmark-json "$RESULTS/${family}.json" 2>&1 | tee "$RESULTS/${family}.log"
    python3 benchmarks/render.py "$RESULTS/${family}.json" -o "$RESULTS/${family}.md"
    ;;
render)
    for f in "$RESULTS"/*.json; do
        python3 benchmarks/render.py "$f" -o "${f%.json}.md" --plots "${f%.json}-plots"
    done
    ;;
*)
    echo "usage: $0 tests | bench FAMILY | render" >&2
    exit 2
    ;;
esac
