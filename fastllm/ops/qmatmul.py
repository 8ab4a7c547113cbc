"""fastllm.qmatmul: y = x @ W^T + bias with W a QuantizedWeight (weight-only quantisation).

Activation modes (act=):
  "float" (default): x is used as it is; the result matches x @ dequantize(W)^T + bias computed in
      float32 up to float32 accumulation error, whichever backend runs. The default, because the
      answer then does not depend on the backend or on M.
  "int8": each row of x is quantised per block of 32 along K (dx = max|x| / 127, round half to
      even) and the block dot products are integer (llama.cpp's CPU scheme): faster on the CPU, at
      the cost of the activations' quantisation error (about 0.4% of each block's max |x|).
Backends: the C++ CPU kernels (AVX-512 VNNI or AVX2/FMA chosen at run time, OpenMP) for
float32/float16/bfloat16 x on the CPU (bfloat16 x with int4 weights: AVX512_BF16 dot products where the CPU has
them, exact products summed in float32, as accurate as the float32 path on the same bfloat16 inputs; one row of
float32 x with int4 weights exact in float32 (formats.int4_exact, nearly every real weight) on AVX-512 VNNI: integer
dot products of the weights with x written as five int8 digits per element, an error within 2^-34 of each block's
largest |x|, for blocks whose largest |x| is at most 2^10 times the mean of the others); on CUDA, for act="float",
the GEMV kernel
(csrc/cuda/qmatmul_gemv.cu) for at most CUDA_GEMV_MAX_M rows of x and the Triton GEMM
(kernels/qmatmul.py: dequantisation in the K loop, tensor cores for float16/bfloat16) for more rows, or
for any M when the extension lacks CUDA; anything else (act="int8" on CUDA, float64) runs the pure-torch
reference, dequantise-then-matmul (the dispatch log records why). Output in x's dtype, float32
accumulation.
Autograd: dx = dy @ dequantize(W) (the int8 mode passes the gradient straight through its
activation rounding), dbias = sum of dy; the packed weight gets no gradient.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import reference
from .._dispatch import select
from ..quant.formats import Format, dequantize, int4_exact
from ..quant.quantize import QuantizedWeight
from ..reference.qmatmul import ACT_MODES
from ._common import (as_rows, call_op, check_same_device, check_tensor, code, dense, kernels, new_output, ptr,
                      run_c)


CUDA_GEMV_MAX_M = 8
"""Rows of x the CUDA GEMV takes (fastllm._C.cuda_qmatmul_max_m; the weight is read once for all)."""


def _limits(m: int, act: str, data: torch.Tensor) -> dict[str, str | None]:
    """Why the CUDA GEMV and the Triton GEMM cannot take this call (None: they can)."""
    if act != "float":
        reason = f"act={act!r} has no GPU kernel"
        return {"cuda": reason, "triton": reason}
    if m > CUDA_GEMV_MAX_M:
        cuda = f"M = {m} rows > {CUDA_GEMV_MAX_M}: the GEMV takes few rows (the Triton GEMM takes more)"
    elif data.data_ptr() % 16:
        cuda = "qweight.data is not 16-byte aligned (the kernel reads it with 128-bit loads)"
    else:
        cuda = None
    return {"cuda": cuda, "triton": None}


@functools.lru_cache(maxsize=None)
def _format(scheme: str, group_size: int) -> Format:
    return Format(scheme, group_size or None)


_EXACT = WeakIdKeyDictionary()
"""scales tensor -> ((versions and addresses of scales and mins), formats.int4_exact(scales, mins))"""


def _exact(scales: torch.Tensor, mins: Optional[torch.Tensor], fmt: Format) -> bool:
    """formats.int4_exact for an int4 weight's scales and mins (False for int8), remembered per scales tensor until
    it or mins is written to, as their version counters tell. Writes that bypass the counters go unnoticed: through
    .data or .numpy(), or to an inference tensor (which has none) inside inference mode. So does a write after a CPU
    graph recorded the call with the flag. The CPU kernel then factors out scales that may round: errors of the
    order of float32 rounding, or another mix of inf and NaN in a non-finite row."""
    if fmt.bits != 4:
        return False
    key = tuple(None if t is None or t.is_inference() else t._version for t in (scales, mins))
    key += (scales.data_ptr(), None if mins is None else mins.data_ptr())
    seen = _EXACT.get(scales)
    if seen is None or seen[0] != key:
        seen = _EXACT[scales] = (key, int4_exact(scales, mins))
    return seen[1]


@torch.library.custom_op("fastllm::qmatmul", mutates_args=())
def _qmatmul(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], scheme: str, group_size: int, act: str) -> torch.Tensor:
    """x: (..., K); data/scales/mins: a packed (N, K) weight (group_size 0: per-channel) -> (..., N)."""
    fmt = _format(scheme, group_size)
    x2 = as_rows(x)
    bias = dense(bias)  # (held until the kernels return)
    m, k = x2.shape
    n = data.shape[0]
    out_shape = None if x.dim() == 2 else (*x.shape[:-1], n)  # None: y is the answer as it is
    backend = select("qmatmul", x, bias, limits=_limits(m, act, data)) if m else "torch"
    if backend == "torch":
        y = reference.qmatmul_fwd(x2, data, scales, mins, bias, fmt, act)
        return y if out_shape is None else y.view(out_shape)
    y = new_output((m, n), x.dtype, x.device)
    if backend == "triton":
        kernels().qmatmul.qmatmul(x2, data, scales, mins, bias, fmt.code, fmt.group(k), y)
        return y if out_shape is None else y.view(out_shape)
    # the CUDA kernel has the float mode only; the CPU's float mode at M = 1 factors exact int4 scales out
    mode = (act == "int8", m == 1 and act == "float" and _exact(scales, mins, fmt)) if backend == "cpu" else ()
    run_c(backend, "qmatmul", x.device, ptr(x2), x2.stride(0), ptr(data), ptr(scales), ptr(mins), ptr(bias), ptr(y),
          y.stride(0), m, n, k, fmt.group(k), fmt.code, *mode, code(x))
    return y if out_shape is None else y.view(out_shape)


@_qmatmul.register_fake
def _(x, data, scales, mins, bias, scheme, group_size, act):
    return x.new_empty(*x.shape[:-1], data.shape[0])


def _setup(ctx, inputs, output):
    x, data, scales, mins, bias, scheme, group_size, _ = inputs
    ctx.save_for_backward(data, scales, mins)
    ctx.fmt = _format(scheme, group_size)
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None


def _backward(ctx, dy):
    data, scales, mins = ctx.saved_tensors
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dx = (dy.to(acc) @ dequantize(data, scales, mins, ctx.fmt, acc)).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, None, None, None, dbias, None, None, None


_qmatmul.register_autograd(_backward, setup_context=_setup)


def qmatmul(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None, *,
            act: str = "float") -> torch.Tensor:
    """y = x @ W^T + bias with W = qweight (out_features N, in_features K), as F.linear.

    x: (..., K) float tensor on qweight's device; bias: (N,) with x's dtype, or None;
    act: "float" (default, exact weights) or "int8" (int8-quantised activations, see the module
    docstring). Returns (..., N) in x's dtype; differentiable in x and bias.
    """
    check_tensor("x", x)
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastllm.QuantizedWeight (see fastllm.quantize), got {type(qweight).__name__}")
    qweight.validate(values=False)
    n, k = qweight.shape
    if bias is not None:
        check_tensor("bias", bias)
        check_same_device("bias", bias, "x", x)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},) (qweight.out_features), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if act not in ACT_MODES:
        raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
    return qmatmul_prechecked(x, qweight, bias, act)


def qmatmul_prechecked(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """qmatmul for a caller whose qweight, bias and act passed the checks already (fastllm.nn.QuantLinear, which
    validated its weight when it built it): x alone is checked, once per call, cheaply."""
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    k = qweight.shape[1]
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) (qweight.in_features), got {tuple(x.shape)}")
    if x.device != qweight.data.device:
        raise ValueError(f"qweight is on {qweight.data.device} but x is on {x.device}; they must be on the same device")
    return call_op(_qmatmul, x, qweight.data, qweight.scales, qweight.mins, bias, qweight.scheme,
                   qweight.group_size or 0, act)
