"""transformers integration: `attn_implementation="fastllm"` runs a model's attention on fastllm.

    import fastllm.integrations.transformers as fl_hf
    fl_hf.register()                       # once; then any model that supports sdpa accepts:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastllm")

The attention function follows transformers' sdpa contract: query (B, Hq, Lq, D), key/value
(B, Hkv, Lk, D), attention_mask None or a bool/float mask broadcastable to (B, 1, Lq, >= Lk);
it returns (attn_output (B, Lq, Hq, Dv), None). Masks are built as for sdpa.
"""
from __future__ import annotations

import torch

from ..ops.attention import attention

NAME = "fastllm"


def fastllm_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """One attention call of a transformers model, on fastllm.attention (GQA without repeating K/V)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='fastllm' does not support softcap; use 'eager'")
    if kwargs.get("position_bias") is not None:
        raise ValueError("attn_implementation='fastllm' does not support position_bias; use 'eager' or 'sdpa'")
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers' sdpa path: the causal flag only without a mask and for more than one query
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=scaling,
                    enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register NAME with transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fastllm_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
