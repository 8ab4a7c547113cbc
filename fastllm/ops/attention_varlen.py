"""fastllm.attention_varlen: attention over packed sequences of different lengths (FlashAttention's
flash_attn_varlen_func contract), each sequence attending only to itself.

    query (Tq, Hq, D), key (Tk, Hkv, D), value (Tk, Hkv, Dv): N sequences back to back
    cu_seqlens_q, cu_seqlens_k: (N + 1,) integer, cumulative lengths (0, l_0, l_0 + l_1, ..., T)
    out (Tq, Hq, Dv); with return_lse also lse (Hq, Tq) float32 (float64 for float64 inputs)
Backends: the Triton kernels of fastllm.attention with per-sequence row offsets (CUDA; CPU under
TRITON_INTERPRET=1 when forced), or the torch reference, which loops over the sequences (on CPU its forward
runs ATen's CPU flash attention per sequence where that computes the same thing, ops/_attention_cpu.py).
"""
from __future__ import annotations

import math
import numbers

import torch

from .._dispatch import select
from ..reference.attention import attention_varlen_bwd as _ref_bwd
from ..reference.attention import attention_varlen_fwd as _ref_fwd
from ..reference.attention import dropout_keep as _ref_keep
from ..reference.attention import _bhld, _sequences
from ._attention_cpu import applies as flash_applies
from ._attention_cpu import flash_fwd
from ._common import call_op, check_same_device, check_tensor, grid_limit, kernels
from .attention import MAX_HEAD_DIM, _check_flags, _draw_seed


def _limits(q: torch.Tensor, cu_q: torch.Tensor) -> dict[str, str | None]:
    """Why the Triton kernels cannot take packed q (T, Hq, D): their grids hold the sequences and the heads in
    dims 2 and 1."""
    return {"triton": grid_limit(sequences=cu_q.shape[0] - 1, heads=q.shape[1])}


def _varlen(cu_q, cu_k, max_q, max_k):
    return kernels().attention.Varlen(cu_q, cu_k, max_q, max_k)


def _keep(q, max_k, dropout_p, seed):
    """The reference backend's dropout keep mask, (1, Hq, Tq, max_k), drawn again in the backward."""
    if dropout_p == 0.0:
        return None
    return _ref_keep((1, q.shape[1], q.shape[0], max_k), dropout_p, seed, q.device)


def _fwd_outputs(q, v):
    lse2_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (torch.empty((q.shape[0], q.shape[1], v.shape[2]), dtype=q.dtype, device=q.device),
            torch.empty((q.shape[1], q.shape[0]), dtype=lse2_dtype, device=q.device))


@torch.library.custom_op("fastllm::attention_varlen", mutates_args=())
def _attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      max_q: int, max_k: int, scale: float, is_causal: bool, bottom_right: bool, dropout_p: float,
                      seed: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if select("attention_varlen", q, k, v, limits=_limits(q, cu_q)) == "triton":
        out, _ = _fwd_outputs(q, v)
        return kernels().attention.attention_fwd(q, k, v, None, scale=scale, is_causal=is_causal,
                                                 bottom_right=bottom_right, dropout_p=dropout_p, seed=seed, out=out,
                                                 varlen=_varlen(cu_q, cu_k, max_q, max_k))
    return (_cpu_fwd(q, k, v, cu_q, cu_k, scale, is_causal, bottom_right, dropout_p)
            or _ref_fwd(q, k, v, cu_q, cu_k, scale, is_causal, bottom_right, dropout_p, _keep(q, max_k, dropout_p, seed)))


def _cpu_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float,
             is_causal: bool, bottom_right: bool, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out, lse2) through ATen's CPU flash attention one sequence at a time (ops/_attention_cpu.py), or None
    where it does not apply to some sequence (an empty one, a bottom-right mask with Lq != Lk, ...)."""
    seqs = _sequences(cu_q, cu_k)
    if not all(flash_applies(q, k, v, rq.stop - rq.start, rk.stop - rk.start, False, is_causal, bottom_right, dropout_p)
               for rq, rk in seqs):
        return None
    out, lse2 = _fwd_outputs(q, v)
    for rq, rk in seqs:
        o, l2 = flash_fwd(_bhld(q[rq]), _bhld(k[rk]), _bhld(v[rk]), None, scale, is_causal, False, dropout_p)
        out[rq] = o[0].transpose(0, 1)
        lse2[:, rq] = l2[0]
    return out, lse2


@_attention_varlen.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, bottom_right, dropout_p, seed, deterministic):
    return _fwd_outputs(q, v)


@torch.library.custom_op("fastllm::attention_varlen_backward", mutates_args=())
def _attention_varlen_backward(dout: torch.Tensor, dlse2: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, out: torch.Tensor,
                               lse2: torch.Tensor, max_q: int, max_k: int, scale: float, is_causal: bool,
                               bottom_right: bool, dropout_p: float, seed: int,
                               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if select("attention_varlen", q, k, v, limits=_limits(q, cu_q)) == "triton":
        return kernels().attention.attention_bwd(dout, dlse2, q, k, v, None, out, lse2, scale=scale,
                                                 is_causal=is_causal, bottom_right=bottom_right, dropout_p=dropout_p,
                                                 seed=seed, deterministic=deterministic,
                                                 varlen=_varlen(cu_q, cu_k, max_q, max_k))
    return _ref_bwd(dout, dlse2, q, k, v, cu_q, cu_k, out, lse2, scale, is_causal, bottom_right, dropout_p,
                    _keep(q, max_k, dropout_p, seed))


@_attention_varlen_backward.register_fake
def _(dout, dlse2, q, k, v, cu_q, cu_k, out, lse2, max_q, max_k, scale, is_causal, bottom_right, dropout_p, seed,
      deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *flags = inputs
    ctx.flags = flags  # max_q, max_k, scale, is_causal, bottom_right, dropout_p, seed, deterministic
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output)


def _backward(ctx, dout, dlse2):
    q, k, v, cu_q, cu_k, out, lse2 = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = call_op(_attention_varlen_backward, dout, dlse2, q, k, v, cu_q, cu_k, out, lse2, *ctx.flags)
    return dq, dk, dv, *([None] * 10)


_attention_varlen.register_autograd(_backward, setup_context=_setup)


# ---- argument checks ---------------------------------------------------------------------------
def _check_tensors(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total tokens, heads, head dim), got shape {tuple(t.shape)}")
        if t is not query:
            if t.dtype != query.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}; they must match")
            check_same_device(name, t, "query", query)
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"key's head dim {key.shape[2]} must equal query's {query.shape[2]}")
    if value.shape[:2] != key.shape[:2]:
        raise ValueError(f"value {tuple(value.shape)} must have key's {tuple(key.shape)} tokens and heads")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"key has {key.shape[1]} heads, which must divide query's {query.shape[1]} heads "
                         f"(query head i reads key/value head i // (Hq / Hkv))")
    for name, t in (("query", query), ("value", value)):
        if t.shape[2] > MAX_HEAD_DIM:
            raise ValueError(f"{name}'s head dim {t.shape[2]} exceeds the supported maximum {MAX_HEAD_DIM}")


def _check_cu(name: str, cu, total: int, max_name: str, max_len, ref: torch.Tensor) -> torch.Tensor:
    """cu_seqlens as int32 on ref's device, after checking its values against total and max_len (read on
    the host, except while a CUDA graph is being captured, where reading would break the capture)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor of N + 1 cumulative lengths, got dtype {cu.dtype} "
                         f"and shape {tuple(cu.shape)}")
    check_same_device(name, cu, "query", ref)
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_len!r}")
    if total >= 2**31:
        raise ValueError(f"{name}: {total} packed tokens exceed int32 offsets")
    capturing = cu.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        b = cu.tolist()
        if b[0] != 0 or b[-1] != total or any(x > y for x, y in zip(b, b[1:])):
            raise ValueError(f"{name} must start at 0, never decrease and end at the {total} packed tokens, "
                             f"got {b if len(b) <= 12 else b[:6] + ['...'] + b[-3:]}")
        longest = max((y - x for x, y in zip(b, b[1:])), default=0)
        if longest > max_len:
            raise ValueError(f"{max_name} is {max_len} but {name} holds a sequence of {longest} tokens")
    return cu.to(torch.int32).contiguous()  # the kernels read entry i at i


def attention_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None, *, causal_alignment: str = "top_left",
                     return_lse: bool = False, deterministic: bool = False):
    """Attention of each packed sequence to itself: for sequence i, rows [cu_seqlens_q[i], cu_seqlens_q[i+1])
    of query attend to rows [cu_seqlens_k[i], cu_seqlens_k[i+1]) of key and value, exactly as
    fastllm.attention would on that sequence alone (softmax(q k^T * scale) v; a query with no key gives 0).

    query: (Tq, Hq, D); key: (Tk, Hkv, D); value: (Tk, Hkv, Dv), float32/float16/bfloat16 (float64 runs the
    torch reference); Hq a multiple of Hkv (grouped-query attention without repeating key/value); D, Dv <= 256.
    cu_seqlens_q, cu_seqlens_k: (N + 1,) int32 (int64 is converted), starting at 0 and ending at Tq / Tk.
    max_seqlen_q, max_seqlen_k: ints >= the longest sequence (they size the kernels' grid).
    dropout_p, scale, deterministic: as fastllm.attention. is_causal with causal_alignment "top_left"
    (query i sees keys j <= i of its sequence) or "bottom_right" (j <= i + Lk_i - Lq_i: new tokens at the
    end of a cached sequence).
    The values of cu_seqlens are checked on the host (a synchronisation), except during CUDA-graph capture.
    Returns out (Tq, Hq, Dv) in query's dtype, or (out, lse) with return_lse, lse (Hq, Tq) in natural log
    units (-inf for a query with no key); differentiable in query, key and value.
    """
    _check_tensors(query, key, value)
    cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, query.shape[0], "max_seqlen_q", max_seqlen_q, query)
    cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, key.shape[0], "max_seqlen_k", max_seqlen_k, query)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} must describe the "
                         f"same number of sequences")
    _check_flags(dropout_p, scale, is_causal, False, causal_alignment, return_lse, deterministic)
    d = query.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    seed = _draw_seed() if dropout_p > 0 else 0
    out, lse2 = call_op(_attention_varlen, query, key, value, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k),
                        float(scale), is_causal, causal_alignment == "bottom_right", float(dropout_p), seed,
                        deterministic)
    return (out, lse2 * math.log(2.0)) if return_lse else out
