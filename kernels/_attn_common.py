"""What the attention kernels share: tile sizes, Triton device helpers and the launchers' argument handling.

Notation (kernels/attention.py has the whole contract): q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv);
scores are kept in log2 units, s2 = s * log2(e), so exp2 (the GPU's native exponential) does the softmax.
Varlen (packed sequences): B is the number of sequences; a program reads its sequence's start and length from
cu_seqlens (int32, cumulative) and the batch strides are 0; Lq and Lk passed to a kernel are then the longest
lengths, which size the grid.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._common import dot, to_out

LOG2E = tl.constexpr(1.4426950408889634)
MAX_HEAD_DIM = 256
"""Largest head dim (of q/k and of v) the kernels take; the tiles are padded to a power of two >= 16."""

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
run on a GPU. kernels/attention_tune.py measures candidates on a GPU and caches the winners per
(GPU architecture, kernel, padded head dim, dtype); pick_config prefers a cached winner over this table."""


def pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(max(d, 1)))


def config_key(d: int, dv: int, dtype: torch.dtype) -> tuple[int, bool]:
    """The CONFIGS key of head dims d (q, k), dv (v) in dtype."""
    return max(64, pad_dim(d), pad_dim(dv)), dtype == torch.float32


def pick_config(kernel: str, d: int, dv: int, dtype: torch.dtype, device: torch.device | None = None) -> AttnConfig:
    """Tiles of `kernel` ("fwd", "dkdv" or "dq") for head dims d (q, k) and dv (v) in `dtype` on `device`:
    the winner cached by kernels/attention_tune.py for this GPU architecture when there is one, else CONFIGS."""
    key = config_key(d, dv, dtype)
    if device is not None and device.type == "cuda":
        from .attention_tune import tuned_config

        cfg = tuned_config(device, kernel, *key)
        if cfg is not None:
            return cfg
    return CONFIGS[key][kernel]


# ---- device helpers ----------------------------------------------------------------------------
@triton.jit
def _keep(seed, row_base, offs_m, offs_n, RNG_COLS, dropout_p):
    """Dropout keep mask [M, N]: Philox uniform >= p at counter (row_base + i) * RNG_COLS + j (int64).
    RNG_COLS is Lk (Lk_max for packed sequences), so every (row, key) pair has its own counter."""
    offs = (row_base + offs_m.to(tl.int64))[:, None] * RNG_COLS + offs_n[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _tile(ptr, offs_r, stride_r, n_r, offs_c, stride_c, n_c):
    """Pointers and in-bounds mask of the tile [len(offs_r), len(offs_c)] of a matrix of n_r x n_c at ptr. Row
    offsets in int64: one (B, L, H, D) sequence passes 2^31 elements at L > 2^31 / (H D), 262k tokens of 64 x 128
    heads, and the delta kernel indexes every packed token of a varlen batch from its first."""
    mask = (offs_r < n_r)[:, None] & (offs_c < n_c)[None, :]
    return ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_c[None, :] * stride_c, mask


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
def _seq(CU, b, L, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: (cu[b], cu[b + 1] - cu[b]) for packed sequences, else (0, L)."""
    if VARLEN:
        start = tl.load(CU + b)
        return start.to(tl.int64), tl.load(CU + b + 1) - start
    return b * 0, L  # b * 0: an int64 zero, so both branches return the same types


@triton.jit
def _causal_offset(LQ, LK, BOTTOM_RIGHT: tl.constexpr):
    """Key j is visible to query i iff j <= i + offset (0: top-left, torch's is_causal; Lk - Lq: bottom-right)."""
    if BOTTOM_RIGHT:
        return LK - LQ
    return 0


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
    s = dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), DOT) * qk_scale
    if MASK_KIND == 1:  # MASK_BOOL, read as bytes; int64 rows: a mask may exceed 2^31 elements
        ptrs, inb = _tile(m_ptr, offs_m.to(tl.int64), stride_mm, LQ, offs_n, stride_mn, LK)
        s = tl.where(tl.load(ptrs, mask=inb, other=0) != 0, s, float("-inf"))
    elif MASK_KIND == 2:  # MASK_ADD, in log2 units like s
        ptrs, inb = _tile(m_ptr, offs_m.to(tl.int64), stride_mm, LQ, offs_n, stride_mn, LK)
        s += tl.load(ptrs, mask=inb, other=0.0).to(tl.float32) * LOG2E
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


@triton.jit
def _load_lse2(LSE, row, offs_m, LQ):
    """lse2 of the rows; +inf (so that p = 0) for rows past Lq and rows that saw no key."""
    lse2 = tl.load(LSE + row + offs_m, mask=offs_m < LQ, other=float("inf"))
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


# ---- launcher helpers --------------------------------------------------------------------------
@dataclass(frozen=True)
class Varlen:
    """Packed sequences: sequence i holds rows [cu_q[i], cu_q[i+1]) of q and [cu_k[i], cu_k[i+1]) of k and v.
    cu_q, cu_k: (N + 1,) int32 on the tensors' device; max_q, max_k: the longest lengths (they size the grid)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @property
    def n(self) -> int:
        return self.cu_q.shape[0] - 1


def packed_4d(t: torch.Tensor, n: int) -> torch.Tensor:
    """A packed (T, H, D) tensor as the (N, H, T, D) view the kernels read: batch stride 0, rows offset by
    cu_seqlens inside the kernels."""
    return t.unsqueeze(0).transpose(1, 2).expand(n, -1, -1, -1)


def check_inputs(q, k, v, mask) -> None:
    """q, k, v as the kernels take them (4-D; for packed sequences their packed_4d views)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.dtype not in DTYPES:
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


def mask_args(mask: torch.Tensor | None, q: torch.Tensor):
    """(kind, tensor, strides) for the kernels; bool masks are read as bytes."""
    if mask is None:
        return MASK_NONE, q, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return MASK_BOOL, mask.view(torch.uint8), mask.stride()
    return MASK_ADD, mask, mask.stride()


def launch(cfg: AttnConfig) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def smaller(cfg: AttnConfig) -> AttnConfig | None:
    """The next tiles to try where cfg's do not fit: one pipeline stage fewer, else the larger block halved
    (down to 16), else None."""
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_m >= cfg.block_n and cfg.block_m > 16:
        return replace(cfg, block_m=cfg.block_m // 2)
    if cfg.block_n > 16:
        return replace(cfg, block_n=cfg.block_n // 2)
    return None


_FITTED: dict = {}  # (kernel, tiles asked for, constexprs, device) -> the tiles that fit


def run_fitting(kernel, grid, cfg: AttnConfig, device: torch.device, args: tuple, constexprs: dict,
                shrink: bool = True) -> AttnConfig:
    """kernel[grid(tiles)](*args, **constexprs, **launch(tiles)) with tiles = cfg, or smaller ones (smaller()) where
    the GPU cannot hold cfg's for this variant: Triton raises OutOfResources when it compiles them. A winner that
    kernels/attention_tune.py measured without a mask, or CONFIGS on a GPU with less shared memory than sm_90's,
    may need more for a float mask or dropout. The tiles that fit are remembered (a warning says so once).
    shrink=False: cfg or the error (tiles a caller chose: the tuner times exactly those). Returns the tiles that
    ran."""
    from triton.runtime.errors import OutOfResources

    key = (kernel, cfg, tuple(sorted(constexprs.items())), str(device))
    tiles = _FITTED.get(key, cfg) if shrink else cfg
    while True:
        try:
            kernel[grid(tiles)](*args, **constexprs, **launch(tiles))
            return tiles
        except OutOfResources as e:
            nxt = smaller(tiles) if shrink else None
            if nxt is None:
                raise
            warnings.warn(f"attention tiles {tiles} do not fit this GPU for {constexprs} ({e}); trying {nxt}",
                          RuntimeWarning, stacklevel=3)
            tiles = _FITTED[key] = nxt
