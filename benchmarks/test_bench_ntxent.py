"""NT-Xent (SimCLR), forward + backward: time and memory against the number of samples."""

import pytest

from benchmarks import _harness


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("ntxent"), ids=str)
def test_ntxent(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
