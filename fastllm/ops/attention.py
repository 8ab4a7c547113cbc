"""fastllm.attention: scaled dot-product attention with torch.nn.functional.scaled_dot_product_attention's
signature and results, plus fastllm-only keywords (causal_alignment, return_lse, deterministic).

Backends: Triton flash attention (CUDA; CPU under TRITON_INTERPRET=1 when forced), torch reference; on CPU the
forward runs ATen's CPU flash attention where that computes the same thing (ops/_attention_cpu.py).
The public function broadcasts the leading dimensions as torch does and brings everything to 4-D views
without copies (expand() gives broadcast dimensions stride 0 and the kernels take any strides); autograd
through those views sums the gradients of broadcast inputs. The custom ops see
    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), mask None or (B, Hq, Lq, Lk) (a view)
and return out (B, Hq, Lq, Dv), laid out as q is ((B, L, H, D) memory order when q is such a view, so
out.transpose(1, 2).reshape(B, L, H * Dv) is free), and lse2 (B, Hq, Lq) float32 (float64 for float64
inputs): the log-sum-exp in log2 units (reference/attention.py says why); `return_lse` gives lse2 * ln 2.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .._dispatch import select
from ..reference.attention import attention_bwd as _ref_bwd
from ..reference.attention import attention_fwd as _ref_fwd
from ..reference.attention import dropout_keep as _ref_keep
from ._attention_cpu import flash_bwd, flash_fwd
from ._common import call_op, check_same_device, check_tensor, grid_limit, kernels

MAX_HEAD_DIM = 256
"""Largest head dim (of query/key and of value) accepted, on every backend alike, so that code which runs
on CPU also runs on the GPU kernels (whose tiles hold a whole head)."""

_ALIGNMENTS = ("top_left", "bottom_right")


def _tk():
    """The Triton attention module (fastllm.kernels.attention); only called once "triton" was chosen."""
    return kernels().attention


# ---- layouts -----------------------------------------------------------------------------------
def _empty_like_layout(ref: torch.Tensor, last: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised (B, H, L, last) tensor in ref's memory order: (B, L, H, last) underneath when ref's
    head stride is below its sequence stride (a transposed (B, L, H, D) tensor), else contiguous."""
    b, h, l, _ = ref.shape
    dtype = dtype or ref.dtype
    if ref.stride(1) < ref.stride(2):
        return torch.empty((b, l, h, last), dtype=dtype, device=ref.device).transpose(1, 2)
    return torch.empty((b, h, l, last), dtype=dtype, device=ref.device)


def _lse2_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_outputs(q: torch.Tensor, v: torch.Tensor):
    return _empty_like_layout(q, v.shape[-1]), torch.empty(q.shape[:3], dtype=_lse2_dtype(q), device=q.device)


def _layout_strides(ref: torch.Tensor, last: int) -> tuple[int, ...]:
    """The strides of _empty_like_layout(ref, last)."""
    b, h, l, _ = ref.shape
    if ref.stride(1) < ref.stride(2):
        return (l * h * last, last, h * last, 1)
    return (h * l * last, l * last, last, 1)


def _in_layout(out: torch.Tensor, lse2: torch.Tensor, q: torch.Tensor):
    """(out, lse2) computed by a backend that chose its own layout, as the op returns them: out laid out as
    _empty_like_layout(q, Dv), lse2 contiguous in _lse2_dtype(q) (or None when not asked for); copies only what
    is laid out otherwise."""
    if out.stride() != _layout_strides(q, out.shape[-1]):
        out = _empty_like_layout(q, out.shape[-1]).copy_(out)
    if lse2 is not None and (lse2.dtype != _lse2_dtype(q) or not lse2.is_contiguous()):
        lse2 = torch.empty(*q.shape[:3], dtype=_lse2_dtype(q), device=q.device).copy_(lse2)
    return out, lse2


def _bwd_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    return _empty_like_layout(q, q.shape[-1]), _empty_like_layout(k, k.shape[-1]), _empty_like_layout(v, v.shape[-1])


def _draw_seed() -> int:
    """The dropout seed, drawn from torch's default generator (so torch.manual_seed makes dropout repeatable)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _keep(q: torch.Tensor, k: torch.Tensor, dropout_p: float, seed: int):
    """The reference backend's dropout keep mask (drawn again from the same seed in the backward)."""
    if dropout_p == 0.0:
        return None
    return _ref_keep((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p, seed, q.device)


# ---- custom ops --------------------------------------------------------------------------------
def _limits(q: torch.Tensor) -> dict[str, str | None]:
    """Why the Triton kernels cannot take q (B, Hq, Lq, D): their grids hold B and the heads in dims 2 and 1."""
    return {"triton": grid_limit(batch=q.shape[0], heads=q.shape[1])}


def _attention_fwd(q, k, v, mask, scale, is_causal, bottom_right, dropout_p, seed, deterministic, lse: bool = True):
    """(out, lse2); lse=False: lse2 may be None (ATen's CPU kernel then skips converting its log-sum-exp)."""
    if select("attention", q, k, v, limits=_limits(q)) == "triton":
        out, lse2 = _fwd_outputs(q, v)
        return _tk().attention_fwd(q, k, v, mask, scale=scale, is_causal=is_causal, bottom_right=bottom_right,
                                   dropout_p=dropout_p, seed=seed, out=out)
    return _in_layout(*(flash_fwd(q, k, v, mask, scale, is_causal, bottom_right, dropout_p, with_lse=lse)
                        or _ref_fwd(q, k, v, mask, scale, is_causal, bottom_right, dropout_p,
                                    _keep(q, k, dropout_p, seed))), q)


def _attention_out(q, k, v, mask, scale, is_causal, bottom_right, dropout_p, seed, deterministic):
    return _attention_fwd(q, k, v, mask, scale, is_causal, bottom_right, dropout_p, seed, deterministic, lse=False)


@torch.library.custom_op("fastllm::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
               is_causal: bool, bottom_right: bool, dropout_p: float, seed: int,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_fwd(q, k, v, mask, scale, is_causal, bottom_right, dropout_p, seed, deterministic)


@_attention.register_fake
def _(q, k, v, mask, scale, is_causal, bottom_right, dropout_p, seed, deterministic):
    return _fwd_outputs(q, v)


@torch.library.custom_op("fastllm::attention_backward", mutates_args=())
def _attention_backward(dout: torch.Tensor, dlse2: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor, lse2: torch.Tensor,
                        scale: float, is_causal: bool, bottom_right: bool, dropout_p: float, seed: int,
                        deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _bwd_outputs(q, k, v)
    if select("attention", q, k, v, limits=_limits(q)) == "triton":
        return _tk().attention_bwd(dout, dlse2, q, k, v, mask, out, lse2, scale=scale, is_causal=is_causal,
                                   bottom_right=bottom_right, dropout_p=dropout_p, seed=seed,
                                   deterministic=deterministic, dq=dq, dk=dk, dv=dv)
    grads = (flash_bwd(dout, dlse2, q, k, v, mask, out, lse2, scale, is_causal, bottom_right, dropout_p)
             or _ref_bwd(dout, dlse2, q, k, v, mask, out, lse2, scale, is_causal, bottom_right, dropout_p,
                         _keep(q, k, dropout_p, seed)))
    for dst, src in zip((dq, dk, dv), grads):
        dst.copy_(src)
    return dq, dk, dv


@_attention_backward.register_fake
def _(dout, dlse2, q, k, v, mask, out, lse2, scale, is_causal, bottom_right, dropout_p, seed, deterministic):
    return _bwd_outputs(q, k, v)


def _setup(ctx, inputs, output):
    q, k, v, mask, *flags = inputs
    ctx.flags = flags  # scale, is_causal, bottom_right, dropout_p, seed, deterministic
    ctx.mask_grad = mask is not None and mask.requires_grad
    ctx.save_for_backward(q, k, v, mask, *output)


def _backward(ctx, dout, dlse2):
    q, k, v, mask, out, lse2 = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if ctx.mask_grad:
        # The kernels never form the Lq x Lk gradient of the scores, which a float mask's gradient is:
        # this rare case runs the reference backward (on the same device).
        scale, is_causal, bottom_right, dropout_p, seed, _ = ctx.flags
        dq, dk, dv, ds = _ref_bwd(dout, dlse2, q, k, v, mask, out, lse2, scale, is_causal, bottom_right, dropout_p,
                                  _keep(q, k, dropout_p, seed))
        return dq, dk, dv, ds.to(mask.dtype), None, None, None, None, None, None
    dq, dk, dv = call_op(_attention_backward, dout, dlse2, q, k, v, mask, out, lse2, *ctx.flags)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention.register_autograd(_backward, setup_context=_setup)


# ---- argument checks and shapes ----------------------------------------------------------------
def _broadcast(name: str, shape, other_name: str, other, hint: str = "") -> tuple[int, ...]:
    shape, other = tuple(shape), tuple(other)
    if shape == other:
        return shape
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(other)))
    except RuntimeError:
        raise ValueError(f"the leading dimensions of {name} {tuple(shape)} do not broadcast with those of "
                         f"{other_name} {tuple(other)}{hint}") from None


def _heads_and_batch(query, key, value, enable_gqa: bool):
    """(lead, batch, Hq, Hk, Hv): lead, the output's leading dims, is (*batch, Hq) or () for 2-D inputs;
    heads are read at dim -3 (as torch does)."""
    if not enable_gqa or query.dim() < 3:
        hint = "; for grouped-query attention pass enable_gqa=True" if query.dim() >= 3 else ""
        lead = _broadcast("key", key.shape[:-2], "query", query.shape[:-2], hint)
        lead = _broadcast("value", value.shape[:-2], "query and key", lead, hint)
        h = lead[-1] if lead else 1
        return lead, lead[:-1], h, h, h
    if key.dim() < 3 or value.dim() < 3:
        raise ValueError(f"with enable_gqa=True, key {tuple(key.shape)} and value {tuple(value.shape)} need a "
                         f"heads dimension (dim -3), as query {tuple(query.shape)} has")
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    for name, h in (("key", hk), ("value", hv)):
        if h == 0 or hq % h != 0:
            raise ValueError(f"{name} has {h} heads, which must divide query's {hq} heads (enable_gqa=True: "
                             f"query head i reads {name} head i // (Hq / H{name[0]}))")
    batch = _broadcast("key", key.shape[:-3], "query", query.shape[:-3])
    batch = _broadcast("value", value.shape[:-3], "query and key", batch)
    return (*batch, hq), batch, hq, hk, hv


def _to_4d(t: torch.Tensor, batch: tuple[int, ...], heads: int, rows: int, cols: int) -> torch.Tensor:
    """t expanded to (*batch, heads, rows, cols) and viewed as (B, heads, rows, cols); copies only when
    several batch dimensions cannot be merged into one."""
    if len(batch) == 1 and t.shape == (*batch, heads, rows, cols):
        return t  # (the usual case: already 4-D)
    t = t.expand(*batch, heads, rows, cols)
    if len(batch) == 1:
        return t
    return t.reshape(math.prod(batch), heads, rows, cols)


def _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment,
                return_lse, deterministic):
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., L, E), got shape {tuple(t.shape)}")
        if t is not query:
            if t.dtype != query.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}; they must match")
            check_same_device(name, t, "query", query)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key's head dim {key.shape[-1]} must equal query's {query.shape[-1]} "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value's sequence length {value.shape[-2]} must equal key's {key.shape[-2]} "
                         f"(key {tuple(key.shape)}, value {tuple(value.shape)})")
    for name, t in (("query", query), ("value", value)):
        if t.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"{name}'s head dim {t.shape[-1]} exceeds the supported maximum {MAX_HEAD_DIM}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be a bool or floating-point tensor, got dtype {attn_mask.dtype}")
        check_same_device("attn_mask", attn_mask, "query", query)
    _check_flags(dropout_p, scale, is_causal, enable_gqa, causal_alignment, return_lse, deterministic)


def _check_flags(dropout_p, scale, is_causal, enable_gqa, causal_alignment, return_lse, deterministic):
    """The scalar arguments shared with attention_varlen."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa), ("return_lse", return_lse),
                       ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if causal_alignment not in _ALIGNMENTS:
        raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', got {causal_alignment!r}")


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
              *, causal_alignment: str = "top_left", return_lse: bool = False, deterministic: bool = False):
    """softmax(query key^T * scale + mask) value, as torch.nn.functional.scaled_dot_product_attention.

    query: (..., Hq, Lq, D); key: (..., Hkv, Lk, D); value: (..., Hkv, Lk, Dv), float32/float16/bfloat16
    (float64 runs the torch reference); leading dimensions broadcast; D, Dv <= 256. The usual layout is
    (B, H, L, D); (B, L, H, D) tensors passed as .transpose(1, 2) views work without copies.
    attn_mask: bool (True = takes part) or float (added to the scores), broadcastable to (..., Hq, Lq, Lk).
        A query row whose keys are all masked out gives 0 (as torch does); a float mask that requires grad
        gets its gradient (computed by the reference backward).
    dropout_p: probability of zeroing each attention weight (always applied when > 0, as torch does).
    is_causal: key j is visible to query i iff j <= i (top-left) or j <= i + Lk - Lq (causal_alignment=
        "bottom_right", for a chunk of new queries against a KV cache). With attn_mask, both apply.
    scale: defaults to 1 / sqrt(D). enable_gqa: Hq may be a multiple of Hkv; query head h reads kv head
        h // (Hq / Hkv), without repeating key/value in memory.
    return_lse: also return lse (..., Hq, Lq), float32 (float64 for float64 inputs), log sum_j exp(s_ij)
        (-inf for a fully masked row); it is differentiable. deterministic: bit-identical gradients run to
        run: the Triton backward then computes dq in a kernel of its own (no atomics); False (default) adds
        each key block's share of dq with atomic adds in the dk/dv kernel, whose order varies run to run.
    With dropout_p > 0 the seed is drawn from torch's default generator (torch.manual_seed repeats it),
    which is a graph break under torch.compile.
    Returns out (..., Hq, Lq, Dv) in query's dtype, or (out, lse) with return_lse; differentiable.
    """
    _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment,
                return_lse, deterministic)
    lq, d, lk, dv = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    lead, batch, hq, hk, hv = _heads_and_batch(query, key, value, enable_gqa)
    if hk != hv:
        # key and value have different head counts: bring both to Hq heads (a copy; rare).
        key = key.repeat_interleave(hq // hk, dim=-3)
        value = value.repeat_interleave(hq // hv, dim=-3)
        hk = hv = hq
    q4, k4, v4 = _to_4d(query, batch, hq, lq, d), _to_4d(key, batch, hk, lk, d), _to_4d(value, batch, hv, lk, dv)
    mask4 = None
    if attn_mask is not None:
        target = (*lead, lq, lk)
        try:
            ok = tuple(torch.broadcast_shapes(tuple(attn_mask.shape), target)) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the attention "
                             f"scores' shape {target} (..., Hq, Lq, Lk)")
        mask4 = _to_4d(attn_mask, batch, hq, lq, lk)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    seed = _draw_seed() if dropout_p > 0 else 0
    out, lse2 = call_op(_attention, q4, k4, v4, mask4, float(scale), is_causal, causal_alignment == "bottom_right",
                        float(dropout_p), seed, deterministic, direct=None if return_lse else _attention_out)
    if len(lead) != 2:
        out = out.reshape(*lead, lq, dv)
    return (out, (lse2 * math.log(2.0)).reshape(*lead, lq)) if return_lse else out
