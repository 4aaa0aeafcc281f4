"""DINO, forward + backward: 2 teacher views against ``views`` student views of (b, k) logits."""

import pytest

from benchmarks import _harness


@pytest.mark.parametrize("impl", _harness.impls())
@pytest.mark.parametrize("case", _harness.cases("dino"), ids=str)
def test_dino(benchmark, case, impl):
    _harness.run_case(benchmark, case, impl)
