"""fastllm.softmax: y = exp(x - max) / sum(exp(x - max)) along `dim`, fp32 accumulation.

Backends: Triton (CUDA; CPU under TRITON_INTERPRET=1 when forced), C++ (CPU), torch reference.
The kernels see (rows, cols) with cols = x.shape[dim]: `dim` is moved last (a copy unless it
already is last), and the result keeps x's dimension order.
"""
from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from ._common import as_rows, call_op, check_tensor, code, kernels, new_output_like, ptr, run_c


def _last_dim_fwd(x: torch.Tensor) -> torch.Tensor:
    """softmax along x's last dim, as a contiguous tensor of x's shape."""
    x2 = as_rows(x)
    backend = select("softmax", x)
    if backend == "triton":
        return kernels().softmax.softmax_fwd(x2).view_as(x)
    if backend == "cpu":
        y = new_output_like(x)
        rows, cols = x2.shape
        run_c(backend, "softmax_fwd", x.device, ptr(x2), x2.stride(0), ptr(y), cols, rows, cols, code(x))
        return y
    return reference.softmax_fwd(x2).view_as(x)


def _last_dim_bwd(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The gradient of softmax along the last dim, as a contiguous tensor of y's shape."""
    y2, dy2 = as_rows(y), as_rows(dy)
    backend = select("softmax", y)
    if backend == "triton":
        return kernels().softmax.softmax_bwd(y2, dy2).view_as(y)
    if backend == "cpu":
        dx = new_output_like(y)
        rows, cols = y2.shape
        run_c(backend, "softmax_bwd", y.device, ptr(y2), y2.stride(0), ptr(dy2), dy2.stride(0), ptr(dx), cols,
              rows, cols, code(y))
        return dx
    return reference.softmax_bwd(y2, dy2).view_as(y)


def _empty_like_result(x: torch.Tensor, dim: int) -> torch.Tensor:
    """An uninitialised tensor laid out as the op returns it: contiguous with `dim` last, viewed back."""
    moved = x.movedim(dim, -1)
    return torch.empty(moved.shape, dtype=x.dtype, device=x.device).movedim(-1, dim)


@torch.library.custom_op("fastllm::softmax", mutates_args=())
def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.numel() == 0:
        return _empty_like_result(x, dim)
    if dim == x.dim() - 1:
        return _last_dim_fwd(x)
    return _last_dim_fwd(x.movedim(dim, -1)).movedim(-1, dim)


@_softmax.register_fake
def _(x, dim):
    return _empty_like_result(x, dim)


@torch.library.custom_op("fastllm::softmax_backward", mutates_args=())
def _softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    if y.numel() == 0:
        return _empty_like_result(y, dim)
    if dim == y.dim() - 1:
        return _last_dim_bwd(y, dy)
    return _last_dim_bwd(y.movedim(dim, -1), dy.movedim(dim, -1)).movedim(-1, dim)


@_softmax_backward.register_fake
def _(y, dy, dim):
    return _empty_like_result(y, dim)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.dim = inputs[1]


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return call_op(_softmax_backward, y, grad, ctx.dim), None


_softmax.register_autograd(_backward, setup_context=_setup)


def softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax of `x` along `dim` (any dimension, any size), as torch.softmax.

    x: float32, float16 or bfloat16 tensor of any shape (float64 runs the torch reference).
    dtype: if given, x is cast to it first (as torch.softmax's dtype argument).
    Returns a tensor of x's shape and dtype; differentiable.
    """
    check_tensor("x", x)
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        x = x.to(dtype)
    if not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for input of shape {tuple(x.shape)}, got {dim}")
    if x.dim() == 0:
        return call_op(_softmax, x.reshape(1), 0).reshape(())
    return call_op(_softmax, x, dim % ndim)
