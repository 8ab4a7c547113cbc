"""Scaled dot-product attention, the math every attention kernel is tested against.

Shapes (already brought to 4-D by fastllm.attention):
    q: (B, Hq, Lq, D)   k: (B, Hkv, Lk, D)   v: (B, Hkv, Lk, Dv)   Hq = G * Hkv (GQA group size G)
    mask: None, or bool / float broadcastable to (B, Hq, Lq, Lk) (True = takes part; float is added)
    out: (B, Hq, Lq, Dv) in q's dtype   lse2: (B, Hq, Lq) in the accumulation dtype, in log2 units

Math, with query head h reading kv head h // G:
    s_ij   = scale * q_i . k_j + mask_ij       (-inf where a bool mask is False or causality forbids)
    lse_i  = log sum_j exp(s_ij)               (-inf for a row with no key left)
    p_ij   = exp(s_ij - lse_i)                 (0 for such a row: its output is 0, as torch gives)
    out_i  = sum_j p_ij v_j
The log-sum-exp is kept in log2 units, lse2 = lse * log2(e), computed as the kernels do from
s2 = s * log2(e): then p = exp2(s2 - lse2) is exactly 1 for a row with a single key, in the forward and
the backward alike, on every backend (a natural-log lse converted back and forth would be off by ulps).
Causality: key j is visible to query i when j <= i + offset, offset = 0 aligned top-left (torch's
is_causal) or Lk - Lq aligned bottom-right (a chunk of queries at the end of a KV cache).
Dropout (z_ij = keep_ij / (1 - dropout_p), keep_ij true with probability 1 - dropout_p): out_i = sum_j p_ij z_ij v_j.
Backward (the gradient of out, and of lse2 when it was used, given dout and dlse2):
    dp_ij = z_ij dout_i . v_j    delta_i = sum_j p_ij dp_ij - dlse2_i log2(e)    ds_ij = p_ij (dp_ij - delta_i)
(sum_j p_ij dp_ij = dout_i . out_i: the kernels use the latter, which needs no pass over the keys.)
    dq_i  = scale sum_j ds_ij k_j    dk_j = scale sum_i ds_ij q_i    dv_j = sum_i p_ij z_ij dout_i
with dk, dv summed over the G query heads of each kv head.
"""
from __future__ import annotations

import torch

from ._util import acc_dtype


def causal_offset(lq: int, lk: int, bottom_right: bool) -> int:
    """Key j is visible to query i when j <= i + causal_offset(...)."""
    return lk - lq if bottom_right else 0


_LOG2E = 1.4426950408889634


def _scores2(q, k, mask, scale, is_causal, bottom_right):
    """s2 = (scale q k^T + mask) * log2(e), -inf for masked-out pairs, in the accumulation dtype, (B, Hq, Lq, Lk)."""
    a = acc_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    kf = k.to(a).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(a), kf.transpose(-1, -2)) * (scale * _LOG2E)
    lq, lk = q.shape[2], k.shape[2]
    if is_causal:
        offset = causal_offset(lq, lk, bottom_right)
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(offset)
        s = s.masked_fill(~visible, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(a) * _LOG2E
    return s


def _softmax2(s2):
    """(p, lse2): p = 2^(s2 - max) / sum_j 2^(s2_j - max) over the last dim, normalised by the division (as the
    kernels' online softmax and torch's are: 2^(s2 - lse2) would carry lse2's rounding into every p of the row,
    which matters for rows shifted far down by a large finite mask), and lse2 = log2 sum_j 2^s2_j; p = 0 and
    lse2 = -inf for an all -inf (or empty) row."""
    if s2.shape[-1] == 0:
        return s2.clone(), s2.new_full(s2.shape[:-1], float("-inf"))
    m = s2.amax(-1)
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp2(s2 - m[..., None])
    total = e.sum(-1)
    return e / total.masked_fill(total == 0, 1.0)[..., None], m + torch.log2(total)


def _probs(s2, lse2):
    """2^(s2 - lse2), with 0 for rows whose lse2 is -inf (no key takes part)."""
    return torch.exp2(s2 - lse2.masked_fill(lse2 == float("-inf"), float("inf"))[..., None])


def dropout_keep(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """A keep mask (True = kept, probability 1 - dropout_p) drawn from a generator seeded with `seed`,
    so that the backward can draw the same one again."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) >= dropout_p


def _dropped(p, dropout_p: float, keep):
    """p with dropout applied: kept entries scaled by 1 / (1 - dropout_p), the others 0."""
    if keep is None:
        return p
    return p * keep.to(p.dtype) * (1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)


def attention_fwd(q, k, v, mask, scale: float, is_causal: bool, bottom_right: bool, dropout_p: float = 0.0,
                  keep: torch.Tensor | None = None):
    """Returns (out, lse2). keep: None, or the dropout keep mask (B, Hq, Lq, Lk) (dropout_keep gives one):
    the probabilities it drops are zeroed and the rest scaled by 1 / (1 - dropout_p), as torch does;
    lse2 is that of the undropped scores."""
    p, lse2 = _softmax2(_scores2(q, k, mask, scale, is_causal, bottom_right))
    p = _dropped(p, dropout_p, keep)
    group = q.shape[1] // v.shape[1]
    out = torch.matmul(p, v.to(p.dtype).repeat_interleave(group, dim=1))
    return out.to(q.dtype), lse2


def attention_bwd(dout, dlse2, q, k, v, mask, out, lse2, scale: float, is_causal: bool, bottom_right: bool,
                  dropout_p: float = 0.0, keep: torch.Tensor | None = None):
    """Returns (dq, dk, dv, ds): dq, dk, dv in the dtypes of q, k, v, and ds (B, Hq, Lq, Lk), the gradient of
    the scores s (so of an additive mask), in the accumulation dtype. dlse2 may be None (lse2 not used);
    keep: the forward's dropout keep mask, or None."""
    a = acc_dtype(q.dtype)
    p = _probs(_scores2(q, k, mask, scale, is_causal, bottom_right), lse2.to(a))
    group = q.shape[1] // k.shape[1]
    b, hkv, lk = k.shape[0], k.shape[1], k.shape[2]
    do = dout.to(a)
    dv = torch.matmul(_dropped(p, dropout_p, keep).transpose(-1, -2), do)
    dp = _dropped(torch.matmul(do, v.to(a).repeat_interleave(group, dim=1).transpose(-1, -2)), dropout_p, keep)
    delta = (p * dp).sum(-1)  # = dout . out, but free of out's rounding (the kernels use dout . out)
    if dlse2 is not None:
        delta = delta - dlse2.to(a) * _LOG2E
    ds = p * (dp - delta[..., None])
    dq = torch.matmul(ds, k.to(a).repeat_interleave(group, dim=1)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(a)) * scale
    dk = dk.view(b, hkv, group, lk, dk.shape[-1]).sum(2)
    dv = dv.view(b, hkv, group, lk, dv.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds


# ---- packed sequences (varlen) -----------------------------------------------------------------
def _sequences(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """(q rows, k rows) slices of each packed sequence."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return [(slice(bq[i], bq[i + 1]), slice(bk[i], bk[i + 1])) for i in range(len(bq) - 1)]


def _bhld(t: torch.Tensor) -> torch.Tensor:
    """Rows of a packed (T, H, D) tensor as a (1, H, T, D) view."""
    return t.transpose(0, 1).unsqueeze(0)


def attention_varlen_fwd(q, k, v, cu_q, cu_k, scale: float, is_causal: bool, bottom_right: bool,
                         dropout_p: float = 0.0, keep: torch.Tensor | None = None):
    """Packed sequences: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv); sequence i is rows [cu_q[i], cu_q[i+1])
    of q and [cu_k[i], cu_k[i+1]) of k, v, attended on its own as attention_fwd does. keep: None or a
    (1, Hq, Tq, >= longest Lk) dropout keep mask (sequence i uses [..., its q rows, :its Lk]).
    Returns out (Tq, Hq, Dv) in q's dtype and lse2 (Hq, Tq) in the accumulation dtype."""
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    lse2 = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    for rq, rk in _sequences(cu_q, cu_k):
        keep_i = None if keep is None else keep[:, :, rq, :rk.stop - rk.start]
        o, l2 = attention_fwd(_bhld(q[rq]), _bhld(k[rk]), _bhld(v[rk]), None, scale, is_causal, bottom_right,
                              dropout_p, keep_i)
        out[rq] = o[0].transpose(0, 1)
        lse2[:, rq] = l2[0]
    return out, lse2


def attention_varlen_bwd(dout, dlse2, q, k, v, cu_q, cu_k, out, lse2, scale: float, is_causal: bool,
                         bottom_right: bool, dropout_p: float = 0.0, keep: torch.Tensor | None = None):
    """(dq, dk, dv) of attention_varlen_fwd, packed like q, k, v; dlse2: None or (Hq, Tq)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rq, rk in _sequences(cu_q, cu_k):
        keep_i = None if keep is None else keep[:, :, rq, :rk.stop - rk.start]
        dl = None if dlse2 is None else dlse2[:, rq].unsqueeze(0)
        g = attention_bwd(_bhld(dout[rq]), dl, _bhld(q[rq]), _bhld(k[rk]), _bhld(v[rk]), None, _bhld(out[rq]),
                          lse2[:, rq].unsqueeze(0), scale, is_causal, bottom_right, dropout_p, keep_i)
        for dst, src, rows in zip((dq, dk, dv), g, (rq, rk, rk)):
            dst[rows] = src[0].transpose(0, 1)
    return dq, dk, dv
