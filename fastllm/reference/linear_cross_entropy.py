"""Linear + cross-entropy over tokens: h (N, D), W (V, D), targets (N,) -> per-token loss (N,).

    z = h W^T (fp32),  loss = F.cross_entropy(z, targets, reduction="none", label_smoothing=eps)
    stats = (m, r):  m = max_v z,  r = log sum_v exp(z - m)      (m + r = logsumexp(z); see kernels' docstring)
    dz = g (exp((z - m) - r) - (1 - eps) onehot(t) - eps / V),  dh = dz W,  dW = dz^T h
The tokens are processed in chunks of at most CHUNK_ELEMS logits, so the full (N, V) matrix never exists
(this is also the CPU backend, where training a 49k-vocab model must not hold N x 49152 fp32 logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._util import acc_dtype

CHUNK_ELEMS = 1 << 23
"""Logits per chunk (8M: 32 MiB in fp32, about 170 tokens at a 49152 vocabulary)."""


def _chunks(n: int, v: int):
    step = max(1, CHUNK_ELEMS // max(v, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def linear_cross_entropy_fwd(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), stats (2, N)) in the accumulation dtype (float32; float64 for float64 inputs); loss is 0
    at ignored tokens."""
    a = acc_dtype(h.dtype)
    wa = w.to(a)
    loss = torch.zeros(h.shape[0], dtype=a, device=h.device)
    stats = torch.zeros((2, h.shape[0]), dtype=a, device=h.device)
    v = w.shape[0]
    for lo, hi in _chunks(h.shape[0], v):
        t = targets[lo:hi]
        keep = t != ignore_index
        z = F.linear(h[lo:hi].to(a), wa)                                              # (C, V)
        m = z.amax(-1)
        z_t = z.gather(1, torch.where(keep, t, 0)[:, None])[:, 0]
        z_mean = z.mean(-1)
        r = z.sub_(m[:, None]).exp_().sum(-1).log_()                                  # z is spent: one (C, V)
        del z                                                                         # before the next chunk's
        stats[0, lo:hi], stats[1, lo:hi] = m, r
        lse = m + r
        # cross-entropy with label smoothing eps: (1 - eps) (lse - z_t) + eps (lse - mean_v z)
        loss[lo:hi] = torch.where(keep, (1.0 - smoothing) * (lse - z_t) + smoothing * (lse - z_mean), 0)
    return loss, stats


def linear_cross_entropy_bwd(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                             stats: torch.Tensor, ignore_index: int, smoothing: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh (N, D) in h's dtype, dW (V, D) in W's dtype) given g (N,), the gradient of each token's loss."""
    a = acc_dtype(h.dtype)
    wa = w.to(a)
    v = w.shape[0]
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    dw = torch.zeros(w.shape, dtype=a, device=w.device)
    for lo, hi in _chunks(h.shape[0], v):
        hc, t = h[lo:hi].to(a), targets[lo:hi]
        keep = t != ignore_index
        m, r = stats[0, lo:hi, None].to(a), stats[1, lo:hi, None].to(a)
        dz = F.linear(hc, wa).sub_(m).sub_(r).exp_()                                 # softmax (C, V), in place
        rows = torch.arange(hi - lo, device=h.device)[keep]
        dz[rows, t[keep]] -= 1.0 - smoothing
        dz -= smoothing / v
        dz *= torch.where(keep, g[lo:hi].to(a), 0)[:, None]
        dh[lo:hi] = (dz @ wa).to(h.dtype)
        dw.addmm_(dz.t(), hc)
        del dz                                                                        # before the next chunk's
    return dh, dw.to(w.dtype)
