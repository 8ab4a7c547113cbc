"""layer_norm forward and backward: fastllm vs torch eager vs torch.compile (GB/s, see harness.py)."""
import pytest

from harness import params, run_case


@pytest.mark.parametrize("case,impl", params("layer_norm"))
def test_layer_norm(benchmark, case, impl):
    run_case(benchmark, case, impl)
