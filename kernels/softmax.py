"""Triton softmax over the last dimension of a (rows, cols) matrix, forward and backward.

Math (per row, fp32 arithmetic whatever the storage dtype):
    forward   y_j  = exp(x_j - m) / s,   m = max_k x_k,   s = sum_k exp(x_k - m)
    backward  dx_j = y_j * (dy_j - c),   c = sum_k dy_k * y_k
exp is evaluated as exp2((x - m) * log2(e)): the subtraction comes first, so the only extra rounding
is relative to |x - m| (not to |x|), and the GPU's exp is exactly this ex2 instruction anyway.

Shapes and layout:
    x, y, dy, dx: (rows, cols), float32 / float16 / bfloat16. Inputs need inner stride 1 (unless
    cols <= 1); the row stride is free (e.g. big[:, :cols]). Outputs are new contiguous tensors of
    the input's dtype.

Special values follow torch: a row that is entirely -inf gives NaN, a NaN anywhere in a row makes
the whole row NaN, -inf entries give 0.

Kernel variants (chosen by `pick_config`; the choice changes speed, not results beyond rounding):
    fused   the whole row lives in registers: one read of x, one write of y. Short rows are packed
            several per program (a 2-D [ROWS, BLOCK] tile) so each program still moves enough data.
    looped  rows wider than MAX_FUSED_COLS: a first loop over BLOCK-wide chunks keeps an online
            max / rescaled sum (forward) or the dot product sum(dy * y) (backward); a second loop,
            walking the chunks in reverse so the most recently read ones (still in L2) come first,
            writes the output.
    split   looped, when there are too few rows to fill the GPU: each row is cut into `splits`
            segments, a first launch writes per-segment statistics to a small fp32 workspace and a
            second launch combines them and writes its segment.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import device_guard, exact_bf16, to_out

__all__ = ["SoftmaxConfig", "pick_config", "softmax_fwd", "softmax_bwd"]

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(v) == exp2(v * log2(e))

# ---- block-size policy -------------------------------------------------------------------------
MAX_FUSED_COLS = 16384
"""Widest row kept whole in registers. The math is fp32 whatever the dtype, so the limit is in
elements: 16384 over 16 warps is 32 fp32 values per thread (about 60 registers, no spills on sm_90),
so two forward programs fit on an SM. Wider rows take the looped variant."""

LOOP_BLOCK = 16384
"""Chunk width of the looped variants (16 warps, 32 values per thread): a program keeps a large load
in flight, and only about two programs share an SM, so the rows being read twice (about 132 * 2 rows
of 128 KiB for fp32 at 32768 columns) stay within the 50 MB L2 for the second read."""

ROW_TILE_ELEMS = 4096
"""Rows narrower than this are packed several per program, up to this many elements per tile."""

MIN_PROGRAMS = 1024
"""Enough programs to fill an H100 (132 SMs) several times over: rows are only packed while at least
this many programs remain, and long rows are split when there are fewer rows than this."""

MAX_SPLITS = 256
"""Most segments one row is cut into by the split variant (bounds the statistics workspace)."""


def _num_warps(tile_elems: int) -> int:
    """Warps for a tile of `tile_elems` elements: 16-32 values per thread at the larger sizes."""
    if tile_elems <= 2048:
        return 4
    if tile_elems <= 8192:
        return 8
    return 16


@dataclass(frozen=True)
class SoftmaxConfig:
    """Launch parameters. block: columns per tile (power of two); rows_per_prog: rows packed per
    program (power of two, fused only); num_warps; looped: chunked variant; splits: programs per
    row (looped only, > 1 means two launches); seg: columns per segment (multiple of block)."""

    block: int
    rows_per_prog: int
    num_warps: int
    looped: bool
    splits: int = 1
    seg: int = 0


def pick_config(rows: int, cols: int, *, max_fused_cols: int = MAX_FUSED_COLS, loop_block: int = LOOP_BLOCK,
                min_programs: int = MIN_PROGRAMS, max_splits: int = MAX_SPLITS) -> SoftmaxConfig:
    """The launch configuration for a (rows, cols) softmax (forward and backward alike). The keyword
    arguments exist so tests can force the looped and split variants at small sizes."""
    block = triton.next_power_of_2(max(cols, 1))
    if block <= max_fused_cols:
        rpp = 1
        if block < ROW_TILE_ELEMS:
            fill = max(1, rows // min_programs)  # pack rows only while >= min_programs programs remain
            rpp = min(ROW_TILE_ELEMS // block, 1 << (fill.bit_length() - 1))
        return SoftmaxConfig(block, rpp, _num_warps(block * rpp), looped=False)
    block = triton.next_power_of_2(loop_block)
    chunks = triton.cdiv(cols, block)
    splits = min(chunks, triton.cdiv(min_programs, max(rows, 1)), max_splits) if rows < min_programs else 1
    seg = triton.cdiv(chunks, max(splits, 1)) * block
    splits = triton.cdiv(cols, seg)
    return SoftmaxConfig(block, 1, _num_warps(block), looped=True, splits=splits, seg=seg)


# ---- kernels -----------------------------------------------------------------------------------
@triton.jit
def _recip(s):
    """1 / s correctly rounded (one division per row, so the precise instruction costs nothing)."""
    return tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def _fwd_fused_kernel(x_ptr, y_ptr, rows, cols, stride_x, stride_y,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, EXACT_BF16: tl.constexpr):
    # One [ROWS, BLOCK] tile per program; padding columns load -inf so they add exp(-inf) = 0.
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    x_row = x_ptr + r[:, None] * stride_x
    x = tl.load(x_row + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
    m = tl.max(x, axis=1)
    e = tl.exp2((x - m[:, None]) * _LOG2E)
    s = tl.sum(e, axis=1)
    y = e * _recip(s)[:, None]
    y_row = y_ptr + r[:, None] * stride_y
    tl.store(y_row + c[None, :], to_out(y, y_ptr, EXACT_BF16), mask=mask)


@triton.jit
def _online_stats(x_row, lo, hi, BLOCK: tl.constexpr):
    """(m, s) over columns [lo, hi) of one row: m the max, s = sum exp(x - m), with m = -inf and
    s = 0 for an empty or all -inf range. Chunks are read with evict_last: they are read again."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(lo, hi, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + c, mask=c < hi, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Shift by 0 while everything seen is -inf: exp(-inf - -inf) would be NaN, exp(-inf - 0) is 0.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2((m - shift) * _LOG2E) + tl.sum(tl.exp2((x - shift) * _LOG2E), axis=0)
        m = m_new
    return m, s


@triton.jit
def _fwd_stats_kernel(x_ptr, stats_ptr, cols, stride_x, seg, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # Split variant, first launch: stats[row, 0, k], stats[row, 1, k] = (m, s) of segment k.
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    lo = k * seg
    hi = tl.minimum(lo + seg, cols)
    m, s = _online_stats(x_ptr + row * stride_x, lo, hi, BLOCK)
    out = stats_ptr + row * (2 * SPLITS) + k
    tl.store(out, m)
    tl.store(out + SPLITS, s)


@triton.jit
def _fwd_looped_kernel(x_ptr, y_ptr, stats_ptr, cols, stride_x, stride_y, seg,
                       SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK: tl.constexpr,
                       EXACT_BF16: tl.constexpr):
    # Looped variant (SPLITS == 1: program = row, statistics computed here) or the split variant's
    # second launch (program = (row, segment), statistics combined from the workspace).
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    if SPLITS == 1:
        lo = 0
        hi = cols
        m, s = _online_stats(x_row, 0, cols, BLOCK)
    else:
        k = tl.program_id(1)
        lo = k * seg
        hi = tl.minimum(lo + seg, cols)
        j = tl.arange(0, SPLITS_P2)
        st = stats_ptr + row * (2 * SPLITS) + j
        pm = tl.load(st, mask=j < SPLITS, other=float("-inf"))
        ps = tl.load(st + SPLITS, mask=j < SPLITS, other=0.0)
        m = tl.max(pm, axis=0)
        shift = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(ps * tl.exp2((pm - shift) * _LOG2E), axis=0)
    # All -inf row: m = -inf, s = 0, exp(x - 0) = 0 and y = 0 / 0 = NaN, as torch.
    shift = tl.where(m == float("-inf"), 0.0, m)
    inv_s = _recip(s)
    n = tl.cdiv(hi - lo, BLOCK)
    for i in range(0, n):
        c = lo + (n - 1 - i) * BLOCK + tl.arange(0, BLOCK)  # last chunk first: it is the likeliest in L2
        mask = c < hi
        x = tl.load(x_row + c, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        y = tl.exp2((x - shift) * _LOG2E) * inv_s
        tl.store(y_row + c, to_out(y, y_ptr, EXACT_BF16), mask=mask)


@triton.jit
def _bwd_fused_kernel(y_ptr, dy_ptr, dx_ptr, rows, cols, stride_y, stride_dy, stride_dx,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, EXACT_BF16: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    y = tl.load(y_ptr + r[:, None] * stride_y + c[None, :], mask=mask, other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    dy = tl.load(dy_ptr + r[:, None] * stride_dy + c[None, :], mask=mask, other=0.0,
                 eviction_policy="evict_first").to(tl.float32)
    dot = tl.sum(y * dy, axis=1)
    dx = y * (dy - dot[:, None])
    tl.store(dx_ptr + r[:, None] * stride_dx + c[None, :], to_out(dx, dx_ptr, EXACT_BF16), mask=mask)


@triton.jit
def _row_dot(y_row, dy_row, lo, hi, BLOCK: tl.constexpr):
    """sum(y * dy) over columns [lo, hi) of one row (per-lane partial sums, one reduction at the end)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK):
        c = start + tl.arange(0, BLOCK)
        mask = c < hi
        y = tl.load(y_row + c, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        dy = tl.load(dy_row + c, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        acc += y * dy
    return tl.sum(acc, axis=0)


@triton.jit
def _bwd_stats_kernel(y_ptr, dy_ptr, stats_ptr, cols, stride_y, stride_dy, seg,
                      SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # Split variant, first launch: stats[row, k] = sum(y * dy) over segment k.
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    lo = k * seg
    hi = tl.minimum(lo + seg, cols)
    dot = _row_dot(y_ptr + row * stride_y, dy_ptr + row * stride_dy, lo, hi, BLOCK)
    tl.store(stats_ptr + row * SPLITS + k, dot)


@triton.jit
def _bwd_looped_kernel(y_ptr, dy_ptr, dx_ptr, stats_ptr, cols, stride_y, stride_dy, stride_dx, seg,
                       SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK: tl.constexpr,
                       EXACT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * stride_y
    dy_row = dy_ptr + row * stride_dy
    dx_row = dx_ptr + row * stride_dx
    if SPLITS == 1:
        lo = 0
        hi = cols
        dot = _row_dot(y_row, dy_row, 0, cols, BLOCK)
    else:
        k = tl.program_id(1)
        lo = k * seg
        hi = tl.minimum(lo + seg, cols)
        j = tl.arange(0, SPLITS_P2)
        dot = tl.sum(tl.load(stats_ptr + row * SPLITS + j, mask=j < SPLITS, other=0.0), axis=0)
    n = tl.cdiv(hi - lo, BLOCK)
    for i in range(0, n):
        c = lo + (n - 1 - i) * BLOCK + tl.arange(0, BLOCK)  # last chunk first: it is the likeliest in L2
        mask = c < hi
        y = tl.load(y_row + c, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        dy = tl.load(dy_row + c, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        tl.store(dx_row + c, to_out(y * (dy - dot), dx_ptr, EXACT_BF16), mask=mask)


# ---- launchers ---------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have inner stride 1, got strides {tuple(t.stride())}")


def softmax_fwd(x: torch.Tensor, *, config: SoftmaxConfig | None = None) -> torch.Tensor:
    """y = softmax(x) along the last dimension.

    x: (rows, cols) float32/float16/bfloat16, x.stride(1) == 1, any row stride; CUDA tensor, or a CPU
    tensor under TRITON_INTERPRET=1. config: override of pick_config(rows, cols) (tests).
    Returns y: (rows, cols), contiguous, x's dtype.
    """
    _check("x", x)
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows == 0 or cols == 0:
        return y
    cfg = config or pick_config(rows, cols)
    exact = exact_bf16(x)
    with device_guard(x):
        if not cfg.looped:
            grid = (triton.cdiv(rows, cfg.rows_per_prog),)
            _fwd_fused_kernel[grid](x, y, rows, cols, x.stride(0), y.stride(0),
                                    BLOCK=cfg.block, ROWS=cfg.rows_per_prog, EXACT_BF16=exact, num_warps=cfg.num_warps)
            return y
        splits, seg = cfg.splits, (cfg.seg if cfg.splits > 1 else cols)
        stats = y  # placeholder pointer, unused when splits == 1
        if splits > 1:
            stats = torch.empty((rows, 2, splits), dtype=torch.float32, device=x.device)
            _fwd_stats_kernel[(rows, splits)](x, stats, cols, x.stride(0), seg,
                                              SPLITS=splits, BLOCK=cfg.block, num_warps=cfg.num_warps)
        _fwd_looped_kernel[(rows, splits)](x, y, stats, cols, x.stride(0), y.stride(0), seg,
                                           SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
                                           BLOCK=cfg.block, EXACT_BF16=exact, num_warps=cfg.num_warps)
    return y


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, *, config: SoftmaxConfig | None = None) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y)) along the last dimension (the gradient of softmax at x, given y).

    y, dy: (rows, cols), the same dtype and device, inner stride 1, any row stride (each its own).
    config: override of pick_config(rows, cols) (tests).
    Returns dx: (rows, cols), contiguous, y's dtype.
    """
    _check("y", y)
    _check("dy", dy)
    if dy.shape != y.shape or dy.dtype != y.dtype or dy.device != y.device:
        raise ValueError(f"dy ({tuple(dy.shape)}, {dy.dtype}, {dy.device}) must match y "
                         f"({tuple(y.shape)}, {y.dtype}, {y.device})")
    rows, cols = y.shape
    dx = torch.empty((rows, cols), dtype=y.dtype, device=y.device)
    if rows == 0 or cols == 0:
        return dx
    cfg = config or pick_config(rows, cols)
    exact = exact_bf16(y)
    with device_guard(y):
        if not cfg.looped:
            grid = (triton.cdiv(rows, cfg.rows_per_prog),)
            _bwd_fused_kernel[grid](y, dy, dx, rows, cols, y.stride(0), dy.stride(0), dx.stride(0),
                                    BLOCK=cfg.block, ROWS=cfg.rows_per_prog, EXACT_BF16=exact, num_warps=cfg.num_warps)
            return dx
        splits, seg = cfg.splits, (cfg.seg if cfg.splits > 1 else cols)
        stats = dx  # placeholder pointer, unused when splits == 1
        if splits > 1:
            stats = torch.empty((rows, splits), dtype=torch.float32, device=y.device)
            _bwd_stats_kernel[(rows, splits)](y, dy, stats, cols, y.stride(0), dy.stride(0), seg,
                                              SPLITS=splits, BLOCK=cfg.block, num_warps=cfg.num_warps)
        _bwd_looped_kernel[(rows, splits)](y, dy, dx, stats, cols, y.stride(0), dy.stride(0), dx.stride(0), seg,
                                           SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
                                           BLOCK=cfg.block, EXACT_BF16=exact, num_warps=cfg.num_warps)
    return dx
