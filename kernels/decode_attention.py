"""Triton split-KV decode attention (flash-decoding): a few new query tokens against a long KV cache.

Shapes (any strides):
    q: (B, Lq, Hq, D)                      Hq = G * Hkv; query head h reads kv head h // G
    k_cache, v_cache: (B, Lmax, Hkv, D) contiguous cache, or (num_blocks, PAGE, Hkv, D) paged cache with
        block_table (B, max_blocks) int32: position n of sequence b is row n % PAGE of block block_table[b, n // PAGE]
    k_scale, v_scale: None, or for an int8 cache float32 (B, Lmax, Hkv) / (num_blocks, PAGE, Hkv): the cached
        row is k_cache[..., :] * k_scale[...]
    cache_seqlens: (B,) int32, the valid length of each sequence, the Lq new tokens included
    out: (B, Lq, Hq, D) in q's dtype
Math (fastllm/reference/decode_attention.py has it per sequence): query i of sequence b sits at position
L_b - Lq + i and sees keys j < L_b, and with causal only j <= L_b - Lq + i (bottom-right alignment);
out = softmax(scale q k^T) v over those keys, 0 for a query that sees none.

Split kernel (grid: num_splits x (Hkv * row blocks) x B): one program holds the whole query group of one kv
head, G heads x Lq tokens as one [BLOCK_M, D] tile (row r = token r // G, head hk * G + r % G), so each K/V
row is read from memory once for all the query heads that use it, and q k^T / p v run on the tensor cores.
It walks its chunk of the sequence (sequence b's length cut into num_splits chunks of whole BLOCK_N tiles,
so short sequences spread over all splits too) with an online softmax in fp32, in the log2 domain, and
writes its normalised partial output (fp32) and log-sum-exp lse2 (log2 units; -inf for a chunk that lies
past the sequence end). The combine kernel (grid: Lq * Hq x B) merges the splits:
    out = sum_s 2^(lse2_s - M) o_s / sum_s 2^(lse2_s - M),   M = max_s lse2_s.
With one split the split kernel writes the output directly and the combine is skipped.
The grid and the workspace depend only on the shapes (never on cache_seqlens' values), and nothing here reads
values on the host, so a decode step can be captured in a CUDA graph.
int8 caches are dequantised in registers: the scale of key j multiplies column j of q k^T, and the scale of
value j multiplies column j of p before p v (both exact rewritings of dequantise-then-multiply).
Limits: Lq * Hq per batch entry and B at most 65535 (grid dims); int64 cache offsets (any cache size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (cache_slots, device_guard, dot, kernel_flags, online_softmax_finish, online_softmax_step, sm_count,
                      to_out)

__all__ = ["DecodeConfig", "pick_config", "num_splits_for", "decode_attention", "MAX_SPLITS", "MAX_HEAD_DIM"]

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
"""Largest head dim; tiles are padded to a power of two >= 16."""

MIN_BLOCK_M, MAX_BLOCK_M = 16, 64
"""Query rows (G * Lq, padded to a power of two) per program: at least 16, the smallest tl.dot tile; at most 64,
so the fp32 accumulator [64, D] stays in registers. Groups of more rows (G * Lq > 64, e.g. 8 query heads per kv
head and Lq > 8) take several row blocks, each reading the K/V head again."""

TILE_BYTES = 16 * 1024
"""Bytes of one K tile (BLOCK_N rows x padded D): 64 rows at D = 128 in fp16/bf16, 128 rows for int8. With the
V tile and num_stages = 3 that is 96 KiB of shared memory in flight per program, 2 programs per H100 SM."""

MAX_SPLITS = 64
"""Most splits: the combine kernel holds [num_splits, D] fp32 partial outputs of one row in registers."""

SPLIT_MIN_TOKENS = 256
"""Fewest cache positions per split the heuristic picks: each split then streams at least a few tiles (the
load pipeline needs several iterations to fill), and the [G * Lq, D] fp32 partial output it writes and the
combine reads back stays small next to the K/V bytes it reads."""

PROGRAMS_PER_SM = 2
"""Programs per SM the heuristic aims at when batch x kv heads is too small to fill the GPU: two resident
programs per SM keep loads in flight while either one starts or finishes."""


@dataclass(frozen=True)
class DecodeConfig:
    """block_n: cache positions per tile (power of two >= 16); num_warps, num_stages of the split kernel."""

    block_n: int
    num_warps: int = 4
    num_stages: int = 3


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(max(d, 1)))


def pick_config(d: int, cache_dtype: torch.dtype) -> DecodeConfig:
    """Tiles of TILE_BYTES for head dim d and the cache's element size.
    NOT TIMED (no GPU was available when this was written); TO TUNE on H100: block_n {32, 64, 128},
    num_warps {4, 8}, num_stages {2, 3, 4} per (D, cache dtype), with benchmarks/bench_decode_attention.py."""
    rows = TILE_BYTES // (_pad_dim(d) * cache_dtype.itemsize)
    return DecodeConfig(block_n=min(128, max(16, rows)))


def _block_m(rows: int) -> int:
    return min(MAX_BLOCK_M, max(MIN_BLOCK_M, triton.next_power_of_2(max(rows, 1))))


def num_splits_for(programs: int, capacity: int, device: torch.device) -> int:
    """Splits of each sequence for `programs` = B x Hkv x row blocks programs over a cache of `capacity`
    positions: none while those programs fill the GPU; otherwise enough for PROGRAMS_PER_SM programs per SM,
    keeping at least SPLIT_MIN_TOKENS positions per split and at most MAX_SPLITS splits. Depends on shapes only
    (the lengths' values are on the device), so a CUDA graph captured once stays valid."""
    sms = sm_count(device)
    if programs == 0 or programs >= sms:
        return 1
    want = triton.cdiv(PROGRAMS_PER_SM * sms, programs)
    return max(1, min(want, capacity // SPLIT_MIN_TOKENS, MAX_SPLITS))


# ---- kernels -----------------------------------------------------------------------------------
@triton.jit
def _split_kernel(Q, K, V, KS, VS, BT, SEQ, O, LSE,
                  sqb, sqi, sqh, sqd, skp, skn, skh, skd, svp, svn, svh, svd,
                  sksp, sksn, sksh, svsp, svsn, svsh, sbtb, sbtn,
                  sob, soi, soh, sos, sod, slb, sli, slh, sls,
                  LQ, GROUP, D, PAGE, M_BLOCKS, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, PAGED: tl.constexpr,
                  INT8: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
                  EXACT_BF16: tl.constexpr):
    split = tl.program_id(0)
    hk = (tl.program_id(1) // M_BLOCKS).to(tl.int64)
    rows = (tl.program_id(1) % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(2).to(tl.int64)
    qi = rows // GROUP  # the query token of each row, and its head:
    h = hk * GROUP + rows % GROUP
    row_ok = rows < GROUP * LQ
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    q = tl.load(Q + (b * sqb + qi * sqi + h * sqh)[:, None] + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    seqlen = tl.load(SEQ + b)
    chunk = tl.cdiv(tl.cdiv(seqlen, tl.num_programs(0)), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seqlen)
    # The last key each row may see: bottom-right causal, or the sequence end.
    if CAUSAL:
        last = seqlen - LQ + qi
    else:
        last = seqlen - 1 + tl.zeros_like(qi)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page, slot = cache_slots(BT, b, sbtb, sbtn, offs_n, n_ok, PAGE, PAGED)
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + (page * skp + slot * skn + hk * skh)[:, None] + offs_d[None, :] * skd, mask=kv_ok, other=0)
        v = tl.load(V + (page * svp + slot * svn + hk * svh)[:, None] + offs_d[None, :] * svd, mask=kv_ok, other=0)
        if INT8:  # through fp32: exact either way, and the interpreter's int8 -> bf16 cast is wrong
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = dot(q, tl.trans(k.to(q.dtype)), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT)
        if INT8:
            s = s * tl.load(KS + page * sksp + slot * sksn + hk * sksh, mask=n_ok, other=0.0)[None, :]
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= last[:, None]), s * qk_scale, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        if INT8:
            p = p * tl.load(VS + page * svsp + slot * svsn + hk * svsh, mask=n_ok, other=0.0)[None, :]
        acc = dot(to_out(p, Q, EXACT_BF16), v.to(q.dtype), acc * alpha[:, None], DOT)
    # A row that saw no key (a chunk past the sequence end, or a query before position 0) has l = 0:
    # its partial output is 0 and its lse -inf, so the combine gives it no weight.
    out, lse2 = online_softmax_finish(acc, m_i, l_i)
    o_ptrs = O + (b * sob + qi * soi + h * soh + split * sos)[:, None] + offs_d[None, :] * sod
    if SPLIT:
        tl.store(o_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b * slb + qi * sli + h * slh + split * sls, lse2, mask=row_ok)
    else:
        tl.store(o_ptrs, to_out(out, O, EXACT_BF16), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(OP, LSE, O, spb, spi, sph, sps, spd, slb, sli, slh, sls, sob, soi, soh, sod,
                    HQ, NUM_SPLITS, D, S_P: tl.constexpr, D_P: tl.constexpr, EXACT_BF16: tl.constexpr):
    qi = tl.program_id(0) // HQ
    h = tl.program_id(0) % HQ
    b = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, S_P)
    offs_d = tl.arange(0, D_P)
    s_ok = offs_s < NUM_SPLITS
    lse2 = tl.load(LSE + b * slb + qi * sli + h * slh + offs_s * sls, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, axis=0)
    w = tl.exp2(lse2 - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty splits
    total = tl.sum(w, axis=0)
    part = tl.load(OP + b * spb + qi * spi + h * sph + offs_s[:, None] * sps + offs_d[None, :] * spd,
                   mask=s_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    o_ptrs = O + b * sob + qi * soi + h * soh + offs_d * sod
    tl.store(o_ptrs, to_out(out, O, EXACT_BF16), mask=offs_d < D)


# ---- launcher ----------------------------------------------------------------------------------
def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, *, scale: float, causal: bool = True,
                     num_splits: int | None = None, config: DecodeConfig | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """out (B, Lq, Hq, D) = decode attention (shapes and math in the module docstring); arguments are taken
    as validated by fastllm.decode_attention. num_splits: None picks num_splits_for(...); config: tiles
    instead of pick_config's (tests); out: optional preallocated output (any strides)."""
    b, lq, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if out.numel() == 0:
        return out
    paged = block_table is not None
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page if paged else page
    int8 = k_cache.dtype == torch.int8
    cfg = config or pick_config(d, k_cache.dtype)
    block_m = _block_m(group * lq)
    m_blocks = triton.cdiv(group * lq, block_m)
    if num_splits is None:
        num_splits = num_splits_for(b * hkv * m_blocks, capacity, q.device)
    elif not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    split = num_splits > 1
    if split:
        part = torch.empty((b, lq, hq, num_splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, lq, hq, num_splits), dtype=torch.float32, device=q.device)
        o, so, sl = part, part.stride(), lse.stride()
    else:
        o, lse, so, sl = out, out, (*out.stride()[:3], 0, out.stride(3)), (0, 0, 0, 0)
    flags = kernel_flags(q)
    cache_seqlens = cache_seqlens.contiguous()  # the kernel reads entry b at b (no copy when already dense)
    bt = block_table if paged else cache_seqlens
    with device_guard(q):
        _split_kernel[(num_splits, hkv * m_blocks, b)](
            q, k_cache, v_cache, k_scale if int8 else q, v_scale if int8 else q, bt, cache_seqlens, o, lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *_strides(k_scale, 3), *_strides(v_scale, 3),
            *_strides(block_table, 2), *so, *sl, lq, group, d, page, m_blocks, scale * _LOG2E,
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, D_P=_pad_dim(d), PAGED=paged, INT8=int8, CAUSAL=causal,
            SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)
        if split:
            _combine_kernel[(lq * hq, b)](
                part, lse, out, *part.stride(), *lse.stride(), *out.stride(), hq, num_splits, d,
                S_P=triton.next_power_of_2(num_splits), D_P=_pad_dim(d), EXACT_BF16=flags["EXACT_BF16"],
                num_warps=4 if num_splits * _pad_dim(d) <= 4096 else 8)
    return out
