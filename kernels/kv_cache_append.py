"""Triton KV-cache append: write the new keys and values of each sequence at its current length, optionally
rotating keys (and queries) with rotary embeddings and quantising to int8, in one pass.

Shapes (any strides):
    k_new, v_new: (B, Lnew, Hkv, D)   q: None or (B, Lnew, Hq, D), rotated into q_out (same shape)
    k_cache, v_cache: (B, Lmax, Hkv, D), or paged (num_blocks, PAGE, Hkv, D) with block_table (B, max_blocks)
    k_scale, v_scale: None, or float32 cache.shape[:3] for an int8 cache
    cache_seqlens: (B,) int32, the lengths BEFORE the append: token t of sequence b goes to position
        cache_seqlens[b] + t
    cos, sin: None, or (max_position, R) tables indexed by that absolute position (R even, <= D)
Math (fastllm/reference/decode_attention.py): "rotate half" rotary embedding of the first R features in fp32,
then, for int8, per (position, kv head): scale = max|x| / 127, code = sign(x) floor(|x| / scale + 1/2) (a row
holding NaN: scale NaN, codes 0; a code of NaN, inf / inf: 0).
Grid: Lnew x B; a program writes one position of one sequence, all its kv heads ([Hkv, D] tiles) and, with q,
rotates that token's Hq query heads. A memory-bound copy: any tile works.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cache_slots, device_guard, kernel_flags, to_out

__all__ = ["kv_cache_append"]

_INT8_MAX = tl.constexpr(127.0)


@triton.jit
def _rotated_rows(X, sh, sd, H, D, COS, SIN, scp, scd, ssp, ssd, pos, R,
                  H_P: tl.constexpr, D_P: tl.constexpr, ROTARY: tl.constexpr):
    """The [H_P, D_P] tile of rows (H, D) at X in fp32, rotary-embedded at position pos when ROTARY; and its mask."""
    offs_h = tl.arange(0, H_P)
    offs_d = tl.arange(0, D_P)
    ok = (offs_h < H)[:, None] & (offs_d < D)[None, :]
    rows = X + offs_h[:, None] * sh
    x = tl.load(rows + offs_d[None, :] * sd, mask=ok, other=0.0).to(tl.float32)
    if ROTARY:
        half = R // 2
        rot = offs_d < R
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        xp = tl.load(rows + partner[None, :] * sd, mask=ok & rot[None, :], other=0.0).to(tl.float32)
        c = tl.load(COS + pos * scp + offs_d * scd, mask=rot, other=1.0).to(tl.float32)
        s = tl.load(SIN + pos * ssp + offs_d * ssd, mask=rot, other=0.0).to(tl.float32)
        x = x * c[None, :] + tl.where(first, -xp, xp) * s[None, :]
    return x, ok


@triton.jit
def _append_kernel(KN, VN, KC, VC, KS, VS, BT, SEQ, COS, SIN, Q, QO,
                   sknb, sknt, sknh, sknd, svnb, svnt, svnh, svnd,
                   skp, skn, skh, skd, svp, svn, svh, svd, sksp, sksn, sksh, svsp, svsn, svsh, sbtb, sbtn,
                   scp, scd, ssp, ssd, sqb, sqt, sqh, sqd, sob, sot, soh, sod,
                   HKV, HQ, D, R, PAGE,
                   H_P: tl.constexpr, HQ_P: tl.constexpr, D_P: tl.constexpr, PAGED: tl.constexpr,
                   INT8: tl.constexpr, ROTARY: tl.constexpr, HAS_Q: tl.constexpr, EXACT_BF16: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = tl.load(SEQ + b) + t
    page, slot = cache_slots(BT, b, sbtb, sbtn, pos, True, PAGE, PAGED)
    offs_h = tl.arange(0, H_P)
    offs_d = tl.arange(0, D_P)
    for which in tl.static_range(2):  # 0: keys (rotated), 1: values
        if which == 0:
            x, ok = _rotated_rows(KN + b * sknb + t * sknt, sknh, sknd, HKV, D, COS, SIN, scp, scd, ssp, ssd, pos, R,
                                  H_P, D_P, ROTARY)
            dst = KC + page * skp + slot * skn + offs_h[:, None] * skh + offs_d[None, :] * skd
            scale_dst = KS + page * sksp + slot * sksn + offs_h * sksh
        else:
            x, ok = _rotated_rows(VN + b * svnb + t * svnt, svnh, svnd, HKV, D, COS, SIN, scp, scd, ssp, ssd, pos, R,
                                  H_P, D_P, False)
            dst = VC + page * svp + slot * svn + offs_h[:, None] * svh + offs_d[None, :] * svd
            scale_dst = VS + page * svsp + slot * svsn + offs_h * svsh
        if INT8:
            scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), _INT8_MAX)
            nan = tl.max((x != x).to(tl.int32), axis=1) > 0  # such a row: scale NaN, codes 0 (reads back NaN)
            scale = tl.where(nan, float("nan"), scale)
            code = tl.floor(tl.math.div_rn(tl.abs(x), tl.where(scale > 0.0, scale, 1.0)[:, None]) + 0.5)
            code = tl.where(code == code, tl.minimum(code, _INT8_MAX), 0.0)
            code = tl.where(nan[:, None], 0.0, code)
            tl.store(dst, tl.where(x < 0.0, -code, code).to(tl.int8), mask=ok)
            tl.store(scale_dst, scale, mask=offs_h < HKV)
        else:
            tl.store(dst, to_out(x, KC, EXACT_BF16), mask=ok)
    if HAS_Q:
        x, ok = _rotated_rows(Q + b * sqb + t * sqt, sqh, sqd, HQ, D, COS, SIN, scp, scd, ssp, ssd, pos, R,
                              HQ_P, D_P, ROTARY)
        offs_q = tl.arange(0, HQ_P)
        tl.store(QO + b * sob + t * sot + offs_q[:, None] * soh + offs_d[None, :] * sod, to_out(x, QO, EXACT_BF16),
                 mask=ok)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, q: torch.Tensor | None = None,
                    q_out: torch.Tensor | None = None) -> None:
    """Append in place (shapes and math in the module docstring); arguments as validated by
    fastllm.kv_cache_append. With q, q_out receives q rotated at the same positions."""
    b, lnew, hkv, d = k_new.shape
    if b * lnew == 0:
        return
    paged = block_table is not None
    rotary = cos is not None
    hq = q.shape[2] if q is not None else 0
    cache_seqlens = cache_seqlens.contiguous()  # the kernel reads entry b at b (no copy when already dense)
    with device_guard(k_new):
        _append_kernel[(lnew, b)](
            k_new, v_new, k_cache, v_cache, k_scale if k_scale is not None else k_new,
            v_scale if v_scale is not None else k_new, block_table if paged else cache_seqlens, cache_seqlens,
            cos if rotary else k_new, sin if rotary else k_new, q if q is not None else k_new,
            q_out if q_out is not None else k_new,
            *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(), *_strides(k_scale, 3),
            *_strides(v_scale, 3), *_strides(block_table, 2), *_strides(cos, 2), *_strides(sin, 2),
            *_strides(q, 4), *_strides(q_out, 4), hkv, hq, d, cos.shape[1] if rotary else 0, k_cache.shape[1],
            H_P=_pow2(hkv), HQ_P=_pow2(hq), D_P=_pow2(d), PAGED=paged, INT8=k_cache.dtype == torch.int8,
            ROTARY=rotary, HAS_Q=q is not None, EXACT_BF16=kernel_flags(k_new)["EXACT_BF16"])
