"""The CPU forward of fastllm.attention and fastllm.attention_varlen where torch's fused CPU kernel computes
exactly what the op asks: ATen's flash attention for CPU (what F.scaled_dot_product_attention runs there), which
returns the output and the log-sum-exp the backward needs without forming the (Lq, Lk) score matrix, and reads
GQA heads and strided (B, L, H, D) views as they are. It runs when there is no mask (its rows with every key
masked out differ from torch's math backend), no dropout (it would draw from torch's generator, not the op's
seeded keep mask, which the backward draws again) and a causal mask is top-left aligned (or Lq = Lk), in fp32,
fp16 and bf16 with equal q/k and v head dims, each head's D values adjacent in memory (the kernel reads the other
strides but not that one); otherwise flash_fwd returns None and the reference runs. GQA heads are read in place
from torch 2.13 on (the version checked here); older torch gets K and V repeated per query head.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, D) -> out (B, Hq, Lq, D) in q's dtype,
    lse2 (B, Hq, Lq) float32 = log2 sum_j exp(s_j)

The backward (flash_bwd) is ATen's CPU flash attention backward under the same conditions, when the log-sum-exp
gets no gradient of its own (ATen's does not take one) and GQA heads are read in place: dq, dk, dv without the
(Lq, Lk) matrices the reference backward forms.
"""
from __future__ import annotations

import torch

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_GQA_IN_PLACE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lq: int, lk: int, masked: bool, is_causal: bool,
            bottom_right: bool, dropout_p: float) -> bool:
    """Whether flash_fwd computes the op for q, k and v's dtype, device, head dims and strides and these lengths."""
    return (_flash is not None and q.is_cpu and q.dtype in _DTYPES and v.shape[-1] == q.shape[-1]
            and (q.stride(-1) == 1 or q.shape[-1] == 1) and (k.stride(-1) == 1 or k.shape[-1] == 1)
            and (v.stride(-1) == 1 or v.shape[-1] == 1)
            and not masked and dropout_p == 0.0 and not (is_causal and bottom_right and lq != lk)
            and lq > 0 and lk > 0)


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              is_causal: bool, bottom_right: bool, dropout_p: float,
              with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(out, lse2) from ATen's CPU flash attention, or None where it does not compute the op's semantics;
    with_lse=False: (out, None)."""
    if not applies(q, k, v, q.shape[2], k.shape[2], mask is not None, is_causal, bottom_right, dropout_p):
        return None
    if k.shape[1] != q.shape[1] and not _GQA_IN_PLACE:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out, lse = _flash(q, k, v, 0.0, is_causal, scale=scale)
    if not with_lse:
        return out, None
    lse2 = torch.empty(*lse.shape, dtype=torch.float32, device=lse.device)  # contiguous (B, Hq, Lq), as returned
    return out, torch.mul(lse, _LOG2E, out=lse2)


def flash_bwd(dout: torch.Tensor, dlse2: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, out: torch.Tensor, lse2: torch.Tensor, scale: float, is_causal: bool,
              bottom_right: bool, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(dq, dk, dv) from ATen's CPU flash attention backward, given the forward's out and lse2; None where
    flash_fwd did not compute the forward, lse2 has a gradient, or GQA would need K and V repeated."""
    if (_flash_bwd is None or not applies(q, k, v, q.shape[2], k.shape[2], mask is not None, is_causal, bottom_right,
                                          dropout_p)
            or (k.shape[1] != q.shape[1] and not _GQA_IN_PLACE) or (dlse2 is not None and bool(dlse2.any()))):
        return None
    return tuple(_flash_bwd(dout, q, k, v, out, lse2 / _LOG2E, 0.0, is_causal, scale=scale))
