"""W-MSE, forward + backward: Cholesky whitening of ``sub_batches`` sub-batches of ``w_size``
rows per view (two views), then the normalized MSE."""

import pytest

from benchmarks import _harness


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("wmse"), ids=str)
def test_wmse(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
