"""fastllm.decode_attention: attention of a few new query tokens per sequence to a KV cache (generation).

Backends: Triton split-KV flash-decoding (CUDA; CPU under TRITON_INTERPRET=1 when forced), the C++ CPU kernel
(csrc/cpu/decode_attention*.cpp: split-KV over (sequence, key range) items, AVX2/FMA), torch (one masked SDPA
call over the batch: the CUDA fallback, and the CPU one for layouts the C++ kernel does not take). The custom op
sees the arguments as given (fastllm::decode_attention) and returns out (B, Lq, Hq, D), contiguous, in q's dtype.
Inference only: no autograd (the output does not require grad).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .._dispatch import select
from ..reference import decode_attention as _ref
from ._common import call_op, check_same_device, check_tensor, code, grid_limit, kernels, ptr, run_c
from ._kv_cache import check_cache, check_positions, cpu_cache_limit, strides3, values_checkable

MAX_HEAD_DIM = 256
"""Largest head dim, on every backend alike (the Triton tiles hold a whole head)."""


def _tk():
    """The Triton module (fastllm.kernels.decode_attention); only called once "triton" was chosen."""
    return kernels().decode_attention


@torch.library.custom_op("fastllm::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                      block_table: Optional[torch.Tensor], k_scale: Optional[torch.Tensor],
                      v_scale: Optional[torch.Tensor], scale: float, causal: bool, num_splits: int) -> torch.Tensor:
    args = (q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale)
    backend = select("decode_attention", q, limits={"cpu": cpu_cache_limit(q, k_cache, v_cache, block_table),
                                                    "triton": grid_limit(batch=q.shape[0])})  # (grid dim 2)
    if backend == "triton":
        return _tk().decode_attention(*args, scale=scale, causal=causal, num_splits=num_splits or None)
    if backend == "cpu":
        return _cpu_decode_attention(*args, scale, causal, num_splits)
    return _ref.decode_attention_batched(*args, scale=scale, causal=causal).contiguous()


def _cpu_decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, scale, causal,
                          num_splits):
    b, lq, hq, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    page = k_cache.shape[1]
    lens = cache_seqlens.contiguous()  # (held until the kernel returns: it may be a copy)
    run_c("cpu", "decode_attention", q.device, ptr(q), strides3(q), ptr(k_cache), strides3(k_cache), ptr(v_cache),
          strides3(v_cache), ptr(k_scale), strides3(k_scale), ptr(v_scale), strides3(v_scale),
          ptr(lens), ptr(block_table), 0 if block_table is None else block_table.stride(0), page,
          ptr(out), b, lq, hq, k_cache.shape[2], d, scale, causal, k_cache.dtype == torch.int8, code(q), num_splits)
    return out


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, scale, causal, num_splits):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _check_args(q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, scale, causal, num_splits):
    check_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (B, Lq, Hq, D), got shape {tuple(q.shape)}")
    layout = check_cache(k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, q.shape[0], "q", q)
    if k_cache.dtype not in (q.dtype, torch.int8):
        raise TypeError(f"k_cache has dtype {k_cache.dtype} but q has {q.dtype}; the cache must have q's dtype "
                        f"or be int8 (with k_scale, v_scale)")
    hq, d = q.shape[2], q.shape[3]
    if layout.heads == 0 or hq % layout.heads != 0:
        raise ValueError(f"k_cache has {layout.heads} kv heads, which must divide q's {hq} heads (query head h "
                         f"reads kv head h // (Hq / Hkv))")
    if layout.head_dim != d:
        raise ValueError(f"k_cache's head dim {layout.head_dim} must equal q's {d}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q's head dim {d} exceeds the supported maximum {MAX_HEAD_DIM}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")
    for name, t in (("cache_seqlens", cache_seqlens), ("block_table", block_table)):
        if t is not None:
            check_same_device(name, t, "q", q)
    return layout


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
                     block_table: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, scale: float | None = None, causal: bool = True,
                     num_splits: int | None = None) -> torch.Tensor:
    """Attention of Lq new query tokens per sequence to the sequence's cached keys and values.

    q: (B, Lq, Hq, D), float32/float16/bfloat16 (float64 runs the torch path); Lq is small (1..16 in
        generation, any Lq works). D <= 256.
    k_cache, v_cache: q's dtype, or int8 with k_scale / v_scale. Either contiguous, (B, Lmax, Hkv, D), sequence b
        at k_cache[b, :L_b]; or paged, (num_blocks, block_size, Hkv, D) with block_table (B, max_blocks) int32:
        position n of sequence b is k_cache[block_table[b, n // block_size], n % block_size] (any block size;
        entries past a sequence's blocks are never read and may hold anything, e.g. -1). Any strides.
    cache_seqlens: (B,) int32 on q's device, L_b = the valid length of sequence b INCLUDING the Lq new tokens,
        whose keys and values must already be in the cache (fastllm.kv_cache_append writes them): query i sits
        at position L_b - Lq + i. 0 <= L_b <= capacity (Lmax, or max_blocks * block_size).
    k_scale, v_scale: for an int8 cache, float32 of shape k_cache.shape[:3] (one scale per position and kv head,
        symmetric: value = code * scale); kv_cache_append fills them. The compute dtype is q's.
    scale: multiplies q k^T; defaults to 1 / sqrt(D).
    causal: query i sees the keys at positions j <= L_b - Lq + i (bottom-right alignment, as in generation);
        otherwise every query sees all L_b keys. A query that sees no key (L_b - Lq + i < 0) gives 0.
    num_splits: how many parts each sequence's keys are split into, combined through their log-sum-exp (None =
        chosen: on the GPU from batch, heads, capacity and the SM count, at most 64; on the CPU from batch, the
        longest length and the threads, at most one per position of the longest sequence; the torch path
        ignores it).
    GQA: Hkv must divide Hq; query head h reads kv head h // (Hq / Hkv), each K/V row read once per group.
    Returns out (B, Lq, Hq, D) in q's dtype. Inference only: no autograd.

    CUDA graphs: nothing here synchronises with the host or allocates by value (the grid and the workspace
    depend on shapes only), so a decode step can be captured and replayed with new cache_seqlens values. The
    value checks (lengths within the capacity, block-table entries in range) read the values on the host: they
    run for CPU tensors, and for CUDA tensors except while capturing or under torch.compile.
    """
    layout = _check_args(q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, scale, causal,
                         num_splits)
    if values_checkable(cache_seqlens):
        check_positions(cache_seqlens, block_table, layout, k_cache.shape[0], None)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    return call_op(_decode_attention, q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale,
                   float(scale), causal, num_splits or 0)
