"""RMSNorm over the last dimension. x, dy: (rows, cols); weight: (cols,) or None;
rstd: (rows,) in the accumulation dtype; dweight: (cols,) in the accumulation dtype."""
import torch

from ._util import acc_dtype


def rms_norm_fwd(x, weight, eps: float):
    """y = x * rstd * weight, rstd = 1 / sqrt(mean_j x^2 + eps). Returns (y, rstd)."""
    xf = x.to(acc_dtype(x.dtype))
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    y = xf * rstd[:, None]
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype), rstd


def add_rms_norm_fwd(x, residual, weight, eps: float):
    """s = x + residual (rounded to x's dtype), y = rms_norm(s). Returns (y, s, rstd)."""
    s = (x.to(acc_dtype(x.dtype)) + residual.to(acc_dtype(x.dtype))).to(x.dtype)
    y, rstd = rms_norm_fwd(s, weight, eps)
    return y, s, rstd


def rms_norm_bwd(dy, x, weight, rstd, dextra=None):
    """xhat = x * rstd, g = dy * weight; dx = rstd * (g - xhat * mean_j(g * xhat)) (+ dextra, the
    gradient reaching the residual sum of add_rms_norm); dweight = sum_i dy * xhat.
    Returns (dx, dweight)."""
    a = acc_dtype(x.dtype)
    xf, dyf = x.to(a), dy.to(a)
    xhat = xf * rstd[:, None].to(a)
    g = dyf * weight.to(a) if weight is not None else dyf
    dx = rstd[:, None].to(a) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dextra is not None:
        dx = dx + dextra.to(a)
    return dx.to(x.dtype), (dyf * xhat).sum(0)
