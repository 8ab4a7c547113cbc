"""Quantised matmul references. x: (M, K); packed weight (data, scales, mins) of shape (N, K) in a
fastllm format (fastllm/quant/formats.py); bias: (N,) or None; y: (M, N) in x's dtype.

act="float":  y = x @ dequantize(W)^T + bias in float32 (the weight dequantised exactly).
act="int8":   the activations are first quantised per block of 32 along K exactly as the CPU
              kernels do it (quantize_activations), then the same math on the dequantised blocks.
"""
import torch

from ..quant.formats import BLOCK, Format, dequantize
from ._util import acc_dtype

ACT_MODES = ("float", "int8")


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K), K a multiple of 32 -> (qx int8 (M, K), dx float32 (M, K // 32)), per block of 32:
    a = max |x| (in float32), dx = a / 127, qx = round_half_even(x * (127 / a)) (0 when a = 0).
    The kernels use the same float32 operations and rounding, so qx and dx are bit-identical. A block
    holding NaN or inf gets qx = 0 and dx = NaN (the outputs it reaches are NaN)."""
    m, k = x.shape
    xb = x.to(torch.float32).view(m, k // BLOCK, BLOCK)
    finite = torch.isfinite(xb).all(-1)
    xb = torch.where(finite[..., None], xb, torch.zeros_like(xb))
    a = xb.abs().amax(-1)
    inv = torch.where(a == 0, torch.zeros_like(a), torch.full_like(a, 127.0) / a)  # (127.0 / a: reciprocal * 127)
    qx = torch.round(xb * inv[..., None]).to(torch.int8).view(m, k)
    return qx, torch.where(finite, a / 127, torch.full_like(a, float("nan")))


def dequantize_activations(qx: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    m, k = qx.shape
    return (qx.view(m, k // BLOCK, BLOCK).to(torch.float32) * dx[..., None]).view(m, k)


def qmatmul_fwd(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                bias: torch.Tensor | None, fmt: Format, act: str = "float") -> torch.Tensor:
    """y = act(x) @ dequantize(W)^T + bias, accumulated in float32 (float64 stays float64)."""
    a = acc_dtype(x.dtype)
    w = dequantize(data, scales, mins, fmt).to(a)
    xa = dequantize_activations(*quantize_activations(x)).to(a) if act == "int8" else x.to(a)
    y = xa @ w.t()
    if bias is not None:
        y = y + bias.to(a)
    return y.to(x.dtype)
