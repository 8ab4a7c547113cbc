"""SwiGLU's gate: y = silu(g) * u = g * sigmoid(g) * u, elementwise. g, u, y: (rows, cols)."""
import torch

from ._util import acc_dtype


def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    a = acc_dtype(gate.dtype)
    return (torch.nn.functional.silu(gate.to(a)) * up.to(a)).to(gate.dtype)


def silu_mul_bwd(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d gate = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))), d up = dy * silu(g)."""
    a = acc_dtype(gate.dtype)
    g, u, d = gate.to(a), up.to(a), dy.to(a)
    sig = torch.sigmoid(g)
    return (d * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (d * g * sig).to(up.dtype)
