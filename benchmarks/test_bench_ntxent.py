"""NT-Xent (SimCLR), forward + backward: time and memory against the number of samples."""

import pytest

from benchmarks import _harness


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("ntxent"), ids=str)
def test_ntxent(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("ntxent_bank"), ids=str)
def test_ntxent_bank(benchmark, case, impl):
    """MoCo: NTXentLoss with a memory bank (InfoNCE of the queries against the bank)."""
    _harness.run_case(benchmark, case, impl)
