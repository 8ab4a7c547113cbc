"""Triton GEMM for weight-only quantised linear layers: y = x @ W^T + bias, with W dequantised tile by tile in
registers inside the K loop (as Marlin does), so the packed weight is read from memory once and never expanded.

Shapes: x (M, K), inner stride 1, any row stride; the packed weight W (N, K) in fastllm's "rows" layout
(fastllm/quant/formats.py): data int8 (N, K) or uint8 (N, K // 2), scales (N, K // G) float16 or (N, 1)
float32 for per-channel int8, mins (N, K // G) float16 for int4_asym; bias (N,) in x's dtype or None;
y (M, N) in x's dtype (any row stride, inner stride 1). K is a multiple of 32 and of G.

Math, per format code (csrc/common/qformat.h; Format.code):
    0 int8 per-channel   y = (x @ q^T) * d          (q exact in fp16/bf16; d applied once to the fp32 sum)
    1 int8 group-wise    w = q * d
    2 int4               w = (u - 8) * d
    3 int4_asym          w = u * d + m
w is computed in fp32 (exact, see formats.py) and rounded once to x's dtype, as torch's F.linear on the
dequantised weight would see it; fp16/bf16 tiles then run on the tensor cores, fp32 ones as true fp32 dots
(never tf32); the accumulation is fp32 throughout, + bias, rounded once to x's dtype.

Grid (M tiles, N tiles, splits); M tiles vary fastest, so programs that share a weight tile run together and
the weight is read from DRAM about once. Program (i, j, s) owns rows [i BLOCK_M, ...) and columns
[j BLOCK_N, ...) of y and the K range [s k_split, (s + 1) k_split). It steps through K by BLOCK_K, and each
step by SUB_K = 32 elements: a sub-tile lies inside one group, so its scales (and mins) are one vector of
BLOCK_N values. int4: a sub-tile is one 16-byte block per column, byte i holding element i (low nibble) and
16 + i (high nibble); rather than interleave nibbles in registers, the low nibbles are multiplied with x's
columns 0..15 of the block and the high nibbles with columns 16..31: two dots of 16, the same sum.
Split-K (when the output tiles alone leave SMs idle, small M): each split writes its fp32 partial tile to a
workspace (splits, M, N) and a second kernel sums the splits in order, adds the bias and rounds: deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import device_guard, dot, kernel_flags, sm_count, to_out

__all__ = ["QConfig", "pick_config", "num_splits_for", "qmatmul"]

I8_CHANNEL, I8_GROUP, I4, I4_ASYM = 0, 1, 2, 3
"""Format codes (fastllm.quant.formats.Format.code, csrc/common/qformat.h)."""


# ---- block-size policy -------------------------------------------------------------------------
@dataclass(frozen=True)
class QConfig:
    """block_m x block_n output tile, block_k: K step (powers of two; block_m, block_n >= 16, block_k >= 32);
    num_warps, num_stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


CONFIGS = {
    # (largest M of the bucket, fp32?): tile
    (16, False): QConfig(16, 64, 128, 4, 4),
    (32, False): QConfig(32, 64, 64, 4, 4),
    (64, False): QConfig(64, 128, 64, 8, 3),
    (None, False): QConfig(128, 128, 64, 8, 3),
    (16, True): QConfig(16, 32, 64, 4, 3),
    (32, True): QConfig(16, 32, 64, 4, 3),
    (64, True): QConfig(64, 64, 32, 8, 2),
    (None, True): QConfig(64, 64, 32, 8, 2),
}
"""Tiles by M bucket (M <= 16, <= 32, <= 64, larger) and by fp32 or not.

Small M is memory-bound (a Marlin-like regime): the tile is as tall as M needs (16, the smallest tl.dot tile,
then 32), narrow in N (64) so that many programs stream the weight, and deep in K (128 elements: 64 bytes of
int4 or 128 of int8 per weight row per step, 4 stages of loads in flight). From M = 64 the tile grows toward a
compute-bound GEMM's (128 x 128 x 64, 8 warps), since each weight tile is then reused by many rows. fp32 runs
its dots as exact fp32 FMAs, which need far more registers: smaller tiles.
Chosen by compiling for sm_90a with Triton 3.9 without a GPU (tests/test_qmatmul_triton.py compile-check):
fp16/bf16 tiles compile with no register spills (bf16, every format: 128-250 registers per thread), the
M > 32 ones on wgmma; fp32 tiles spill at most 16 bytes; shared memory at most 32 KiB. NOT TIMED on a GPU."""

SUB_K = tl.constexpr(32)
"""Elements of K dequantised at a time: one int4 block (16 bytes of a weight row), so one group whatever G and
one scale (and min) per column. 64- or 128-element sub-tiles made ptxas spill hundreds of bytes per thread at
small M (the pipelined weight loads of every stage wait in registers), so the BLOCK_K step is unrolled over
sub-tiles of 32 instead."""

PROGRAMS_PER_SM = 2
"""Programs per SM the split-K heuristic aims at when the output tiles alone do not fill the GPU."""
MIN_K_STEPS_PER_SPLIT = 4
"""Fewest BLOCK_K steps a split gets: its load pipeline (num_stages deep) needs a few iterations to pay off."""
MAX_SPLITS = 16
"""Most K splits (the workspace holds splits x M x N fp32 partials)."""


def _bucket(m: int) -> int | None:
    return next((b for b in (16, 32, 64) if m <= b), None)


def pick_config(m: int, n: int, k: int, dtype: torch.dtype) -> QConfig:
    """The tile for M rows of x in `dtype`, shrunk to the problem (no larger than N or K need)."""
    cfg = CONFIGS[(_bucket(m), dtype == torch.float32)]
    return QConfig(cfg.block_m, max(16, min(cfg.block_n, triton.next_power_of_2(n))),
                   max(32, min(cfg.block_k, triton.next_power_of_2(k))), cfg.num_warps, cfg.num_stages)


def num_splits_for(tiles: int, m: int, n: int, k: int, block_k: int, bits: int, device: torch.device) -> int:
    """K splits for `tiles` output tiles: none while they fill the GPU; else enough for PROGRAMS_PER_SM per SM,
    with at least MIN_K_STEPS_PER_SPLIT steps of block_k per split, at most MAX_SPLITS, and no more than keep the
    fp32 partials (written and read back, 8 M N bytes per split) within the packed weight's N K bits / 8 bytes."""
    sms = sm_count(device)
    if tiles >= sms:
        return 1
    want = triton.cdiv(PROGRAMS_PER_SM * sms, tiles)
    by_bytes = (n * k * bits // 8) // (8 * m * n)
    return max(1, min(want, triton.cdiv(k, block_k) // MIN_K_STEPS_PER_SPLIT, MAX_SPLITS, by_bytes))


# ---- kernels -----------------------------------------------------------------------------------
@triton.jit
def _group_vector(S, offs_n, ok, stride_n, g):
    """Column g of a (N, K // G) scale or min table for the columns offs_n, in fp32 (0 where not ok)."""
    return tl.load(S + offs_n * stride_n + g, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _acc_dot(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b. Under the interpreter (DOT_INTERP) acc is fp64 and the whole K sum is exact up to one final
    rounding: rounding each 16- or 32-deep partial dot to fp32 (as _common.dot does) would add an error the GPU's
    fp32 MMA accumulation does not have."""
    if DOT == 2:  # DOT_INTERP
        return tl.dot(a.to(tl.float64), b.to(tl.float64)) + acc
    return dot(a, b, acc, DOT)


@triton.jit
def _qmm_kernel(X, W, S, MINS, B, Y, P, M, N, K, KH, G, sxm, sym, swn, ssn, k_split,
                FMT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y (SPLIT: of the fp32 partial sums of K split program_id(2) in P)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * sxm       # [BLOCK_M, 1]
    w_cols = W + offs_n.to(tl.int64)[None, :] * swn       # [1, BLOCK_N]: weight row n is column n of W^T
    k_start = tl.program_id(2) * k_split
    k_end = tl.minimum(k_start + k_split, K)
    if DOT == 2:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for t in tl.static_range(BLOCK_K // SUB_K):
            kb = k0 + t * SUB_K                            # a multiple of 32, inside group kb // G
            g = tl.minimum(kb, K - 1) // G                 # (clamped: a sub-tile past K has zero x anyway)
            if FMT >= 2:  # int4: one 16-byte block per column, [16, BLOCK_N] bytes of two nibbles
                j = tl.arange(0, SUB_K // 2)
                x_ok = m_ok[:, None] & (kb + j < K)[None, :]
                x_lo = tl.load(x_rows + (kb + j)[None, :], mask=x_ok, other=0.0)
                x_hi = tl.load(x_rows + (kb + SUB_K // 2 + j)[None, :], mask=x_ok, other=0.0)
                jb = kb // 2 + j
                b = tl.load(w_cols + jb[:, None], mask=(jb < KH)[:, None] & n_ok[None, :], other=0)
                d = _group_vector(S, offs_n, n_ok, ssn, g)[None, :]
                lo = (b & 0xF).to(tl.float32)
                hi = (b >> 4).to(tl.float32)
                if FMT == 2:
                    lo, hi = (lo - 8.0) * d, (hi - 8.0) * d
                else:
                    mn = _group_vector(MINS, offs_n, n_ok, ssn, g)[None, :]
                    lo, hi = lo * d + mn, hi * d + mn
                acc = _acc_dot(x_lo, to_out(lo, X, EXACT_BF16), acc, DOT)
                acc = _acc_dot(x_hi, to_out(hi, X, EXACT_BF16), acc, DOT)
            else:  # int8: [SUB_K, BLOCK_N]
                k = kb + tl.arange(0, SUB_K)
                k_ok = k < K
                xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0).to(tl.float32)
                if FMT == 1:
                    w = w * _group_vector(S, offs_n, n_ok, ssn, g)[None, :]
                acc = _acc_dot(xt, to_out(w, X, EXACT_BF16), acc, DOT)
    acc = acc.to(tl.float32)
    if FMT == 0:  # per-channel scale, constant along K
        acc = acc * tl.load(S + offs_n, mask=n_ok, other=0.0)[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        part = P + tl.program_id(2).to(tl.int64) * M * N
        tl.store(part + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = Y + offs_m.to(tl.int64)[:, None] * sym + offs_n[None, :]
        tl.store(out, to_out(acc, Y, EXACT_BF16), mask=ok)


@triton.jit
def _split_sum_kernel(P, B, Y, M, N, sym, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                      EXACT_BF16: tl.constexpr):
    """y[m, n] = sum over the splits (in order) of P[s, m, n] + bias[n], for BLOCK consecutive (m, n)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M * N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLITS):
        acc += tl.load(P + s * M * N + i, mask=ok, other=0.0)
    n = i % N
    if HAS_BIAS:
        acc += tl.load(B + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + (i // N) * sym + n, to_out(acc, Y, EXACT_BF16), mask=ok)


SUM_BLOCK = 1024
"""Outputs per program of the split-K sum (4 warps, 8 each per thread: a streaming kernel)."""


# ---- launcher ----------------------------------------------------------------------------------
def qmatmul(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
            bias: torch.Tensor | None, fmt_code: int, group: int, out: torch.Tensor,
            config: QConfig | None = None, splits: int | None = None) -> torch.Tensor:
    """out (M, N) = x (M, K) @ W^T + bias for the packed W (data, scales, mins) of format `fmt_code` and group
    size `group` (K for per-channel int8). The caller validates (fastllm.ops.qmatmul). config / splits override
    pick_config and num_splits_for (tests use them to reach every path)."""
    m, k = x.shape
    n = data.shape[0]
    cfg = config or pick_config(m, n, k, x.dtype)
    grid_mn = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    if splits is None:
        bits = 8 if fmt_code <= I8_GROUP else 4
        splits = num_splits_for(grid_mn[0] * grid_mn[1], m, n, k, cfg.block_k, bits, x.device)
    k_split = triton.cdiv(triton.cdiv(k, cfg.block_k), splits) * cfg.block_k
    splits = triton.cdiv(k, k_split)  # no empty split
    flags = kernel_flags(x)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    with device_guard(x):
        _qmm_kernel[(*grid_mn, splits)](
            x, data, scales, scales if mins is None else mins, out if bias is None else bias, out, part,
            m, n, k, k // 2, group, x.stride(0), out.stride(0), data.stride(0), scales.stride(0), k_split,
            FMT=fmt_code, HAS_BIAS=bias is not None, SPLIT=splits > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)
        if splits > 1:
            _split_sum_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
                part, out if bias is None else bias, out, m, n, out.stride(0), splits, HAS_BIAS=bias is not None,
                BLOCK=SUM_BLOCK, EXACT_BF16=flags["EXACT_BF16"], num_warps=4)
    return out
