"""Flash attention backward (kernels/attention.py states the contract): dq, dk, dv given dout (and dlse2).

A tiny kernel computes delta_i = dout_i . out_i - dlse2_i log2(e); then
    dkdv kernel (grid: Lk blocks x Hkv x B): a program owns a block of keys and loops over the G query heads of
        its group and over the query blocks that can see it, accumulating dk and dv in registers;
    dq, deterministic mode: a dq kernel (grid: Lq blocks x Hq x B) owns a block of queries and loops over the key
        blocks, recomputing the scores. Every gradient element is written by exactly one program, with no
        atomics: the gradients are bit-identical run to run.
    dq, fast mode (ATOMIC_DQ): the dkdv kernel, which already has ds for each (query block, key block) tile,
        also adds ds k * scale into an fp32 dq buffer with atomic adds (as FlashAttention-2 does), so the
        scores are computed once instead of twice; the order of the additions, hence dq's last bits, varies
        from run to run. NOT TIMED against the deterministic mode yet (no GPU has run it).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._attn_common import (LOG2E, AttnConfig, Varlen, _causal_offset, _keep, _key_range, _kv_scores,
                           _load_lse2, _load_tile, _query_block, _scores, _seq, _store_tile, _tile, check_inputs,
                           mask_args, packed_4d, pad_dim, pick_config, run_fitting)
from ._common import device_guard, dot, kernel_flags, to_out

DELTA_BLOCK_M = 64
"""Rows per program of the delta kernel (a row reduction over Dv <= 256: memory-bound, any size works)."""


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
        delta -= tl.load(DLSE + row, mask=offs_m < LQ, other=0.0) * LOG2E
    tl.store(DELTA + row, delta, mask=offs_m < LQ)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, dq_ptr, m_ptr, LSE, DELTA, row, lo, hi, offs_n, offs_d, offs_dv,
                 sqm, sqd, sdm, sdd, sam, sad, smm, smn, LQ, LK, D, DV, sm_scale, qk_scale, causal_off, seed,
                 RNG_COLS, dropout_p, BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT: tl.constexpr,
                 EXACT_BF16: tl.constexpr):
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
        dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, v.shape[0]], tl.float32), DOT)
        if DROPOUT:
            scale_keep = tl.where(_keep(seed, row, offs_m, offs_n, RNG_COLS, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
            dv = dot(tl.trans(to_out(p * scale_keep, do_ptr, EXACT_BF16)), do, dv, DOT)
            dp = dp * scale_keep
        else:
            dv = dot(tl.trans(to_out(p, do_ptr, EXACT_BF16)), do, dv, DOT)
        ds = to_out(p * (dp - delta[:, None]), q_ptr, EXACT_BF16)
        dk = dot(tl.trans(ds), q, dk, DOT)
        if ATOMIC_DQ:
            # Keys past Lk (k loaded as 0) must add nothing to dq; without the EDGE masks their p can be inf (a row
            # whose every key has a large finite negative mask, -1e4, has lse2 ~ -1.4e4, and their s is 0): then
            # inf * 0 = NaN.
            if not EDGE:
                ds = tl.where((offs_n < LK)[None, :], ds, tl.zeros_like(ds))
            dq = dot(ds, k, tl.zeros([BLOCK_M, k.shape[1]], tl.float32), DOT) * sm_scale
            ptrs, inb = _tile(dq_ptr, offs_m, sam, LQ, offs_d, sad, D)
            tl.atomic_add(ptrs, dq, mask=inb, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, M, DO, LSE, DELTA, DK, DV_OUT, DQ_ACC, CU_Q, CU_K,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                 sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sab, sah, sam, sad, slb, slh,
                 GROUP, LQ, LK, RNG_COLS, D, DV, sm_scale, qk_scale, seed, dropout_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
                 MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                 VARLEN: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT: tl.constexpr,
                 EXACT_BF16: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q0, LQ = _seq(CU_Q, b, LQ, VARLEN)
    k0, LK = _seq(CU_K, b, LK, VARLEN)
    if start_n >= LK:  # packed sequences: this one is shorter than the longest
        return
    causal_off = _causal_offset(LQ, LK, BOTTOM_RIGHT)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    k = _load_tile(K + b * skb + hk * skh + k0 * skn, offs_n, skn, LK, offs_d, skd, D)
    v = _load_tile(V + b * svb + hk * svh + k0 * svn, offs_n, svn, LK, offs_dv, svd, DV)
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
        q_ptr = Q + b * sqb + h * sqh + q0 * sqm
        do_ptr = DO + b * sdb + h * sdh + q0 * sdm
        dq_ptr = DQ_ACC + b * sab + h * sah + q0 * sam
        m_ptr = M + b * smb + h * smh
        row = b * slb + h * slh + q0
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, dq_ptr, m_ptr, LSE, DELTA, row, lo, full_lo,
                              offs_n, offs_d, offs_dv, sqm, sqd, sdm, sdd, sam, sad, smm, smn, LQ, LK, D, DV,
                              sm_scale, qk_scale, causal_off, seed, RNG_COLS, dropout_p, BLOCK_M, MASK_KIND, True,
                              IS_CAUSAL, DROPOUT, ATOMIC_DQ, DOT, EXACT_BF16)
        # Past the diagonal no tile masking is needed: keys past Lk only feed dk/dv rows never stored.
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, dq_ptr, m_ptr, LSE, DELTA, row, full_lo, LQ,
                              offs_n, offs_d, offs_dv, sqm, sqd, sdm, sdd, sam, sad, smm, smn, LQ, LK, D, DV,
                              sm_scale, qk_scale, causal_off, seed, RNG_COLS, dropout_p, BLOCK_M, MASK_KIND, False,
                              IS_CAUSAL, DROPOUT, ATOMIC_DQ, DOT, EXACT_BF16)
    dk = dk * sm_scale
    _store_tile(DK + b * sdkb + hk * sdkh + k0 * sdkn, offs_n, sdkn, LK, offs_d, sdkd, D, dk, EXACT_BF16)
    _store_tile(DV_OUT + b * sdvb + hk * sdvh + k0 * sdvn, offs_n, sdvn, LK, offs_dv, sdvd, DV, dv, EXACT_BF16)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, m_ptr, lo, hi, offs_m, offs_d, offs_dv,
               skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed, row, RNG_COLS, dropout_p,
               BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr,
               DROPOUT: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, s = _kv_scores(q, k_ptr, v_ptr, m_ptr, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn, svd, smm, smn,
                             LQ, LK, D, DV, qk_scale, causal_off, MASK_KIND, EDGE, IS_CAUSAL, DOT)
        p = tl.exp2(s - lse2[:, None])
        dp = dot(do, tl.trans(v), tl.zeros([offs_m.shape[0], BLOCK_N], tl.float32), DOT)
        if DROPOUT:
            dp = tl.where(_keep(seed, row, offs_m, offs_n, RNG_COLS, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = dot(to_out(ds, k_ptr, EXACT_BF16), k, dq, DOT)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, M, DO, LSE, DELTA, DQ, CU_Q, CU_K,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               smb, smh, smm, smn, sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd, slb, slh,
               GROUP, LQ, LK, RNG_COLS, D, DV, sm_scale, qk_scale, seed, dropout_p,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
               MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
               VARLEN: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    start_m, h, b, hk = _query_block(BLOCK_M, GROUP)
    q0, LQ = _seq(CU_Q, b, LQ, VARLEN)
    k0, LK = _seq(CU_K, b, LK, VARLEN)
    if start_m >= LQ:
        return
    causal_off = _causal_offset(LQ, LK, BOTTOM_RIGHT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    q = _load_tile(Q + b * sqb + h * sqh + q0 * sqm, offs_m, sqm, LQ, offs_d, sqd, D)
    do = _load_tile(DO + b * sdb + h * sdh + q0 * sdm, offs_m, sdm, LQ, offs_dv, sdd, DV)
    row = b * slb + h * slh + q0
    lse2 = _load_lse2(LSE, row, offs_m, LQ)
    delta = tl.load(DELTA + row + offs_m, mask=offs_m < LQ, other=0.0)
    k_ptr = K + b * skb + hk * skh + k0 * skn
    v_ptr = V + b * svb + hk * svh + k0 * svn
    m_ptr = M + b * smb + h * smh
    dq = tl.zeros([BLOCK_M, D_P], tl.float32)
    full_end, end = _key_range(start_m, BLOCK_M, BLOCK_N, LK, causal_off, IS_CAUSAL)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, m_ptr, 0, full_end, offs_m, offs_d, offs_dv,
                    skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed, row, RNG_COLS,
                    dropout_p, BLOCK_N, MASK_KIND, False, IS_CAUSAL, DROPOUT, DOT, EXACT_BF16)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_ptr, v_ptr, m_ptr, full_end, end, offs_m, offs_d, offs_dv,
                    skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed, row, RNG_COLS,
                    dropout_p, BLOCK_N, MASK_KIND, True, IS_CAUSAL, DROPOUT, DOT, EXACT_BF16)
    dq = dq * sm_scale
    _store_tile(DQ + b * sdqb + h * sdqh + q0 * sdqm, offs_m, sdqm, LQ, offs_d, sdqd, D, dq, EXACT_BF16)


def attention_bwd(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, *,
                  scale: float, is_causal: bool = False, bottom_right: bool = False, dropout_p: float = 0.0,
                  seed: int = 0, deterministic: bool = True, dq: torch.Tensor | None = None,
                  dk: torch.Tensor | None = None, dv: torch.Tensor | None = None, config: AttnConfig | None = None,
                  varlen: Varlen | None = None):
    """(dq, dk, dv), the gradients of attention_fwd's out (and lse2, when dlse is given) given dout.

    dout: like out (any strides, e.g. an expanded tensor of ones); dlse: None or the gradient of lse2 (lse's
    shape, float32); out, lse: attention_fwd's results. dk, dv are summed over the query heads of each kv
    head. deterministic: atomic-free and bit-identical run to run; False adds dq with atomics (faster).
    dq, dk, dv: optional preallocated outputs (any strides); config: tiles for both kernels (tests);
    varlen: packed sequences, as attention_fwd.
    """
    if varlen is not None:
        n = varlen.n
        dq = torch.empty_like(q) if dq is None else dq
        dk = torch.empty_like(k) if dk is None else dk
        dv = torch.empty_like(v) if dv is None else dv
        q, k, v, out, dout, dq4, dk4, dv4 = (packed_4d(t, n) for t in (q, k, v, out, dout, dq, dk, dv))
        # delta and lse are (Hq, Tq): the delta kernel sees them as one batch of Tq rows per head.
        rows = (out[:1], dout[:1], 1, q.shape[2])
        lq, lk, lse_strides, rng_cols, cu_q, cu_k = varlen.max_q, varlen.max_k, (0, lse.stride(0)), varlen.max_k, \
            varlen.cu_q, varlen.cu_k
    check_inputs(q, k, v, mask)
    b, hq, _, d = q.shape
    hkv, dvd = k.shape[1], v.shape[3]
    if varlen is None:
        lq, lk = q.shape[2], k.shape[2]
        dq4 = dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
        dk4 = dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
        dv4 = dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
        rows = (out, dout, b, lq)
        lse_strides, rng_cols, cu_q, cu_k = (hq * lq, lq), lk, lse, lse
    if lq == 0 or lk == 0 or b * hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg_kv = config or pick_config("dkdv", d, dvd, q.dtype, q.device)
    cfg_q = config or pick_config("dq", d, dvd, q.dtype, q.device)
    kind, m, ms = mask_args(mask, q)
    # Under the interpreter programs run one after another: the atomic path is then exactly repeatable too.
    atomic = not deterministic
    d_out, d_dout, d_b, d_lq = rows
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    dlse_c = dlse.to(torch.float32).contiguous() if dlse is not None else delta
    dq_acc = torch.zeros((b if varlen is None else 1, hq, q.shape[2], d), dtype=torch.float32, device=q.device) \
        if atomic else delta
    acc_strides = (dq_acc.stride(0) if varlen is None else 0, *dq_acc.stride()[1:]) if atomic else (0, 0, 0, 0)
    common = dict(D_P=pad_dim(d), DV_P=pad_dim(dvd), MASK_KIND=kind, IS_CAUSAL=is_causal, BOTTOM_RIGHT=bottom_right,
                  VARLEN=varlen is not None, DROPOUT=dropout_p > 0.0, **kernel_flags(q))
    sizes = (*lse_strides, hq // hkv, lq, lk, rng_cols, d, dvd, scale, scale * math.log2(math.e), seed, dropout_p)
    with device_guard(q):
        _delta_kernel[(triton.cdiv(d_lq, DELTA_BLOCK_M), hq, d_b)](
            d_out, d_dout, dlse_c, delta, *d_out.stride(), *d_dout.stride(), hq, d_lq, dvd,
            BLOCK_M=DELTA_BLOCK_M, DV_P=pad_dim(dvd), HAS_DLSE=dlse is not None)
        run_fitting(_dkdv_kernel, lambda t: (triton.cdiv(lk, t.block_n), hkv, b), cfg_kv, q.device,
                    (q, k, v, m, dout, lse, delta, dk4, dv4, dq_acc, cu_q, cu_k, *q.stride(), *k.stride(),
                     *v.stride(), *ms, *dout.stride(), *dk4.stride(), *dv4.stride(), *acc_strides, *sizes),
                    dict(ATOMIC_DQ=atomic, **common), shrink=config is None)
        if atomic:
            dq.copy_(dq_acc if varlen is None else dq_acc[0].transpose(0, 1))
        else:
            run_fitting(_dq_kernel, lambda t: (triton.cdiv(lq, t.block_m), hq, b), cfg_q, q.device,
                        (q, k, v, m, dout, lse, delta, dq4, cu_q, cu_k, *q.stride(), *k.stride(), *v.stride(), *ms,
                         *dout.stride(), *dq4.stride(), *sizes), common, shrink=config is None)
    return dq, dk, dv
