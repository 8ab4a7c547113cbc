"""softmax forward and backward: fastllm vs torch eager vs torch.compile (GB/s, see harness.py)."""
import pytest

from harness import params, run_case


@pytest.mark.parametrize("case,impl", params("softmax"))
def test_softmax(benchmark, case, impl):
    run_case(benchmark, case, impl)
