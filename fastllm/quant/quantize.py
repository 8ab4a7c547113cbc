"""fastllm.quantize and QuantizedWeight: a float weight (N, K) -> packed tensors in the "rows" layout
(see formats.py), and back.

The rounding rules are GGUF's (ggml-quants.c, as the `gguf` package reproduces them), computed in
float32 with the same operations, so that group size 32 gives the very bytes of GGUF Q8_0 / Q4_0 /
Q4_1 (tests check this against gguf.quants.quantize):
  int8       d = max|w| / 127, q = sign(w d') floor(|w d'| + 1/2), d' = 1/d (0 when d = 0)
  int4       w* = the element of largest |w| (first one), d = w* / -8, u = clamp(trunc(w d' + 8.5), 0, 15)
  int4_asym  d = (max w - min w) / 15, m = min w, u = clamp(trunc((w - m) d' + 0.5), 0, 15)
q is computed with the float32 d; the stored d (and m) are then rounded to float16 for group-wise
formats. Error bounds per element (what tests/test_quant.py checks): int8 |d|/2, int4 |d| (the
value of opposite sign to w* clips at +7), int4_asym |d|/2, each plus the effect of the float16
rounding of d and m.
"""
from __future__ import annotations

import torch

from .formats import DEFAULT_GROUP_SIZE, LAYOUTS, SCHEMES, Format, dequantize, pack_int4

_FORMAT_VERSION = 1
"""First entry of the "qformat" tensor of a saved QuantizedWeight."""


def _recip(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _quantize_groups(w: torch.Tensor, fmt: Format):
    """w: float32 (N, K // G, G) -> (q or u as int16 (N, K // G, G), d float32 (N, K // G), m or None)."""
    if fmt.scheme == "int8":
        d = w.abs().amax(-1) / 127
        t = w * _recip(d)[..., None]
        return torch.sign(t) * torch.floor(t.abs() + 0.5), d, None
    if fmt.scheme == "int4":
        wmax = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))[..., 0]
        d = wmax / -8
        u = torch.trunc(w * _recip(d)[..., None] + 8.5).clamp(0, 15)
        return u, d, None
    lo, hi = w.amin(-1), w.amax(-1)
    d = (hi - lo) / 15
    u = torch.trunc((w - lo[..., None]) * _recip(d)[..., None] + 0.5).clamp(0, 15)
    return u, d, lo


class QuantizedWeight:
    """A weight (N, K) quantised in one of fastllm's formats (formats.py): the packed tensors
    `data`, `scales`, `mins` (None unless scheme "int4_asym"), and scheme, group_size, shape.

    to_dict()/from_dict() give a flat {name: tensor} dict (safetensors.torch.save_file can write it;
    the format travels in the int32 tensor "qformat"). Construction validates the tensors, so a
    corrupt or mismatched packed tensor raises ValueError/TypeError naming it."""

    def __init__(self, data: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, scheme: str,
                 group_size: int | None, shape, layout: str = "rows", *, check_values: bool = True):
        self.format = Format(scheme, group_size)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.data, self.scales, self.mins, self.layout = data, scales, mins, layout
        if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2
                and all(isinstance(s, int) and s > 0 for s in shape)):
            raise ValueError(f"shape must be (N, K) with positive ints, got {shape!r}")
        self.shape = torch.Size(shape)
        self.validate(values=check_values)

    # ---- description ---------------------------------------------------------------------------
    scheme = property(lambda self: self.format.scheme)
    group_size = property(lambda self: self.format.group_size)
    device = property(lambda self: self.data.device)
    out_features = property(lambda self: self.shape[0])
    in_features = property(lambda self: self.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def tensors(self):
        return (self.data, self.scales, self.mins)

    def __repr__(self) -> str:
        return (f"QuantizedWeight(shape={tuple(self.shape)}, scheme={self.scheme!r}, group_size={self.group_size}, "
                f"layout={self.layout!r}, device={self.device})")

    def validate(self, values: bool = True) -> None:
        """Raises ValueError/TypeError naming the packed tensor that does not fit the format: wrong
        dtype, shape, device or strides (cheap, checked before every kernel call), and with
        values=True also non-finite scales or mins (a pass over them)."""
        sig = None
        if not values and not torch.compiler.is_compiling():  # (dynamo cannot trace data_ptr comparisons)
            sig = tuple((id(t), None if t is None else (t.dtype, t.shape, t.stride(), t.device, t.data_ptr()))
                        for t in self.tensors())
            if sig == getattr(self, "_checked", None):
                return  # these very tensors passed already (qmatmul validates on every call)
        fmt, (n, k) = self.format, self.shape
        fmt.check_k(k, "shape[1]")
        expect = {"data": (fmt.data_dtype, fmt.data_shape(n, k)), "scales": (fmt.scale_dtype, fmt.scale_shape(n, k)),
                  "mins": (torch.float16, fmt.scale_shape(n, k))}
        for name, t in (("data", self.data), ("scales", self.scales), ("mins", self.mins)):
            if name == "mins" and not fmt.has_mins:
                if t is not None:
                    raise ValueError(f"mins must be None for scheme {fmt.scheme!r}")
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            dtype, shape = expect[name]
            if t.dtype != dtype:
                raise TypeError(f"{name} must have dtype {dtype} for {fmt.scheme} group_size {fmt.group_size}, "
                                f"got {t.dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for a {fmt.scheme} weight of shape {(n, k)}, got "
                                 f"{tuple(t.shape)} (corrupt or mismatched packed tensor)")
            if t.device != self.data.device:
                raise ValueError(f"{name} is on {t.device} but data is on {self.data.device}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
            if values and name != "data" and not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or infinite values (corrupt packed tensor)")
        if sig is not None:
            self._checked = sig

    # ---- conversions ---------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (N, K) these tensors stand for (exact in float32), in `dtype`."""
        return dequantize(self.data, self.scales, self.mins, self.format, dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(*(None if t is None else t.to(device) for t in self.tensors()), self.scheme,
                               self.group_size, self.shape, self.layout)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """{"qdata", "scales", ["mins"], "qformat"}: tensors only, for state dicts and safetensors."""
        code = {s: i for i, s in enumerate(SCHEMES)}[self.scheme]
        meta = torch.tensor([_FORMAT_VERSION, code, self.group_size or 0, self.shape[0], self.shape[1],
                             LAYOUTS.index(self.layout)], dtype=torch.int32)
        out = {"qdata": self.data, "scales": self.scales, "qformat": meta}
        if self.mins is not None:
            out["mins"] = self.mins
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """Inverse of to_dict (validates everything; a wrong or missing entry raises ValueError)."""
        for key in ("qdata", "scales", "qformat"):
            if key not in d:
                raise ValueError(f"quantized weight dict lacks {key!r} (has {sorted(d)})")
        meta = d["qformat"]
        if meta.dtype != torch.int32 or tuple(meta.shape) != (6,) or int(meta[0]) != _FORMAT_VERSION:
            raise ValueError(f"qformat must be int32 (6,) of format version {_FORMAT_VERSION}, got {meta!r}")
        _, code, group, n, k, layout = (int(v) for v in meta)
        if not 0 <= code < len(SCHEMES) or not 0 <= layout < len(LAYOUTS):
            raise ValueError(f"qformat names an unknown scheme or layout: {meta.tolist()}")
        return cls(d["qdata"], d["scales"], d.get("mins"), SCHEMES[code], group or None, (n, k), LAYOUTS[layout])


def quantize(weight: torch.Tensor, scheme: str = "int4", group_size: int | None = None) -> QuantizedWeight:
    """Quantise a float weight (N, K) (nn.Linear's layout) to a QuantizedWeight.

    scheme: "int8" (symmetric; per output channel by default, or group-wise), "int4" (symmetric,
    group-wise) or "int4_asym" (scale and min per group). group_size: None for the scheme's default
    (int8: per-channel; int4: 128), or 32, 64, 128. K must be a multiple of 32 and of group_size.
    The rounding rules are in the module docstring (GGUF's, bit for bit at group_size 32).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be 2-D (out_features, in_features) and non-empty, got shape "
                         f"{tuple(weight.shape)}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    fmt = Format(scheme, DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size)
    n, k = weight.shape
    fmt.check_k(k, "weight.shape[1]")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or infinite values")
    g = fmt.group(k)
    q, d, m = _quantize_groups(w.view(n, k // g, g), fmt)
    q = q.reshape(n, k)
    data = q.to(torch.int8) if fmt.bits == 8 else pack_int4(q)
    scales = d.to(fmt.scale_dtype).contiguous()
    mins = None if m is None else m.to(torch.float16).contiguous()
    if not torch.isfinite(scales).all() or (mins is not None and not torch.isfinite(mins).all()):
        raise ValueError(f"weight has values beyond float16's range (|w| > 65504 * {fmt.qmax}); group-wise scales "
                         "are float16")
    return QuantizedWeight(data.contiguous(), scales, mins, scheme, fmt.group_size, (n, k))
