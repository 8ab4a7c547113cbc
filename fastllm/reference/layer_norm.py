"""LayerNorm over the last dimension. x, dy: (rows, cols); weight, bias: (cols,) or None;
mean, rstd: (rows,) in the accumulation dtype; dweight, dbias: (cols,) in the accumulation dtype."""
import torch

from ._util import acc_dtype


def layer_norm_fwd(x, weight, bias, eps: float):
    """y = (x - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps) (biased variance).
    Returns (y, mean, rstd)."""
    xf = x.to(acc_dtype(x.dtype))
    mean = xf.mean(-1)
    mean = mean + (xf - mean[:, None]).mean(-1)  # one refinement step: exact to rounding when |mean| >> std
    var = (xf - mean[:, None]).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype), mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd):
    """xhat = (x - mean) * rstd, g = dy * weight;
    dx = rstd * (g - mean_j g - xhat * mean_j(g * xhat)); dweight = sum_i dy * xhat; dbias = sum_i dy.
    Returns (dx, dweight, dbias)."""
    a = acc_dtype(x.dtype)
    xf, dyf = x.to(a), dy.to(a)
    xhat = (xf - mean[:, None].to(a)) * rstd[:, None].to(a)
    g = dyf * weight.to(a) if weight is not None else dyf
    dx = rstd[:, None].to(a) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dyf * xhat).sum(0), dyf.sum(0)
