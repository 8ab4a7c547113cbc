"""fastllm.layer_norm: the semantics of torch.nn.functional.layer_norm.

y = (x - mean) * rstd * weight + bias over the trailing `normalized_shape` dimensions, biased
variance, rstd = 1 / sqrt(var + eps); fp32 statistics. Backends: C++/CUDA (CUDA tensors), C++ (CPU
tensors), torch reference (other dtypes, mixed parameter dtypes, other devices, empty inputs).
The kernels see (rows, cols) with cols = prod(normalized_shape).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from .._dispatch import select
from ._common import (as_rows, call_op, check_normalized_shape, check_param, check_tensor, code, cuda_workspace, dense,
                      new_output, new_output_like, ptr, run_c, stat_dtype)


def _layer_norm(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float, stats: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y: x.shape, mean: (rows,), rstd: (rows,)); with stats=False (nothing will differentiate y) the kernels
    skip the statistics, which are then None."""
    x2 = as_rows(x, len(normalized_shape))
    backend = select("layer_norm", x, weight, bias) if x.numel() else "torch"
    if backend == "torch":
        w, b = (None if p is None else p.reshape(-1) for p in (weight, bias))
        y, mean, rstd = reference.layer_norm_fwd(x2, w, b, eps)
        return y.view(x.shape), mean, rstd
    rows, cols = x2.shape
    y = new_output_like(x)
    mean = rstd = None
    if stats:
        mean, rstd = x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)
    w, b = dense(weight), dense(bias)  # (held until the kernel returns: they may be copies)
    run_c(backend, "layer_norm_fwd", x.device, ptr(x2), x2.stride(0), ptr(w), ptr(b), ptr(y), cols, ptr(mean),
          ptr(rstd), rows, cols, eps, code(x))
    return y, mean, rstd


def _layer_norm_y(x, normalized_shape, weight, bias, eps):
    return _layer_norm(x, normalized_shape, weight, bias, eps, stats=False)


@torch.library.custom_op("fastllm::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, normalized_shape: list[int], weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y: x.shape, mean: (rows,), rstd: (rows,))."""
    return _layer_norm(x, normalized_shape, weight, bias, eps)


@_layer_norm_fwd.register_fake
def _(x, normalized_shape, weight, bias, eps):
    rows = math.prod(x.shape[:x.dim() - len(normalized_shape)])
    stats = x.new_empty(rows, dtype=stat_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("fastllm::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                    rstd: torch.Tensor, normalized_shape: list[int], need_dweight: bool,
                    need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx: x.shape, dweight: normalized_shape or (0,), dbias: normalized_shape or (0,))."""
    k = len(normalized_shape)
    dy2, x2, w = as_rows(dy, k), as_rows(x, k), None if weight is None else dense(weight).view(-1)
    backend = select("layer_norm", x, weight) if x.numel() else "torch"
    if backend == "torch":
        dx, dw, db = reference.layer_norm_bwd(dy2, x2, w, mean, rstd)
    else:
        rows, cols = x2.shape
        dx = new_output((rows, cols), x.dtype, x.device)
        dw = torch.empty(cols, dtype=torch.float32, device=x.device) if need_dweight else None
        db = torch.empty(cols, dtype=torch.float32, device=x.device) if need_dbias else None
        args = (ptr(dy2), dy2.stride(0), ptr(x2), x2.stride(0), ptr(w), ptr(mean), ptr(rstd), ptr(dx), dx.stride(0),
                ptr(dw), ptr(db))
        if backend == "cuda":
            ws = cuda_workspace(rows, cols, x.device) if (need_dweight or need_dbias) else None
            args = args + (ptr(ws),)
        run_c(backend, "layer_norm_bwd", x.device, *args, rows, cols, code(x))
    pdtype = weight.dtype if weight is not None else x.dtype
    dw = dw.view(normalized_shape).to(pdtype) if need_dweight else x.new_empty(0)
    db = db.view(normalized_shape).to(pdtype) if need_dbias else x.new_empty(0)
    return dx.view(x.shape), dw, db


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, normalized_shape, need_dweight, need_dbias):
    pdtype = weight.dtype if weight is not None else x.dtype
    dw = x.new_empty(normalized_shape, dtype=pdtype) if need_dweight else x.new_empty(0)
    db = x.new_empty(normalized_shape, dtype=pdtype) if need_dbias else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, db


def _setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.normalized_shape = normalized_shape
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    need_db = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dw, db = call_op(_layer_norm_bwd, dy, x, weight, mean, rstd, ctx.normalized_shape, need_dw, need_db)
    return dx, None, dw if need_dw else None, db if need_db else None, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup)


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the trailing dims, as torch.nn.functional.layer_norm.

    x: (..., *normalized_shape), float32/float16/bfloat16 (other float dtypes run the reference);
    weight, bias: normalized_shape or None. Returns y with x's shape and dtype; differentiable in
    x, weight and bias.
    """
    check_tensor("x", x)
    ns = check_normalized_shape(normalized_shape, x)
    check_param("weight", weight, x, ns)
    check_param("bias", bias, x, ns)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return call_op(_layer_norm_fwd, x, ns, weight, bias, float(eps), direct=_layer_norm_y)[0]
