"""fastllm.linear_cross_entropy: F.cross_entropy(F.linear(input, weight), target) without the logits.

A language-model head's loss: input (..., D) hidden states, weight (V, D) the output embedding, target (...)
token ids. Neither backend forms the (tokens x V) logits: the Triton kernels (CUDA; CPU under
TRITON_INTERPRET=1 when forced) keep one [tokens, vocab] tile at a time with an online log-sum-exp, and the
torch backend (CPU) works through chunks of tokens. The custom ops see the flattened (N, D) / (N,) views and
return the per-token loss (0 at ignored tokens) and the row statistics (m, r) of its log-sum-exp m + r
(kernels/linear_cross_entropy.py says why a pair), float32 (float64 for float64 inputs); the reduction happens outside them, so autograd hands the backward op each token's gradient.
"""
from __future__ import annotations

import numbers

import torch

from .._dispatch import select
from ..reference import linear_cross_entropy as _ref
from ..reference._util import acc_dtype
from ._common import call_op, check_same_device, check_tensor, kernels

_REDUCTIONS = ("mean", "sum", "none")


def _row_outputs(h: torch.Tensor):
    a = acc_dtype(h.dtype)
    return (torch.empty(h.shape[0], dtype=a, device=h.device), torch.empty((2, h.shape[0]), dtype=a, device=h.device))


@torch.library.custom_op("fastllm::linear_cross_entropy", mutates_args=())
def _lce(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,
         smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    if select("linear_cross_entropy", h, w) == "triton":
        return kernels().linear_cross_entropy.lce_fwd(h, w, targets, ignore_index, smoothing)
    return _ref.linear_cross_entropy_fwd(h, w, targets, ignore_index, smoothing)


@_lce.register_fake
def _(h, w, targets, ignore_index, smoothing):
    return _row_outputs(h)


@torch.library.custom_op("fastllm::linear_cross_entropy_backward", mutates_args=())
def _lce_backward(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                  ignore_index: int, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    if select("linear_cross_entropy", h, w) == "triton":
        return kernels().linear_cross_entropy.lce_bwd(g.float(), h, w, targets, stats, ignore_index, smoothing)
    return _ref.linear_cross_entropy_bwd(g, h, w, targets, stats, ignore_index, smoothing)


@_lce_backward.register_fake
def _(g, h, w, targets, stats, ignore_index, smoothing):
    return torch.empty_like(h), torch.empty_like(w)


def _setup(ctx, inputs, output):
    h, w, targets, ignore_index, smoothing = inputs
    ctx.save_for_backward(h, w, targets, output[1])
    ctx.flags = (ignore_index, smoothing)


def _backward(ctx, g_loss, g_stats):
    h, w, targets, stats = ctx.saved_tensors
    if g_loss is None:
        return None, None, None, None, None
    dh, dw = call_op(_lce_backward, g_loss.contiguous(), h, w, targets, stats, *ctx.flags)
    return dh, dw, None, None, None


_lce.register_autograd(_backward, setup_context=_setup)


def _check(input, weight, target, ignore_index, reduction, label_smoothing) -> None:
    check_tensor("input", input)
    check_tensor("weight", weight)
    check_tensor("target", target, floating=False)
    check_same_device("weight", weight, "input", input)
    check_same_device("target", target, "input", input)
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension (..., D)")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, D) with V >= 1 and D = input.shape[-1] = {input.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 or int32 tensor of token ids, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input's without D), "
                         f"got {tuple(target.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    kept = target[target != ignore_index]
    if kept.numel() and (kept.min().item() < 0 or kept.max().item() >= weight.shape[0]):
        raise ValueError(f"target holds ids outside [0, {weight.shape[0]}) (the vocabulary, weight.shape[0]) "
                         f"other than ignore_index={ignore_index}: min {kept.min().item()}, max {kept.max().item()}")


def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy(F.linear(input, weight), target, ...) computed without the (tokens x V) logits.

    input: (..., D) float32/float16/bfloat16 (float64 runs the torch backend); weight: (V, D), input's dtype
    and device; target: (...) int64/int32 token ids in [0, V), or ignore_index (those tokens add nothing).
    reduction: "mean" (over the tokens not ignored; NaN when all are, as torch), "sum" or "none" (target's
    shape). label_smoothing: eps in [0, 1], as F.cross_entropy's. Logits and sums are fp32 whatever the
    dtype. Returns the loss in input's dtype; differentiable in input and weight.
    """
    _check(input, weight, target, ignore_index, reduction, label_smoothing)
    h = input.reshape(-1, input.shape[-1])                                           # (N, D)
    t = target.reshape(-1).long()                                                    # (N,)
    loss, _ = call_op(_lce, h, weight, t, int(ignore_index), float(label_smoothing))         # (N,) fp32
    if reduction == "none":
        return loss.view(target.shape).to(input.dtype)
    if reduction == "sum":
        return loss.sum().to(input.dtype)
    return (loss.sum() / (t != ignore_index).sum()).to(input.dtype)
