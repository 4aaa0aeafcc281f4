"""pytest set-up of the benchmark suite (``python -m pytest benchmarks --benchmark-only``).

* The repository's ``addopts`` disable pytest-benchmark for the unit-test run; ``--benchmark-only``
  (or ``--benchmark-enable``) on the command line turns the benchmarks back on.
* ``machine_info`` of the results gets the GPU name, commit, library versions, date and the
  rates measured for the roofline floors; the results JSON gets the rows that were skipped.
"""

import gc
import os

import pytest
import torch

from benchmarks import _harness

# The benchmarks pick each backend explicitly; an inherited FASTSSL_BACKEND must not matter.
os.environ.pop("FASTSSL_BACKEND", None)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pyproject's addopts carry --benchmark-disable, and pytest-benchmark refuses that together
    # with --benchmark-only; asking for only the benchmarks means running them.
    if config.getoption("benchmark_only", False) and config.getoption("benchmark_disable", False):
        config.option.benchmark_disable = False


def pytest_sessionstart(session):
    _harness.note_session_start()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(_harness.machine_info())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_harness.SKIPPED)


@pytest.fixture(autouse=True)
def _seed_and_free():
    torch.manual_seed(0)
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
