"""fastllm.nn modules: state_dict-compatible with torch's, same outputs."""
import pytest
import torch

import fastllm


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", [
    (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {}),
    (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {"bias": False}),
    (fastllm.nn.LayerNorm, torch.nn.LayerNorm, {"elementwise_affine": False}),
    (fastllm.nn.RMSNorm, torch.nn.RMSNorm, {"eps": 1e-6}),
    (fastllm.nn.RMSNorm, torch.nn.RMSNorm, {}),
])
def test_module_state_dict_and_output(ours_cls, torch_cls, kwargs):
    ref = torch_cls((4, 16), **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-2, 2)
    ours = ours_cls((4, 16), **kwargs)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    ref.load_state_dict(ours.state_dict())
    assert "normalized_shape" in repr(ours) or "(4, 16)" in repr(ours)
