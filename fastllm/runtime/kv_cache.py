"""A static (pre-allocated) KV cache: one (B, Hkv, Lmax, D) key and value buffer per layer, allocated once
for the longest sequence a generation may reach, so that no step allocates and a decode step's tensors
keep their addresses (what CUDA graphs need).

Positions are shared by the batch rows: step t writes cache slot t of every row. Prompts of different
lengths are left-padded (fastllm/runtime/generate.py), and the padded slots are hidden by `key_mask`.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    """k[layer], v[layer]: (B, Hkv, Lmax, D). key_mask: None or (B, Lmax) bool, True where a slot holds a
    real token (False for left padding)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask: torch.Tensor | None = None
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v: (B, Hkv, L, D) at slots [start, start + L); return the layer's keys and values of
        slots [0, start + L): two (B, Hkv, start + L, D) views."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; writing up to {end} does not fit")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
