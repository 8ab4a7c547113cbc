"""Model definitions (llama.py, gpt2.py, sharing decoder.py) and their config (config.py); build_model turns a config and a dict of
loaded tensors into a ready model."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .gpt2 import GPT2
from .llama import Llama

ARCHITECTURES = {"llama": Llama, "gpt2": GPT2}


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype,
                quantized: dict | None = None, act: str = "float"):
    """The model for `cfg` holding `tensors` ({fastllm name: tensor}, any dtype/device; converted to
    `dtype` on `device`). quantized: {linear module name: QuantizedWeight}: those nn.Linear layers become
    fastllm.nn.QuantLinear (activation mode `act`) holding the weight as it is; their biases, if any, come
    from `tensors`. Raises ValueError naming missing or unexpected tensors and wrong shapes."""
    from ..nn.quant_linear import QuantLinear

    quantized = quantized or {}
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.arch](cfg)
    for name, q in quantized.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, torch.nn.Linear) or tuple(q.shape) != (lin.out_features, lin.in_features):
            raise ValueError(f"quantised tensor {name} of shape {tuple(q.shape)} does not fit the {cfg.arch} model")
        ql = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme=q.scheme,
                         group_size=q.group_size, act=act, device=device, dtype=dtype)
        ql.load_quantized(q.to(device))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ql)
    tied = cfg.tie_word_embeddings and "lm_head" not in quantized
    if tied:
        tensors.setdefault("lm_head.weight", tensors.get("tok_embeddings.weight"))
    expected = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(n for n in expected if tensors.get(n) is None)
    unexpected = sorted(n for n in tensors if n not in expected)
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the {cfg.arch} config: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for name, p in expected.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"tensor {name} has shape {tuple(tensors[name].shape)}, the config implies "
                             f"{tuple(p.shape)}")
    state = {n: t.to(device=device, dtype=dtype) for n, t in tensors.items()}
    result = model.load_state_dict(state, assign=True, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    if any(not k.startswith(tuple(f"{q}." for q in quantized)) for k in result.missing_keys):
        raise ValueError(f"the weights do not fit the {cfg.arch} config: missing {result.missing_keys[:5]}")
    if tied:
        model.lm_head.weight = model.tok_embeddings.weight
    if model.rotary is not None:  # buffers made on the meta device: build them again
        model.rotary = type(model.rotary)(cfg).to(device)
    return model.eval()


__all__ = ["ModelConfig", "Llama", "GPT2", "build_model"]
