"""Decode attention over a KV cache and appending to that cache: the math the kernels are tested against,
and the torch backend (batched, for CPU tensors and as the CUDA fallback).

Cache layouts (fastllm/ops/decode_attention.py documents the arguments in full):
    contiguous: cache (B, Lmax, Hkv, D), sequence b's position n at cache[b, n]
    paged:      cache (num_blocks, PAGE, Hkv, D) with block_table (B, max_blocks), position n of sequence b
                at cache[block_table[b, n // PAGE], n % PAGE]
    int8:       cache int8 with scale float32 (cache.shape[:3]): the value is cache[...] * scale[..., None]
Decode attention: query i (of Lq) of sequence b sits at position L_b - Lq + i, L_b = cache_seqlens[b], and
attends to the keys at positions j < L_b, with causal only to j <= L_b - Lq + i (bottom-right alignment):
    out[b, i, h] = sum_j softmax_j(scale q[b, i, h] . k_j) v_j   over kv head h // (Hq / Hkv); 0 if no key.
Append: the Lnew new rows of sequence b go to positions L_b + t (L_b = cache_seqlens[b] before the append),
rotated first (keys and queries) when cos / sin are given:
    rope(x)[d] = x[d] cos[p, d] - x[d + R/2] sin[p, d]        d < R/2
    rope(x)[d] = x[d] cos[p, d] + x[d - R/2] sin[p, d]        R/2 <= d < R     (R = cos.shape[1] <= D)
    rope(x)[d] = x[d]                                          d >= R
("rotate half", as Llama in Hugging Face transformers), and quantised for an int8 cache per (position, kv head):
    scale = max_d |x[d]| / 127,  code[d] = sign(x[d]) floor(|x[d]| / scale + 1/2)   (0 where scale = 0)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._util import acc_dtype
from .attention import attention_fwd

INT8_MAX = 127


# ---- cache access ------------------------------------------------------------------------------
def cache_index(positions: torch.Tensor, b: torch.Tensor, block_table: torch.Tensor | None, page: int):
    """(first, second) indices of positions (any shape) of sequences b (broadcastable) in a cache:
    (b, n) for a contiguous cache, (block_table[b, n // page], n % page) for a paged one."""
    if block_table is None:
        return b.expand_as(positions), positions
    return block_table.long()[b, positions // page], positions % page


def dequantize(codes: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows in `dtype`: int8 codes times their scale (computed in float32, or float64 for float64), or the
    rows themselves."""
    if scale is None:
        return codes.to(dtype)
    a = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes.to(a) * scale.to(a)[..., None]).to(dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, scale float32) of x (..., D) per row, as in the module docstring (float32 arithmetic). A row
    holding NaN gets scale NaN and codes 0 (it reads back as NaN); a NaN code (inf / inf) is 0."""
    x = x.float()
    scale = x.abs().amax(-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, 1.0)
    codes = torch.sign(x) * torch.floor(x.abs() / safe[..., None] + 0.5)
    codes = torch.where(torch.isnan(scale)[..., None] | torch.isnan(codes), 0.0, codes)
    return codes.clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ("rotate half") of x (B, L, H, D) at positions (B, L), in x's accumulation dtype."""
    a = acc_dtype(x.dtype)
    r = cos.shape[-1]
    c, s = cos.to(a)[positions][:, :, None], sin.to(a)[positions][:, :, None]  # (B, L, 1, R)
    xr, rest = x.to(a)[..., :r], x.to(a)[..., r:]
    rotated = torch.cat((-xr[..., r // 2:], xr[..., :r // 2]), -1)
    return torch.cat((xr * c + rotated * s, rest), -1)


# ---- decode attention --------------------------------------------------------------------------
def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=None, k_scale=None, v_scale=None, *,
                     scale: float, causal: bool = True) -> torch.Tensor:
    """The obvious math, one sequence at a time: gather its L_b valid rows, dequantise them in the accumulation
    dtype, and run bottom-right causal attention (reference/attention.py) over them. Returns (B, Lq, Hq, D) in
    q's dtype."""
    a = acc_dtype(q.dtype)
    page = k_cache.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = torch.arange(int(cache_seqlens[b]), device=q.device)
        idx = cache_index(n, torch.tensor(b, device=q.device), block_table, page)
        k = dequantize(k_cache[idx], None if k_scale is None else k_scale[idx], a)  # (L, Hkv, D)
        v = dequantize(v_cache[idx], None if v_scale is None else v_scale[idx], a)
        out, _ = attention_fwd(q[b].transpose(0, 1)[None].to(a), k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               None, scale, causal, True)
        outs.append(out[0].transpose(0, 1))
    return torch.stack(outs).to(q.dtype) if outs else q.new_empty(q.shape)


def decode_attention_batched(q, k_cache, v_cache, cache_seqlens, block_table=None, k_scale=None, v_scale=None, *,
                             scale: float, causal: bool = True) -> torch.Tensor:
    """The same result from one masked SDPA call over the whole batch (the torch backend): the caches are taken as
    (B, N, Hkv, D) in q's dtype (a view of a contiguous cache, gathered from a paged one, dequantised from int8),
    N = the longest length on CPU (read on the host) or the capacity on other devices (no host synchronisation,
    so it can be captured in a CUDA graph)."""
    bsz, lq = q.shape[:2]
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page if block_table is not None else page
    on_host = q.device.type == "cpu"
    n_max = min(int(cache_seqlens.max()), capacity) if on_host and bsz else capacity
    n = torch.arange(n_max, device=q.device)
    if block_table is None:
        idx = (slice(None), slice(0, n_max))
    else:  # entries past a sequence's blocks may hold anything: clamp them (their rows are masked out)
        table = block_table.clamp(0, k_cache.shape[0] - 1)
        idx = cache_index(n[None, :].expand(bsz, n_max), torch.arange(bsz, device=q.device)[:, None], table, page)
    k = dequantize(k_cache[idx], None if k_scale is None else k_scale[idx], q.dtype)  # (B, N, Hkv, D)
    v = dequantize(v_cache[idx], None if v_scale is None else v_scale[idx], q.dtype)
    lens = cache_seqlens.long()[:, None, None]  # (B, 1, 1)
    visible = n[None, None, :] < lens  # (B, 1, N) against queries (B, Lq, 1):
    if not on_host or bool((lens < n_max).any()):
        # Rows past a length may hold anything (NaN in never-written memory): zero them, as masking leaves 0 * NaN.
        k, v = (t.masked_fill(~visible[:, 0, :, None, None], 0.0) for t in (k, v))
    if causal:
        visible = visible & (n[None, None, :] <= lens - lq + torch.arange(lq, device=q.device)[None, :, None])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=visible[:, None], scale=scale, enable_gqa=True)
    # A query that sees no key: SDPA gives 0 on CPU; make it so on every device.
    return out.transpose(1, 2).masked_fill(~visible.any(-1)[..., None, None], 0.0)


# ---- append ------------------------------------------------------------------------------------
def kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None, k_scale=None, v_scale=None,
                    cos=None, sin=None, q=None):
    """Write k_new, v_new (B, Lnew, Hkv, D) at positions cache_seqlens[b] + t, in place (rotating the keys when
    cos / sin are given, quantising for int8 caches); returns q (B, Lnew, Hq, D) rotated likewise (q needs cos
    and sin), or None without q."""
    bsz, lnew = k_new.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(lnew, device=k_new.device)  # (B, Lnew)
    idx = cache_index(pos, torch.arange(bsz, device=k_new.device)[:, None], block_table, k_cache.shape[1])
    if cos is not None:
        k_new = rope(k_new, cos, sin, pos)
    for cache, scale, x in ((k_cache, k_scale, k_new), (v_cache, v_scale, v_new)):
        if scale is None:
            cache[idx] = x.to(cache.dtype)
        else:
            cache[idx], scale[idx] = quantize_int8(x)
    return None if q is None else rope(q, cos, sin, pos).to(q.dtype)
