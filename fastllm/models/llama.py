"""Llama-family decoder (Llama 2/3, Mistral-style GQA, SmolLM2, TinyLlama), built from fastllm ops.

    h = tok_embeddings[tokens]                                  (B, L, dim)
    per layer:  h = h + wo(attn(rope(wq(rms(h))), rope(wk(rms(h))), wv(rms(h))))
                h = h + w_down(silu(w_gate(rms(h))) * w_up(rms(h)))
    logits = lm_head(rms(h))                                    (B, L, vocab)
RMSNorm runs on fastllm.rms_norm. Attention: fastllm.attention for whole sequences (forward), attention_varlen
over the packed prompts (prefill), kv_cache_append + decode_attention over the static KV cache (decode).
Parameter names are fastllm's own (short, gpt-fast style); fastllm/loading/names.py maps the Hugging Face
and GGUF names onto them. Tied embeddings: lm_head.weight is tok_embeddings.weight.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

import fastllm

from ..runtime.kv_cache import StaticKVCache
from .config import ModelConfig
from .rope import Rotary, apply_rotary


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

    def forward(self, h: torch.Tensor, attend) -> torch.Tensor:
        """h: (..., dim) -> (..., dim). attend(layer, q, k, v) -> y: the attention of this call's mode (full,
        prefill or decode), given q (..., Hq, D) and k, v (..., Hkv, D) before rotary, returning (..., Hq, D)."""
        x = self.attn_norm(h)                                                        # (..., dim)
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))                  # (..., Hq, D)
        k = self.wk(x).unflatten(-1, (self.n_kv, self.head_dim))                     # (..., Hkv, D)
        v = self.wv(x).unflatten(-1, (self.n_kv, self.head_dim))                     # (..., Hkv, D)
        y = attend(self.index, q, k, v)                                              # (..., Hq, D)
        h = h + self.wo(y.flatten(-2))
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
        cos, sin = self.rotary.table(max_len)                                        # (Lmax, D)
        return StaticKVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                             p.dtype, p.device, cos, sin)

    def _run(self, tokens: torch.Tensor, attend) -> torch.Tensor:
        h = self.tok_embeddings(tokens)                                              # (..., dim)
        for layer in self.layers:
            h = layer(h, attend)
        return h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, vocab) of whole sequences tokens (B, L) at positions 0..L-1, causal, no cache."""
        b, l = tokens.shape
        cos, sin = self.rotary(torch.arange(l, device=tokens.device).expand(b, l))   # (B, L, D)

        def attend(i, q, k, v):                                                      # (B, L, H, D)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            y = fastllm.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                  enable_gqa=True)                                   # (B, Hq, L, D)
            return y.transpose(1, 2)

        return self.lm_head(self.norm(self._run(tokens, attend)))

    def prefill(self, prompts: list[list[int]], cache: StaticKVCache) -> torch.Tensor:
        """Run the prompts (row b of the cache gets prompts[b], from slot 0) and return the logits of each
        prompt's last token, (B, vocab). The prompts are packed back to back, without padding: attention is
        fastllm.attention_varlen over them, and their keys and values are written into the cache rows."""
        device = cache.lengths.device
        lens = [len(p) for p in prompts]
        longest = max(lens)
        cache.check_room(longest)
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)      # (T,)
        rows = torch.repeat_interleave(torch.arange(len(lens), device=device),
                                       torch.tensor(lens, device=device))                            # (T,)
        pos = torch.cat([torch.arange(n, device=device) for n in lens])                             # (T,)
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)  # (B+1,)
        if self.cfg.rope_type == "dynamic":
            cache.cos, cache.sin = self.rotary.table(cache.max_len, longest)
        cos, sin = cache.cos[pos], cache.sin[pos]                                    # (T, D)

        def attend(i, q, k, v):                                                      # (T, H, D)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            cache.k[i][rows, pos] = k
            cache.v[i][rows, pos] = v
            return fastllm.attention_varlen(q, k, v, cu, cu, longest, longest, is_causal=True)

        h = self._run(tokens, attend)[cu[1:].long() - 1]                             # (B, dim)
        cache.lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        cache.longest = longest
        return self.lm_head(self.norm(h))

    def decode(self, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """One new token per row, tokens (B,), appended at each row's length; returns logits (B, vocab).
        Per layer: kv_cache_append (rotary on the new key and query, written in place) then decode_attention
        over the row's cached keys (split-KV on the GPU); no host synchronisation, no allocation by value."""
        cache.check_room(1)
        if self.cfg.rope_type == "dynamic":
            cache.cos, cache.sin = self.rotary.table(cache.max_len, cache.longest + 1)
        after = cache.lengths + 1                                                    # (B,) int32

        def attend(i, q, k, v):                                                      # (B, 1, H, D)
            q = fastllm.kv_cache_append(cache.k[i], cache.v[i], k, v, cache.lengths, cos=cache.cos, sin=cache.sin,
                                        q=q)
            return fastllm.decode_attention(q, cache.k[i], cache.v[i], after)

        h = self._run(tokens[:, None], attend)                                       # (B, 1, dim)
        cache.lengths.copy_(after)
        cache.longest += 1
        return self.lm_head(self.norm(h))[:, 0]
