"""The one table of tensor names: fastllm's parameter name -> (Hugging Face name, GGUF name), module
prefixes to which ".weight" / ".bias" are appended; "{i}" is the layer index."""
from __future__ import annotations

import re

from ..models.config import ModelConfig

LAYER_INDEX = re.compile(r"(?:^|\.)(?:blk|layers|h)\.(\d+)\.")
"""The layer index in a file's tensor name: GGUF blk.N.*, HF Llama model.layers.N.*, GPT-2 (transformer.)h.N.*."""

LLAMA_NAMES: dict[str, tuple[str, str]] = {
    "tok_embeddings": ("model.embed_tokens", "token_embd"),
    "layers.{i}.attn_norm": ("model.layers.{i}.input_layernorm", "blk.{i}.attn_norm"),
    "layers.{i}.wq": ("model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_q"),
    "layers.{i}.wk": ("model.layers.{i}.self_attn.k_proj", "blk.{i}.attn_k"),
    "layers.{i}.wv": ("model.layers.{i}.self_attn.v_proj", "blk.{i}.attn_v"),
    "layers.{i}.wo": ("model.layers.{i}.self_attn.o_proj", "blk.{i}.attn_output"),
    "layers.{i}.mlp_norm": ("model.layers.{i}.post_attention_layernorm", "blk.{i}.ffn_norm"),
    "layers.{i}.w_gate": ("model.layers.{i}.mlp.gate_proj", "blk.{i}.ffn_gate"),
    "layers.{i}.w_up": ("model.layers.{i}.mlp.up_proj", "blk.{i}.ffn_up"),
    "layers.{i}.w_down": ("model.layers.{i}.mlp.down_proj", "blk.{i}.ffn_down"),
    "norm": ("model.norm", "output_norm"),
    "lm_head": ("lm_head", "output"),
}
GPT2_NAMES: dict[str, tuple[str, str]] = {
    "tok_embeddings": ("transformer.wte", "token_embd"),
    "pos_embeddings": ("transformer.wpe", "position_embd"),
    "layers.{i}.ln_1": ("transformer.h.{i}.ln_1", "blk.{i}.attn_norm"),
    "layers.{i}.c_attn": ("transformer.h.{i}.attn.c_attn", "blk.{i}.attn_qkv"),
    "layers.{i}.c_proj": ("transformer.h.{i}.attn.c_proj", "blk.{i}.attn_output"),
    "layers.{i}.ln_2": ("transformer.h.{i}.ln_2", "blk.{i}.ffn_norm"),
    "layers.{i}.c_fc": ("transformer.h.{i}.mlp.c_fc", "blk.{i}.ffn_up"),
    "layers.{i}.mlp_proj": ("transformer.h.{i}.mlp.c_proj", "blk.{i}.ffn_down"),
    "norm": ("transformer.ln_f", "output_norm"),
    "lm_head": ("lm_head", "output"),
}
TABLES = {"llama": LLAMA_NAMES, "gpt2": GPT2_NAMES}

HF_CONV1D = {"gpt2": ("c_attn.weight", "c_proj.weight", "c_fc.weight", "mlp_proj.weight")}
"""fastllm weights that Hugging Face stores as Conv1D (in, out) matrices: transposed into nn.Linear's (out, in)."""


def from_hf_layout(arch: str, name: str, t):
    """A Hugging Face tensor in the layout of fastllm parameter `name`."""
    return t.t() if name.endswith(HF_CONV1D.get(arch, ())) else t

IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
"""Tensors some checkpoints carry that the model recomputes (old Llama files store rotary frequencies, old
GPT-2 files their causal-mask buffers)."""


def name_map(cfg: ModelConfig, source: str) -> dict[str, str]:
    """{name in the file: fastllm parameter name} for source "hf" or "gguf", every layer and suffix."""
    col = {"hf": 0, "gguf": 1}[source]
    out = {}
    for ours, theirs in TABLES[cfg.arch].items():
        layers = range(cfg.n_layers) if "{i}" in ours else [None]
        for i in layers:
            for suffix in (".weight", ".bias"):
                out[theirs[col].format(i=i) + suffix] = ours.format(i=i) + suffix
                if source == "hf" and theirs[col].startswith("transformer."):
                    # the original GPT-2 checkpoints name the same tensors without "transformer."
                    out[theirs[col][len("transformer."):].format(i=i) + suffix] = ours.format(i=i) + suffix
    return out


def check_layer_count(cfg: ModelConfig, tensor_names, source: str) -> None:
    """ValueError unless the file's layer tensors are numbered 0 .. cfg.n_layers - 1, all of them (checked before
    name_map builds names for every layer: a corrupt layer count of 10**8 would otherwise run for minutes)."""
    found = {int(m.group(1)) for n in tensor_names if (m := LAYER_INDEX.search(n))}
    if len(found) != cfg.n_layers or max(found, default=-1) != cfg.n_layers - 1:  # i.e. found != {0 .. n - 1}
        shown = sorted(found)[:8]
        raise ValueError(f"{source}: the config says {cfg.n_layers} layers, the weights hold tensors of {len(found)} "
                         f"layers (indices {shown}{'...' if len(found) > 8 else ''})")


def parameter_shapes(cfg: ModelConfig, source: str) -> dict[str, tuple[int, ...]]:
    """{fastllm parameter name: shape} of the model `cfg` describes (built on the meta device: no memory);
    ValueError when the sizes are too large to describe a tensor at all (e.g. a corrupt hidden size of 10**9), or
    when the model refuses the config (rope.py: llama3 scaling that divides 0 by 0)."""
    import torch

    from ..models import ARCHITECTURES

    try:
        with torch.device("meta"):
            model = ARCHITECTURES[cfg.arch](cfg)
    except RuntimeError as e:  # torch: "Storage size calculation overflowed ..."
        raise ValueError(f"{source}: the config's sizes describe no possible model ({e})") from None
    except ValueError as e:  # the model's own checks (rotary scaling without a finite frequency)
        raise ValueError(f"{source}: {e}") from None
    return {n: tuple(p.shape) for n, p in model.named_parameters()}
