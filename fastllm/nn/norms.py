"""LayerNorm and RMSNorm modules: torch.nn's own parameters, initialisation and state_dict names
(weight, bias), with the forward pass on fastllm's kernels."""
import torch

from ..ops import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm whose forward runs fastllm.layer_norm. x: (..., *normalized_shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm whose forward runs fastllm.rms_norm. x: (..., *normalized_shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)
