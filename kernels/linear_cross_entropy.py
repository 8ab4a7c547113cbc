"""Triton fused linear + cross-entropy: the loss of a language-model head without the (tokens x vocab) logits.

Math (per token i, fp32 accumulation whatever the storage dtype; z_iv = h_i . W_v, eps = label smoothing):
    m_i     = max_v z_iv,   r_i = log sum_v exp(z_iv - m_i)               (so log sum_v exp(z_iv) = m_i + r_i)
    loss_i  = (m_i - (1 - eps) z_{i,t_i} - (eps / V) sum_v z_iv) + r_i     (0 where t_i == ignore_index)
    dz_iv   = g_i (exp((z_iv - m_i) - r_i) - (1 - eps) [v == t_i] - eps / V)   (g_i: d loss / d loss_i; 0 if ignored)
The row statistics are kept as the pair (m, r), not as their sum: z - m is exact for the largest logits, and r
is small (0 <= r <= log V), so the softmax the backward recomputes is as accurate as torch's; a single fp32
log-sum-exp of magnitude |m| would carry an absolute error of ulp(m), scaling every probability by that much.
    dh      = dz W        (N, D)           dW = dz^T h        (V, D)

Shapes: h (N, D), W (V, D), targets (N,) int64, g (N,) fp32; loss (N,) fp32, stats (2, N) fp32 = (m, r). h and W share a dtype
(float32 / float16 / bfloat16); any strides.

Three kernels, each tiling the logits as [BLOCK_N tokens, BLOCK_V vocab] and summing z over D in BLOCK_D steps:
    forward    one program per token block walks the whole vocabulary with an online log-sum-exp (running
               max and rescaled sum), so only a [BLOCK_N, BLOCK_V] tile of logits ever exists.
    dh         one program per (token block, D tile) walks the vocabulary, recomputes each logits tile,
               turns it into dz with the saved (m, r), and accumulates dz @ W[:, D tile] in registers.
    dW         one program per (vocab block, D tile) walks the tokens, recomputes the transposed tile
               z^T = W h^T, and accumulates dz^T @ h[:, D tile]: each dW element has one owner, so no atomics
               and a deterministic result.
The backward recomputes the logits once per D tile of its output (cost about (2 D / OUT_BLOCK_D + 2) times the
forward's matmul); that is the price of never storing them. dz is rounded to the input dtype before its
matmul, as torch's unfused backward rounds its logits gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, dot, kernel_flags, to_out

__all__ = ["lce_fwd", "lce_bwd"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

BLOCK_N = 64
"""Tokens per tile (the M side of the MMAs)."""
BLOCK_V = 128
"""Vocabulary entries per tile: the online log-sum-exp folds one such chunk of logits at a time."""
BLOCK_D = 64
"""Hidden-dimension step of the logits' inner product."""
OUT_BLOCK_D = 128
"""Width of the dh / dW tile a backward program owns (its accumulator lives in registers)."""
NUM_WARPS, NUM_STAGES = 4, 3
"""Launch settings of all three kernels (the ones tests/test_linear_cross_entropy.py compiles for sm_90)."""


def _blocks(n: int, v: int, d: int) -> dict:
    """Block sizes, shrunk to the problem (at least 16: tl.dot's smallest tile) so small cases stay cheap."""
    def fit(block, size):
        return max(16, min(block, triton.next_power_of_2(size)))
    return {"BLOCK_N": fit(BLOCK_N, n), "BLOCK_V": fit(BLOCK_V, v), "BLOCK_D": fit(BLOCK_D, d),
            "OUT_D": fit(OUT_BLOCK_D, d)}


@triton.jit
def _logits(h_ptr, w_ptr, n, v, N, V, D, s_hn, s_hd, s_wv, s_wd,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = h[n] . W[v] in fp32 (n, v: int64 index vectors; rows/columns out of range give 0)."""
    z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        hb = tl.load(h_ptr + n[:, None] * s_hn + d[None, :] * s_hd, mask=(n < N)[:, None] & (d < D)[None, :], other=0.0)
        wb = tl.load(w_ptr + v[None, :] * s_wv + d[:, None] * s_wd, mask=(v < V)[None, :] & (d < D)[:, None], other=0.0)
        z = dot(hb, wb, z, DOT)
    return z


@triton.jit
def _logits_t(h_ptr, w_ptr, n, v, N, V, D, s_hn, s_hd, s_wv, s_wd,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """z^T[BLOCK_V, BLOCK_N] = W[v] . h[n] in fp32 (the transposed tile the dW kernel needs)."""
    z = tl.zeros([BLOCK_V, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        wb = tl.load(w_ptr + v[:, None] * s_wv + d[None, :] * s_wd, mask=(v < V)[:, None] & (d < D)[None, :], other=0.0)
        hb = tl.load(h_ptr + n[None, :] * s_hn + d[:, None] * s_hd, mask=(n < N)[None, :] & (d < D)[:, None], other=0.0)
        z = dot(wb, hb, z, DOT)
    return z


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, st_ptr, loss_ptr, N, V, D, s_hn, s_hd, s_wv, s_wd, s_t,
                ignore_index, smoothing,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.load(t_ptr + n * s_t, mask=n < N, other=ignore_index)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)     # running max
    s = tl.zeros([BLOCK_N], tl.float32)                   # sum exp(z - m)
    zt = tl.zeros([BLOCK_N], tl.float32)                  # target logit
    zsum = tl.zeros([BLOCK_N], tl.float32)                # sum of logits (label smoothing)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logits(h_ptr, w_ptr, n, v, N, V, D, s_hn, s_hd, s_wv, s_wd, BLOCK_N, BLOCK_V, BLOCK_D, DOT)
        valid = (v < V)[None, :]
        zt += tl.sum(tl.where(v[None, :] == t[:, None], z, 0.0), axis=1)
        zsum += tl.sum(tl.where(valid, z, 0.0), axis=1)
        z = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))         # finite: every chunk holds at least one valid column
        s = s * tl.exp2((m - m_new) * _LOG2E) + tl.sum(tl.exp2((z - m_new[:, None]) * _LOG2E), axis=1)
        m = m_new
    r = tl.log2(s) * _LN2
    loss = (m - (1.0 - smoothing) * zt - (smoothing / V) * zsum) + r
    loss = tl.where(t == ignore_index, 0.0, loss)
    tl.store(st_ptr + n, m, mask=n < N)
    tl.store(st_ptr + N + n, r, mask=n < N)
    tl.store(loss_ptr + n, loss, mask=n < N)


@triton.jit
def _dz(z, v, t, m, r, g, V, ignore_index, smoothing, TRANSPOSED: tl.constexpr):
    """dz = g (softmax - (1 - eps) onehot - eps / V) for a logits tile z ([N, V], or [V, N] if TRANSPOSED);
    0 in padding columns and ignored rows."""
    g = tl.where(t == ignore_index, 0.0, g)
    if TRANSPOSED:
        p = tl.exp2(((z - m[None, :]) - r[None, :]) * _LOG2E)
        dz = g[None, :] * (p - tl.where(v[:, None] == t[None, :], 1.0 - smoothing, 0.0) - smoothing / V)
        dz = tl.where((v < V)[:, None], dz, 0.0)
    else:
        p = tl.exp2(((z - m[:, None]) - r[:, None]) * _LOG2E)
        dz = g[:, None] * (p - tl.where(v[None, :] == t[:, None], 1.0 - smoothing, 0.0) - smoothing / V)
        dz = tl.where((v < V)[None, :], dz, 0.0)
    return dz


@triton.jit
def _dh_kernel(h_ptr, w_ptr, t_ptr, st_ptr, g_ptr, dh_ptr, N, V, D, s_hn, s_hd, s_wv, s_wd, s_t, s_dhn, s_dhd,
               ignore_index, smoothing, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               OUT_D: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    do = tl.program_id(1).to(tl.int64) * OUT_D + tl.arange(0, OUT_D)
    t = tl.load(t_ptr + n * s_t, mask=n < N, other=ignore_index)
    m = tl.load(st_ptr + n, mask=n < N, other=0.0)
    r = tl.load(st_ptr + N + n, mask=n < N, other=0.0)
    g = tl.load(g_ptr + n, mask=n < N, other=0.0)
    acc = tl.zeros([BLOCK_N, OUT_D], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logits(h_ptr, w_ptr, n, v, N, V, D, s_hn, s_hd, s_wv, s_wd, BLOCK_N, BLOCK_V, BLOCK_D, DOT)
        dz = to_out(_dz(z, v, t, m, r, g, V, ignore_index, smoothing, False), h_ptr, EXACT_BF16)
        wb = tl.load(w_ptr + v[:, None] * s_wv + do[None, :] * s_wd, mask=(v < V)[:, None] & (do < D)[None, :],
                     other=0.0)
        acc = dot(dz, wb, acc, DOT)
    tl.store(dh_ptr + n[:, None] * s_dhn + do[None, :] * s_dhd, to_out(acc, dh_ptr, EXACT_BF16),
             mask=(n < N)[:, None] & (do < D)[None, :])


@triton.jit
def _dw_kernel(h_ptr, w_ptr, t_ptr, st_ptr, g_ptr, dw_ptr, N, V, D, s_hn, s_hd, s_wv, s_wd, s_t, s_dwv, s_dwd,
               ignore_index, smoothing, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               OUT_D: tl.constexpr, DOT: tl.constexpr, EXACT_BF16: tl.constexpr):
    v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    do = tl.program_id(1).to(tl.int64) * OUT_D + tl.arange(0, OUT_D)
    acc = tl.zeros([BLOCK_V, OUT_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        t = tl.load(t_ptr + n * s_t, mask=n < N, other=ignore_index)
        m = tl.load(st_ptr + n, mask=n < N, other=0.0)
        r = tl.load(st_ptr + N + n, mask=n < N, other=0.0)
        g = tl.load(g_ptr + n, mask=n < N, other=0.0)
        zt = _logits_t(h_ptr, w_ptr, n, v, N, V, D, s_hn, s_hd, s_wv, s_wd, BLOCK_N, BLOCK_V, BLOCK_D, DOT)
        dzt = to_out(_dz(zt, v, t, m, r, g, V, ignore_index, smoothing, True), w_ptr, EXACT_BF16)
        hb = tl.load(h_ptr + n[:, None] * s_hn + do[None, :] * s_hd, mask=(n < N)[:, None] & (do < D)[None, :],
                     other=0.0)
        acc = dot(dzt, hb, acc, DOT)
    tl.store(dw_ptr + v[:, None] * s_dwv + do[None, :] * s_dwd, to_out(acc, dw_ptr, EXACT_BF16),
             mask=(v < V)[:, None] & (do < D)[None, :])


# ---- launchers ---------------------------------------------------------------------------------
def lce_fwd(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int, smoothing: float):
    """(loss (N,), stats (2, N)), float32: the per-token cross-entropy of logits h @ W^T, and the row
    statistics (m, r), m + r being their log-sum-exp.

    h: (N, D), W: (V, D) of one dtype (float32/float16/bfloat16), targets: (N,) int64 in [0, V) or
    ignore_index; any strides; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    (n, d), v = h.shape, w.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    stats = torch.empty((2, n), dtype=torch.float32, device=h.device)
    if n == 0:
        return loss, stats
    b = _blocks(n, v, d)
    flags = kernel_flags(h)
    with device_guard(h):
        _fwd_kernel[(triton.cdiv(n, b["BLOCK_N"]),)](
            h, w, targets, stats, loss, n, v, d, h.stride(0), h.stride(1), w.stride(0), w.stride(1),
            targets.stride(0), ignore_index, smoothing, BLOCK_N=b["BLOCK_N"], BLOCK_V=b["BLOCK_V"],
            BLOCK_D=b["BLOCK_D"], DOT=flags["DOT"], num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return loss, stats


def lce_bwd(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
            ignore_index: int, smoothing: float):
    """(dh (N, D) in h's dtype, dW (V, D) in W's dtype), given g (N,) float32, the gradient of each token's loss,
    and stats (2, N) float32 (contiguous) from lce_fwd (the other arguments as lce_fwd's)."""
    (n, d), v = h.shape, w.shape[0]
    dh = torch.empty((n, d), dtype=h.dtype, device=h.device)
    dw = torch.empty((v, d), dtype=w.dtype, device=w.device)
    if n == 0:
        dw.zero_()
        return dh, dw
    b = _blocks(n, v, d)
    flags = kernel_flags(h)
    common = dict(BLOCK_N=b["BLOCK_N"], BLOCK_V=b["BLOCK_V"], BLOCK_D=b["BLOCK_D"], OUT_D=b["OUT_D"], **flags,
                  num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    args = (h, w, targets, stats, g)
    sizes = (n, v, d, h.stride(0), h.stride(1), w.stride(0), w.stride(1), targets.stride(0))
    with device_guard(h):
        _dh_kernel[(triton.cdiv(n, b["BLOCK_N"]), triton.cdiv(d, b["OUT_D"]))](
            *args, dh, *sizes, dh.stride(0), dh.stride(1), ignore_index, smoothing, **common)
        _dw_kernel[(triton.cdiv(v, b["BLOCK_V"]), triton.cdiv(d, b["OUT_D"]))](
            *args, dw, *sizes, dw.stride(0), dw.stride(1), ignore_index, smoothing, **common)
    return dh, dw
