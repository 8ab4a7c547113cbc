"""QuantLinear (nn.Linear with a quantised weight, forward on fastllm.qmatmul) and quantize_model,
which swaps a model's nn.Linear layers for it.

state_dict names: "qweight" (packed data), "scales", "mins" (int4_asym only), "bias"; see
fastllm/quant/formats.py for the layout. A model quantised with quantize_model() saves with
model.state_dict() (safetensors included) and loads into a model quantised with the same options.
"""
from __future__ import annotations

import fnmatch

import torch

from ..ops.qmatmul import qmatmul_prechecked
from ..quant.formats import DEFAULT_GROUP_SIZE, Format
from ..quant.quantize import QuantizedWeight, quantize
from ..reference.qmatmul import ACT_MODES


class QuantLinear(torch.nn.Module):
    """y = x @ W^T + bias with W (out_features, in_features) stored quantised.

    scheme / group_size as in fastllm.quantize; act: "float" or "int8" (see fastllm.qmatmul).
    x: (..., in_features) -> (..., out_features). The buffers start uninitialised (zeros): use
    from_linear() or load a state_dict."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: str = "int4",
                 group_size: int | None = None, act: str = "float", device=None, dtype=None):
        super().__init__()
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
        if scheme not in DEFAULT_GROUP_SIZE:
            raise ValueError(f"scheme must be one of {tuple(DEFAULT_GROUP_SIZE)}, got {scheme!r}")
        fmt = Format(scheme, DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size)
        fmt.check_k(in_features, "in_features")
        if out_features <= 0:
            raise ValueError(f"out_features must be positive, got {out_features}")
        self.in_features, self.out_features, self.format, self.act = in_features, out_features, fmt, act
        n, k = out_features, in_features
        self.register_buffer("qweight", torch.zeros(fmt.data_shape(n, k), dtype=fmt.data_dtype, device=device))
        self.register_buffer("scales", torch.zeros(fmt.scale_shape(n, k), dtype=fmt.scale_dtype, device=device))
        self.register_buffer("mins", torch.zeros(fmt.scale_shape(n, k), dtype=torch.float16, device=device)
                             if fmt.has_mins else None)
        self.bias = torch.nn.Parameter(torch.zeros(n, device=device, dtype=dtype)) if bias else None
        self.register_load_state_dict_post_hook(_check_loaded)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, scheme: str = "int4", group_size: int | None = None,
                    act: str = "float") -> "QuantLinear":
        """A QuantLinear holding quantize(linear.weight, scheme, group_size) and a copy of the bias."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        q = quantize(w, scheme, group_size)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme,
                  group_size=q.group_size, act=act, device=w.device, dtype=w.dtype)
        mod.load_quantized(q)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def load_quantized(self, q: QuantizedWeight) -> None:
        """Copies a QuantizedWeight of this layer's shape and format into the buffers."""
        if q.format != self.format or tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"q is a {q.scheme}/{q.group_size} weight of shape {tuple(q.shape)}, this layer holds "
                             f"{self.format.scheme}/{self.format.group_size} of shape "
                             f"{(self.out_features, self.in_features)}")
        self.qweight.copy_(q.data)
        self.scales.copy_(q.scales)
        if self.mins is not None:
            self.mins.copy_(q.mins)

    def quantized_weight(self, check_values: bool = False) -> QuantizedWeight:
        """The buffers as a QuantizedWeight (validated; check_values also scans the scales)."""
        return QuantizedWeight(self.qweight, self.scales, self.mins, self.format.scheme, self.format.group_size,
                               (self.out_features, self.in_features), check_values=check_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return qmatmul_prechecked(x, self._cached_weight(), bias, self.act)

    def _cached_weight(self) -> QuantizedWeight:
        """quantized_weight(), built again only when the buffers are other tensors (after .to(), say): the
        QuantizedWeight then remembers that its tensors passed validation, so each call skips it."""
        key = (id(self.qweight), id(self.scales), id(self.mins))
        cached = self.__dict__.get("_qw")
        if cached is None or cached[0] != key:
            cached = (key, self.quantized_weight())
            self.__dict__["_qw"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.format.scheme!r}, group_size={self.format.group_size}, act={self.act!r}")


def fused(mods: "list[QuantLinear]", owner: torch.nn.Module, name: str) -> "QuantLinear | None":
    """One QuantLinear whose output is torch.cat([m(x) for m in mods], -1), or None when the modules cannot be
    fused (not all QuantLinear; different in_features, format or act; a bias).

    Exact: row j of a packed weight holds output feature j alone (its packed values, scales, mins), so the
    rows of the modules concatenated along N give the same numbers as the separate calls (one kernel call
    instead of len(mods), each thread getting a larger share of rows). No second copy of the weights: the
    modules' buffers become row views of the fused buffers, so a load_state_dict (in-place copies) updates both;
    when a module's buffers are other tensors (after .to(), say) the fused module is built again. It is kept
    in owner.__dict__["_fused"][name], outside the module tree (not in state_dict, named_modules or .to())."""
    key = [(m, m._buffers.get("qweight"), m._buffers.get("scales"), m._buffers.get("mins")) for m in mods]
    cache = owner.__dict__.setdefault("_fused", {})
    cached = cache.get(name)
    if cached is not None and all(a is b for ka, kb in zip(key, cached[0]) for a, b in zip(ka, kb)):
        return cached[1]
    first = mods[0]
    if (not all(type(m) is QuantLinear for m in mods) or any(m.bias is not None for m in mods)
            or any((m.in_features, m.format, m.act) != (first.in_features, first.format, first.act) for m in mods)):
        cache[name] = (key, None)
        return None
    out = QuantLinear(first.in_features, sum(m.out_features for m in mods), False, scheme=first.format.scheme,
                      group_size=first.format.group_size, act=first.act, device=first.qweight.device)
    row = 0
    for m in mods:
        rows = slice(row, row + m.out_features)
        for buf in ("qweight", "scales", "mins"):
            part = getattr(m, buf)
            if part is not None:
                target = getattr(out, buf)[rows]
                target.copy_(part)
                setattr(m, buf, target)
        row += m.out_features
    cache[name] = ([(m, m.qweight, m.scales, m.mins) for m in mods], out)
    return out


def _check_loaded(module: QuantLinear, incompatible_keys) -> None:
    """After load_state_dict: the loaded buffers must form a valid weight (finite scales included)."""
    module.quantized_weight(check_values=True)


def quantize_model(model: torch.nn.Module, scheme: str = "int4", group_size: int | None = None, *,
                   act: str = "float", skip=("lm_head",)) -> torch.nn.Module:
    """Replace every nn.Linear of `model` (in place) by QuantLinear.from_linear(...); returns model.

    skip: module names (as in model.named_modules()) or fnmatch patterns ("*.gate") left in float;
    the default keeps the output head. Embeddings are not nn.Linear and stay as they are. A layer
    whose in_features is not a multiple of 32 and of group_size raises ValueError naming it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in skip)]
    for name, lin in targets:
        try:
            new = QuantLinear.from_linear(lin, scheme, group_size, act)
        except ValueError as exc:
            raise ValueError(f"cannot quantise layer {name!r}: {exc} (leave it in float with skip=)") from exc
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def fused_modules(root: torch.nn.Module) -> "list[QuantLinear]":
    """The fused modules fused() built and keeps for root and its submodules (a CPU graph holds them: its
    recorded calls point into their buffers)."""
    return [out for m in root.modules() for _, out in m.__dict__.get("_fused", {}).values() if out is not None]
