"""Prefill and decode tokens/s of a model: fastllm against transformers on the same weights, same prompt.

Both sides run the same loop: one prefill of a prompt of `prompt_len` tokens (batch `batch`), then
`new_tokens` greedy decode steps, each timed as a whole (device synchronised).
    prefill tokens/s = batch * prompt_len / prefill seconds
    decode tokens/s  = batch / (median seconds of one decode step)
transformers runs its own model class with its default (dynamic) KV cache and its default attention
("sdpa"), in the same dtype; `transformers_model()` builds it from fastllm's loaded weights (Llama-family
and GPT-2 models, through the name table of fastllm/loading/names.py; quantised layers dequantised, so
transformers runs the same values in dense form, as it does when it loads a GGUF file itself).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .graphs import decode_stepper


@dataclass
class GenTiming:
    prefill_tok_s: float
    decode_tok_s: float
    decode_ms: float          # median milliseconds per decode step

    def row(self) -> dict:
        return {"prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s, "decode_ms": self.decode_ms}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(vocab: int, batch: int, prompt_len: int) -> torch.Tensor:
    """The benchmarks' prompts: (batch, prompt_len) token ids drawn from a fixed seed (ids < 3: special tokens)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g)


def _time_loop(prefill, step, device, batch: int, prompt_len: int, new_tokens: int) -> GenTiming:
    _sync(device)
    t0 = time.perf_counter()
    nxt = prefill()
    _sync(device)
    t_prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        nxt = step(nxt)
        _sync(device)
        steps.append(time.perf_counter() - t0)
    med = statistics.median(steps) if steps else float("nan")
    return GenTiming(batch * prompt_len / t_prefill, batch / med, med * 1e3)


@torch.inference_mode()
def time_fastllm(model, batch: int = 1, prompt_len: int = 128, new_tokens: int = 32, warmup: bool = True) -> GenTiming:
    """fastllm's prefill (packed prompts) and decode steps (static cache) of a loaded model."""
    device = model.tok_embeddings.weight.device
    ids = prompts(model.cfg.vocab_size, batch, prompt_len).tolist()

    def run():
        cache = model.new_cache(batch, prompt_len + new_tokens + 1)
        step = decode_stepper(model, cache)  # as generation runs it: CUDA or CPU graph replays where they apply
        return _time_loop(lambda: model.prefill(ids, cache).argmax(-1),
                          lambda nxt: step(nxt).argmax(-1), device, batch, prompt_len, new_tokens)

    if warmup:
        run()
    return run()


def transformers_model(model):
    """A transformers model (LlamaForCausalLM or GPT2LMHeadModel) holding fastllm `model`'s weights, same dtype
    and device, or None when the architecture has no mapping (or transformers is missing)."""
    try:
        import transformers
    except ImportError:
        return None
    from ..loading.names import IGNORED_SUFFIXES, from_hf_layout, name_map

    cfg = model.cfg
    p = model.tok_embeddings.weight
    if cfg.arch == "llama":
        rope = dict(cfg.rope_scaling, rope_theta=cfg.rope_theta) if cfg.rope_scaling else {"rope_theta": cfg.rope_theta}
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
            rope_theta=cfg.rope_theta, rope_scaling=rope if cfg.rope_scaling else None)
        cls = transformers.LlamaForCausalLM
    elif cfg.arch == "gpt2":
        hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.dim, n_layer=cfg.n_layers,
                                         n_head=cfg.n_heads, n_positions=cfg.max_seq_len, n_inner=cfg.intermediate_size,
                                         layer_norm_epsilon=cfg.norm_eps)
        cls = transformers.GPT2LMHeadModel
    else:
        return None
    with torch.device(p.device):
        hf = cls._from_config(hf_cfg, dtype=p.dtype)
    ours = dict(model.state_dict())
    for name, mod in model.named_modules():  # quantised layers: transformers gets the dequantised weight
        if hasattr(mod, "quantized_weight"):
            ours[f"{name}.weight"] = mod.quantized_weight().dequantize(p.dtype)
    names = name_map(cfg, "hf")
    state = {}
    for theirs in hf.state_dict():
        src = names.get(theirs)
        if src is not None and src in ours:
            state[theirs] = from_hf_layout(cfg.arch, src, ours[src])  # (a transpose is its own inverse)
    missing = [n for n in hf.state_dict() if n not in state and not n.endswith(IGNORED_SUFFIXES)]
    if missing:
        raise RuntimeError(f"no fastllm weight for transformers' {missing[:3]}")
    hf.load_state_dict(state, strict=False)
    return hf.eval()


@torch.inference_mode()
def time_transformers(hf, batch: int = 1, prompt_len: int = 128, new_tokens: int = 32, warmup: bool = True) -> GenTiming:
    """The same loop on a transformers model: forward over the prompt, then one token per step with its
    dynamic KV cache."""
    device = next(hf.parameters()).device
    ids = prompts(hf.config.vocab_size, batch, prompt_len).to(device)

    def run():
        state = {}

        def prefill():
            out = hf(ids, use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[:, -1].argmax(-1)

        def step(nxt):
            out = hf(nxt[:, None], past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[:, -1].argmax(-1)

        return _time_loop(prefill, step, device, batch, prompt_len, new_tokens)

    if warmup:
        run()
    return run()
