#!/usr/bin/env bash
# The GPU machine's one prepared command, benchmarks/gpu_check.py, run as --dry-run: the same code
# on tiny shapes on the CPU (Triton through the interpreter, perf_counter instead of CUDA events,
# graph capture skipped). It takes about 40 s on an idle 2-core machine; the deadline is raised
# from the dry run's 45 s to 90 s so that a machine shared with other work still gets through
# the first units of every section (the run ends as soon as its units are done). Fails when a
# check fails, a unit raises or crashes, the output files are missing, or a section that must
# run did not.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

python benchmarks/gpu_check.py --dry-run --deadline 90 "$work/gpu-check"

python - "$work/gpu-check" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("results.json", "summary.md", "log.txt", "workers.log"):
    if not (out / name).is_file():
        sys.exit(f"gpu_check --dry-run wrote no {name}")
data = json.loads((out / "results.json").read_text())
units = data["units"]
ran = {}
for uid, entry in units.items():
    if entry.get("status") == "ok":
        ran[entry["section"]] = ran.get(entry["section"], 0) + 1
# The first units of these sections always fit in the budget; the rest may be skipped on a slow machine.
missing = [s for s in ("environment", "correctness", "graphs", "rates", "timing") if not ran.get(s)]
if missing:
    sys.exit(f"gpu_check --dry-run: no unit of {missing} ran; statuses: "
             + str({uid: e.get("status") for uid, e in units.items()}))
print("gpu_check --dry-run: " + ", ".join(f"{s} {n} ok" for s, n in sorted(ran.items())))
PY
echo "step-50-gpu-check-dry-run.sh: ok ($(( $(date +%s) - start )) s)"
