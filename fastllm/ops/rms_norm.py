"""fastllm.rms_norm and fastllm.add_rms_norm: the semantics of torch.nn.functional.rms_norm, and
the fused residual form used between Transformer blocks.

y = x * rstd * weight over the trailing `normalized_shape` dims, rstd = 1 / sqrt(mean(x^2) + eps),
eps defaulting to torch.finfo(x.dtype).eps; fp32 statistics. add_rms_norm: s = x + residual (in x's
dtype), y = rms_norm(s); returns (y, s). Backends as for layer_norm.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from .._dispatch import select
from ._common import (as_rows, call_op, check_like, check_normalized_shape, check_param, check_tensor, code,
                      cuda_workspace, dense, new_output, new_output_like, ptr, run_c, stat_dtype)


def _stats_like(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.new_empty(math.prod(x.shape[:x.dim() - k]), dtype=stat_dtype(x.dtype))


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- forward ops -------------------------------------------------------------------------------
def _rms_norm(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None, eps: float,
              stats: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y: x.shape, rstd: (rows,)); rstd is None with stats=False (nothing will differentiate y)."""
    x2 = as_rows(x, len(normalized_shape))
    backend = select("rms_norm", x, weight) if x.numel() else "torch"
    if backend == "torch":
        y, rstd = reference.rms_norm_fwd(x2, None if weight is None else weight.reshape(-1), eps)
        return y.view(x.shape), rstd
    rows, cols = x2.shape
    y = new_output_like(x)
    rstd = x.new_empty(rows, dtype=torch.float32) if stats else None
    w = dense(weight)  # (held until the kernel returns: it may be a copy)
    run_c(backend, "rms_norm_fwd", x.device, ptr(x2), x2.stride(0), ptr(w), ptr(y), cols, ptr(rstd), rows, cols, eps,
          code(x))
    return y, rstd


def _rms_norm_y(x, normalized_shape, weight, eps):
    return _rms_norm(x, normalized_shape, weight, eps, stats=False)


@torch.library.custom_op("fastllm::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, normalized_shape: list[int], weight: Optional[torch.Tensor],
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y: x.shape, rstd: (rows,))."""
    return _rms_norm(x, normalized_shape, weight, eps)


@_rms_norm_fwd.register_fake
def _(x, normalized_shape, weight, eps):
    return _dense_like(x), _stats_like(x, len(normalized_shape))


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                  stats: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(y: x.shape, s = x + residual: x.shape, rstd: (rows,)); rstd is None with stats=False."""
    x2, r2 = as_rows(x), as_rows(residual)
    backend = select("rms_norm", x, residual, weight) if x.numel() else "torch"
    if backend == "torch":
        y, s, rstd = reference.add_rms_norm_fwd(x2, r2, weight, eps)
        return y.view(x.shape), s.view(x.shape), rstd
    rows, cols = x2.shape
    y, s = new_output_like(x), new_output_like(x)
    rstd = x.new_empty(rows, dtype=torch.float32) if stats else None
    w = dense(weight)  # (held until the kernel returns: it may be a copy)
    run_c(backend, "add_rms_norm_fwd", x.device, ptr(x2), x2.stride(0), ptr(r2), r2.stride(0), ptr(s), cols, ptr(w),
          ptr(y), cols, ptr(rstd), rows, cols, eps, code(x))
    return y, s, rstd


def _add_rms_norm_ys(x, residual, weight, eps):
    return _add_rms_norm(x, residual, weight, eps, stats=False)


@torch.library.custom_op("fastllm::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalises over the last dim. Returns (y: x.shape, s = x + residual: x.shape, rstd: (rows,))."""
    return _add_rms_norm(x, residual, weight, eps)


@_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps):
    return _dense_like(x), _dense_like(x), _stats_like(x, 1)


# ---- backward op -------------------------------------------------------------------------------
@torch.library.custom_op("fastllm::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                  dextra: Optional[torch.Tensor], normalized_shape: list[int],
                  need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx: x.shape (plus dextra when given), dweight: normalized_shape or (0,))."""
    k = len(normalized_shape)
    dy2, x2 = as_rows(dy, k), as_rows(x, k)
    de2 = None if dextra is None else as_rows(dextra, k)
    w = None if weight is None else dense(weight).view(-1)
    backend = select("rms_norm", x, weight) if x.numel() else "torch"
    if backend == "torch":
        dx, dw = reference.rms_norm_bwd(dy2, x2, w, rstd, de2)
    else:
        rows, cols = x2.shape
        dx = new_output((rows, cols), x.dtype, x.device)
        dw = torch.empty(cols, dtype=torch.float32, device=x.device) if need_dweight else None
        args = (ptr(dy2), dy2.stride(0), ptr(x2), x2.stride(0), ptr(w), ptr(rstd), ptr(de2),
                0 if de2 is None else de2.stride(0), ptr(dx), dx.stride(0), ptr(dw))
        if backend == "cuda":
            ws = cuda_workspace(rows, cols, x.device) if need_dweight else None  # (held until the launch)
            args = args + (ptr(ws),)
        run_c(backend, "rms_norm_bwd", x.device, *args, rows, cols, code(x))
    pdtype = weight.dtype if weight is not None else x.dtype
    dw = dw.view(normalized_shape).to(pdtype) if need_dweight else x.new_empty(0)
    return dx.view(x.shape), dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, dextra, normalized_shape, need_dweight):
    pdtype = weight.dtype if weight is not None else x.dtype
    return _dense_like(x), x.new_empty(normalized_shape, dtype=pdtype) if need_dweight else x.new_empty(0)


# ---- autograd ----------------------------------------------------------------------------------
def _rms_setup(ctx, inputs, output):
    x, normalized_shape, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.normalized_shape = normalized_shape


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    dx, dw = call_op(_rms_norm_bwd, dy, x, weight, rstd, None, ctx.normalized_shape, need_dw)
    return dx, None, dw if need_dw else None, None


_rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def _add_setup(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, s, rstd = output
    ctx.save_for_backward(s, weight, rstd)


def _add_backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    dsum, dw = call_op(_rms_norm_bwd, dy, s, weight, rstd, ds, [s.shape[-1]], need_dw)
    return dsum, dsum, dw if need_dw else None, None


_add_rms_norm_fwd.register_autograd(_add_backward, setup_context=_add_setup)


# ---- public functions --------------------------------------------------------------------------
def _resolve_eps(eps, x: torch.Tensor) -> float:
    if eps is None:
        return float(torch.finfo(x.dtype).eps)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number or None, got {eps!r}")
    return float(eps)


def rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """RMSNorm over the trailing dims, as torch.nn.functional.rms_norm.

    x: (..., *normalized_shape), float32/float16/bfloat16 (other float dtypes run the reference);
    weight: normalized_shape or None; eps: None means torch.finfo(x.dtype).eps.
    Returns y with x's shape and dtype; differentiable in x and weight.
    """
    check_tensor("x", x)
    ns = check_normalized_shape(normalized_shape, x)
    check_param("weight", weight, x, ns)
    return call_op(_rms_norm_fwd, x, ns, weight, _resolve_eps(eps, x), direct=_rms_norm_y)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                 eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm over the last dim: s = x + residual; returns (rms_norm(s), s).

    x, residual: (..., D), same shape, dtype and device; weight: (D,) or None.
    Both outputs are differentiable (the gradient of s flows to x and residual).
    """
    check_tensor("x", x)
    check_like("residual", residual, "x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    check_param("weight", weight, x, [x.shape[-1]])
    y, s, _ = call_op(_add_rms_norm_fwd, x, residual, weight, _resolve_eps(eps, x), direct=_add_rms_norm_ys)
    return y, s
