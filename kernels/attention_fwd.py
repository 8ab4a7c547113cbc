"""Flash attention forward (kernels/attention.py states the contract): out and the log-sum-exp lse2.

Grid: Lq blocks x Hq x B. A program holds a [BLOCK_M, D] tile of queries and walks the key blocks, keeping
the running max m, running sum l and the unnormalised output (online softmax) in fp32, in the log2 domain
(scale * log2(e) is folded into one multiply). The key range is split in two: blocks every query of the tile
sees in full (no per-element masking) and the blocks on the causal diagonal or the Lk edge (masked).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._attn_common import (AttnConfig, Varlen, _causal_offset, _keep, _key_range, _kv_scores, _load_tile,
                           _query_block, _seq, _store_tile, check_inputs, mask_args, packed_4d, pad_dim,
                           pick_config, run_fitting)
from ._common import device_guard, dot, kernel_flags, online_softmax_finish, online_softmax_step, to_out


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, m_ptr, lo, hi, offs_m, offs_d, offs_dv,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                LQ, LK, D, DV, qk_scale, causal_off, seed, row, RNG_COLS, dropout_p,
                BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                DROPOUT: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, s = _kv_scores(q, k_ptr, v_ptr, m_ptr, offs_m, offs_n, offs_d, offs_dv, stride_kn, stride_kd,
                             stride_vn, stride_vd, stride_mm, stride_mn, LQ, LK, D, DV, qk_scale, causal_off,
                             MASK_KIND, EDGE, IS_CAUSAL, DOT)
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        if DROPOUT:
            p = tl.where(_keep(seed, row, offs_m, offs_n, RNG_COLS, dropout_p), p / (1.0 - dropout_p), 0.0)
        acc = dot(to_out(p, v_ptr, EXACT_BF16), v, acc * alpha[:, None], DOT)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, M, O, LSE, CU_Q, CU_K,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sob, soh, som, sod, slb, slh,
                GROUP, LQ, LK, RNG_COLS, D, DV, qk_scale, seed, dropout_p,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
                MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                VARLEN: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    start_m, h, b, hk = _query_block(BLOCK_M, GROUP)
    q0, LQ = _seq(CU_Q, b, LQ, VARLEN)
    k0, LK = _seq(CU_K, b, LK, VARLEN)
    if start_m >= LQ:  # packed sequences: this one is shorter than the longest
        return
    causal_off = _causal_offset(LQ, LK, BOTTOM_RIGHT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    q = _load_tile(Q + b * sqb + h * sqh + q0 * sqm, offs_m, sqm, LQ, offs_d, sqd, D)
    k_ptr = K + b * skb + hk * skh + k0 * skn
    v_ptr = V + b * svb + hk * svh + k0 * svn
    m_ptr = M + b * smb + h * smh
    row = b * slb + h * slh + q0  # this head's first row in LSE; also the dropout counter's row base
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_P], tl.float32)
    full_end, end = _key_range(start_m, BLOCK_M, BLOCK_N, LK, causal_off, IS_CAUSAL)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, m_ptr, 0, full_end, offs_m, offs_d, offs_dv,
                                skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed,
                                row, RNG_COLS, dropout_p, BLOCK_N, MASK_KIND, False, IS_CAUSAL, DROPOUT, DOT,
                                EXACT_BF16)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, m_ptr, full_end, end, offs_m, offs_d, offs_dv,
                                skn, skd, svn, svd, smm, smn, LQ, LK, D, DV, qk_scale, causal_off, seed,
                                row, RNG_COLS, dropout_p, BLOCK_N, MASK_KIND, True, IS_CAUSAL, DROPOUT, DOT,
                                EXACT_BF16)
    out, lse2 = online_softmax_finish(acc, m_i, l_i)  # a row that saw no key: 0 and -inf, as torch gives
    _store_tile(O + b * sob + h * soh + q0 * som, offs_m, som, LQ, offs_dv, sod, DV, out, EXACT_BF16)
    tl.store(LSE + row + offs_m, lse2, mask=offs_m < LQ)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                  scale: float, is_causal: bool = False, bottom_right: bool = False, dropout_p: float = 0.0,
                  seed: int = 0, out: torch.Tensor | None = None, config: AttnConfig | None = None,
                  varlen: Varlen | None = None):
    """out, lse2 = attention(q, k, v) (shapes and math in kernels/attention.py).

    q, k, v: 4-D (B, H, L, D), float32/float16/bfloat16, any strides; CUDA tensors, or CPU under
    TRITON_INTERPRET=1. With `varlen` (packed sequences) they are packed (T, H, D) tensors instead.
    mask: None or (B, Hq, Lq, Lk) bool/float view (broadcast dimensions may have stride 0); not with varlen.
    scale: multiplies q k^T. bottom_right: causal alignment (else top-left). dropout_p, seed: dropout.
    out: optional preallocated output, (B, Hq, Lq, Dv) or packed (Tq, Hq, Dv), any strides;
    config: tiles instead of pick_config's.
    Returns (out, lse2): out in q's dtype; lse2 float32 in log2 units, (B, Hq, Lq) contiguous, or (Hq, Tq)
    with varlen.
    """
    if varlen is not None:
        if mask is not None:
            raise ValueError("mask is not supported with packed sequences (varlen)")
        out = torch.empty((*q.shape[:2], v.shape[2]), dtype=q.dtype, device=q.device) if out is None else out
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        n = varlen.n
        q, k, v, out4 = packed_4d(q, n), packed_4d(k, n), packed_4d(v, n), packed_4d(out, n)
        lq, lk, lse_strides, rng_cols = varlen.max_q, varlen.max_k, (0, lse.stride(0)), varlen.max_k
        cu_q, cu_k = varlen.cu_q, varlen.cu_k
    check_inputs(q, k, v, mask)
    b, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    if varlen is None:
        lq, lk = q.shape[2], k.shape[2]
        out = torch.empty((b, hq, lq, dv), dtype=q.dtype, device=q.device) if out is None else out
        out4 = out
        lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
        lse_strides, rng_cols, cu_q, cu_k = (hq * lq, lq), lk, lse, lse
    if out.numel() == 0 and lse.numel() == 0 or lq == 0:
        return out, lse
    cfg = config or pick_config("fwd", d, dv, q.dtype, q.device)
    kind, m, ms = mask_args(mask, q)
    with device_guard(q):
        run_fitting(_fwd_kernel, lambda t: (triton.cdiv(lq, t.block_m), hq, b), cfg, q.device,
                    (q, k, v, m, out4, lse, cu_q, cu_k, *q.stride(), *k.stride(), *v.stride(), *ms, *out4.stride(),
                     *lse_strides, hq // hkv, lq, lk, rng_cols, d, dv, scale * math.log2(math.e), seed, dropout_p),
                    dict(D_P=pad_dim(d), DV_P=pad_dim(dv), MASK_KIND=kind, IS_CAUSAL=is_causal,
                         BOTTOM_RIGHT=bottom_right, VARLEN=varlen is not None, DROPOUT=dropout_p > 0.0,
                         **kernel_flags(q)), shrink=config is None)
    return out, lse
