"""fastllm.kv_cache_append: write new keys and values into a KV cache (contiguous or paged, fp or int8) at each
sequence's current length, optionally applying rotary embeddings to the keys and the queries in the same pass.

Backends: Triton (CUDA; CPU under TRITON_INTERPRET=1 when forced), the C++ CPU kernel (csrc/cpu/kv_cache_append.cpp),
torch (the reference, vectorised). The custom
op fastllm::kv_cache_append mutates k_cache, v_cache, k_scale, v_scale and q_out and returns nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import select
from ..reference import decode_attention as _ref
from ._common import call_op, check_same_device, check_tensor, code, grid_limit, kernels, ptr, run_c
from ._kv_cache import check_cache, check_positions, cpu_cache_limit, strides3, values_checkable


@torch.library.custom_op("fastllm::kv_cache_append",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale", "q_out"))
def _kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor],
                     k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], cos: Optional[torch.Tensor],
                     sin: Optional[torch.Tensor], q: Optional[torch.Tensor], q_out: Optional[torch.Tensor]) -> None:
    args = (k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, k_scale, v_scale, cos, sin, q)
    limit = cpu_cache_limit(k_new, k_cache, v_cache, block_table, v_new, q, cos, sin)
    backend = select("kv_cache_append", k_new, limits={"cpu": limit, "triton": grid_limit(batch=k_new.shape[0])})
    if backend == "triton":
        kernels().kv_cache_append.kv_cache_append(*args, q_out)
        return
    if backend == "cpu":
        _cpu_append(*args, q_out)
        return
    q_rot = _ref.kv_cache_append(*args)
    if q_out is not None:
        q_out.copy_(q_rot)


def _cpu_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, k_scale, v_scale, cos, sin, q, q_out):
    if cos is not None:
        cos, sin = cos.float(), sin.float()
    b, lnew, hkv, d = k_new.shape
    lens = cache_seqlens.contiguous()  # (held until the kernel returns: it may be a copy)
    run_c("cpu", "kv_cache_append", k_new.device, ptr(k_cache), strides3(k_cache), ptr(v_cache), strides3(v_cache),
          ptr(k_scale), strides3(k_scale), ptr(v_scale), strides3(v_scale), ptr(k_new), strides3(k_new), ptr(v_new),
          strides3(v_new), ptr(lens), ptr(block_table),
          0 if block_table is None else block_table.stride(0), k_cache.shape[1], ptr(cos), ptr(sin),
          0 if cos is None else cos.stride(0), 0 if cos is None else cos.shape[1], ptr(q), strides3(q), ptr(q_out),
          b, lnew, 0 if q is None else q.shape[2], hkv, d, k_cache.dtype == torch.int8, code(k_new))


@_kv_cache_append.register_fake
def _(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, k_scale, v_scale, cos, sin, q, q_out):
    return None


_MUTATED = (0, 1, 6, 7, 11)  # k_cache, v_cache, k_scale, v_scale, q_out: the op's mutates_args


def _check_rotary(cos, sin, q, k_new):
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (rotary embedding) or both be None")
    if cos is None:
        if q is not None:
            raise ValueError("q is only rotated (and returned) when cos and sin are given")
        return
    d = k_new.shape[-1]
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t)
        check_same_device(name, t, "k_new", k_new)
        if t.dim() != 2 or t.shape[1] % 2 != 0 or not 0 < t.shape[1] <= d:
            raise ValueError(f"{name} must be (max_position, R) with R even and 0 < R <= D = {d}, got shape "
                             f"{tuple(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin {tuple(sin.shape)} must have cos's shape {tuple(cos.shape)}")
    if q is not None:
        check_tensor("q", q)
        check_same_device("q", q, "k_new", k_new)
        b, lnew, hkv, _ = k_new.shape
        if q.dim() != 4 or q.shape[0] != b or q.shape[1] != lnew or q.shape[3] != d:
            raise ValueError(f"q must be (B, Lnew, Hq, D) = ({b}, {lnew}, Hq, {d}) like k_new, got {tuple(q.shape)}")
        if q.dtype != k_new.dtype:
            raise TypeError(f"q has dtype {q.dtype} but k_new has {k_new.dtype}; they must match")


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    cache_seqlens: torch.Tensor, *, block_table: torch.Tensor | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                    q: torch.Tensor | None = None) -> torch.Tensor | None:
    """Write k_new, v_new into the cache in place at positions [L_b, L_b + Lnew) of each sequence b.

    k_cache, v_cache, block_table, k_scale, v_scale: the cache, as fastllm.decode_attention takes it
        (contiguous (B, Lmax, Hkv, D) or paged (num_blocks, block_size, Hkv, D) with block_table; k_new's dtype,
        or int8 with float32 scales of shape k_cache.shape[:3], written here too).
    k_new, v_new: (B, Lnew, Hkv, D), float32/float16/bfloat16, any strides.
    cache_seqlens: (B,) int32, L_b = the length of sequence b BEFORE the append (not changed here: add Lnew
        afterwards, then pass it to decode_attention, whose lengths include the new tokens). Every written position
        must lie within the capacity and, for a paged cache, in a block whose block_table entry is in range.
    cos, sin: None, or (max_position, R) tables (R even, <= D; e.g. Hugging Face Llama's cos/sin for positions
        0..max_position-1), looked up at each token's absolute position L_b + t: the first R features of the keys
        are rotated ("rotate half": x * cos + rotate_half(x) * sin, in fp32, rounded once).
    q: None, or (B, Lnew, Hq, D) queries in k_new's dtype, rotated the same way (needs cos and sin).
    int8 caches: per (position, kv head), symmetric: scale = max|x| / 127, code = round-half-away(x / scale).
    Returns the rotated q (a new (B, Lnew, Hq, D) tensor), or None without q. Inference only: no autograd.

    CUDA graphs: no host synchronisation and no allocation but q's output; the value checks (see
    fastllm.decode_attention) are skipped while capturing.
    """
    check_tensor("k_new", k_new)
    if k_new.dim() != 4:
        raise ValueError(f"k_new must be 4-D (B, Lnew, Hkv, D), got shape {tuple(k_new.shape)}")
    check_tensor("v_new", v_new)
    if v_new.shape != k_new.shape or v_new.dtype != k_new.dtype:
        raise ValueError(f"v_new {tuple(v_new.shape)} {v_new.dtype} must have k_new's shape and dtype "
                         f"{tuple(k_new.shape)} {k_new.dtype}")
    check_same_device("v_new", v_new, "k_new", k_new)
    layout = check_cache(k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, k_new.shape[0], "k_new",
                         k_new)
    if k_cache.dtype not in (k_new.dtype, torch.int8):
        raise TypeError(f"k_cache has dtype {k_cache.dtype} but k_new has {k_new.dtype}; the cache must have "
                        f"k_new's dtype or be int8")
    if (layout.heads, layout.head_dim) != tuple(k_new.shape[2:]):
        raise ValueError(f"k_new's heads and head dim {tuple(k_new.shape[2:])} must equal the cache's "
                         f"{(layout.heads, layout.head_dim)}")
    _check_rotary(cos, sin, q, k_new)
    if values_checkable(cache_seqlens):
        check_positions(cache_seqlens, block_table, layout, k_cache.shape[0], k_new.shape[1])
        if cos is not None and k_new.shape[0] and int(cache_seqlens.max()) + k_new.shape[1] > cos.shape[0]:
            raise ValueError(f"cos and sin have {cos.shape[0]} positions, fewer than cache_seqlens.max() + Lnew = "
                             f"{int(cache_seqlens.max()) + k_new.shape[1]}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q is not None else None
    call_op(_kv_cache_append, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, k_scale, v_scale, cos, sin, q,
            q_out, mutated=_MUTATED)
    return q_out
