"""Softmax over the last dimension. x, y, dy: (rows, cols)."""
import torch

from ._util import acc_dtype


def softmax_fwd(x: torch.Tensor) -> torch.Tensor:
    """y = exp(x - max_j x) / sum_j exp(x - max_j x)."""
    return torch.softmax(x.to(acc_dtype(x.dtype)), dim=-1).to(x.dtype)


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx = y * (dy - sum_j dy * y)."""
    a = acc_dtype(y.dtype)
    yf, dyf = y.to(a), dy.to(a)
    return (yf * (dyf - (dyf * yf).sum(-1, keepdim=True))).to(y.dtype)
