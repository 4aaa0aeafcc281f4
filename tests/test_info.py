"""``python -m fastssl.info``: environment report, dispatch explanations, --check table."""

from __future__ import annotations

import io
import subprocess
import sys

import torch

from fastssl import info


def test_dispatch_is_explained_for_every_family_on_cpu():
    for family in info.FAMILIES:
        chosen, why = info.explain_auto(family, torch.device("cpu"))
        assert chosen == "torch" and why


def test_check_passes_on_cpu_in_float32_and_lists_every_backend():
    out = io.StringIO()
    failures = info.check([torch.device("cpu")], [torch.float32], out=out)
    table = out.getvalue()
    assert failures == 0, table
    for case in info._cases():
        assert f"{case.name:28s} cpu    float32   reference" in table
        assert f"{case.name:28s} cpu    float32   torch" in table
    assert "triton" in table  # the interpreter lane runs the kernels on CPU


def test_check_reports_a_wrong_backend(monkeypatch):
    real = info._cases

    def broken_cases():
        cases = real()[:1]
        case = cases[0]
        wrong = info.Case(case.name, case.family, case.make,
                          lambda x, b: case.run(x, b) * (1.0 if b == "reference" else 1.01))
        return [wrong]

    monkeypatch.setattr(info, "_cases", broken_cases)
    out = io.StringIO()
    assert info.check([torch.device("cpu")], [torch.float32], out=out) == 2  # torch and triton
    assert out.getvalue().count("FAIL") == 2


def test_command_line_prints_versions_and_dispatch():
    result = subprocess.run([sys.executable, "-m", "fastssl.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"torch                {torch.__version__}" in result.stdout
    assert "ntxent" in result.stdout and "-> torch" in result.stdout
