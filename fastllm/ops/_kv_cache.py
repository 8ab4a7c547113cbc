"""Argument checks shared by the KV-cache ops (decode_attention, kv_cache_append): the cache layout (contiguous
or paged, fp or int8 with scales), the lengths, and the values a kernel would read out of bounds with.

Layouts (see fastllm/reference/decode_attention.py for the math):
    contiguous: k_cache, v_cache (B, Lmax, Hkv, D); capacity Lmax
    paged:      k_cache, v_cache (num_blocks, block_size, Hkv, D) and block_table (B, max_blocks) int32;
                capacity max_blocks * block_size
    int8:       k_cache, v_cache int8 with k_scale, v_scale float32 of shape k_cache.shape[:3]
Value checks (lengths within the capacity, block-table entries within [0, num_blocks)) need the values on the
host: they run for CPU tensors always, and for CUDA tensors except while a CUDA graph is being captured or
torch.compile is tracing (reading values there would synchronise or break the graph); then the caller vouches
for them.
"""
from __future__ import annotations

import contextlib
import contextvars

from dataclasses import dataclass

import torch

from ._common import check_same_device, check_tensor

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float64)  # float64: torch path


@dataclass(frozen=True)
class CacheLayout:
    paged: bool
    page: int  # block_size (paged), or Lmax
    capacity: int  # positions per sequence
    heads: int  # Hkv
    head_dim: int
    int8: bool


def _check_int_vector(name: str, t, shape: tuple[int, ...], ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(name, t, floating=False)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got dtype {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    check_same_device(name, t, ref_name, ref)


def check_cache(k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, batch: int, ref_name: str,
                ref: torch.Tensor) -> CacheLayout:
    """Check the cache arguments for a batch of `batch` sequences on ref's device; returns the layout."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, floating=False)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, (B, Lmax, Hkv, D) or (num_blocks, block_size, Hkv, D), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in CACHE_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16, int8 (or float64), got {t.dtype}")
        check_same_device(name, t, ref_name, ref)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must have k_cache's shape and dtype "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    _check_int_vector("cache_seqlens", cache_seqlens, (batch,), ref_name, ref)
    paged = block_table is not None
    if paged:
        check_tensor("block_table", block_table, floating=False)
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be an int32 (B, max_blocks) tensor with B = {batch}, got "
                             f"{block_table.dtype} of shape {tuple(block_table.shape)}")
        check_same_device("block_table", block_table, ref_name, ref)
    elif k_cache.shape[0] != batch:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} must have B = {batch} rows (B, Lmax, Hkv, D), or pass "
                         f"block_table for a paged cache")
    int8 = k_cache.dtype == torch.int8
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not int8:
            if s is not None:
                raise ValueError(f"{name} is only for int8 caches (k_cache is {k_cache.dtype})")
            continue
        if s is None:
            raise ValueError(f"{name} is required with an int8 cache (float32 of shape k_cache.shape[:3])")
        check_tensor(name, s)
        if s.dtype != torch.float32 or s.shape != k_cache.shape[:3]:
            raise ValueError(f"{name} must be float32 of shape {tuple(k_cache.shape[:3])} (k_cache.shape[:3]), "
                             f"got {s.dtype} {tuple(s.shape)}")
        check_same_device(name, s, ref_name, ref)
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page if paged else page
    return CacheLayout(paged, page, capacity, k_cache.shape[2], k_cache.shape[3], int8)


def strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    """The strides of t's first three dims (elements), as the C++ CPU kernels take them; zeros for None."""
    return (0, 0, 0) if t is None else tuple(t.stride()[:3])


def cpu_cache_limit(x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor | None, *others: torch.Tensor | None) -> str | None:
    """Why the C++ CPU kernels (which read rows with unit stride) cannot take these tensors, or None."""
    for name, t in (("the input", x), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table),
                    *((f"tensor {i}", t) for i, t in enumerate(others))):
        if t is not None and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            return f"{name}'s last dimension is strided ({t.stride(-1)}); the CPU kernel reads rows with unit stride"
    return None


_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("fastllm_trusted_positions", default=False)


@contextlib.contextmanager
def trusted_positions():
    """Skip the host-side value checks of cache_seqlens / block_table in this block: for a caller that keeps
    the lengths itself and guarantees them (fastllm's runtime checks the room before every step), so that a
    decode step does not read the device's lengths back on every layer."""
    token = _trusted.set(True)
    try:
        yield
    finally:
        _trusted.reset(token)


def values_checkable(t: torch.Tensor) -> bool:
    """Whether the values are to be read on the host here: not under CUDA-graph capture or torch.compile, and
    not inside trusted_positions()."""
    if torch.compiler.is_compiling() or _trusted.get():  # (dynamo cannot trace ContextVar.get: ask it first)
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_positions(cache_seqlens: torch.Tensor, block_table: torch.Tensor | None, layout: CacheLayout,
                    num_blocks: int, new: int | None) -> None:
    """The positions an op touches must lie in the cache, and the block-table entries of the blocks holding them
    in [0, num_blocks): [0, cache_seqlens[b]) for attention (new=None), [cache_seqlens[b], cache_seqlens[b] + new)
    for an append of `new` tokens. Reads the values on the host (see values_checkable)."""
    values = cache_seqlens.tolist()  # (a few Python ints: cheaper than tensor ops for a decode step's batch)
    if not values:
        return
    lowest = min(values)
    if lowest < 0:
        raise ValueError(f"cache_seqlens[{values.index(lowest)}] = {lowest} is negative")
    highest = max(values)
    if highest + (new or 0) > layout.capacity:
        extra = f" + {new} new tokens" if new is not None else ""
        raise ValueError(f"cache_seqlens[{values.index(highest)}] = {highest}{extra} exceeds the cache capacity of "
                         f"{layout.capacity} positions")
    if block_table is None:
        return
    lens = torch.tensor(values, dtype=torch.int64, device="cpu")
    end = lens + (new or 0)
    table = block_table.detach().to("cpu", torch.int64)
    cols = torch.arange(table.shape[1], device="cpu")
    first = lens // layout.page if new is not None else torch.zeros_like(lens)
    used = (cols >= first[:, None]) & (cols < (end + layout.page - 1)[:, None] // layout.page)
    bad = (used & ((table < 0) | (table >= num_blocks))).nonzero()
    if len(bad):
        b, j = (int(x) for x in bad[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is out of range [0, {num_blocks}) (the "
                         f"cache's blocks), and sequence {b} uses that block")
