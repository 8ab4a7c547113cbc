"""Model definitions (llama.py, gpt2.py, sharing decoder.py) and their config (config.py); build_model turns a config and a dict of
loaded tensors into a ready model."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .gpt2 import GPT2
from .llama import Llama

ARCHITECTURES = {"llama": Llama, "gpt2": GPT2}


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype):
    """The model for `cfg` holding `tensors` ({fastllm name: tensor}, any dtype/device; converted to
    `dtype` on `device`). Raises ValueError naming missing or unexpected tensors and wrong shapes."""
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.arch](cfg)
    if cfg.tie_word_embeddings:
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
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    if model.rotary is not None:  # buffers made on the meta device: build them again
        model.rotary = type(model.rotary)(cfg).to(device)
    return model.eval()


__all__ = ["ModelConfig", "Llama", "GPT2", "build_model"]
