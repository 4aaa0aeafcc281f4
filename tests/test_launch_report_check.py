"""The launch report's CI check (benchmarks/launch_report.py ``--check``) under two Tritons.

``--other-python X`` must capture every case again in interpreter X and compile every launch
with X's Triton, and ``--check`` must fail on that Triton's compile failures and spills as on
the installed one's. The first tests judge synthetic results (no compiler needed); the last
runs the check under a second Triton, found through the environment variable
``FASTSSL_SECOND_PYTHON`` (e.g. a venv with Triton 3.6.0, the GPU machine's version; CI runs
the full check under it in ``.ci/step-20-triton36.sh``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import launch_report  # noqa: E402

SMALL_CASE = "barlow_twins n=2, d=7 bfloat16"


def _targets(spilled=(), failed=()):
    return {"spilled": list(spilled), "compile_failures": list(failed)}


def _compile_only(version, cases):
    return {"environment": {"triton": version}, "cases": cases}


def test_check_fails_on_the_other_tritons_spills_failures_and_missing_cases():
    clean = {"name": "a", "error": None, "targets": _targets(), "launches": []}
    results = _compile_only("3.9.0", [clean, dict(clean, name="b")])
    assert launch_report.check_failures(results) == []
    results["other_results"] = _compile_only("3.6.0", [
        {"name": "a", "error": None, "targets": _targets(spilled=["_gram_backward_kernel"]), "launches": []},
    ])
    problems = launch_report.check_failures(results)
    assert problems == ["a: _gram_backward_kernel spills registers (Triton 3.6.0)",
                        "b: not captured under Triton 3.6.0"]
    results["other_results"]["cases"].append(
        {"name": "b", "error": "RuntimeError: boom\n...", "targets": _targets(failed=["_loss_kernel"]), "launches": []})
    problems = launch_report.check_failures(results)
    assert "b: capture failed (Triton 3.6.0): RuntimeError: boom" in problems
    assert "b: _loss_kernel failed to compile (Triton 3.6.0)" in problems


def test_check_of_the_full_report_judges_the_other_triton_too():
    case = {"name": "a", "error": None, "targets": _targets(), "launches": [],
            "other_targets": _targets(spilled=["_standardize_kernel"]), "other_error": None}
    report = {"environment": {"triton": "3.9.0"}, "other": {"triton": "3.6.0"}, "cases": [case]}
    assert launch_report.check_failures(report) == ["a: _standardize_kernel spills registers (Triton 3.6.0)"]
    del case["other_targets"]
    assert launch_report.check_failures(report) == ["a: not captured under Triton 3.6.0"]


def _second_python() -> str:
    python = os.environ.get("FASTSSL_SECOND_PYTHON")
    if not python:
        pytest.skip("set FASTSSL_SECOND_PYTHON to a Python with another Triton (e.g. a venv with triton==3.6.0) "
                    "to run the check under two Tritons")
    probe = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"FASTSSL_SECOND_PYTHON={python} cannot import triton: {probe.stderr[-500:]}")
    return probe.stdout.strip()


@pytest.mark.slow
def test_other_python_compiles_every_launch_under_its_triton(tmp_path):
    other_version = _second_python()
    from test_kernel_compile import _nvidia_backend_available, _run_isolated

    if not _nvidia_backend_available():
        pytest.skip("Triton's NVIDIA backend is not installed")
    import triton

    result = _run_isolated(
        [str(REPO / "benchmarks" / "launch_report.py"), "--case-names", f'["{SMALL_CASE}"]', "--check", "--no-write",
         "--quiet", "--other-python", os.environ["FASTSSL_SECOND_PYTHON"]],
        tmp_path, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("launch check"))
    assert f"Triton {triton.__version__} and {other_version}" in line and line.endswith(": ok"), line
    ours, theirs = line.split("cases, ")[1].split(" launches")[0].split(" + ")
    assert int(ours) > 0 and int(theirs) == int(ours), line  # every launch compiled under both
