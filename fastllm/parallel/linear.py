"""Column- and row-parallel linear layers (Megatron-LM style) on torch.distributed, for inference.

A linear y = x W^T + b with W (N, K) split over the W_ranks processes of a group:

    ColumnParallelLinear   rank r holds the rows R_r of W (output features) and b[R_r]:
                           y[..., R_r] = x W[R_r]^T + b[R_r]      x: (..., K) -> (..., |R_r|), no communication
    RowParallelLinear      rank r holds the columns [k0_r, k1_r) of W (input features):
                           y = sum_r x_r W[:, k0_r:k1_r]^T + b     x_r: (..., k1_r - k0_r) -> (..., N)
                           the sum is one all-reduce; b is added once, after it

A column-parallel layer followed by a row-parallel one (attention heads then the output projection; the MLP's
gate/up then down) needs a single all-reduce. The local layer is an nn.Linear or a fastllm.nn.QuantLinear
(the packed "rows" layout slices along N by rows, and along K at group boundaries: k0, k1 multiples of 32 and of
the group size). Inference only: the all-reduce is not differentiated, so a forward that would record a graph
raises instead of giving wrong gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..nn.quant_linear import QuantLinear
from ..quant.formats import BLOCK
from ..quant.quantize import QuantizedWeight


def slice_linear(linear: nn.Module, rows: torch.Tensor | None = None,
                 cols: tuple[int, int] | None = None, bias: bool = True) -> nn.Module:
    """A new nn.Linear / QuantLinear holding W[rows][:, cols[0]:cols[1]] (and bias[rows] when `bias`), frozen.
    rows: int64 indices of output features (None: all); cols: a range of input features (None: all)."""
    if isinstance(linear, QuantLinear):
        return _slice_quant(linear, rows, cols, bias)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear or fastllm.nn.QuantLinear, got {type(linear).__name__}")
    w = linear.weight.detach()
    w = w if rows is None else w[rows.to(w.device)]
    w = w if cols is None else w[:, cols[0]:cols[1]]
    keep_bias = bias and linear.bias is not None
    with torch.device("meta"):
        new = nn.Linear(w.shape[1], w.shape[0], bias=keep_bias)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if keep_bias:
        b = linear.bias.detach()
        new.bias = nn.Parameter((b if rows is None else b[rows.to(b.device)]).contiguous(), requires_grad=False)
    return new


def _slice_quant(linear: QuantLinear, rows, cols, bias: bool) -> QuantLinear:
    q = linear.quantized_weight()
    data, scales, mins = q.data, q.scales, q.mins
    n, k = q.shape
    if rows is not None:
        rows = rows.to(data.device)
        data, scales = data[rows], scales[rows]
        mins = None if mins is None else mins[rows]
        n = rows.numel()
    if cols is not None:
        k0, k1 = cols
        g = q.group_size or BLOCK  # per-channel int8: one scale per row, any multiple of 32 splits
        if k0 % BLOCK or k1 % BLOCK or k0 % g or k1 % g:
            raise ValueError(f"a quantised layer of {k} input features split at [{k0}, {k1}) cuts its packed "
                             f"blocks: the split points must be multiples of {BLOCK} and of its group size {g} "
                             f"(use fewer ranks or a smaller group_size)")
        per_byte = 8 // q.format.bits
        data = data[:, k0 // per_byte:k1 // per_byte]
        if q.group_size is not None:  # group-wise scales follow the columns; per-channel ones are per row
            scales = scales[:, k0 // g:k1 // g]
            mins = None if mins is None else mins[:, k0 // g:k1 // g]
        k = k1 - k0
    keep_bias = bias and linear.bias is not None
    sliced = QuantizedWeight(data.contiguous(), scales.contiguous(), None if mins is None else mins.contiguous(),
                             q.scheme, q.group_size, (n, k), check_values=False)
    new = QuantLinear(k, n, keep_bias, scheme=q.scheme, group_size=q.group_size, act=linear.act,
                      device=data.device, dtype=None if linear.bias is None else linear.bias.dtype)
    new.load_quantized(sliced)
    if keep_bias:
        b = linear.bias.detach()
        new.bias = nn.Parameter((b if rows is None else b[rows.to(b.device)]).contiguous(), requires_grad=False)
    return new


def _check_inference(module: nn.Module, x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:  # (shard_model freezes the parameters)
        raise RuntimeError(f"{type(module).__name__} is for inference: run the tensor-parallel model under "
                           f"torch.inference_mode() or torch.no_grad() (its all-reduce has no backward)")


class ColumnParallelLinear(nn.Module):
    """This rank's output features `rows` of a linear: forward(x (..., K)) -> (..., len(rows)) via `local`."""

    def __init__(self, linear: nn.Module, rows: torch.Tensor):
        super().__init__()
        self.local = slice_linear(linear, rows=rows)
        self.in_features, self.out_features = linear.in_features, len(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_inference(self, x)
        return self.local(x)


class RowParallelLinear(nn.Module):
    """This rank's input features [k0, k1) of a linear: forward(x_r (..., k1 - k0)) -> (..., N), the all-reduced
    sum over the ranks of `group` (None: the default group), plus the whole bias once."""

    def __init__(self, linear: nn.Module, k0: int, k1: int, group=None):
        super().__init__()
        self.local = slice_linear(linear, cols=(k0, k1), bias=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features, self.group = k1 - k0, linear.out_features, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_inference(self, x)
        y = self.local(x)                                                            # (..., N), partial sum
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)
