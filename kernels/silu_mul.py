"""Triton silu_mul: y = silu(g) * u = g * sigmoid(g) * u elementwise over (rows, cols), fp32 arithmetic,
rounded once to the inputs' dtype (torch's F.silu(g) * u takes two kernels and rounds twice).

silu(g) = g / (1 + exp(-g)) as torch computes it: for g below about -88, exp(-g) overflows to inf and the quotient
is -0, as in torch (the form g * e / (1 + e) with e = exp(g) would go through subnormal e and lose bits);
g = -inf gives NaN (-inf / inf), as in torch. exp(x) = exp2(x log2(e)) with the rounding error of the product
x log2(e) added back to first order: exp2 would otherwise scale it by |x log2(e)|, 1e-5 relative at |x| = 88.

g, u: (rows, cols), inner stride 1, any row stride (the halves of a fused gate/up projection); y: a new
contiguous (rows, cols) tensor. One program per (row, BLOCK columns), in one grid dimension.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, exact_bf16, to_out

__all__ = ["silu_mul"]

BLOCK = 1024
"""Columns per program: 8 fp32 values per thread at 4 warps, one 16-byte load per input for fp16/bf16."""

_LOG2E = tl.constexpr(1.4426950408889634)
_LOG2E_LO = tl.constexpr(1.92596298909109e-08)  # log2(e) - fp32(log2(e))
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, cols, col_blocks, g_stride, u_stride, y_stride, BLOCK: tl.constexpr,
                     EXACT_BF16: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one grid dimension: a CUDA grid's second holds only 65535 blocks
    row = pid // col_blocks
    offs = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    g = tl.load(g_ptr + row * g_stride + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + offs, mask=mask, other=0.0).to(tl.float32)
    x = -g
    p = x * _LOG2E
    err = tl.fma(x, _LOG2E, -p) + x * _LOG2E_LO  # x log2(e) - p: p's rounding, which exp2 would scale by |p|
    e = tl.exp2(p) * (1.0 + tl.where(tl.abs(p) < 128.0, err, 0.0) * _LN2)  # exp(x), to ~1 ulp
    silu = g / (1.0 + e)
    out = y_ptr + row * y_stride + offs
    tl.store(out, to_out(silu * u, out, EXACT_BF16), mask=mask)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u: (rows, cols) of one float dtype, inner stride 1 -> y (rows, cols) contiguous."""
    rows, cols = g.shape
    y = torch.empty((rows, cols), dtype=g.dtype, device=g.device)
    if rows == 0 or cols == 0:
        return y
    col_blocks = triton.cdiv(cols, BLOCK)
    with device_guard(g):
        _silu_mul_kernel[(rows * col_blocks,)](g, u, y, cols, col_blocks, g.stride(0), u.stride(0), y.stride(0),
                                               BLOCK=BLOCK, EXACT_BF16=exact_bf16(g), num_warps=4)
    return y
