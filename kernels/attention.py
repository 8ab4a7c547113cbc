"""Triton flash attention: forward (output + log-sum-exp) and backward (dq, dk, dv), never forming Lq x Lk.

Shapes (any strides, including 0 for broadcast dimensions, so (B, L, H, D) views need no copy):
    q: (B, Hq, Lq, D)   k: (B, Hkv, Lk, D)   v: (B, Hkv, Lk, Dv)   Hq = G * Hkv; query head h reads kv head h // G
    mask: None, or (B, Hq, Lq, Lk) bool (True takes part) / float (added to the scores), usually an expand()ed
          view whose broadcast dimensions have stride 0
    out: (B, Hq, Lq, Dv) in q's dtype   lse2: (B, Hq, Lq) float32, log-sum-exp in log2 units (lse * log2(e),
         see reference/attention.py for why); -inf for a row with no key
Packed sequences (varlen, as FlashAttention's *_varlen functions): q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv)
hold N sequences back to back; sequence i is rows [cu_q[i], cu_q[i+1]) of q and [cu_k[i], cu_k[i+1]) of k, v;
out is (Tq, Hq, Dv) and lse2 (Hq, Tq); no mask (causality and GQA apply per sequence).
Math (reference/attention.py has it in full): s = scale q k^T + mask, p = softmax(s), out = p v; a row whose
keys are all masked gives out = 0 (as torch does). Causal: key j visible to query i iff j <= i + offset,
offset = 0 (top-left, torch's is_causal) or Lk - Lq (bottom-right), per sequence.
Dropout: keep_ij = rand(seed, (row_i * C + j)) >= p (Philox, tl.rand), row_i the query's row in lse2 laid out
flat, C = Lk (the longest Lk when packed); regenerated identically in the backward; kept probabilities are
scaled by 1 / (1 - p); the statistics (m, l, lse2) use the undropped p.

The forward is in attention_fwd.py, the backward (deterministic and atomic dq) in attention_bwd.py, shared
helpers and tile sizes in _attn_common.py, the per-GPU tile tuning in attention_tune.py.
Precision: q k^T and p v accumulate in fp32. fp16/bf16 feed the tensor cores with p and ds rounded to the
input dtype (as FlashAttention does); fp32 inputs use input_precision="ieee" (never tf32).
Limits: grid dims 1 and 2 are Hq (or Hkv) and B (at most 65535 each); row offsets within one (b, h) are
int32 for q, k, v and their gradients (L * row stride < 2^31), int64 for the mask and packed sequence starts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attn_common import CONFIGS, MAX_HEAD_DIM, AttnConfig, Varlen, _keep, pick_config
from ._common import DOT_IEEE32, DOT_INTERP, DOT_NATIVE, device_guard
from .attention_bwd import _dkdv_kernel, _dq_kernel, attention_bwd
from .attention_fwd import _fwd_kernel, attention_fwd

__all__ = ["AttnConfig", "CONFIGS", "Varlen", "pick_config", "attention_fwd", "attention_bwd", "dropout_keep_mask",
           "MAX_HEAD_DIM", "DOT_NATIVE", "DOT_IEEE32", "DOT_INTERP", "_fwd_kernel", "_dkdv_kernel", "_dq_kernel"]


@triton.jit
def _keep_kernel(OUT, LQ, LK, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The dropout keep mask the attention kernels use, written out as uint8 (B, Hq, Lq, Lk) (tests).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(2).to(tl.int64) * LQ
    keep = _keep(seed, row, offs_m, offs_n, LK, dropout_p)
    tl.store(OUT + (row + offs_m)[:, None] * LK + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m < LQ)[:, None] & (offs_n < LK)[None, :])


def dropout_keep_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The keep mask (True = kept) the kernels draw for (B, Hq, Lq, Lk) = shape, dropout_p and seed.
    For packed sequences pass (1, Hq, Tq, longest Lk): sequence i's mask is [..., cu_q[i]:cu_q[i+1], :Lk_i]."""
    b, hq, lq, lk = shape
    out = torch.empty(shape, dtype=torch.uint8, device=device)
    if out.numel():
        grid = (triton.cdiv(lq, 64), triton.cdiv(lk, 64), b * hq)
        with device_guard(out):
            _keep_kernel[grid](out, lq, lk, seed, dropout_p, BLOCK_M=64, BLOCK_N=64)
    return out.bool()
