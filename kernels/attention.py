"""Triton flash attention: forward (output + log-sum-exp) and backward (dq, dk, dv), never forming Lq x Lk.

Shapes (any strides, including 0 for broadcast dimensions, so (B, L, H, D) views need no copy):
    q: (B, Hq, Lq, D)   k: (B, Hkv, Lk, D)   v: (B, Hkv, Lk, Dv)   Hq = G * Hkv; query head h reads kv head h // G
    mask: None, or (B, Hq, Lq, Lk) bool (True takes part) / float (added to the scores), usually an expand()ed
          view whose broadcast dimensions have stride 0
    out: (B, Hq, Lq, Dv) in q's dtype   lse2: (B, Hq, Lq) float32, log-sum-exp in log2 units (lse * log2(e),
         see reference/attention.py for why); -inf for a row with no key
Math (reference/attention.py has it in full): s = scale q k^T + mask, p = softmax(s), out = p v; a row whose
keys are all masked gives out = 0 (as torch does). Causal: key j visible to query i iff j <= i + offset,
offset = 0 (top-left, torch's is_causal) or Lk - Lq (bottom-right).

Forward (grid: Lq blocks x Hq x B): a program holds a [BLOCK_M, D] tile of queries and walks the key blocks,
keeping the running max m, running sum l and the unnormalised output (online softmax) in fp32, in the log2
domain (scale * log2(e) is folded into one multiply; exp2 is the GPU's native exponential). The key range
is split in two: blocks every query of the tile may see in full (no per-element masking) and the blocks on
the causal diagonal or the Lk edge (masked with tl.where).
Backward: a tiny kernel computes delta_i = dout_i . out_i - dlse2_i log2(e); then
    dkdv kernel (grid: Lk blocks x Hkv x B): a program owns a block of keys and loops over the G query heads
        of its group and over the query blocks that can see it, accumulating dk and dv in registers;
    dq kernel   (grid: Lq blocks x Hq x B): a program owns a block of queries and loops over the key blocks.
Every output element is written by exactly one program, with no atomics, so the backward is bit-identical
run to run (the deterministic mode costs nothing: the same kernels serve both modes for now).
Dropout: keep_ij = rand(seed, ((b*Hq + h)*Lq + i)*Lk + j) >= p (Philox, tl.rand), regenerated identically in
the backward; kept probabilities are scaled by 1 / (1 - p); the statistics (m, l, lse2) use the undropped p.

Precision: q k^T and p v accumulate in fp32. fp16/bf16 feed the tensor cores with p and ds rounded to the
input dtype (as FlashAttention does); fp32 inputs use input_precision="ieee" (never tf32).
Limits: grid dims 1 and 2 are Hq (or Hkv) and B (at most 65535 each); row offsets within one (b, h) are
int32 for q, k, v and their gradients (L * row stride < 2^31), int64 for the mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import DOT_IEEE32, DOT_NATIVE, device_guard, kernel_flags, to_out
from ._common import dot as _dot

__all__ = ["AttnConfig", "CONFIGS", "pick_config", "attention_fwd", "attention_bwd", "dropout_keep_mask",
           "MAX_HEAD_DIM", "DOT_NATIVE", "DOT_IEEE32"]

_LOG2E = tl.constexpr(1.4426950408889634)
MAX_HEAD_DIM = 256
"""Largest head dim (of q/k and of v) the kernels take; the tiles are padded to a power of two >= 16."""

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


# ---- block-size policy -------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnConfig:
    """block_m: query rows per tile, block_n: key rows per tile (powers of two >= 16); num_warps, num_stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _cfgs(fwd, dkdv, dq):
    return {"fwd": AttnConfig(*fwd), "dkdv": AttnConfig(*dkdv), "dq": AttnConfig(*dq)}


CONFIGS = {
    # (padded head dim, fp32?): tiles of the forward, dkdv and dq kernels (block_m, block_n, warps, stages)
    (64, False): _cfgs((128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 2)),
    (128, False): _cfgs((128, 64, 8, 3), (32, 64, 8, 2), (64, 64, 8, 2)),
    (256, False): _cfgs((64, 32, 8, 2), (32, 32, 8, 1), (32, 32, 8, 1)),
    (64, True): _cfgs((32, 64, 8, 2), (16, 32, 4, 1), (32, 64, 8, 2)),
    (128, True): _cfgs((32, 64, 8, 2), (32, 32, 8, 1), (32, 64, 8, 2)),
    (256, True): _cfgs((32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1)),
}
"""Tiles by padded head dim (<= 64, <= 128, <= 256; q/k and v alike) and by fp32 or not.

fp16/bf16: starting points from the FlashAttention-2 paper and the Triton tutorial for sm_80/sm_90. The
forward holds the q tile and the fp32 accumulator [BLOCK_M, D] in registers (BLOCK_M halves at D = 256);
the dkdv kernel holds k, v, dk, dv ([BLOCK_N, D] each) while q and dout tiles stream through, so its tiles
are smaller. fp32 runs tl.dot as exact fp32 FMAs (never tf32), which needs far more registers: small tiles.
Checked without a GPU by compiling every kernel for sm_90a with Triton 3.9 (ptxas -v): the fp16/bf16 forward
and dkdv kernels use wgmma for D <= 128 (mma.sync at 256), all fit the 227 KiB of shared memory, and no
chosen tile spills more than 12 bytes of registers (larger fp32 tiles spill kilobytes). NOT TIMED: none has
run on a GPU.
TO TUNE on H100: sweep BLOCK_M in {32, 64, 128}, BLOCK_N in {32, 64, 128}, num_warps {4, 8}, num_stages
{2, 3, 4} per (kernel, D, dtype, causal) and cache the winner per (D, dtype, arch) (triton.autotune keyed on
the padded head dims and dtype, or a table filled from benchmarks/bench_attention.py)."""


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(max(d, 1)))


def pick_config(kernel: str, d: int, dv: int, dtype: torch.dtype) -> AttnConfig:
    """Tiles of `kernel` ("fwd", "dkdv" or "dq") for head dims d (q, k) and dv (v) in `dtype`."""
    return CONFIGS[(max(64, _pad_dim(d), _pad_dim(dv)), dtype == torch.float32)][kernel]


# ---- shared device helpers ---------------------------------------------------------------------
@triton.jit
def _keep(seed, row_base, offs_m, offs_n, LK, dropout_p):
    """Dropout keep mask [M, N]: Philox uniform >= p at counter row_base + i * Lk + j (int64)."""
    offs = (row_base + offs_m.to(tl.int64))[:, None] * LK + offs_n[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _tile(ptr, offs_r, stride_r, n_r, offs_c, stride_c, n_c):
    """Pointers and in-bounds mask of the tile [len(offs_r), len(offs_c)] of a matrix of n_r x n_c at ptr."""
    mask = (offs_r < n_r)[:, None] & (offs_c < n_c)[None, :]
    return ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask


@triton.jit
def _load_tile(ptr, offs_r, stride_r, n_r, offs_c, stride_c, n_c):
    """The tile [len(offs_r), len(offs_c)], zero outside the matrix (zero rows and padding columns add 0)."""
    ptrs, mask = _tile(ptr, offs_r, stride_r, n_r, offs_c, stride_c, n_c)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, offs_r, stride_r, n_r, offs_c, stride_c, n_c, val, EXACT_BF16: tl.constexpr):
    ptrs, mask = _tile(ptr, offs_r, stride_r, n_r, offs_c, stride_c, n_c)
    tl.store(ptrs, to_out(val, ptr, EXACT_BF16), mask=mask)


@triton.jit
def _query_block(BLOCK_M: tl.constexpr, GROUP):
    """(start_m, h, b, kv head) of a program over query blocks. Blocks run in reverse: under causal masking
    the last ones see the most keys, so they start first."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    return start_m, h, tl.program_id(2).to(tl.int64), h // GROUP


@triton.jit
def _scores(q, k, m_ptr, offs_m, offs_n, stride_mm, stride_mn, LQ, LK, qk_scale, causal_off,
            MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT: tl.constexpr):
    """s = q k^T * scale * log2(e) + mask * log2(e) [M, N] in fp32, -inf where a key may not be seen.
    EDGE: this block touches the causal diagonal or the Lk edge, so those masks are applied."""
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), DOT) * qk_scale
    if MASK_KIND == 1:  # MASK_BOOL, read as bytes; int64 rows: a mask may exceed 2^31 elements
        ptrs, inb = _tile(m_ptr, offs_m.to(tl.int64), stride_mm, LQ, offs_n, stride_mn, LK)
        s = tl.where(tl.load(ptrs, mask=inb, other=0) != 0, s, float("-inf"))
    elif MASK_KIND == 2:  # MASK_ADD, in log2 units like s
        ptrs, inb = _tile(m_ptr, offs_m.to(tl.int64), stride_mm, LQ, offs_n, stride_mn, LK)
        s += tl.load(ptrs, mask=inb, other=0.0).to(tl.float32) * _LOG2E
    if EDGE:
        ok = (offs_n < LK)[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + causal_off)
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _kv_scores(q, k_ptr, v_ptr, m_ptr, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn, svd, smm, smn,
               LQ, LK, D, DV, qk_scale, causal_off, MASK_KIND: tl.constexpr, EDGE: tl.constexpr,
               IS_CAUSAL: tl.constexpr, DOT: tl.constexpr):
    """The key and value tiles at offs_n and the scores s2 of the query tile q against them."""
    k = _load_tile(k_ptr, offs_n, skn, LK, offs_d, skd, D)
    v = _load_tile(v_ptr, offs_n, svn, LK, offs_dv, svd, DV)
    s = _scores(q, k, m_ptr, offs_m, offs_n, smm, smn, LQ, LK, qk_scale, causal_off, MASK_KIND, EDGE, IS_CAUSAL, DOT)
    return k, v, s


@triton.jit
def _key_range(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LK, causal_off, IS_CAUSAL: tl.constexpr):
    """(full_end, end): key blocks [0, full_end) are seen in full by every query row of the tile,
    [full_end, end) need the causal / edge masks."""
    if IS_CAUSAL:
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_off, 0), LK)
        full = tl.minimum(tl.maximum(start_m + causal_off + 1, 0), LK)
    else:
        end = LK
        full = LK
    return (full // BLOCK_N) * BLOCK_N, end


# ---- forward -----------------------------------------------------------------------------------
@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, m_ptr, lo, hi, offs_m, offs_d, offs_dv,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                LQ, LK, D, DV, qk_scale, causal_off, seed, row_base, dropout_p,
                BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                DROPOUT: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, s = _kv_scores(q, k_ptr, v_ptr, m_ptr, offs_m, offs_n, offs_d, offs_dv, stride_kn, stride_kd,
                             stride_vn, stride_vd, stride_mm, stride_mn, LQ, LK, D, DV, qk_scale, causal_off,
                             MASK_KIND, EDGE, IS_CAUSAL, DOT)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Shift by 0 while a row has seen only -inf: exp2(-inf - -inf) would be NaN, exp2(-inf - 0) is 0.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_keep(seed, row_base, offs_m, offs_n, LK, dropout_p), p / (1.0 - dropout_p), 0.0)
        acc = _dot(to_out(p, v_ptr, EXACT_BF16), v, acc * alpha[:, None], DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, M, O, LSE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sob, soh, som, sod,
                HQ, GROUP, LQ, LK, D, DV, qk_scale, causal_off, seed, dropout_p,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
                MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    start_m, h, b, hk = _query_block(BLOCK_M, GROUP)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, sqm, LQ, offs_d, sqd, D)
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    m_ptr = M + b * smb + h * smh
    row_base = (b * HQ + h) * LQ
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_P], tl.float32)
    full_end, end = _key_range(start_m, BLOCK_M, BLOCK_N, LK, causal_off, IS_CAUSAL)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, m_ptr, 0, full_end, offs_m, offs_d, offs_dv,
                                skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed,
                                row_base, dropout_p, BLOCK_N, MASK_KIND, False, IS_CAUSAL, DROPOUT, DOT, EXACT_BF16)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, m_ptr, full_end, end, offs_m, offs_d, offs_dv,
                                skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed,
                                row_base, dropout_p, BLOCK_N, MASK_KIND, True, IS_CAUSAL, DROPOUT, DOT, EXACT_BF16)
    # A row that saw no key has l = 0: its output is 0 (acc is 0 too) and its lse -inf, as torch gives.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    _store_tile(O + b * sob + h * soh, offs_m, som, LQ, offs_dv, sod, DV, out, EXACT_BF16)
    tl.store(LSE + (b * HQ + h) * LQ + offs_m, lse2, mask=offs_m < LQ)


# ---- backward ----------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, HQ, LQ, DV,
                  BLOCK_M: tl.constexpr, DV_P: tl.constexpr, HAS_DLSE: tl.constexpr):
    # delta = rowsum(dout * out) - dlse2 * log2(e), fp32, (B, Hq, Lq) contiguous.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, DV_P)
    o = _load_tile(O + b * sob + h * soh, offs_m, som, LQ, offs_d, sod, DV)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, sdm, LQ, offs_d, sdd, DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = (b * HQ + h) * LQ + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < LQ, other=0.0) * _LOG2E
    tl.store(DELTA + row, delta, mask=offs_m < LQ)


@triton.jit
def _load_lse2(LSE, row, offs_m, LQ):
    """lse2 of the rows; +inf (so that p = 0) for rows past Lq and rows that saw no key."""
    lse2 = tl.load(LSE + row + offs_m, mask=offs_m < LQ, other=float("inf"))
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, m_ptr, LSE, DELTA, row, lo, hi, offs_n, offs_d, offs_dv,
                 sqm, sqd, sdm, sdd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed, dropout_p,
                 BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 DROPOUT: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr, offs_m, sqm, LQ, offs_d, sqd, D)
        do = _load_tile(do_ptr, offs_m, sdm, LQ, offs_dv, sdd, DV)
        lse2 = _load_lse2(LSE, row, offs_m, LQ)
        delta = tl.load(DELTA + row + offs_m, mask=offs_m < LQ, other=0.0)
        # Scores for this [M, N] tile (rows past Lq get p = 0 through lse = +inf; keys past Lk only feed
        # dk/dv rows that are never stored), then the transposed products.
        s = _scores(q, k, m_ptr, offs_m, offs_n, smm, smn, LQ, LK, qk_scale, causal_off,
                    MASK_KIND, EDGE, IS_CAUSAL, DOT)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, v.shape[0]], tl.float32), DOT)
        if DROPOUT:
            scale_keep = tl.where(_keep(seed, row, offs_m, offs_n, LK, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
            dv = _dot(tl.trans(to_out(p * scale_keep, do_ptr, EXACT_BF16)), do, dv, DOT)
            dp = dp * scale_keep
        else:
            dv = _dot(tl.trans(to_out(p, do_ptr, EXACT_BF16)), do, dv, DOT)
        ds = p * (dp - delta[:, None])
        dk = _dot(tl.trans(to_out(ds, q_ptr, EXACT_BF16)), q, dk, DOT)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, M, DO, LSE, DELTA, DK, DV_OUT,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                 sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                 HQ, GROUP, LQ, LK, D, DV, sm_scale, qk_scale, causal_off, seed, dropout_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
                 MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    k = _load_tile(K + b * skb + hk * skh, offs_n, skn, LK, offs_d, skd, D)
    v = _load_tile(V + b * svb + hk * svh, offs_n, svn, LK, offs_dv, svd, DV)
    dk = tl.zeros([BLOCK_N, D_P], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_P], tl.float32)
    # Query blocks that see any key of this block start at lo; from full_lo on they see all of it.
    if IS_CAUSAL:
        lo = (tl.minimum(tl.maximum(start_n - causal_off, 0), LQ) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), LQ), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_lo = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_ptr = Q + b * sqb + h * sqh
        do_ptr = DO + b * sdb + h * sdh
        m_ptr = M + b * smb + h * smh
        row = (b * HQ + h) * LQ
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, m_ptr, LSE, DELTA, row, lo, full_lo,
                              offs_n, offs_d, offs_dv, sqm, sqd, sdm, sdd, smm, smn, LQ, LK, D, DV, qk_scale,
                              causal_off, seed, dropout_p, BLOCK_M, MASK_KIND, True, IS_CAUSAL, DROPOUT, DOT,
                              EXACT_BF16)
        # Past the diagonal no tile masking is needed: keys past Lk only feed dk/dv rows never stored.
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, m_ptr, LSE, DELTA, row, full_lo, LQ,
                              offs_n, offs_d, offs_dv, sqm, sqd, sdm, sdd, smm, smn, LQ, LK, D, DV, qk_scale,
                              causal_off, seed, dropout_p, BLOCK_M, MASK_KIND, False, IS_CAUSAL, DROPOUT, DOT,
                              EXACT_BF16)
    dk = dk * sm_scale
    _store_tile(DK + b * sdkb + hk * sdkh, offs_n, sdkn, LK, offs_d, sdkd, D, dk, EXACT_BF16)
    _store_tile(DV_OUT + b * sdvb + hk * sdvh, offs_n, sdvn, LK, offs_dv, sdvd, DV, dv, EXACT_BF16)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, m_ptr, lo, hi, offs_m, offs_d, offs_dv,
               skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed, row, dropout_p,
               BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr,
               DROPOUT: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, s = _kv_scores(q, k_ptr, v_ptr, m_ptr, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn, svd, smm, smn,
                             LQ, LK, D, DV, qk_scale, causal_off, MASK_KIND, EDGE, IS_CAUSAL, DOT)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros([offs_m.shape[0], BLOCK_N], tl.float32), DOT)
        if DROPOUT:
            dp = tl.where(_keep(seed, row, offs_m, offs_n, LK, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(to_out(ds, k_ptr, EXACT_BF16), k, dq, DOT)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, M, DO, LSE, DELTA, DQ,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               smb, smh, smm, smn, sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd,
               HQ, GROUP, LQ, LK, D, DV, sm_scale, qk_scale, causal_off, seed, dropout_p,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
               MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
               DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    start_m, h, b, hk = _query_block(BLOCK_M, GROUP)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, sqm, LQ, offs_d, sqd, D)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, sdm, LQ, offs_dv, sdd, DV)
    row = (b * HQ + h) * LQ
    lse2 = _load_lse2(LSE, row, offs_m, LQ)
    delta = tl.load(DELTA + row + offs_m, mask=offs_m < LQ, other=0.0)
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    m_ptr = M + b * smb + h * smh
    dq = tl.zeros([BLOCK_M, D_P], tl.float32)
    full_end, end = _key_range(start_m, BLOCK_M, BLOCK_N, LK, causal_off, IS_CAUSAL)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, m_ptr, 0, full_end, offs_m, offs_d, offs_dv,
                    skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed, row, dropout_p,
                    BLOCK_N, MASK_KIND, False, IS_CAUSAL, DROPOUT, DOT, EXACT_BF16)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, m_ptr, full_end, end, offs_m, offs_d, offs_dv,
                    skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed, row, dropout_p,
                    BLOCK_N, MASK_KIND, True, IS_CAUSAL, DROPOUT, DOT, EXACT_BF16)
    dq = dq * sm_scale
    _store_tile(DQ + b * sdqb + h * sdqh, offs_m, sdqm, LQ, offs_d, sdqd, D, dq, EXACT_BF16)


@triton.jit
def _keep_kernel(OUT, LQ, LK, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The dropout keep mask the attention kernels use, written out as uint8 (B, Hq, Lq, Lk) (tests).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(2).to(tl.int64) * LQ
    keep = _keep(seed, row, offs_m, offs_n, LK, dropout_p)
    tl.store(OUT + (row + offs_m)[:, None] * LK + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m < LQ)[:, None] & (offs_n < LK)[None, :])


# ---- launchers ---------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DELTA_BLOCK_M = 64
"""Rows per program of the delta kernel (a row reduction over Dv <= 256: memory-bound, any size works)."""


def _check_inputs(q, k, v, mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 like q, got {t.dtype} (q: {q.dtype})")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share B, Hkv and Lk with q {tuple(q.shape)}")
    if k.shape[3] != d or hq % k.shape[1] != 0:
        raise ValueError(f"k {tuple(k.shape)} must have q's head dim and a number of heads dividing q's {hq}")
    if max(d, v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {MAX_HEAD_DIM}, got q/k {d}, v {v.shape[3]}")
    if mask is not None and tuple(mask.shape) != (b, hq, lq, k.shape[2]):
        raise ValueError(f"mask must be expanded to (B, Hq, Lq, Lk) = {(b, hq, lq, k.shape[2])}, "
                         f"got {tuple(mask.shape)}")


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor):
    """(kind, tensor, strides) for the kernels; bool masks are read as bytes."""
    if mask is None:
        return MASK_NONE, q, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return MASK_BOOL, mask.view(torch.uint8), mask.stride()
    return MASK_ADD, mask, mask.stride()


def _launch(cfg: AttnConfig) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                  scale: float, is_causal: bool = False, bottom_right: bool = False, dropout_p: float = 0.0,
                  seed: int = 0, out: torch.Tensor | None = None, config: AttnConfig | None = None):
    """out, lse2 = attention(q, k, v) (shapes and math in the module docstring).

    q, k, v: 4-D, float32/float16/bfloat16, any strides; CUDA tensors, or CPU under TRITON_INTERPRET=1.
    mask: None or (B, Hq, Lq, Lk) bool/float view (broadcast dimensions may have stride 0).
    scale: multiplies q k^T. bottom_right: causal alignment (else top-left). dropout_p, seed: dropout.
    out: optional preallocated (B, Hq, Lq, Dv) output (any strides); config: tiles instead of pick_config's.
    Returns (out, lse2): out in q's dtype, lse2 (B, Hq, Lq) float32 contiguous, in log2 units.
    """
    _check_inputs(q, k, v, mask)
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = _alloc((b, hq, lq, dv), q) if out is None else out
    lse = _alloc((b, hq, lq), q, torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    cfg = config or pick_config("fwd", d, dv, q.dtype)
    kind, m, ms = _mask_args(mask, q)
    grid = (triton.cdiv(lq, cfg.block_m), hq, b)
    with device_guard(q):
        _fwd_kernel[grid](q, k, v, m, out, lse, *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
                          hq, hq // hkv, lq, lk, d, dv, scale * math.log2(math.e),
                          lk - lq if bottom_right else 0, seed, dropout_p,
                          D_P=_pad_dim(d), DV_P=_pad_dim(dv), MASK_KIND=kind, IS_CAUSAL=is_causal,
                          DROPOUT=dropout_p > 0.0, **kernel_flags(q), **_launch(cfg))
    return out, lse


def attention_bwd(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, *,
                  scale: float, is_causal: bool = False, bottom_right: bool = False, dropout_p: float = 0.0,
                  seed: int = 0, dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                  dv: torch.Tensor | None = None, config: AttnConfig | None = None):
    """(dq, dk, dv), the gradients of attention_fwd's out (and lse2, when dlse is given) given dout.

    dout: like out (any strides, e.g. an expanded tensor of ones); dlse: None or the gradient of lse2,
    (B, Hq, Lq) float32; out, lse: attention_fwd's results. dk, dv are summed over the query heads of each kv head. Each
    gradient element is written by one program, without atomics: the result is bit-identical run to run.
    dq, dk, dv: optional preallocated outputs (any strides); config: tiles for both kernels (tests).
    """
    _check_inputs(q, k, v, mask)
    b, hq, lq, d = q.shape
    hkv, lk, dvd = k.shape[1], k.shape[2], v.shape[3]
    dq = _alloc(q.shape, q) if dq is None else dq
    dk = _alloc(k.shape, k) if dk is None else dk
    dv = _alloc(v.shape, v) if dv is None else dv
    if lq == 0 or lk == 0 or b * hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg_kv = config or pick_config("dkdv", d, dvd, q.dtype)
    cfg_q = config or pick_config("dq", d, dvd, q.dtype)
    kind, m, ms = _mask_args(mask, q)
    flags = kernel_flags(q)
    delta = _alloc((b, hq, lq), q, torch.float32)
    lse = lse.contiguous()
    dlse_c = dlse.to(torch.float32).contiguous() if dlse is not None else delta
    common = dict(D_P=_pad_dim(d), DV_P=_pad_dim(dvd), MASK_KIND=kind, IS_CAUSAL=is_causal,
                  DROPOUT=dropout_p > 0.0, **flags)
    sizes = (hq, hq // hkv, lq, lk, d, dvd, scale, scale * math.log2(math.e), lk - lq if bottom_right else 0,
             seed, dropout_p)
    with device_guard(q):
        _delta_kernel[(triton.cdiv(lq, _DELTA_BLOCK_M), hq, b)](
            out, dout, dlse_c, delta, *out.stride(), *dout.stride(), hq, lq, dvd,
            BLOCK_M=_DELTA_BLOCK_M, DV_P=_pad_dim(dvd), HAS_DLSE=dlse is not None)
        _dkdv_kernel[(triton.cdiv(lk, cfg_kv.block_n), hkv, b)](
            q, k, v, m, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride(),
            *dk.stride(), *dv.stride(), *sizes, **common, **_launch(cfg_kv))
        _dq_kernel[(triton.cdiv(lq, cfg_q.block_m), hq, b)](
            q, k, v, m, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride(),
            *dq.stride(), *sizes, **common, **_launch(cfg_q))
    return dq, dk, dv


def dropout_keep_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The keep mask (True = kept) the kernels draw for (B, Hq, Lq, Lk) = shape, dropout_p and seed."""
    b, hq, lq, lk = shape
    out = torch.empty(shape, dtype=torch.uint8, device=device)
    if out.numel():
        grid = (triton.cdiv(lq, 64), triton.cdiv(lk, 64), b * hq)
        with device_guard(out):
            _keep_kernel[grid](out, lq, lk, seed, dropout_p, BLOCK_M=64, BLOCK_N=64)
    return out.bool()
