"""Barlow Twins and VICReg, forward + backward: time and memory against d (N fixed) and at
DESIGN §5's N = 256 / 2048, d = 8192."""

import pytest

from benchmarks import _harness


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("barlow_twins"), ids=str)
def test_barlow_twins(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("vicreg"), ids=str)
def test_vicreg(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
