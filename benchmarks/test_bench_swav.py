"""SwAV: the swapped-prediction loss over two high-resolution crops (forward + backward) and the
Sinkhorn-Knopp codes alone (forward only: the codes carry no gradient)."""

import pytest

from benchmarks import _harness


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("swav"), ids=str)
def test_swav(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("sinkhorn"), ids=str)
def test_sinkhorn(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("swav_multicrop"), ids=str)
def test_swav_multicrop(benchmark, case, impl):
    """SwAV as trained: 2 high-resolution crops (codes) and small crops (predictions only)."""
    _harness.run_case(benchmark, case, impl)
