"""Route torch.nn.functional.scaled_dot_product_attention to fastllm.attention.

    fastllm.patch_sdpa()            # from now on F.scaled_dot_product_attention runs fastllm
    fastllm.unpatch_sdpa()          # back to torch's
    with fastllm.patch_sdpa():      # or only inside a block (restored on exit, nested blocks too)
        model(x)

Only calls made through the attribute `torch.nn.functional.scaled_dot_product_attention` are routed:
code that bound the function to another name before patching keeps calling torch's. Inputs that
fastllm does not take (head dims above 256) go to torch's own function unchanged.
"""
from __future__ import annotations

import torch.nn.functional as F

from .ops.attention import MAX_HEAD_DIM, attention

_TORCH_SDPA = F.scaled_dot_product_attention


def _fastllm_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
    """scaled_dot_product_attention with torch's signature, run by fastllm.attention."""
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    return attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)


class patch_sdpa:
    """Patch F.scaled_dot_product_attention now; as a context manager, put back on exit what was
    there on entry."""

    def __init__(self):
        self._previous = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _fastllm_sdpa

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._previous
        return False


def unpatch_sdpa() -> None:
    """Restore torch's own F.scaled_dot_product_attention."""
    F.scaled_dot_product_attention = _TORCH_SDPA


def sdpa_is_patched() -> bool:
    return F.scaled_dot_product_attention is _fastllm_sdpa
