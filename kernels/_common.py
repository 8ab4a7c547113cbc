"""Helpers shared by the Triton kernel files: output rounding that agrees between the interpreter
and the GPU, and the launch context."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def interpreting(t: torch.Tensor) -> bool:
    """True when the kernels run under the Triton interpreter (CPU tensors, or TRITON_INTERPRET set)."""
    env = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")
    return env or not t.is_cuda


def exact_bf16(t: torch.Tensor) -> bool:
    """Whether to_out must round bf16 by hand for outputs like t (only under the interpreter)."""
    return t.dtype == torch.bfloat16 and interpreting(t)


CPU_SMS = 1
"""'SMs' of the Triton interpreter (CPU tensors): it runs programs one after another, so heuristics that split
work to fill a GPU's SMs give it few splits."""


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (CPU_SMS for CPU tensors, which the interpreter runs)."""
    if device.type != "cuda":
        return CPU_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_guard(t: torch.Tensor):
    """Make t's CUDA device current for a launch (nothing for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def to_out(v, out_ptr, EXACT_BF16: tl.constexpr):
    """v (fp32) in out_ptr's element type. EXACT_BF16 (set by the launchers only for bf16 outputs
    under the Triton interpreter, whose fp32 -> bf16 cast truncates) rounds to nearest even by hand,
    as the GPU's cvt.rn.bf16.f32 does, so interpreted and compiled results agree bit for bit."""
    if EXACT_BF16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        r = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        out = tl.where(v == v, r, v.to(tl.bfloat16))  # NaN: the carry above could reach the sign bit
    else:
        out = v.to(out_ptr.dtype.element_ty)
    return out


DOT_NATIVE, DOT_IEEE32, DOT_INTERP = 0, 1, 2
"""How `dot` multiplies: fp16/bf16 tensor cores; true fp32 (fp32 inputs: never tf32); or, under the Triton
interpreter, in fp64 rounded once to fp32. The interpreter's own dot hands tiles to numpy, whose BLAS
sums in an order that depends on the tile shape (so the forward and the backward, which use different
tiles, would get scores that differ in the last bit; the GPU's MMA sums each element in the same order
whatever the tile) and misreads bf16 storage; the fp64 sum of exact products is shape-independent."""


@triton.jit
def dot(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation (DOT: one of DOT_NATIVE, DOT_IEEE32, DOT_INTERP)."""
    if DOT == 2:  # DOT_INTERP
        return tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32) + acc
    elif DOT == 1:  # DOT_IEEE32
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def kernel_flags(q: torch.Tensor) -> dict:
    """Launch constexprs for kernels computing in q's dtype: EXACT_BF16 (see to_out) and DOT (see dot)."""
    interp = interpreting(q)
    mode = DOT_INTERP if interp else (DOT_IEEE32 if q.dtype == torch.float32 else DOT_NATIVE)
    return {"EXACT_BF16": interp and q.dtype == torch.bfloat16, "DOT": mode}


@triton.jit
def cache_slots(BT, b, sbt_b, sbt_n, pos, ok, PAGE, PAGED: tl.constexpr):
    """(page, slot), int64, of the positions `pos` (a scalar or a vector, in range where `ok`) of sequence b
    (int64) in a KV cache, whose element offsets are then page * page_stride + slot * slot_stride:
    contiguous (B, Lmax, ...): page b, slot pos; paged (num_blocks, PAGE, ...): position n lives in block
    BT[b, n // PAGE] at slot n % PAGE (block-table entries are read only where `ok`: unused ones may hold
    anything)."""
    if PAGED:
        page = tl.load(BT + b * sbt_b + (pos // PAGE) * sbt_n, mask=ok, other=0).to(tl.int64)
        slot = (pos % PAGE).to(tl.int64)
    else:
        page = b + tl.zeros_like(pos).to(tl.int64)
        slot = pos.to(tl.int64)
    return page, slot


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One key block of an online softmax in log2 units: s [M, N] scores (-inf = not seen), m_i / l_i [M] the
    running max and sum. Returns (p = 2^(s - m_new) [M, N], alpha = 2^(m_i - m_new) [M] to rescale the running
    output, m_new, l_new). A row that has seen only -inf is shifted by 0 (exp2(-inf - -inf) would be NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - shift)
    p = tl.exp2(s - shift[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def online_softmax_finish(acc, m_i, l_i):
    """(out = acc / l, lse2 = m + log2 l) of an online softmax; a row that saw no key (l = 0) gives out 0 and
    lse2 -inf (as torch gives for a fully masked row)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    return out, tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
