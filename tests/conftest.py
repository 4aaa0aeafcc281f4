"""Shared test set-up.

Triton decides at decoration time whether a kernel is compiled or interpreted, so
``TRITON_INTERPRET=1`` must be set before any ``fastssl.kernels`` module is imported. Without
CUDA we set it here: the Triton tests then run on CPU tensors through the interpreter. With CUDA
the kernels compile, the CPU-interpreter parametrizations are skipped and the ``gpu`` ones run.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep the test-suite independent of the user's environment.
os.environ.pop("FASTSSL_BACKEND", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per skipped lane instead of one line per skipped test."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    hints = {
        "needs a CUDA device": "the gpu lane: run `python -m pytest -m gpu` on a CUDA machine",
        "lightly": "the lightly comparisons: `pip install --no-deps lightly==1.6.0`",
    }
    terminalreporter.section("skipped lanes", sep="-")
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        hint = next((text for key, text in hints.items() if key in reason), "")
        terminalreporter.write_line(f"{count:5d} skipped: {reason}" + (f"  ({hint})" if hint else ""))
