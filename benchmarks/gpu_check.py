r"""One prepared command for a GPU machine: correctness of every Triton path, CUDA-graph capture,
registers and spills, and the DESIGN §5 timings, in under 8 minutes, compiles included.

How to run on the GPU machine (one H200, PyTorch 2.11, Triton 3.6, no network; ``python3`` is
the interpreter that holds PyTorch there): from the repository root, install without
dependencies, then run the check into a folder under ``$OUT`` so that its files come back --
one device call with ``timeout_s=600``::

    python3 -m pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py $OUT/gpu-check

The script stops itself after 7.5 minutes (``--deadline``), skips and records what did not fit,
and prints a short table last. It writes four files into the folder, rewritten after every
finished unit (a killed run still leaves what it measured): ``results.json`` (raw results),
``summary.md`` (rendered), ``log.txt`` (progress) and ``workers.log`` (the worker processes'
output). Where the copy of the tree has no git metadata, put ``FASTSSL_COMMIT=<hash>`` before
``python3`` (the results also carry a digest of the sources). Commit ``results.json`` and
``summary.md`` under ``benchmarks/results/`` as ``gpu-check-<date>.{json,md}``. lightly is not
installed there: for its column, download its wheel here (``pip download --no-deps lightly==1.6.0
-d .whl``, with ``/.whl/`` in ``.git/info/exclude``) and name ``.whl`` in the call's ``carry``;
the script puts it on its workers' path. ``--only REGEX`` reruns some units (``--list`` prints
them); ``--dry-run OUTDIR`` runs the same code on the CPU (see below).

What runs
---------
Every check is a *unit* (``check/ntxent/awkward``, ``time/dino 12 views x 64, K=65536 float32``,
...); units belong to *sections*:

``environment``
    device, SMs, memory, driver, torch / Triton / CUDA versions (the commit and date come from
    the orchestrating process).
``correctness``
    every Triton path -- NT-Xent, InfoNCE (MoCo), uniformity, Barlow Twins, VICReg, SwAV and its
    Sinkhorn, DINO, W-MSE's CUDA C++ extension, and the losses that reach those kernels
    (DirectCLR, VICRegL) -- against the torch path on fresh random inputs at small, awkward
    (N = 1, 2, 3, 127; d = 1, 3, 129; non-contiguous views) and headline shapes, values and
    input gradients. Both fastssl paths are measured against the float64 reference on the same
    inputs; the Triton path passes when its norm-wise relative error is at most twice the torch
    path's, or under a floor per dtype (:data:`ERROR_FLOORS`). During every Triton call the
    kernels' output buffers are NaN-poisoned (each kernel module's ``_new_buffer``, and on CUDA the
    caching allocator's free blocks), so an element a kernel leaves unwritten shows up as a
    non-finite result. ``nan/<family>``: a NaN, then an Inf, in one input element must give a
    non-finite loss (never a silent finite number; an exception also counts as not silent).
``graphs``
    one training step per family (a linear model, the loss module on the Triton backend,
    backward, SGD with momentum) captured in a CUDA graph and replayed on new inputs against
    the same step run eagerly by a twin model (loss, weights, module state).
``registers``
    ``n_regs`` / ``n_spills`` of every compiled kernel in Triton's JIT cache (each worker reads
    the caches of ``fastssl.kernels.*`` after every unit), with warps, stages, shared memory and
    the specialization constants.
``warmup``
    ``torch.compile`` of the reference at every headline shape, run by the parallel workers of
    phase 1 so that the timed phase finds Inductor's and Triton's caches warm.
``rates``
    bf16, float32 (IEEE) and TF32 ``torch.mm`` rates and the copy bandwidth, measured in this
    run (:mod:`benchmarks.roofline`).
``timing`` / ``compiled``
    forward + backward medians (CUDA events; fresh random inputs every call, drawn outside the
    timed region) of fastssl's Triton path, its torch path, the eager reference, lightly (when
    importable) and ``torch.compile`` of the reference at every headline shape of
    :data:`benchmarks.launch_report.HEADLINE_CASES` (plus the Sinkhorn forward), with the peak
    memory of one call, the roofline floor (:mod:`benchmarks.roofline`) and, where the committed
    launch report (``benchmarks/results/launch-report.json``) predicts the case, its predicted
    time next to the measured one. W-MSE's "triton" column is its CUDA C++ extension, its
    "torch" column the batched PyTorch path; iBOT's "triton" column is its patch-loss kernels
    beside DINO's.

Budget and isolation
--------------------
Units run in worker processes (so a sticky CUDA error, a crash or a hang costs one unit, not the
run). Phase 1 runs the environment, correctness, graph and warm-up units on several workers at
once (their cost is mostly compiling); phase 2 runs the rates and timings on one worker, alone
on the GPU, started during phase 1 so that its imports are done when phase 1 ends. With
``--workers 1`` (the dry run's default on a busy machine) one worker runs every section in order. Every section has a deadline, a fixed fraction of the global deadline
(:data:`SECTIONS`); a worker starts a unit only if its estimated duration fits before its
section's deadline, the orchestrator kills a unit that runs past its own timeout or past its
section's deadline (plus a grace period), and units that never started are recorded as skipped
with the reason. Failures are recorded with their traceback and the other units still run.

``--dry-run``
-------------
The same code on tiny shapes on the CPU: the workers set ``TRITON_INTERPRET=1`` before any kernel
is imported, CUDA events are replaced by ``time.perf_counter``, graph capture is skipped with a
note (the training steps of each recipe still run eagerly against their twins), ``torch.compile``
uses the ``eager`` backend (Dynamo only: Inductor's C++ compile alone would exceed the budget),
and the global deadline is 45 s. CI runs it (``.ci/step-50-gpu-check-dry-run.sh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: import the repository's packages
    sys.path.insert(0, str(REPO_ROOT))

GPU_DEADLINE_S = 450.0  # 7.5 minutes: under the 8-minute target with the interpreter's start-up
DRY_DEADLINE_S = 45.0
LAUNCH_REPORT = REPO_ROOT / "benchmarks" / "results" / "launch-report.json"

#: Section -> (phase, deadline as a fraction of the global deadline). Sections of one phase run
#: side by side; phase 2 starts when phase 1 is done, and its sections share one worker, in
#: this order.
SECTIONS: Dict[str, Tuple[int, float]] = {
    "environment": (1, 0.47),
    "graphs": (1, 0.45),
    "correctness": (1, 0.47),
    "warmup": (1, 0.47),
    "rates": (2, 0.97),
    "timing": (2, 0.80),
    "compiled": (2, 0.97),
    "selftest": (1, 1.0),  # the test suite's units (never planned by default)
}

#: Floors of the norm-wise relative error a Triton path may always have, per input dtype: float32
#: reductions in another order, half-precision gradients rounded once more.
ERROR_FLOORS = {"float32": 5e-5, "float16": 3e-3, "bfloat16": 2e-2}
#: Absolute error allowed per element (root-mean-square), for results that are 0 in exact
#: arithmetic and rounding noise in every implementation (e.g. Barlow Twins' gradient at N = 2,
#: where the standardized views are ±1 whatever the inputs).
ABSOLUTE_FLOORS = {"float32": 1e-6, "float16": 1e-4, "bfloat16": 1e-3}

FAILING = ("fail", "error", "crashed")
MAX_FAILED_STARTS = 3  # workers of one phase that may die before their first unit


# ============================================================================================
# Plan: units, sections, deadlines (standard library only: the orchestrator never imports torch)
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Unit:
    """One isolated piece of the check, run by a worker process."""

    id: str
    section: str
    kind: str
    args: Dict[str, Any]
    estimate_s: float  # a worker starts the unit only if this much time is left in its section
    timeout_s: float  # the orchestrator kills it after this long

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: Dict[str, Any]) -> "Unit":
        return Unit(**data)


#: (estimate, timeout) in seconds per unit kind, on the GPU and in the dry run.
_COSTS = {
    "environment": ((10, 60), (1, 30)),
    "wmse-build": ((120, 280), (1, 30)),
    "check": ((25, 150), (2, 40)),
    "nan": ((15, 120), (1, 40)),
    "graph": ((20, 120), (2, 40)),
    "warm": ((45, 180), (1, 40)),
    "rates": ((10, 60), (1, 30)),
    "time": ((20, 120), (2, 40)),
    "compiled": ((25, 150), (1, 40)),
}

#: Families whose correctness is checked, and the sets of shapes each has.
CHECK_FAMILIES: Dict[str, Tuple[str, ...]] = {
    "ntxent": ("small", "awkward", "headline"),
    "infonce": ("small", "awkward", "headline"),
    "uniformity": ("small", "awkward", "headline"),
    "barlow_twins": ("small", "awkward", "headline"),
    "vicreg": ("small", "awkward", "headline"),
    "swav": ("small", "awkward", "headline"),
    "sinkhorn": ("small", "awkward", "headline"),
    "dino": ("small", "awkward", "headline"),
    "ibot": ("small", "awkward", "headline"),
    "wmse": ("small", "awkward", "headline"),
    "directclr": ("small", "awkward"),
    "vicregl": ("small",),
}

#: Families whose training step is captured in a CUDA graph.
GRAPH_FAMILIES = ("ntxent", "moco", "uniformity", "barlow_twins", "vicreg", "swav", "dino", "ibot", "wmse")

#: Headline family -> the correctness and graph families whose verdicts its table row shows.
ROW_CHECKS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "ntxent": (("ntxent",), ("ntxent",)),
    "infonce": (("infonce",), ("moco",)),
    "barlow_twins": (("barlow_twins",), ("barlow_twins",)),
    "vicreg": (("vicreg",), ("vicreg",)),
    "swav": (("swav", "sinkhorn"), ("swav",)),
    "sinkhorn": (("sinkhorn",), ()),
    "dino": (("dino",), ("dino",)),
    "wmse": (("wmse",), ("wmse",)),
    "ibot": (("ibot",), ("ibot",)),
}

#: Harness families without a kernel: their "triton" column runs the torch path.
NO_KERNEL: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TimingCase:
    """One DESIGN §5 headline shape, as the benchmark harness names its family and shape."""

    name: str  # the launch report's case name ("family label dtype")
    family: str  # the launch report's family
    harness_family: Optional[str]  # benchmarks._harness.FAMILIES key; None: no recipe
    shape: Dict[str, int]
    dtype: str

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _harness_shape(family: str, shape: Dict[str, int]) -> Tuple[Optional[str], Dict[str, int]]:
    """The benchmark harness's family and shape for a launch-report case."""
    if family in ("ntxent", "barlow_twins", "vicreg"):
        return family, {"n": shape["n"], "d": shape["d"]}
    if family == "infonce":  # MoCo: NTXentLoss with a bank of K keys
        return "ntxent_bank", {"n": shape["n"], "d": shape["d"], "bank": shape["k"]}
    if family in ("swav", "sinkhorn"):
        return family, {"b": shape["b"], "k": shape["k"]}
    if family == "dino":
        return family, {"views": shape["views"], "b": shape["b"], "k": shape["k"]}
    if family == "ibot":  # the harness fixes 196 tokens per image, 78 of them masked
        return family, {"images": shape["images"], "k": shape["k"]}
    if family == "wmse":
        return family, {"d": shape["d"], "w_size": shape["w_size"], "sub_batches": shape["sub_batches"]}
    return None, dict(shape)


#: Tiny shapes of the dry run, per harness family (same regime: N < d for the decorrelation
#: losses, as at their headline shapes).
def _tiny_shape(harness_family: Optional[str], shape: Dict[str, int]) -> Dict[str, int]:
    if harness_family == "ntxent":
        return {"n": 8, "d": 16}
    if harness_family == "ntxent_bank":
        return {"n": 4, "d": 16, "bank": 32}
    if harness_family in ("barlow_twins", "vicreg"):
        return {"n": max(2, shape["n"] // 128), "d": 32}
    if harness_family in ("swav", "sinkhorn"):
        return {"b": 12, "k": 24}
    if harness_family == "dino":
        return {"views": 3, "b": 4, "k": 48}
    if harness_family == "ibot":
        return {"images": 1, "k": 48}
    if harness_family == "wmse":
        return {"d": 6, "w_size": 16, "sub_batches": 2}
    return dict(shape)


def timing_cases(dry_run: bool) -> List[TimingCase]:
    """The launch report's headline cases, plus the Sinkhorn forward of DESIGN §5 ("SwAV
    Sinkhorn, B = 4096, K = 3000, 3 iterations"); in the dry run the first case of each family,
    at a tiny shape."""
    from benchmarks import launch_report

    cases: List[Tuple[str, str, Dict[str, int], str]] = [
        (c.name, c.family, dict(c.shape), c.dtype) for c in launch_report.HEADLINE_CASES
    ]
    cases.append(("sinkhorn B=4096, K=3000, 3 iterations float32", "sinkhorn", {"b": 4096, "k": 3000}, "float32"))
    out: List[TimingCase] = []
    for name, family, shape, dtype in cases:
        harness_family, harness_shape = _harness_shape(family, shape)
        if dry_run:
            if any(c.harness_family == harness_family for c in out):
                continue  # tiny shapes: one case per family exercises the same code
            harness_shape = _tiny_shape(harness_family, harness_shape)
        out.append(TimingCase(name, family, harness_family, harness_shape, dtype))
    return out


def build_plan(dry_run: bool) -> List[Unit]:
    """Every unit of a full run, in the order workers claim them."""
    which = 1 if dry_run else 0

    def unit(uid: str, section: str, kind: str, **args: Any) -> Unit:
        estimate, timeout = _COSTS[kind][which]
        if kind == "time" and not dry_run and args["case"]["shape"].get("n", 0) > 100_000:
            estimate, timeout = 45, 150  # NT-Xent at 2N = 1M: about a second per Triton call
        return Unit(uid, section, kind, args, float(estimate), float(timeout))

    units = [unit("environment", "environment", "environment")]
    # The W-MSE extension build (nvcc, a minute or more) starts first, on its own worker.
    units.append(unit("check/wmse/build", "correctness", "wmse-build"))
    cases = timing_cases(dry_run)
    # Small checks and graph captures alternate: a run cut short still has some of each.
    small = [unit(f"check/{f}/small", "correctness", "check", family=f, set="small") for f in CHECK_FAMILIES]
    graphs = [unit(f"graph/{family}", "graphs", "graph", family=family) for family in GRAPH_FAMILIES]
    for index in range(max(len(small), len(graphs))):
        units += small[index : index + 1] + graphs[index : index + 1]
    # Compiling the references takes the longest; started early, they leave the timed phase's
    # torch.compile rows warm Inductor and Triton caches.
    units += [unit(f"warm/{c.name}", "warmup", "warm", case=c.to_json()) for c in cases if c.harness_family]
    units += [unit(f"nan/{f}", "correctness", "nan", family=f) for f in CHECK_FAMILIES]
    for which_set in ("awkward", "headline"):
        units += [unit(f"check/{f}/{which_set}", "correctness", "check", family=f, set=which_set)
                  for f, sets in CHECK_FAMILIES.items() if which_set in sets]
    units.append(unit("rates", "rates", "rates"))
    units += [unit(f"time/{c.name}", "timing", "time", case=c.to_json()) for c in cases]
    units += [unit(f"compiled/{c.name}", "compiled", "compiled", case=c.to_json()) for c in cases if c.harness_family]
    return units


def section_deadlines(start: float, total_s: float, sections: Sequence[str]) -> Dict[str, float]:
    """Absolute deadline of each section: ``start + fraction · total``."""
    return {s: start + SECTIONS[s][1] * total_s for s in sections}


def can_start(unit: Unit, now: float, deadlines: Dict[str, float], global_deadline: float) -> bool:
    """A unit starts only if its estimated duration fits before its section's deadline and the
    global one."""
    return now + unit.estimate_s <= min(deadlines[unit.section], global_deadline)


def kill_time(unit: Unit, started: float, deadlines: Dict[str, float], global_deadline: float, grace_s: float) -> float:
    """When the orchestrator stops a running unit: its own timeout, its section's deadline plus
    a grace period, or the global deadline, whichever comes first."""
    return min(started + unit.timeout_s, deadlines[unit.section] + grace_s, global_deadline)


# ============================================================================================
# Results: one JSON document, flushed to OUTDIR after every change
# ============================================================================================


class ResultStore:
    """``results.json``, ``summary.md`` and ``log.txt`` in the output folder, rewritten atomically
    whenever a unit finishes (a killed run still leaves what it measured)."""

    def __init__(self, outdir: Path, meta: Dict[str, Any]) -> None:
        self.outdir = outdir
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.data: Dict[str, Any] = {
            "meta": meta, "environment": {}, "rates": {}, "sections": {}, "units": {}, "registers": [],
            "predictions": {},
        }  # fmt: skip
        self._kernels: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self._log = open(outdir / "log.txt", "a", buffering=1)

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        line = f"[{stamp}] {message}"
        print(line, flush=True)
        self._log.write(line + "\n")

    def record(self, unit: Unit, status: str, **fields: Any) -> None:
        entry = self.data["units"].setdefault(unit.id, {"section": unit.section, "kind": unit.kind})
        entry.update(fields, status=status)
        if status == "ok" and unit.kind == "environment":
            self.data["environment"] = dict(entry.get("result") or {})
        if status == "ok" and unit.kind == "rates":
            self.data["rates"] = dict(entry.get("result") or {})

    def partial(self, unit: Unit, result: Dict[str, Any]) -> None:
        """A running unit's results so far (kept if the unit is later killed)."""
        entry = self.data["units"].setdefault(unit.id, {"section": unit.section, "kind": unit.kind})
        entry["result"] = result
        entry.setdefault("status", "running")

    def add_kernels(self, kernels: Sequence[Dict[str, Any]]) -> None:
        for k in kernels:
            self._kernels.setdefault((k.get("kernel", ""), k.get("hash", "")), k)
        self.data["registers"] = sorted(
            self._kernels.values(), key=lambda k: (-(k.get("n_spills") or 0), -(k.get("n_regs") or 0), k.get("kernel", ""))
        )

    def flush(self) -> None:
        self.data["meta"]["updated"] = _now_iso()
        _write_atomic(self.outdir / "results.json", json.dumps(self.data, indent=1, default=str))
        _write_atomic(self.outdir / "summary.md", render_summary(self.data))

    def close(self) -> None:
        self._log.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit_id() -> str:
    """``git rev-parse HEAD`` (``-dirty`` when tracked files differ); where the copy of the tree
    has no git metadata, ``$FASTSSL_COMMIT`` if set (pass it on the command line)."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return os.environ.get("FASTSSL_COMMIT") or "unknown (no git metadata: set FASTSSL_COMMIT)"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return head + ("-dirty" if dirty else "")


def source_digest() -> str:
    """SHA-1 over the sources that decide the results (``fastssl/``, ``kernels/``, ``csrc/``,
    ``benchmarks/*.py``), names and contents in sorted order: matches a run to a commit even
    where the tree was copied without its git metadata."""
    digest = hashlib.sha1()
    for folder, pattern in (("fastssl", "**/*.py"), ("kernels", "**/*.py"), ("csrc", "**/*"), ("benchmarks", "*.py")):
        for path in sorted((REPO_ROOT / folder).glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_predictions(path: Path = LAUNCH_REPORT) -> Dict[str, Dict[str, Any]]:
    """The launch report's prediction per case name: path, predicted time, floor, % of floor."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for case in report.get("cases", []):
        prediction = case.get("prediction") or {}
        name = f"{case.get('family')} {case.get('shape')} {case.get('dtype')}"
        out[name] = {
            "path": case.get("backend"), "predicted_s": prediction.get("predicted_s"),
            "floor_s": prediction.get("floor_s"), "percent_of_floor": prediction.get("percent_of_floor"),
            "triton": (report.get("environment") or {}).get("triton"),
            "commit": (report.get("environment") or {}).get("commit"),
        }  # fmt: skip
    return out


# ============================================================================================
# Orchestration: worker processes, claims, deadlines, kills, respawns
# ============================================================================================


@dataclasses.dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    events: Path
    offset: int = 0
    unit: Optional[Unit] = None
    unit_started: float = 0.0
    killed_reason: Optional[str] = None
    fatal: Optional[str] = None


def _claim_path(claims: Path, unit_id: str) -> Path:
    return claims / hashlib.sha1(unit_id.encode()).hexdigest()


def unpack_lightly_wheel(folder: Path, wheels: Path = REPO_ROOT / ".whl") -> Optional[Path]:
    """Where lightly is not installed (the GPU machine), a lightly wheel carried in ``.whl/`` is
    unpacked into ``folder`` for the workers' path (its loss files need none of its
    dependencies: :mod:`benchmarks.lightly_loader`). Returns the folder, or None."""
    import importlib.util
    import zipfile

    found = sorted(wheels.glob("lightly-*.whl")) if wheels.is_dir() else []
    if not found or importlib.util.find_spec("lightly") is not None:
        return None
    with zipfile.ZipFile(found[-1]) as wheel:
        wheel.extractall(folder)
    return folder


def _worker_env(dry_run: bool, extra_paths: Sequence[Path] = ()) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("FASTSSL_BACKEND", None)  # "auto" must mean auto
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(REPO_ROOT)] + [str(p) for p in extra_paths] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # Parallelism comes from the workers; one Inductor compile thread each avoids a process pool
    # per worker.
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


class WorkerPool:
    """The worker processes of one phase: their job (units, deadlines), claims and event files
    under ``scratch``. A pool may start one worker ahead of its phase (:meth:`start_standby`): it
    imports torch and fastssl while the previous phase runs, and claims units once the ``go``
    file exists."""

    def __init__(self, units: Sequence[Unit], *, deadlines: Dict[str, float], global_deadline: float, dry_run: bool,
                 seed: int, scratch: Path, extra_paths: Sequence[Path] = ()) -> None:
        self.units = list(units)
        self.scratch = scratch
        self.claims = scratch / "claims"
        self.claims.mkdir(parents=True, exist_ok=True)
        self.go = scratch / "go"
        self.log_path = scratch / "workers.log"
        self.deadlines, self.global_deadline = deadlines, global_deadline
        self.env = _worker_env(dry_run, extra_paths)
        # Workers of real runs import torch, fastssl and Dynamo before their first unit (the
        # test suite's self-test units need none of it).
        preload = any(u.kind != "selftest" for u in units)
        self.job = {
            "units": [u.to_json() for u in units], "deadlines": deadlines, "global_deadline": global_deadline,
            "dry_run": dry_run, "seed": seed, "claims": str(self.claims), "preload": preload,
        }  # fmt: skip
        self.spawned = 0
        self.standby: List[_Worker] = []

    def spawn(self, wait_for_go: bool = False) -> _Worker:
        index = self.spawned
        self.spawned += 1
        events = self.scratch / f"worker-{index}.jsonl"
        job_path = self.scratch / f"job-{index}.json"
        job_path.write_text(json.dumps(dict(self.job, events=str(events), worker=index,
                                            start_after=str(self.go) if wait_for_go else None)))
        with open(self.log_path, "a") as log:
            log.write(f"\n===== worker {index} ({_now_iso()}) =====\n")
            log.flush()
            process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return _Worker(index, process, events)

    def start_standby(self) -> None:
        if self.units:
            self.standby.append(self.spawn(wait_for_go=True))

    def stop_standby(self) -> None:
        """Kill a standby worker whose phase never ran."""
        for worker in self.standby:
            if worker.process.poll() is None:
                _kill_group(worker.process)
        self.standby = []

    def startable(self) -> List[Unit]:
        now = time.time()
        return [u for u in self.units if not _claim_path(self.claims, u.id).exists()
                and can_start(u, now, self.deadlines, self.global_deadline)]  # fmt: skip


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the worker and its compile processes
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_units(pool: WorkerPool, store: ResultStore, *, workers: int, grace_s: float, poll_s: float = 0.2) -> None:
    """Run the pool's units on up to ``workers`` worker processes (its standby first) until they
    are done or their sections' deadlines have passed; record every unit's outcome in ``store``
    (flushed after each)."""
    units = pool.units
    if not units:
        return
    by_id = {u.id: u for u in units}
    deadlines, global_deadline = pool.deadlines, pool.global_deadline
    log_path = pool.log_path
    running: List[_Worker] = list(pool.standby)
    pool.standby = []
    pool.go.touch()
    startable = pool.startable

    def spawn() -> None:
        running.append(pool.spawn())

    started_any: set = set()  # workers that started at least one unit

    def read_events(worker: _Worker) -> None:
        try:
            with open(worker.events, "rb") as f:
                f.seek(worker.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        lines = chunk.split(b"\n")
        complete, rest = lines[:-1], lines[-1]
        worker.offset += len(chunk) - len(rest)
        changed = False
        for raw in complete:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            kind = event.get("event")
            unit = by_id.get(event.get("unit", ""))
            if kind == "start" and unit is not None:
                started_any.add(worker.index)
                worker.unit, worker.unit_started = unit, time.time()
                store.record(unit, "running", started=_now_iso(), worker=worker.index)
                changed = True
            elif kind == "progress" and unit is not None:
                store.partial(unit, event.get("result") or {})
                changed = True
            elif kind == "done" and unit is not None:
                fields = {k: event[k] for k in ("seconds", "result", "error", "reason") if k in event}
                store.record(unit, event.get("status", "error"), worker=worker.index, **fields)
                store.log(f"{event.get('status', 'error'):8s} {unit.id} ({event.get('seconds', 0):.1f} s)"
                          + (f": {event['reason']}" if event.get("reason") else "")
                          + (f": {_last_line(event['error'])}" if event.get("error") else ""))
                worker.unit = None
                changed = True
            elif kind == "registers":
                store.add_kernels(event.get("kernels") or [])
                changed = True
            elif kind == "fatal":
                worker.fatal = event.get("error")
        if changed:
            store.flush()

    def kill(worker: _Worker, reason: str) -> None:
        worker.killed_reason = reason
        _kill_group(worker.process)

    # Workers that die before starting any unit (a broken import, say): three in all, then stop.
    failed_starts = [0]

    def may_respawn() -> bool:
        return failed_starts[0] < MAX_FAILED_STARTS and bool(startable())

    for _ in range(min(workers, len(units)) - len(running)):
        spawn()
    while running:
        time.sleep(poll_s)
        now = time.time()
        for worker in list(running):
            read_events(worker)
            if worker.unit is not None and worker.process.poll() is None:
                stop_at = kill_time(worker.unit, worker.unit_started, deadlines, global_deadline, grace_s)
                if now >= stop_at:
                    over_own = now >= worker.unit_started + worker.unit.timeout_s
                    kill(worker, f"stopped after {now - worker.unit_started:.0f} s: "
                         + ("its timeout" if over_own else "the section's deadline"))
            if worker.process.poll() is None:
                continue
            read_events(worker)
            running.remove(worker)
            code = worker.process.returncode
            if worker.index not in started_any and code != 0 and not worker.killed_reason:
                failed_starts[0] += 1
            if worker.unit is not None:  # it died or was killed in the middle of a unit
                if worker.killed_reason:
                    status, reason = "timeout", worker.killed_reason
                else:
                    status, reason = "crashed", f"worker exited with code {code}"
                if worker.fatal:
                    reason += f" after a sticky device error: {_last_line(worker.fatal)}"
                store.record(worker.unit, status, reason=reason, seconds=now - worker.unit_started,
                             log_tail=_tail(log_path, 4000))
                store.log(f"{status:8s} {worker.unit.id}: {reason}")
                store.flush()
            if (code != 0 or worker.killed_reason) and may_respawn():
                spawn()  # a fresh process for the units still waiting
        if not running and may_respawn():
            spawn()
    for unit in units:
        entry = store.data["units"].get(unit.id)
        if not _claim_path(pool.claims, unit.id).exists():
            if failed_starts[0] >= MAX_FAILED_STARTS:
                store.record(unit, "error", reason="not started: the worker processes died before their first unit",
                             log_tail=_tail(log_path, 4000))
            else:
                left = deadlines[unit.section] - time.time()
                store.record(unit, "skipped", reason=f"not started: needs ~{unit.estimate_s:.0f} s, "
                             f"{max(left, 0):.0f} s were left before the {unit.section} deadline")
        elif entry is None or entry.get("status") == "running":  # claimed, then its worker vanished
            store.record(unit, "crashed", reason="claimed by a worker that ended without a result",
                         log_tail=_tail(log_path, 4000))
    store.flush()


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ============================================================================================
# Worker: claims units in order, runs each, writes one JSON line per event
# ============================================================================================


class UnitContext:
    """What a unit function gets: the mode, a seed of its own and a way to report partial results."""

    def __init__(self, unit: Unit, dry_run: bool, seed: int, emit: Callable[[Dict[str, Any]], None]) -> None:
        self.unit = unit
        self.dry_run = dry_run
        self.seed = (seed + zlib.crc32(unit.id.encode())) % (2**31)
        self._emit = emit

    def progress(self, result: Dict[str, Any]) -> None:
        self._emit({"event": "progress", "unit": self.unit.id, "result": result})


class Skip(Exception):
    """A unit that cannot run here (the message says why): recorded as skipped, not failed."""


def worker_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    dry_run = bool(job["dry_run"])
    if dry_run:  # kernels decide at import whether they are interpreted
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("FASTSSL_BACKEND", None)
    if job.get("preload"):
        try:
            _preload(dry_run)
        except Exception:  # noqa: BLE001 - each unit then fails with its own traceback
            traceback.print_exc()
    if job.get("start_after"):  # a standby: wait for the previous phase to end
        while not os.path.exists(job["start_after"]) and time.time() < job["global_deadline"]:
            time.sleep(0.05)
    events = open(job["events"], "a", buffering=1)

    def emit(event: Dict[str, Any]) -> None:
        events.write(json.dumps(event, default=str) + "\n")
        events.flush()

    claims = Path(job["claims"])
    deadlines = job["deadlines"]
    seen_kernels: set = set()
    for data in job["units"]:
        unit = Unit.from_json(data)
        if not can_start(unit, time.time(), deadlines, job["global_deadline"]):
            continue
        try:
            os.close(os.open(_claim_path(claims, unit.id), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue  # another worker has it
        emit({"event": "start", "unit": unit.id})
        started = time.perf_counter()
        ctx = UnitContext(unit, dry_run, int(job["seed"]), emit)
        event: Dict[str, Any] = {"event": "done", "unit": unit.id}
        try:
            result = UNIT_KINDS[unit.kind](ctx, **unit.args)
            passed = result.get("passed")
            event.update(status="fail" if passed is False else "ok", result=result)
            if result.get("note"):
                event["reason"] = result["note"]
        except Skip as why:
            event.update(status="skipped", reason=str(why))
        except BaseException as error:  # noqa: BLE001 - every failure is recorded, the next unit runs
            event.update(status="error", error=traceback.format_exc(limit=30))
            if isinstance(error, KeyboardInterrupt):
                raise
        event["seconds"] = time.perf_counter() - started
        emit(event)
        if "torch" in sys.modules:
            kernels = [k for k in compiled_kernels() if (k["kernel"], k["hash"]) not in seen_kernels]
            seen_kernels.update((k["kernel"], k["hash"]) for k in kernels)
            if kernels:
                emit({"event": "registers", "kernels": kernels})
            broken = device_error()
            if broken:  # a sticky CUDA error: every later unit would fail in this process
                emit({"event": "fatal", "error": broken})
                events.close()
                os._exit(3)
            _release_cached_memory()  # several workers share the GPU in phase 1
    events.close()
    return 0


def _preload(dry_run: bool) -> None:
    """What every real unit needs first: torch, fastssl and its kernels, the benchmark harness,
    Dynamo (the custom ops' autograd imports it on first use) and, on the GPU, a CUDA context."""
    import torch
    import torch._dynamo  # noqa: F401

    import fastssl.functional  # noqa: F401
    import fastssl.kernels.ntxent  # noqa: F401

    _harness()
    if not dry_run and torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")


def _release_cached_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def device_error() -> Optional[str]:
    """The error a CUDA synchronize raises in this process, if any (a sticky device error)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return None


# --------------------------------------------------------------------------------------------
# Registers and spills from Triton's JIT cache
# --------------------------------------------------------------------------------------------


def _constexprs(kernel: Any) -> Dict[str, Any]:
    """The constants a compiled kernel was specialized on (constexprs and arguments equal to 1),
    by argument name."""
    src = getattr(kernel, "src", None)
    constants = getattr(src, "constants", None) or {}
    names = list(getattr(getattr(src, "fn", None), "arg_names", []) or [])
    out = {}
    for key, value in constants.items():
        index = key[0] if isinstance(key, tuple) and key else key
        name = names[index] if isinstance(index, int) and index < len(names) else str(key)
        if isinstance(value, (bool, int, float, str)):
            out[name] = value
    return out


def compiled_kernels(modules: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Every compiled kernel in the JIT caches of the loaded ``fastssl.kernels`` modules:
    registers, spills, warps, stages, shared memory, specialization constants. Empty under the
    interpreter (nothing is compiled)."""
    modules = modules if modules is not None else dict(sys.modules)
    out = []
    for module_name, module in sorted(modules.items()):
        if not module_name.startswith("fastssl.kernels") or module is None:
            continue
        for attr, obj in sorted(vars(module).items()):
            try:
                jit = obj if hasattr(obj, "device_caches") else getattr(obj, "fn", None)  # autotuners wrap it
                caches = getattr(jit, "device_caches", None)
            except Exception:  # noqa: BLE001 - an object whose attributes cannot be read is no kernel
                continue
            if not isinstance(caches, dict):
                continue
            for entry in list(caches.values()):
                kernel_cache = entry[0] if isinstance(entry, tuple) else {}
                for kernel in list(kernel_cache.values()):
                    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                        try:
                            kernel._init_handles()  # compiled but not launched yet
                        except Exception:  # noqa: BLE001 - reported as unknown
                            pass
                    metadata = getattr(kernel, "metadata", None)
                    out.append({
                        "kernel": f"{module_name}.{attr}",
                        "hash": str(getattr(kernel, "hash", ""))[:16],
                        "n_regs": getattr(kernel, "n_regs", None),
                        "n_spills": getattr(kernel, "n_spills", None),
                        "num_warps": getattr(metadata, "num_warps", None),
                        "num_stages": getattr(metadata, "num_stages", None),
                        "shared": getattr(metadata, "shared", None),
                        "constexprs": _constexprs(kernel),
                    })  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Worker side of the units. Everything below imports torch (and fastssl) inside functions: the
# orchestrator and the test suite's self-test units run without it.
# --------------------------------------------------------------------------------------------


def _device(ctx: UnitContext):
    import torch

    if ctx.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --dry-run on a machine without a GPU")
    return torch.device("cuda")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def unit_environment(ctx: UnitContext) -> Dict[str, Any]:
    import platform

    import torch

    import fastssl
    from benchmarks import lightly_loader

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: Dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton_version, "fastssl": getattr(fastssl, "__version__", None),
        "lightly": lightly_loader.lightly_version(), "hostname": platform.node(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""), "cpu_count": os.cpu_count(),
    }  # fmt: skip
    if torch.cuda.is_available() and not ctx.dry_run:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
            allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )  # fmt: skip
        try:
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()[:300]
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = f"unavailable: {error}"
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})", note="dry run: CPU, Triton interpreter")
    return info


# --------------------------------------------------------------------------------------------
# Correctness: recipes
# --------------------------------------------------------------------------------------------

# (shape, dtype, non-contiguous) per family and set, as on the GPU; the dry run shrinks them
# (:func:`_dry_shapes`).
_ALL = ("float32", "bfloat16", "float16")
CHECK_SHAPES: Dict[str, Dict[str, List[Tuple[Dict[str, int], str, bool]]]] = {
    "ntxent": {
        "small": [({"n": 16, "d": 32}, dt, False) for dt in _ALL],
        "awkward": [({"n": 1, "d": 1}, "float32", False), ({"n": 2, "d": 3}, "float32", True),
                    ({"n": 3, "d": 129}, "bfloat16", True), ({"n": 127, "d": 3}, "float16", False),
                    ({"n": 127, "d": 129}, "float32", True)],
        "headline": [({"n": 4096, "d": 128}, "bfloat16", False)],
    },
    "infonce": {
        "small": [({"n": 8, "k": 64, "d": 32}, dt, False) for dt in _ALL],
        "awkward": [({"n": 1, "k": 1, "d": 1}, "float32", False), ({"n": 2, "k": 3, "d": 3}, "float32", True),
                    ({"n": 3, "k": 129, "d": 129}, "bfloat16", True), ({"n": 127, "k": 33, "d": 3}, "float32", False)],
        "headline": [({"n": 256, "k": 65536, "d": 128}, "bfloat16", False)],
    },
    "uniformity": {
        "small": [({"n": 16, "d": 32}, dt, False) for dt in _ALL],
        "awkward": [({"n": 2, "d": 1}, "float32", False), ({"n": 3, "d": 3}, "float32", True),
                    ({"n": 127, "d": 129}, "bfloat16", True)],
        "headline": [({"n": 4096, "d": 128}, "bfloat16", False)],
    },
    "barlow_twins": {
        "small": [({"n": 16, "d": 32}, dt, False) for dt in _ALL],
        "awkward": [({"n": 2, "d": 1}, "float32", False), ({"n": 3, "d": 3}, "float32", True),
                    ({"n": 127, "d": 129}, "bfloat16", True), ({"n": 2, "d": 129}, "float32", False),
                    ({"n": 127, "d": 3}, "float16", True)],
        "headline": [({"n": n, "d": 8192}, dt, False) for n in (2048, 256) for dt in ("float32", "bfloat16")],
    },
    "swav": {
        "small": [({"b": 16, "k": 30, "low": 2}, dt, False) for dt in _ALL],
        "awkward": [({"b": 1, "k": 3, "low": 0}, "float32", False), ({"b": 2, "k": 1, "low": 1}, "float32", True),
                    ({"b": 3, "k": 129, "low": 2}, "bfloat16", True), ({"b": 127, "k": 3, "low": 1}, "float32", False)],
        "headline": [({"b": 4096, "k": 3000, "low": 0}, "float32", False)],
    },
    "sinkhorn": {
        "small": [({"b": 16, "k": 30}, dt, False) for dt in _ALL],
        "awkward": [({"b": 1, "k": 1}, "float32", False), ({"b": 2, "k": 3}, "float32", True),
                    ({"b": 3, "k": 129}, "bfloat16", True), ({"b": 127, "k": 3}, "float32", False)],
        "headline": [({"b": 4096, "k": 3000}, "float32", False)],
    },
    "dino": {
        "small": [({"views": 4, "b": 8, "k": 64}, dt, False) for dt in _ALL],
        "awkward": [({"views": 1, "b": 1, "k": 3}, "float32", False), ({"views": 2, "b": 2, "k": 1}, "float32", True),
                    ({"views": 2, "b": 3, "k": 129}, "bfloat16", True), ({"views": 3, "b": 127, "k": 3}, "float32", False)],
        "headline": [({"views": 12, "b": 64, "k": 65536}, dt, False) for dt in ("float32", "bfloat16")],
    },
    "ibot": {  # images x tokens, about 40 % of the tokens masked (at least one per image)
        "small": [({"images": 4, "tokens": 16, "k": 64}, dt, False) for dt in _ALL],
        "awkward": [({"images": 1, "tokens": 1, "k": 3}, "float32", False), ({"images": 2, "tokens": 3, "k": 1}, "float32", True),
                    ({"images": 3, "tokens": 9, "k": 129}, "bfloat16", True), ({"images": 5, "tokens": 7, "k": 3}, "float32", False)],
        "headline": [({"images": 64, "tokens": 196, "k": 65536}, dt, False) for dt in ("float32", "bfloat16")],
    },
    "wmse": {
        "small": [({"d": 8, "w_size": 16, "sub_batches": 2}, dt, False) for dt in _ALL],
        "awkward": [({"d": 1, "w_size": 4, "sub_batches": 1}, "float32", False),
                    ({"d": 3, "w_size": 8, "sub_batches": 3}, "float32", True),
                    ({"d": 129, "w_size": 256, "sub_batches": 2}, "float32", True)],
        "headline": [({"d": 128, "w_size": 256, "sub_batches": 4}, "float32", False)],
    },
    "directclr": {
        "small": [({"n": 16, "d": 96, "loss_dim": 64}, dt, False) for dt in ("float32", "bfloat16")],
        "awkward": [({"n": 1, "d": 3, "loss_dim": 1}, "float32", False), ({"n": 3, "d": 129, "loss_dim": 65}, "float32", True)],
    },
    "vicregl": {  # float32 only: in half precision the nearest-neighbour matches of the local term
        # can flip between implementations (ties after rounding); vicreg covers the half kernels
        "small": [({"b": 6, "d": 24, "h": 5, "c": 16}, "float32", False)],
    },
}  # fmt: skip
CHECK_SHAPES["vicreg"] = CHECK_SHAPES["barlow_twins"]

#: Largest size of each dimension in the dry run (the interpreter runs every program in Python).
_DRY_CAPS = {"n": 5, "d": 7, "k": 24, "b": 5, "views": 3, "w_size": 8, "sub_batches": 2, "loss_dim": 3,
             "low": 1, "h": 5, "c": 8, "images": 3, "tokens": 9}  # fmt: skip


def _dry_shapes(family: str, which: str) -> List[Tuple[Dict[str, int], str, bool]]:
    """The dry run's version of a set: dimensions capped (:data:`_DRY_CAPS`), float32 and
    bfloat16 only, at most three shapes, duplicates dropped."""
    out: List[Tuple[Dict[str, int], str, bool]] = []
    for shape, dtype, strided in CHECK_SHAPES[family][which]:
        small = {k: min(v, _DRY_CAPS.get(k, v)) for k, v in shape.items()}
        if family == "wmse":  # whitening needs more rows per sub-batch than features
            small["d"] = min(small["d"], small["w_size"] - 2)
        if dtype == "float16" or any(s == small and d == dtype for s, d, _ in out):
            continue
        out.append((small, dtype, strided))
    return out[:3]


def check_shapes(family: str, which: str, dry_run: bool) -> List[Tuple[Dict[str, int], str, bool]]:
    return _dry_shapes(family, which) if dry_run else list(CHECK_SHAPES[family][which])


@dataclasses.dataclass(frozen=True)
class CheckRecipe:
    """How to check one family: ``make(shape, dtype, device, strided)`` gives (tensors, extras) --
    the tensors that need a gradient have ``requires_grad`` -- and ``run(tensors, extras,
    backend)`` the loss (Sinkhorn: the codes, no backward)."""

    make: Callable[..., Tuple[List[Any], Dict[str, Any]]]
    run: Callable[[List[Any], Dict[str, Any], str], Any]
    backward: bool = True


@contextmanager
def without_wmse_extension() -> Iterator[None]:
    """W-MSE's batched PyTorch path even where its CUDA extension is built (the "torch" side of
    the W-MSE comparisons: ``backend="torch"`` would run the extension too)."""
    from fastssl import wmse

    saved = wmse._use_cuda_kernel
    wmse._use_cuda_kernel = lambda x, whitening: False
    try:
        yield
    finally:
        wmse._use_cuda_kernel = saved


def check_recipes() -> Dict[str, CheckRecipe]:
    import torch
    import torch.nn.functional as F

    import fastssl.functional as FS
    from fastssl.ntxent import uniformity_loss

    def randn(rows: int, cols: int, dtype, device, strided: bool, grad: bool = True):
        # Fresh N(0, 1) draws; a strided view (every other column) when asked for.
        if strided and cols > 1:
            x = torch.randn(rows, 2 * cols, device=device)[:, ::2]
        else:
            x = torch.randn(rows, cols, device=device)
        return x.to(dtype).requires_grad_(grad)

    def cosines(rows: int, k: int, dtype, device, strided: bool, grad: bool = True):
        # SwAV scores are cosines of normalized embeddings and prototypes: in [-1, 1], never zeros.
        z = F.normalize(torch.randn(rows, 16, device=device), dim=1)
        prototypes = F.normalize(torch.randn(2 * k if strided else k, 16, device=device), dim=1)
        scores = z @ prototypes.T
        return (scores[:, ::2] if strided else scores).to(dtype).requires_grad_(grad)

    def pair(s, dt, dev, st):
        return [randn(s["n"], s["d"], dt, dev, st), randn(s["n"], s["d"], dt, dev, st)], {}

    def infonce(s, dt, dev, st):
        bank = F.normalize(torch.randn(s["k"], s["d"], device=dev), dim=1).to(dt)
        return [randn(s["n"], s["d"], dt, dev, st), randn(s["n"], s["d"], dt, dev, st), bank.requires_grad_(False)], {}

    def swav(s, dt, dev, st):
        crops = [cosines(s["b"], s["k"], dt, dev, st) for _ in range(2 + s["low"])]
        return crops, {"high": 2}

    def dino(s, dt, dev, st):
        teacher = [randn(s["b"], s["k"], dt, dev, st, grad=False) for _ in range(2)]
        student = [randn(s["b"], s["k"], dt, dev, st) for _ in range(s["views"])]
        center = 0.1 * torch.randn(s["k"], device=dev)
        return student + teacher, {"views": s["views"], "center": center}

    def wmse(s, dt, dev, st):
        per_view = s["w_size"] * s["sub_batches"]
        x = randn(2 * per_view, s["d"], dt, dev, st)
        return [x], {"w_size": s["w_size"], "permutations": [torch.randperm(per_view, device=dev)]}

    def run_wmse(t, e, backend):
        with without_wmse_extension() if backend == "torch" else _nullcontext():
            return FS.wmse_loss(t[0], 2, e["w_size"], 1, 0.0, permutations=e["permutations"], backend=backend)

    def ibot(s, dt, dev, st):
        # A token mask with about 40 % of the tokens of each image set, at least one (drawn on
        # the host: the inputs are made outside the checked call).
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
        mask = torch.rand(s["images"], s["tokens"], generator=gen) < 0.4
        mask[:, 0] |= ~mask.any(dim=1)
        rows = int(mask.sum())
        teacher = randn(rows, s["k"], dt, dev, st, grad=False)
        student = randn(rows, s["k"], dt, dev, st)
        center = torch.randn(1, s["k"], device=dev) * 0.1
        return [student, teacher], {"mask": mask.to(dev), "center": center}

    def directclr(s, dt, dev, st):
        return pair(s, dt, dev, st)[0], {"loss_dim": s["loss_dim"]}

    def vicregl(s, dt, dev, st):
        b, d, h, c = s["b"], s["d"], s["h"], s["c"]
        tensors = []
        for _ in range(2):
            tensors.append(randn(b, d, dt, dev, st))
            tensors.append(torch.randn(b, h, h, c, device=dev).to(dt).requires_grad_(True))
        grids = [(torch.rand(b, h, h, 2, device=dev) * h) for _ in range(2)]
        return tensors, {"grids": grids}

    def run_vicregl(t, e, backend):
        grids = [g.to(t[0].dtype) for g in e["grids"]]
        return FS.vicregl_loss([(t[0], t[1]), (t[2], t[3])], grids, backend=backend)

    return {
        "ntxent": CheckRecipe(pair, lambda t, e, b: FS.ntxent_loss(t[0], t[1], 0.5, backend=b)),
        "infonce": CheckRecipe(infonce, lambda t, e, b: FS.infonce_loss(t[0], t[1], t[2], 0.2, backend=b)),
        "uniformity": CheckRecipe(lambda s, dt, dev, st: ([randn(s["n"], s["d"], dt, dev, st)], {}),
                                  lambda t, e, b: uniformity_loss(t[0], 2.0, backend=b)),
        "barlow_twins": CheckRecipe(pair, lambda t, e, b: FS.barlow_twins_loss(t[0], t[1], 5e-3, backend=b)),
        "vicreg": CheckRecipe(pair, lambda t, e, b: FS.vicreg_loss(t[0], t[1], backend=b)),
        "swav": CheckRecipe(swav, lambda t, e, b: FS.swav_loss(t[: e["high"]], t[e["high"]:], None, 0.1, 3, 0.05, backend=b)),
        "sinkhorn": CheckRecipe(lambda s, dt, dev, st: ([cosines(s["b"], s["k"], dt, dev, st, grad=False)], {}),
                                lambda t, e, b: FS.sinkhorn(t[0], 3, 0.05, backend=b), backward=False),
        "dino": CheckRecipe(dino, lambda t, e, b: FS.dino_loss(t[e["views"]:], t[: e["views"]], e["center"], 0.04, 0.1, backend=b)),
        "ibot": CheckRecipe(ibot, lambda t, e, b: FS.ibot_patch_loss(t[1], t[0], e["mask"], e["center"], 0.04, 0.1, backend=b)),
        "wmse": CheckRecipe(wmse, run_wmse),
        "directclr": CheckRecipe(directclr, lambda t, e, b: FS.directclr_loss(t[0], t[1], loss_dim=e["loss_dim"], backend=b)),
        "vicregl": CheckRecipe(vicregl, run_vicregl),
    }  # fmt: skip


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


# --------------------------------------------------------------------------------------------
# Correctness: poisoned outputs, comparisons
# --------------------------------------------------------------------------------------------


@contextmanager
def poisoned_outputs(device, nbytes: int) -> Iterator[None]:
    """NaN in every buffer the kernels are about to fill: each loaded kernel module's
    ``_new_buffer`` returns NaN-filled tensors, and on CUDA the caching allocator's free blocks
    are filled with NaN first (about ``nbytes`` in large blocks, 32 MiB in small ones), so that
    ``torch.empty`` inside a launcher -- or ``at::empty`` in the CUDA extension -- hands out NaN."""
    import importlib
    import pkgutil

    import torch

    import fastssl.kernels as kernel_package

    patched = []
    for info in pkgutil.iter_modules(kernel_package.__path__):
        module = importlib.import_module(f"fastssl.kernels.{info.name}")
        if hasattr(module, "_new_buffer"):
            patched.append((module, module._new_buffer))
            module._new_buffer = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # only poisoned blocks stay cached
            large = torch.full((max(nbytes, 1 << 26) // 4,), float("nan"), device=device)
            small = [torch.full((1 << 16,), float("nan"), device=device) for _ in range(128)]  # 256 KiB each
            del large, small
        yield
    finally:
        for module, original in patched:
            module._new_buffer = original


def error_norms(got, want) -> Tuple[float, float]:
    """(‖got − want‖, ‖want‖) in float64; the error is infinite when ``got`` has a non-finite
    element where ``want`` is finite (where both are non-finite they count as equal)."""
    import torch

    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return math.inf, 0.0
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    if bool((bad_got & ~bad_want).any()):
        return math.inf, 0.0
    got, want = torch.where(bad_want, 0.0, got), torch.where(bad_want, 0.0, want)
    return float(torch.linalg.vector_norm(got - want)), float(torch.linalg.vector_norm(want))


def _relative(error: float, scale: float) -> float:
    return error / scale if scale > 0 else error


def within_tolerance(ours: float, theirs: float, scale: float, numel: int, dtype: str) -> bool:
    """The Triton path's error ``ours`` against the torch path's ``theirs`` (both ‖· − exact‖):
    at most twice as large, or within the dtype's relative floor plus its absolute floor."""
    allowed = max(2.0 * theirs, ERROR_FLOORS[dtype] * scale + ABSOLUTE_FLOORS[dtype] * math.sqrt(max(numel, 1)))
    return ours <= allowed


def _value_and_grads(recipe: CheckRecipe, tensors: List[Any], extras: Dict[str, Any], backend: str):
    import torch

    out = recipe.run(tensors, extras, backend)
    leaves = [t for t in tensors if getattr(t, "requires_grad", False)]
    if not recipe.backward or not leaves:
        return out.detach(), []
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _to_float64(tensors: List[Any]) -> List[Any]:
    import torch

    return [t.detach().to(torch.float64).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in tensors]  # fmt: skip


def _extras_float64(extras: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in extras.items()}


def compare_paths(family: str, recipe: CheckRecipe, shape: Dict[str, int], dtype: str, strided: bool, device) -> Dict[str, Any]:
    """Triton and torch paths against the float64 reference on one fresh draw of inputs."""
    import torch

    tensors, extras = recipe.make(shape, _dtype(dtype), device, strided)
    want, want_grads = _value_and_grads(recipe, _to_float64(tensors), _extras_float64(extras), "reference")
    torch_value, torch_grads = _value_and_grads(recipe, tensors, extras, "torch")
    nbytes = 8 * sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    with poisoned_outputs(device, nbytes):
        triton_value, triton_grads = _value_and_grads(recipe, tensors, extras, "triton")
    _sync(device)
    names = ["value"] + [f"grad[{i}]" for i in range(len(want_grads))]
    errors = []
    passed = True
    for name, ours, theirs, exact in zip(names, [triton_value] + triton_grads, [torch_value] + torch_grads, [want] + want_grads):
        (e_triton, scale), (e_torch, _) = error_norms(ours, exact), error_norms(theirs, exact)
        ok = within_tolerance(e_triton, e_torch, scale, exact.numel(), dtype)
        passed &= ok
        errors.append({"what": name, "triton": _relative(e_triton, scale), "torch": _relative(e_torch, scale),
                       "triton_vs_torch": _relative(*error_norms(ours, theirs)), "scale": scale, "ok": ok})
    contract = []
    if recipe.backward:
        if triton_value.dtype != torch.float32 or triton_value.dim() != 0:
            contract.append(f"loss is {triton_value.dtype} with shape {tuple(triton_value.shape)}, expected a 0-d float32")
        leaves = [t for t in tensors if getattr(t, "requires_grad", False)]
        contract += [f"grad[{i}] is {g.dtype}, expected {x.dtype}" for i, (g, x) in enumerate(zip(triton_grads, leaves)) if g.dtype != x.dtype]
    return {
        "shape": shape, "dtype": dtype, "strided": strided, "passed": passed and not contract, "errors": errors,
        "contract": contract, "loss": float(triton_value.float().sum()),
    }  # fmt: skip


def unit_check(ctx: UnitContext, family: str, set: str) -> Dict[str, Any]:
    import torch

    device = _device(ctx)
    torch.manual_seed(ctx.seed)
    recipe = check_recipes()[family]
    cases = []
    for shape, dtype, strided in check_shapes(family, set, ctx.dry_run):
        try:
            cases.append(compare_paths(family, recipe, shape, dtype, strided, device))
        except Exception:  # noqa: BLE001 - one shape's error is that shape's failure
            cases.append({"shape": shape, "dtype": dtype, "strided": strided, "passed": False,
                          "error": traceback.format_exc(limit=20)})
        ctx.progress({"cases": cases})
    result: Dict[str, Any] = {"cases": cases, "passed": all(c["passed"] for c in cases), "seed": ctx.seed}
    if family == "wmse":
        from fastssl.kernels import wmse_cuda

        built = device.type == "cuda" and wmse_cuda.load_extension() is not None
        result["extension"] = "built" if built else (wmse_cuda.build_failure() or "not used on CPU")
        if device.type == "cuda" and not built:
            result["passed"] = False  # the comparison ran the torch path twice
        if device.type != "cuda":
            result["note"] = "the CUDA extension needs CUDA: both sides ran the batched PyTorch path"
    return result


def unit_wmse_build(ctx: UnitContext) -> Dict[str, Any]:
    """Build (or load) W-MSE's CUDA extension once, before the W-MSE units need it."""
    if ctx.dry_run:
        raise Skip("the CUDA extension needs CUDA and nvcc")
    from fastssl.kernels import wmse_cuda

    started = time.perf_counter()
    extension = wmse_cuda.load_extension()
    return {"built": extension is not None, "failure": wmse_cuda.build_failure(),
            "seconds": time.perf_counter() - started, "passed": extension is not None}


def unit_nonfinite(ctx: UnitContext, family: str) -> Dict[str, Any]:
    """A NaN, then an Inf, in one element of the first input that takes a gradient (Sinkhorn: the
    scores): the Triton path must not return a finite loss (DESIGN §3)."""
    import torch

    device = _device(ctx)
    torch.manual_seed(ctx.seed)
    recipe = check_recipes()[family]
    shape, dtype, strided = check_shapes(family, "small", ctx.dry_run)[0]
    outcomes = []
    for bad in (float("nan"), float("inf")):
        tensors, extras = recipe.make(shape, _dtype(dtype), device, strided)
        target = next(i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor) and (t.requires_grad or not recipe.backward))
        with torch.no_grad():
            poisoned = tensors[target].detach().clone()
            poisoned.view(-1)[0] = bad
        tensors[target] = poisoned.requires_grad_(tensors[target].requires_grad)
        row: Dict[str, Any] = {"input": str(bad)}
        for backend in ("triton", "torch"):
            try:
                with torch.no_grad():
                    value = recipe.run(tensors, extras, backend)
                finite = bool(torch.isfinite(value).all())
                row[backend] = "finite" if finite else "non-finite"
            except Exception as error:  # noqa: BLE001 - raising is not silent
                row[backend] = f"raised {type(error).__name__}: {_last_line(str(error))[:200]}"
        row["ok"] = row["triton"] != "finite"
        outcomes.append(row)
    return {"shape": shape, "dtype": dtype, "outcomes": outcomes, "passed": all(r["ok"] for r in outcomes)}


# --------------------------------------------------------------------------------------------
# CUDA-graph capture of one training step per family
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphRecipe:
    """A training step: ``views`` inputs (rows, 32) through one linear layer to ``width``
    features, the loss built by ``make_loss(width)`` (state copied for the twin) applied by
    ``apply``."""

    width: int
    views: int
    rows: int
    make_loss: Callable[[int], Any]
    apply: Callable[[Any, List[Any]], Any]


def graph_recipes() -> Dict[str, GraphRecipe]:
    import torch
    import torch.nn.functional as F

    import fastssl
    import fastssl.functional as FS
    from fastssl.ntxent import uniformity_loss

    def none(width: int) -> None:
        return None

    permutation = {}

    def wmse(_state, outputs):
        x = torch.cat(outputs)
        per_view = x.shape[0] // 2
        if x.device not in permutation:  # fixed, so that the twin draws the same sub-batches
            permutation[x.device] = torch.randperm(per_view, generator=torch.Generator().manual_seed(0)).to(x.device)
        return FS.wmse_loss(x, 2, per_view // 2, 1, 0.0, permutations=[permutation[x.device]], backend="triton")

    def ibot(loss, outputs):
        # A fixed mask (a graph replays the same shapes): every other token of 8 images of 8
        # tokens, 32 of the 64 rows; the teacher is the second view, without gradient.
        # Rows are picked by a cached index (boolean indexing would read the count on the host).
        rows = outputs[0].shape[0]
        key = (outputs[0].device, rows)
        if key not in permutation:
            mask = (torch.arange(rows, device=outputs[0].device) % 2 == 0).reshape(-1, 8)
            permutation[key] = (mask, mask.reshape(-1).nonzero().squeeze(1))
        mask, picked = permutation[key]
        return loss(outputs[1].detach().index_select(0, picked), outputs[0].index_select(0, picked), mask)

    return {
        "ntxent": GraphRecipe(64, 2, 64, lambda w: fastssl.NTXentLoss(0.2, backend="triton"), lambda s, o: s(o[0], o[1])),
        "moco": GraphRecipe(64, 2, 64, lambda w: fastssl.NTXentLoss(0.2, memory_bank_size=(96, w), backend="triton"),
                            lambda s, o: s(o[0], o[1])),
        "uniformity": GraphRecipe(64, 1, 64, none, lambda s, o: uniformity_loss(o[0], 2.0, backend="triton")),
        "barlow_twins": GraphRecipe(256, 2, 32, lambda w: fastssl.BarlowTwinsLoss(backend="triton"), lambda s, o: s(o[0], o[1])),
        "vicreg": GraphRecipe(256, 2, 32, lambda w: fastssl.VICRegLoss(backend="triton"), lambda s, o: s(o[0], o[1])),
        "swav": GraphRecipe(300, 4, 64, lambda w: fastssl.SwaVLoss(backend="triton"),
                            lambda s, o: s([F.normalize(x, dim=1) for x in o[:2]], [F.normalize(x, dim=1) for x in o[2:]])),
        "dino": GraphRecipe(300, 6, 64, lambda w: fastssl.DINOLoss(output_dim=w, backend="triton"),
                            lambda s, o: s([x.detach() for x in o[:2]], o)),
        "ibot": GraphRecipe(300, 2, 64, lambda w: fastssl.IBOTPatchLoss(output_dim=w, backend="triton"), ibot),
        "wmse": GraphRecipe(8, 2, 64, none, wmse),
    }  # fmt: skip


def unit_graph(ctx: UnitContext, family: str) -> Dict[str, Any]:
    """Capture forward + backward + optimizer step in a CUDA graph after a warm-up on a side
    stream, replay it twice on new inputs and compare with the same steps run eagerly by a twin
    (loss, weights, loss-module state). In the dry run the steps run eagerly only."""
    import copy

    import torch

    device = _device(ctx)
    torch.manual_seed(ctx.seed)
    recipe = graph_recipes()[family]
    if ctx.dry_run:  # the interpreter runs every program in Python: fewer rows and prototypes
        recipe = dataclasses.replace(recipe, rows=min(recipe.rows, 32), width=min(recipe.width, 48))
    dim = 32
    model = torch.nn.Linear(dim, recipe.width).to(device)
    state = recipe.make_loss(recipe.width)
    state = state.to(device) if isinstance(state, torch.nn.Module) else state
    twin, twin_state = copy.deepcopy(model), copy.deepcopy(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    inputs = [torch.randn(recipe.rows, dim, device=device) for _ in range(recipe.views)]

    def step(net, loss_state, opt):
        opt.zero_grad(set_to_none=False)
        loss = recipe.apply(loss_state, [net(x) for x in inputs])
        loss.backward()
        opt.step()
        return loss

    def compare(a, b, what: str) -> None:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")

    capture = device.type == "cuda"
    warmups, rounds = (3, 2) if capture else (0, 1)  # the dry run checks the recipe, not the capture
    if capture:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile, allocate gradients, banks, centers
            for _ in range(warmups):
                step(model, state, optimizer)
                step(twin, twin_state, twin_optimizer)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(model, state, optimizer)
    else:
        for _ in range(warmups):
            step(model, state, optimizer)
            step(twin, twin_state, twin_optimizer)
    losses = []
    for _ in range(rounds):
        for x in inputs:
            x.copy_(torch.randn_like(x))
        if capture:
            graph.replay()
            loss = static_loss
        else:
            loss = step(model, state, optimizer)
        expected = step(twin, twin_state, twin_optimizer)
        _sync(device)
        compare(loss, expected, "loss")
        losses.append(float(loss.detach()))
        for ours, theirs in zip(model.parameters(), twin.parameters()):
            compare(ours, theirs, "weights after the step")
        if isinstance(state, torch.nn.Module):
            for (name, ours), (_, theirs) in zip(state.named_buffers(), twin_state.named_buffers()):
                compare(ours, theirs, f"loss module buffer {name}")
    result: Dict[str, Any] = {"captured": capture, "losses": losses, "passed": True}
    if not capture:
        result["note"] = "graph capture skipped (no CUDA): the recipe's steps ran eagerly and matched the twin"
    return result


# --------------------------------------------------------------------------------------------
# Rates and timings
# --------------------------------------------------------------------------------------------


def unit_rates(ctx: UnitContext) -> Dict[str, Any]:
    """bf16, float32 (IEEE) and TF32 matmul rates and the copy bandwidth, on this device."""
    import torch

    from benchmarks import roofline

    device = _device(ctx)
    size = 256 if ctx.dry_run else 8192
    copy_bytes = (16 << 20) if ctx.dry_run else (1 << 30)
    out: Dict[str, Any] = {"device": str(device), "matmul_size": size, "copy_bytes": copy_bytes}
    out["bfloat16_tflops"] = roofline.matmul_flops_per_s(device, torch.bfloat16, size=size) / 1e12
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        out["float32_tflops"] = roofline.matmul_flops_per_s(device, torch.float32, size=size) / 1e12
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            out["tf32_tflops"] = roofline.matmul_flops_per_s(device, torch.float32, size=size) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out["copy_gbps"] = roofline.copy_bytes_per_s(device, nbytes=copy_bytes) / 1e9
    return out


class Unavailable(Exception):
    """This implementation does not exist for this case here."""


def _harness():
    from benchmarks import _harness, test_bench_prototype  # noqa: F401 - registers iBOT with the harness

    return _harness


def _reference_infeasible(case: TimingCase, device) -> Optional[str]:
    """Why the reference (and lightly) cannot run at this shape: the textbook NT-Xent holds its
    (2N)² logits several times over."""
    import torch

    if case.harness_family != "ntxent" or device.type != "cuda":
        return None
    rows = 2 * case.shape["n"]
    needed = 3.0 * rows * rows * 4
    available = torch.cuda.get_device_properties(device).total_memory
    if needed > 0.8 * available:
        return f"the reference holds (2N)² = {rows}² logits: about {needed / 1e12:.1f} TB, the GPU has {available / 1e9:.0f} GB"
    return None


def _build_impl(case: TimingCase, impl: str, device, dry_run: bool):
    import functools

    import torch

    harness = _harness()
    family = harness.FAMILIES[case.harness_family]
    if impl in ("eager", "compiled", "lightly"):
        reason = _reference_infeasible(case, device)
        if reason:
            raise Unavailable(reason)
    if impl == "triton":
        return functools.partial(family.fastssl, backend="triton")
    if impl == "torch":
        fn = functools.partial(family.fastssl, backend="torch")
        if case.harness_family != "wmse":
            return fn

        def batched_pytorch(*args):
            with without_wmse_extension():
                return fn(*args)

        return batched_pytorch
    if impl == "eager":
        return family.reference
    if impl == "compiled":
        torch._dynamo.reset()  # a fresh cache: recompile limits of earlier cases do not apply
        return torch.compile(family.reference, backend="eager" if dry_run else "inductor")
    if impl == "lightly":
        if family.lightly is None:
            raise Unavailable(f"lightly has no {case.harness_family} loss")
        try:
            return family.lightly(case.shape, device)
        except ImportError as error:
            raise Unavailable(f"lightly cannot be loaded: {error}") from None
    raise ValueError(impl)


def _is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return "out of memory" in text or "outofmemory" in type(error).__name__.lower()


def time_call(fn, make_args: Callable[[], tuple], backward: bool, device, *, budget_s: float, min_reps: int,
              max_reps: int) -> Dict[str, Any]:
    """One warm-up call, then timed calls on fresh inputs (CUDA events on CUDA, perf_counter on
    the CPU) until ``budget_s`` of timed calls and ``min_reps`` (or one call longer than the
    budget); the first timed call also measures the peak memory (CUDA). Returns times in ms."""
    import torch

    cuda = device.type == "cuda"
    args = make_args()
    _sync(device)
    started = time.perf_counter()
    out = fn(*args)
    if backward:
        out.backward()
    _sync(device)
    first_call_s = time.perf_counter() - started
    value = float(out.detach().float().sum())
    del args, out
    times: List[float] = []
    peak = None
    while True:
        args = make_args()
        _sync(device)
        if cuda and not times:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            if backward:
                out.backward()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            if backward:
                out.backward()
            times.append(1e3 * (time.perf_counter() - t0))
        if cuda and peak is None:
            peak = torch.cuda.max_memory_allocated(device) - before
        del args, out
        spent = sum(times) / 1e3
        if len(times) >= max_reps or (spent >= budget_s and (len(times) >= min_reps or times[0] / 1e3 >= budget_s)):
            break
    ordered = sorted(times)
    return {
        "median_ms": ordered[len(ordered) // 2], "min_ms": ordered[0], "reps": len(times),
        "first_call_s": first_call_s, "peak_mb": None if peak is None else peak / 2**20, "value": value,
    }  # fmt: skip


def _time_case(ctx: UnitContext, case_json: Dict[str, Any], impls: Sequence[str]) -> Dict[str, Any]:
    import gc

    import torch

    case = TimingCase(**case_json)
    device = _device(ctx)
    torch.manual_seed(ctx.seed)
    if case.harness_family is None:
        raise Skip(f"no timing recipe for the launch report's family {case.family!r}")
    harness = _harness()
    from benchmarks import roofline

    family = harness.FAMILIES[case.harness_family]
    dtype = _dtype(case.dtype)
    cost = roofline.cost(case.harness_family, case.shape, dtype)
    result: Dict[str, Any] = {"case": case.to_json(), "flops": cost.flops, "bytes": cost.bytes, "impls": {}}
    if case.harness_family in NO_KERNEL:
        result["note"] = f"{case.harness_family} has no Triton kernel: backend='triton' runs the torch path"
    make_args = lambda: family.make_inputs(case.shape, dtype, device)  # noqa: E731
    for impl in impls:
        try:
            fn = _build_impl(case, impl, device, ctx.dry_run)
            row = time_call(
                fn, make_args, family.backward, device,
                budget_s=0.0 if ctx.dry_run else 0.4, min_reps=1 if ctx.dry_run else 3, max_reps=1 if ctx.dry_run else 25,
            )  # fmt: skip
        except Unavailable as why:
            row = {"skipped": str(why)}
        except Exception as error:  # noqa: BLE001 - one implementation's failure is its row's
            if _is_oom(error):
                row = {"skipped": f"out of memory: {_last_line(str(error))[:200]}"}
            elif impl in ("lightly", "compiled"):  # as the benchmark harness: reported, not fatal
                what = "lightly failed" if impl == "lightly" else "torch.compile failed"
                row = {"skipped": f"{what}: {type(error).__name__}: {_last_line(str(error))[:300]}"}
            else:
                row = {"error": traceback.format_exc(limit=20)}
        finally:
            if impl == "compiled":
                torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["impls"][impl] = row
        ctx.progress(result)
    # fastssl's own paths failing fails the unit; a failing eager reference is reported beside it.
    errors = [impl for impl, row in result["impls"].items() if "error" in row]
    if any(impl in ("triton", "torch") for impl in errors):
        result["passed"] = False
    if errors:
        result["failed_impls"] = errors
    return result


def unit_time(ctx: UnitContext, case: Dict[str, Any]) -> Dict[str, Any]:
    return _time_case(ctx, case, ("triton", "torch", "eager", "lightly"))


def unit_compiled(ctx: UnitContext, case: Dict[str, Any]) -> Dict[str, Any]:
    return _time_case(ctx, case, ("compiled",))


def unit_warm(ctx: UnitContext, case: Dict[str, Any]) -> Dict[str, Any]:
    """Compile the reference at one headline shape (forward + backward), so that the timed
    phase finds Inductor's and Triton's on-disk caches warm."""
    import torch

    timing_case = TimingCase(**case)
    device = _device(ctx)
    family = _harness().FAMILIES[timing_case.harness_family]
    reason = _reference_infeasible(timing_case, device)
    if reason:
        raise Skip(reason)
    fn = _build_impl(timing_case, "compiled", device, ctx.dry_run)
    started = time.perf_counter()
    try:
        out = fn(*family.make_inputs(timing_case.shape, _dtype(timing_case.dtype), device))
        if family.backward:
            out.backward()
        _sync(device)
    except Exception as error:  # noqa: BLE001
        if _is_oom(error):
            raise Skip(f"out of memory: {_last_line(str(error))[:200]}") from None
        raise
    finally:
        torch._dynamo.reset()
    return {"compile_and_first_call_s": time.perf_counter() - started}


def unit_selftest(ctx: UnitContext, action: str = "ok", seconds: float = 0.0) -> Dict[str, Any]:
    """Units for the test suite's checks of the orchestration (no torch): succeed, fail a check,
    raise, sleep past a deadline, or kill their own process."""
    ctx.progress({"partial": True})  # what a unit killed later leaves behind
    if seconds:
        time.sleep(seconds)
    if action == "fail":
        return {"passed": False, "why": "a failing check"}
    if action == "raise":
        raise RuntimeError("a unit that raises")
    if action == "skip":
        raise Skip("nothing to do here")
    if action == "exit":
        os._exit(7)
    return {"passed": True, "action": action}


UNIT_KINDS: Dict[str, Callable[..., Dict[str, Any]]] = {
    "environment": unit_environment,
    "wmse-build": unit_wmse_build,
    "check": unit_check,
    "nan": unit_nonfinite,
    "graph": unit_graph,
    "warm": unit_warm,
    "rates": unit_rates,
    "time": unit_time,
    "compiled": unit_compiled,
    "selftest": unit_selftest,
}


# ============================================================================================
# Rendering: the summary and the short table printed last (standard library only)
# ============================================================================================


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _impl_ms(timing: Optional[Dict[str, Any]], impl: str) -> Optional[float]:
    row = ((timing or {}).get("result") or {}).get("impls", {}).get(impl) or {}
    return row.get("median_ms")


def _impl_cell(timing: Optional[Dict[str, Any]], impl: str) -> str:
    row = ((timing or {}).get("result") or {}).get("impls", {}).get(impl)
    if row is None:
        return "-" if timing is None or timing.get("status") in ("skipped", None) else "n/a"
    if "median_ms" in row:
        return _ms(row["median_ms"])
    if "skipped" in row:
        return "oom" if row["skipped"].startswith("out of memory") else "n/a"
    return "ERR"


def _rate_for(rates: Dict[str, Any], dtype: str) -> Optional[float]:
    key = "bfloat16_tflops" if dtype in ("bfloat16", "float16") else "float32_tflops"
    value = rates.get(key)
    return value * 1e12 if value else None


def floor_ms(result: Dict[str, Any], rates: Dict[str, Any], dtype: str) -> Optional[float]:
    """max(FLOPs / matmul rate at the dtype, bytes / copy bandwidth), both measured in this run."""
    rate, copy = _rate_for(rates, dtype), rates.get("copy_gbps")
    if not copy or result.get("bytes") is None:
        return None
    compute = result.get("flops", 0.0) / rate if rate else 0.0
    return 1e3 * max(compute, result["bytes"] / (copy * 1e9))


def _verdict(units: Dict[str, Dict[str, Any]], prefixes: Sequence[str]) -> str:
    """"pass n/m", "FAIL n/m" or "-": the units whose ids start with one of ``prefixes``."""
    chosen = [u for uid, u in units.items() if any(uid.startswith(p) for p in prefixes)]
    if not chosen:
        return "-"
    done = [u for u in chosen if u.get("status") in ("ok", "fail", "error", "crashed", "timeout")]
    bad = [u for u in done if u.get("status") != "ok"]
    if bad:
        return f"FAIL {len(bad)}/{len(chosen)}"
    return f"pass {len(done)}/{len(chosen)}" if done else "-"


def headline_rows(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per headline case: medians, speed-ups, % of floor, prediction, check verdicts."""
    units = data.get("units", {})
    rates = data.get("rates", {})
    predictions = data.get("predictions", {})
    rows = []
    order = {uid: index for index, uid in enumerate((data.get("meta") or {}).get("plan") or [])}
    for uid, entry in sorted(units.items(), key=lambda item: order.get(item[0], len(order))):
        if not uid.startswith("time/"):
            continue
        name = uid[len("time/"):]
        result = entry.get("result") or {}
        case = result.get("case") or {}
        compiled = units.get(f"compiled/{name}")
        ms = {impl: _impl_ms(entry, impl) for impl in ("triton", "torch", "eager", "lightly")}
        ms["compiled"] = _impl_ms(compiled, "compiled")
        cells = {impl: _impl_cell(entry, impl) for impl in ("triton", "torch", "eager", "lightly")}
        cells["compiled"] = _impl_cell(compiled, "compiled") if compiled else "-"
        dtype = case.get("dtype") or name.rsplit(" ", 1)[-1]
        floor = floor_ms(result, rates, dtype) if result else None
        triton = ms["triton"]

        def speedup(other: Optional[float]) -> Optional[float]:
            return other / triton if other and triton else None

        prediction = predictions.get(name) or {}
        predicted_ms = 1e3 * prediction["predicted_s"] if prediction.get("predicted_s") else None
        path = prediction.get("path")
        measured_for_prediction = (ms["torch"] if path == "torch" else triton) if predicted_ms else None
        family = case.get("family") or name.split(" ", 1)[0]
        check_families, graph_families = ROW_CHECKS.get(family, ((family,), (family,)))
        prefixes = [f"check/{f}/" for f in check_families] + [f"nan/{f}" for f in check_families]
        if (data.get("meta") or {}).get("dry_run") and case.get("shape"):  # say what really ran
            name = f"{family} tiny {', '.join(f'{k}={v}' for k, v in case['shape'].items())} {dtype}"
        rows.append({
            "case": name, "family": family, "status": entry.get("status"), "ms": ms, "cells": cells,
            "vs_eager": speedup(ms["eager"]), "vs_compiled": speedup(ms["compiled"]), "vs_lightly": speedup(ms["lightly"]),
            "vs_torch": speedup(ms["torch"]), "floor_ms": floor,
            "percent_of_floor": 100.0 * floor / triton if floor and triton else None,
            "predicted_ms": predicted_ms, "predicted_path": path, "measured_for_prediction_ms": measured_for_prediction,
            "predicted_percent_of_floor": prediction.get("percent_of_floor"),
            "checks": _verdict(units, prefixes) if check_families else "n/a",
            "graph": _verdict(units, [f"graph/{f}" for f in graph_families]) if graph_families else "n/a",
            "no_kernel": family in NO_KERNEL,
        })  # fmt: skip
    return rows


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}%" if value < 10 else f"{value:.0f}%"


def render_table(data: Dict[str, Any]) -> str:
    """The short table printed last: per headline shape the medians (ms), Triton's speed-ups, its
    % of the floor and the checks of its family."""
    header = ["case", "triton", "torch", "eager", "compiled", "lightly", "x eager", "x comp", "x lightly",
              "x torch", "% floor", "pred ms", "checks", "graph"]  # fmt: skip
    lines = [header]
    for row in headline_rows(data):
        c = row["cells"]
        lines.append([
            row["case"][:52] + ("*" if row["no_kernel"] else ""), c["triton"], c["torch"], c["eager"], c["compiled"],
            c["lightly"], _x(row["vs_eager"]), _x(row["vs_compiled"]), _x(row["vs_lightly"]), _x(row["vs_torch"]),
            _pct(row["percent_of_floor"]), _ms(row["predicted_ms"]), row["checks"], row["graph"],
        ])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = []
    for index, line in enumerate(lines):
        text.append("  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if index == 0:
            text.append("-" * len(text[0]))
    return "\n".join(text)


def status_counts(data: Dict[str, Any]) -> Dict[str, Dict[str, int]]:
    """Per section, how many units ended in each status."""
    counts: Dict[str, Dict[str, int]] = {}
    for entry in data.get("units", {}).values():
        section = counts.setdefault(entry.get("section", "?"), {})
        section[entry.get("status", "?")] = section.get(entry.get("status", "?"), 0) + 1
    return counts


def render_summary(data: Dict[str, Any]) -> str:
    meta, env, rates, units = data.get("meta", {}), data.get("environment", {}), data.get("rates", {}), data.get("units", {})
    mode = "dry run (CPU, Triton interpreter, tiny shapes)" if meta.get("dry_run") else "GPU"
    lines = [
        f"# GPU check: {env.get('device', '?')}",
        "",
        f"Mode: {mode}. Commit {meta.get('commit', '?')}, started {meta.get('started', '?')}, "
        f"updated {meta.get('updated', '?')}, deadline {meta.get('deadline_s', '?')} s.",
        f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}), Triton {env.get('triton', '?')}, "
        f"Python {env.get('python', '?')}, lightly {env.get('lightly') or 'not importable'}; "
        f"{env.get('sms', '?')} SMs, {env.get('memory_gib', '?')} GiB; nvidia-smi: {env.get('nvidia_smi', '-')}.",
        "Rates measured in this run: "
        + (", ".join(f"{k.replace('_tflops', '')} matmul {v:.1f} TFLOP/s" for k, v in rates.items() if k.endswith("_tflops") and v)
           + (f", copy {rates['copy_gbps']:.0f} GB/s" if rates.get("copy_gbps") else "") if rates else "not measured")
        + ". Floor = max(FLOPs / matmul rate at the input dtype (float32: IEEE), bytes / copy bandwidth)"
        " (benchmarks/roofline.py).",
        "",
        "## Headline shapes (forward + backward, median ms)",
        "",
        "| case | triton | torch | eager | compiled | lightly | × eager | × compiled | × lightly | × torch "
        "| floor ms | % of floor | predicted ms (path) | measured on that path | checks | graph |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in headline_rows(data):
        c = row["cells"]
        predicted = f"{_ms(row['predicted_ms'])} ({row['predicted_path']})" if row["predicted_ms"] else "-"
        lines.append(
            f"| {row['case']}{' †' if row['no_kernel'] else ''} | {c['triton']} | {c['torch']} | {c['eager']} | {c['compiled']} "
            f"| {c['lightly']} | {_x(row['vs_eager'])} | {_x(row['vs_compiled'])} | {_x(row['vs_lightly'])} "
            f"| {_x(row['vs_torch'])} | {_ms(row['floor_ms'])} | {_pct(row['percent_of_floor'])} | {predicted} "
            f"| {_ms(row['measured_for_prediction_ms'])} | {row['checks']} | {row['graph']} |")
    lines += [
        "",
        "† no Triton kernel: the triton column runs the torch path. Speed-ups are the other median over the "
        "Triton median (> 1: Triton is faster). Predictions: `benchmarks/results/launch-report.json` "
        "(the `auto` path, from the compiled code; its floor uses TF32 for float32). "
        "n/a: not available (lightly not importable, the reference cannot hold the logits); oom: out of memory.",
        "",
        "## Peak memory of one call (MiB)",
        "",
        "| case | triton | torch | eager | compiled | lightly |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for uid, entry in units.items():
        if uid.startswith("time/"):
            name = uid[len("time/"):]
            cells = []
            for impl, source in (("triton", entry), ("torch", entry), ("eager", entry), ("compiled", units.get(f"compiled/{name}")),
                                 ("lightly", entry)):
                row = ((source or {}).get("result") or {}).get("impls", {}).get(impl) or {}
                cells.append("-" if row.get("peak_mb") is None else f"{row['peak_mb']:,.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Sections", "", "| section | ok | fail | error | crashed | timeout | skipped |", "|---|---:|---:|---:|---:|---:|---:|"]
    for section, counts in status_counts(data).items():
        lines.append(f"| {section} | " + " | ".join(str(counts.get(s, 0)) for s in ("ok", "fail", "error", "crashed", "timeout", "skipped")) + " |")
    lines += ["", "## Correctness (norm-wise relative error against the float64 reference)", "",
              "| unit | status | shapes | worst triton error | torch error there | notes |", "|---|---|---:|---:|---:|---|"]
    for uid, entry in units.items():
        if not uid.startswith("check/"):
            continue
        result = entry.get("result") or {}
        cases = result.get("cases") or []
        worst = max((e for c in cases for e in c.get("errors", [])), key=lambda e: e["triton"], default=None)
        notes = [f"{c['dtype']} {c['shape']}{' strided' if c.get('strided') else ''}: "
                 + ("error: " + _last_line(c["error"]) if c.get("error") else
                    "; ".join(f"{e['what']} {e['triton']:.1e} vs {e['torch']:.1e}" for e in c.get("errors", []) if not e["ok"])
                    + ("; ".join(c.get("contract", []))))
                 for c in cases if not c.get("passed")]  # fmt: skip
        if result.get("extension"):
            notes.append(f"extension: {str(result['extension'])[:200]}")
        notes += [entry[k] for k in ("reason",) if entry.get(k)]
        worst_triton = "-" if worst is None else f"{worst['triton']:.1e}"
        worst_torch = "-" if worst is None else f"{worst['torch']:.1e}"
        cell = "<br>".join(n.replace("|", "/") for n in notes)
        lines.append(f"| {uid} | {entry.get('status')} | {len(cases)} | {worst_triton} | {worst_torch} | {cell} |")
    lines += ["", "## Non-finite inputs (one NaN, then one Inf)", "", "| unit | status | triton | torch |", "|---|---|---|---|"]
    for uid, entry in units.items():
        if uid.startswith("nan/"):
            outcomes = (entry.get("result") or {}).get("outcomes") or []
            lines.append(f"| {uid} | {entry.get('status')} | " + ", ".join(f"{o['input']}: {o['triton']}" for o in outcomes)
                         + " | " + ", ".join(f"{o['input']}: {o['torch']}" for o in outcomes) + " |")
    lines += ["", "## CUDA graphs (one training step captured and replayed)", "", "| unit | status | notes |", "|---|---|---|"]
    for uid, entry in units.items():
        if uid.startswith("graph/"):
            note = entry.get("reason") or (_last_line(entry.get("error", "")) if entry.get("error") else "")
            lines.append(f"| {uid} | {entry.get('status')} | {note.replace('|', '/')} |")
    kernels = data.get("registers") or []
    lines += ["", f"## Registers and spills ({len(kernels)} compiled kernels from Triton's JIT cache)", ""]
    if kernels:
        lines += ["| kernel | regs | spills | warps | stages | shared KiB | constants |", "|---|---:|---:|---:|---:|---:|---|"]
        for k in kernels:
            constants = ", ".join(f"{n}={v}" for n, v in sorted((k.get("constexprs") or {}).items()))
            shared = k.get("shared")
            lines.append(f"| `{k['kernel'].replace('fastssl.kernels.', '')}` | {k.get('n_regs')} | "
                         f"{'**' + str(k['n_spills']) + '**' if k.get('n_spills') else k.get('n_spills')} | {k.get('num_warps')} "
                         f"| {k.get('num_stages')} | {'-' if shared is None else f'{shared / 1024:.1f}'} | {constants[:160]} |")
    else:
        lines.append("None: the interpreter compiles nothing (dry run), or no Triton unit ran.")
    problems = [(uid, e) for uid, e in units.items()
                if e.get("status") in ("fail", "error", "crashed", "timeout") or (e.get("result") or {}).get("failed_impls")]
    lines += ["", f"## Problems ({len(problems)})", ""]
    for uid, entry in problems:
        lines.append(f"### {uid}: {entry.get('status')}")
        if entry.get("reason"):
            lines.append(f"\n{entry['reason']}\n")
        detail = entry.get("error") or entry.get("log_tail") or ""
        failed_rows = {k: v.get("error") for k, v in ((entry.get("result") or {}).get("impls") or {}).items() if v.get("error")}
        for impl, tb in failed_rows.items():
            detail += f"\n[{impl}]\n{tb}"
        if detail:
            lines += ["", "```", detail.strip()[-3000:], "```", ""]
    skipped = [(uid, e) for uid, e in units.items() if e.get("status") == "skipped"]
    lines += ["", f"## Skipped ({len(skipped)})", ""]
    lines += [f"* {uid}: {e.get('reason', '')}" for uid, e in skipped]
    rows_not_measured = [(uid, impl, row["skipped"]) for uid, e in units.items()
                         for impl, row in ((e.get("result") or {}).get("impls") or {}).items() if row.get("skipped")]
    lines += ["", f"## Timing rows not measured ({len(rows_not_measured)})", ""]
    lines += [f"* {uid} [{impl}]: {reason}" for uid, impl, reason in rows_not_measured]
    return "\n".join(lines) + "\n"


# ============================================================================================
# Entry point
# ============================================================================================


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", nargs="?", help="folder for results.json, summary.md, log.txt, workers.log")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    parser.add_argument("--deadline", type=float, help=f"seconds for the whole run (default {GPU_DEADLINE_S:.0f}, dry run {DRY_DEADLINE_S:.0f})")
    parser.add_argument("--workers", type=int, help="parallel workers in phase 1 (default: half the cores, at most 8; "
                        "in the dry run 2, or 1 on a busy machine); 1: one worker runs every section in order")
    parser.add_argument("--only", help="run only the units whose id matches this regular expression")
    parser.add_argument("--list", action="store_true", help="print the units and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    units = build_plan(args.dry_run)
    if args.only:
        units = [u for u in units if re.search(args.only, u.id)]
    if args.list:
        for u in units:
            print(f"{u.section:12s} {u.id}  (~{u.estimate_s:.0f} s, timeout {u.timeout_s:.0f} s)")
        return 0
    if not args.outdir:
        parser.error("OUTDIR is required")
    total = args.deadline or (DRY_DEADLINE_S if args.dry_run else GPU_DEADLINE_S)
    workers = args.workers or default_workers(args.dry_run)
    return run_check(Path(args.outdir), units, total_s=total, workers=workers, dry_run=args.dry_run,
                     argv=list(argv) if argv is not None else sys.argv[1:])


def default_workers(dry_run: bool) -> int:
    """Phase 1 is mostly compiling, one CPU core per worker: half the cores, at most 8, on the GPU
    machine (16 cores). The dry run: two workers on an idle machine, one on a busy one (every
    worker imports torch, which a loaded machine makes slow)."""
    cores = os.cpu_count() or 2
    if not dry_run:
        return max(1, min(8, cores // 2))
    try:
        busy = os.getloadavg()[0] > 0.75 * cores
    except OSError:
        busy = False
    return 1 if busy or cores < 2 else 2


def run_check(outdir: Path, units: Sequence[Unit], *, total_s: float, workers: int, dry_run: bool,
              argv: Optional[List[str]] = None, grace_s: Optional[float] = None) -> int:
    """Run ``units`` in their phases within ``total_s`` seconds; write the results into
    ``outdir`` and print the short table last. Exit status 1 when a check failed or a unit
    errored or crashed, else 0 (skipped units and timeouts are reported, not fatal)."""
    start = time.time()
    global_deadline = start + total_s
    seed = int.from_bytes(os.urandom(4), "little") % (2**31)
    meta = {
        "plan": [u.id for u in units],
        "started": _now_iso(), "commit": commit_id(), "source_sha1": source_digest(), "dry_run": dry_run,
        "deadline_s": total_s, "workers": workers,
        "seed": seed, "argv": argv or [], "script": "benchmarks/gpu_check.py",
    }  # fmt: skip
    store = ResultStore(outdir, meta)
    store.data["predictions"] = {} if dry_run else load_predictions()  # they are for the headline shapes
    deadlines = section_deadlines(start, total_s, sorted({u.section for u in units}))
    for section, deadline in deadlines.items():
        store.data["sections"][section] = {"phase": SECTIONS[section][0], "deadline_s": round(deadline - start, 1)}
    store.log(f"gpu_check: {len(units)} units, deadline {total_s:.0f} s, {workers} workers in phase 1"
              + (" (dry run)" if dry_run else ""))
    store.flush()
    grace = grace_s if grace_s is not None else (5.0 if dry_run else 15.0)
    with tempfile.TemporaryDirectory(prefix="fastssl-gpu-check-") as scratch_dir:
        scratch = Path(scratch_dir)
        # One worker runs every section in order; several run phase 1 side by side, then one
        # worker (started ahead, so that its imports overlap phase 1) has the GPU to itself.
        groups = [list(units)] if workers == 1 else [[u for u in units if SECTIONS[u.section][0] == p] for p in (1, 2)]
        lightly_site = unpack_lightly_wheel(scratch / "site")
        if lightly_site:
            store.log(f"lightly: unpacked {lightly_site} from .whl/ for the workers")
        pools = [WorkerPool(group, deadlines=deadlines, global_deadline=global_deadline, dry_run=dry_run, seed=seed,
                            scratch=scratch / f"phase{index + 1}", extra_paths=[lightly_site] if lightly_site else [])
                 for index, group in enumerate(groups)]  # fmt: skip
        try:
            if len(pools) > 1:
                pools[1].start_standby()
            for pool, n_workers in zip(pools, (workers, 1)):
                run_units(pool, store, workers=n_workers, grace_s=grace)
        finally:
            for pool in pools:
                pool.stop_standby()
            logs = sorted(scratch.glob("phase*/workers.log"))
            text = "".join(f"##### {p.parent.name}\n{p.read_text(errors='replace')}" for p in logs)
            _write_atomic(outdir / "workers.log", text[-(2 << 20):])
    store.data["meta"]["finished"] = _now_iso()
    store.data["meta"]["elapsed_s"] = round(time.time() - start, 1)
    store.flush()
    counts = status_counts(store.data)
    failing = sum(c.get(s, 0) for c in counts.values() for s in FAILING)
    incomplete = sum(c.get(s, 0) for c in counts.values() for s in ("timeout", "skipped"))
    store.log(f"done in {time.time() - start:.0f} s: {failing} failing, {incomplete} timed out or skipped; "
              f"results in {outdir}/results.json and summary.md")
    store.close()
    kernels = store.data["registers"]
    spilling = sorted({k["kernel"].replace("fastssl.kernels.", "") for k in kernels if k.get("n_spills")})
    print(f"\n{'FAIL' if failing else 'OK'}: "
          + ", ".join(f"{section} " + "/".join(f"{n} {s}" for s, n in sorted(c.items())) for section, c in sorted(counts.items()))
          + f"; {len(kernels)} compiled kernels, " + (f"SPILLING: {', '.join(spilling)}" if spilling else "none spills"))
    print()
    print(render_table(store.data))  # last: the reply of a device call carries the end of the output
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
