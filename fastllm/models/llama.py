"""Llama-family decoder (Llama 2/3, Mistral-style GQA, SmolLM2, TinyLlama), built from fastllm ops.

    h = tok_embeddings[tokens]                                  (B, L, dim)
    per layer:  h = h + wo(attn(rope(wq(rms(h))), rope(wk(rms(h))), wv(rms(h))))
                h = h + w_down(silu(w_gate(rms(h))) * w_up(rms(h)))
    logits = lm_head(rms(h))                                    (B, L, vocab)
RMSNorm runs on fastllm.rms_norm, attention on fastllm.attention against the static KV cache.
Parameter names are fastllm's own (short, gpt-fast style); fastllm/loading/names.py maps the Hugging Face
and GGUF names onto them. Tied embeddings: lm_head.weight is tok_embeddings.weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastllm

from ..runtime.kv_cache import StaticKVCache
from .config import ModelConfig
from .rope import Rotary, apply_rotary


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
    """The new queries against every cached key: q (B, Hq, L, D); k, v (B, Hkv, S, D) with the last L of
    the S slots being the new tokens; key_mask None or (B, S) bool (False = padding). Causal, aligned
    bottom-right (query i sees slots j <= i + S - L). Returns (B, Hq, L, D).
    (The one place attention is called: fastllm.decode_attention will take the L = 1 steps.)"""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return fastllm.attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True,
                             causal_alignment="bottom_right")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return fastllm.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index, self.n_heads, self.n_kv, self.head_dim = index, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=qkv_bias)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w_gate = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w_up = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, h, cos, sin, cache: StaticKVCache, start: int):
        b, l, _ = h.shape
        x = self.attn_norm(h)                                                       # (B, L, dim)
        q = self.wq(x).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)      # (B, Hq, L, D)
        k = self.wk(x).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)         # (B, Hkv, L, D)
        v = self.wv(x).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)         # (B, Hkv, L, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_all, v_all = cache.update(self.index, start, k, v)                        # (B, Hkv, start+L, D)
        mask = None if cache.key_mask is None else cache.key_mask[:, :start + l]
        y = cached_attention(q, k_all, v_all, mask)                                  # (B, Hq, L, D)
        h = h + self.wo(y.transpose(1, 2).reshape(b, l, -1))
        x = self.mlp_norm(h)
        return h + self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.rotary = Rotary(cfg)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        p = self.tok_embeddings.weight
        return StaticKVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                             p.dtype, p.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache, start: int,
                last_only: bool = False) -> torch.Tensor:
        """tokens, positions: (B, L) int64 (positions are per row: left padding shifts them); the tokens
        fill cache slots [start, start + L). Returns logits (B, L, vocab), or (B, 1, vocab) with last_only."""
        h = self.tok_embeddings(tokens)                                              # (B, L, dim)
        cos, sin = self.rotary(positions)                                            # (B, L, D)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, start)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h))
