"""GPT-2 (learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings), built from fastllm ops.

    h = wte[tokens] + wpe[positions]                                (B, L, dim)
    per layer:  h = h + c_proj(attn(split(c_attn(ln_1(h)))))        (causal, H heads of D = dim / H)
                h = h + mlp_proj(gelu_tanh(c_fc(ln_2(h))))
    logits = lm_head(ln_f(h))                                       (B, L, vocab); lm_head = wte
LayerNorm runs on fastllm.layer_norm; attention in the three modes of decoder.py. Hugging Face stores the
projections as Conv1D (in, out) matrices: fastllm/loading/names.py transposes them into nn.Linear's (out, in).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .decoder import DecoderLM
from ..nn import LayerNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index, self.n_heads, self.head_dim = index, cfg.n_heads, cfg.head_dim
        self.ln_1 = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln_2 = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.c_fc = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.mlp_proj = nn.Linear(cfg.intermediate_size, cfg.dim)

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """h + pending (..., dim) -> (h', pending') whose sum is the block's output; attend as in decoder.py."""
        if pending is not None:
            h = h + pending
        q, k, v = self.c_attn(self.ln_1(h)).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(-3)  # (..., H, D)
        h = h + self.c_proj(attend(self.index, q, k, v).flatten(-2))
        return h, self.mlp_proj(F.gelu(self.c_fc(self.ln_2(h)), approximate="tanh"))


class GPT2(DecoderLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_embeddings.weight
        self.rotary = None

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens) + self.pos_embeddings(positions)
