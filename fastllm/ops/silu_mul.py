"""fastllm.silu_mul: SwiGLU's gate, y = silu(gate) * up = gate * sigmoid(gate) * up, in one pass.

The Llama MLP computes w_down(silu(w_gate(x)) * w_up(x)); torch takes two elementwise kernels (and a
temporary) for the middle, fastllm one, which also makes it a C++ call that a CPU graph can record
(fastllm/runtime/cpu_graph.py). fp32 arithmetic, rounded once to the inputs' dtype.
Backends: Triton (CUDA), C++ (CPU), torch reference.
gate and up may be views with a row stride, such as the two halves of a fused gate/up projection.
"""
from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from ._common import as_rows, call_op, check_like, check_tensor, code, kernels, new_output_like, ptr, run_c


@torch.library.custom_op("fastllm::silu_mul", mutates_args=())
def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = as_rows(gate), as_rows(up)
    backend = select("silu_mul", gate, up) if gate.numel() else "torch"
    if backend == "torch":
        return reference.silu_mul_fwd(g2, u2).view(gate.shape)
    if backend == "triton":
        return kernels().silu_mul.silu_mul(g2, u2).view(gate.shape)
    rows, cols = g2.shape
    y = new_output_like(gate)
    run_c(backend, "silu_mul", gate.device, ptr(g2), g2.stride(0), ptr(u2), u2.stride(0), ptr(y), cols, rows, cols,
          code(gate))
    return y


@_silu_mul.register_fake
def _(gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = reference.silu_mul_bwd(as_rows(gate), as_rows(up), as_rows(dy))
    return dg.view(gate.shape), du.view(up.shape)


_silu_mul.register_autograd(_backward, setup_context=_setup)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. gate, up: (..., N) of the same shape, floating dtype and device -> (..., N), differentiable
    (the backward runs the torch reference)."""
    check_tensor("gate", gate)
    check_like("up", up, "gate", gate)
    if gate.dim() == 0:
        return call_op(_silu_mul, gate.reshape(1), up.reshape(1)).reshape(())
    return call_op(_silu_mul, gate, up)
