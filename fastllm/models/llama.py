"""Llama-family decoder (Llama 2/3, Mistral-style GQA, SmolLM2, TinyLlama), built from fastllm ops.

    h = tok_embeddings[tokens]                                  (B, L, dim)
    per layer:  h = h + wo(attn(rope(wq(rms(h))), rope(wk(rms(h))), wv(rms(h))))
                h = h + w_down(silu(w_gate(rms(h))) * w_up(rms(h)))          (fastllm.silu_mul)
    logits = lm_head(rms(h))                                    (B, L, vocab)
RMSNorm runs on fastllm.rms_norm, fused with the residual add before it (add_rms_norm: a block hands the
MLP's output on unadded, see DecoderLM._run); attention in the three modes of decoder.py (whole sequences, packed
prefill, decode steps over the static KV cache).
Parameter names are fastllm's own (short, gpt-fast style); fastllm/loading/names.py maps the Hugging Face
and GGUF names onto them. Tied embeddings: lm_head.weight is tok_embeddings.weight.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import RMSNorm
from ..ops import add_rms_norm, silu_mul
from ..nn.quant_linear import fused
from .config import ModelConfig
from .decoder import DecoderLM
from .rope import Rotary


FUSED_MAX_ROWS = 8
"""Quantised q/k/v (and gate/up) run as one qmatmul over their concatenated rows for at most this many rows of x
(decode steps of up to 8 sequences), where the three calls' fixed costs outweigh the work. Above it (prefill)
they stay separate: with the current CPU kernel the fused matrices were slower at many rows (SmolLM2 prefill of
128 tokens, 2 threads: 323 tok/s fused against 351 separate; the cause, probably the larger matrix falling
out of cache, is not pinned down)."""


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

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the hidden state h + pending (..., dim) (pending None: h alone) -> (h', pending') whose sum
        is its output: the MLP's residual add is left to the next norm, which fuses it (add_rms_norm).
        attend(layer, q, k, v) -> y: the attention of this call's mode (full, prefill or decode), given q
        (..., Hq, D) and k, v (..., Hkv, D) before rotary, returning (..., Hq, D)."""
        if pending is None:
            x = self.attn_norm(h)                                                    # (..., dim)
        else:
            x, h = add_rms_norm(pending, h, self.attn_norm.weight, self.attn_norm.eps)   # h += pending
        small = x.numel() <= FUSED_MAX_ROWS * x.shape[-1]
        qkv = fused([self.wq, self.wk, self.wv], self, "_wqkv") if small else None
        if qkv is not None:  # quantised: one qmatmul for the three projections
            q, k, v = qkv(x).split([self.wq.out_features, self.wk.out_features, self.wv.out_features], -1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))                           # (..., Hq, D)
        k = k.unflatten(-1, (self.n_kv, self.head_dim))                              # (..., Hkv, D)
        v = v.unflatten(-1, (self.n_kv, self.head_dim))                              # (..., Hkv, D)
        y = attend(self.index, q, k, v)                                              # (..., Hq, D)
        x, h = add_rms_norm(self.wo(y.flatten(-2)), h, self.mlp_norm.weight, self.mlp_norm.eps)  # h += wo(y)
        gate_up = fused([self.w_gate, self.w_up], self, "_w_gate_up") if small else None
        if gate_up is not None:
            gate, up = gate_up(x).split([self.w_gate.out_features, self.w_up.out_features], -1)
        else:
            gate, up = self.w_gate(x), self.w_up(x)
        return h, self.w_down(silu_mul(gate, up))                                    # (..., dim) twice


class Llama(DecoderLM):
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

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)                                           # positions: via rotary

    def final_norm(self, h: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        if pending is None:
            return self.norm(h)
        return add_rms_norm(pending, h, self.norm.weight, self.norm.eps)[0]
