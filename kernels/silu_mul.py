"""Triton silu_mul: y = silu(g) * u = g * sigmoid(g) * u elementwise over (rows, cols), fp32 arithmetic,
rounded once to the inputs' dtype (torch's F.silu(g) * u takes two kernels and rounds twice).

silu(g) = g / (1 + exp(-g)) as torch computes it, with the functions its CUDA kernel calls: CUDA's expf (libdevice;
tl.exp would be ex2.approx of x log2(e), whose rounding exp2 scales by |x log2(e)|) and a correctly rounded
division (div_rn; `/` would compile to the approximate div.full). For g below about -88, exp(-g) overflows to inf
and the quotient is -0, as in torch (the form g * e / (1 + e) with e = exp(g) would go through subnormal e and lose
bits); g = -inf gives NaN (-inf / inf), as in torch. Under the interpreter (no libdevice) exp is numpy's.

g, u: (rows, cols), inner stride 1, any row stride (the halves of a fused gate/up projection); y: a new
contiguous (rows, cols) tensor. One program per (row, BLOCK columns), in one grid dimension.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton.language.extra import libdevice

from ._common import device_guard, exact_bf16, interpreting, to_out

__all__ = ["silu_mul"]

BLOCK = 1024
"""Columns per program: 8 fp32 values per thread at 4 warps, one 16-byte load per input for fp16/bf16."""


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, cols, col_blocks, g_stride, u_stride, y_stride, BLOCK: tl.constexpr,
                     EXACT_BF16: tl.constexpr, LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one grid dimension: a CUDA grid's second holds only 65535 blocks
    row = pid // col_blocks
    offs = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    g = tl.load(g_ptr + row * g_stride + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if LIBDEVICE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    silu = tl.math.div_rn(g, 1.0 + e)
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
                                               BLOCK=BLOCK, EXACT_BF16=exact_bf16(g), LIBDEVICE=not interpreting(g),
                                               num_warps=4)
    return y
