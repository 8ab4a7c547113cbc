"""ModelConfig: the hyper-parameters of a decoder-only Transformer, read from a Hugging Face config.json
or from GGUF metadata (fastllm/loading/gguf.py fills it), in one dataclass the model files take.

Rotary scaling follows config.json's `rope_scaling` (transformers < 5) or `rope_parameters` (transformers
>= 5, which also carries rope_theta): rope_type "default", "linear", "dynamic" (NTK-aware) and "llama3" are
implemented (fastllm/models/rope.py); any other type is refused here with a clear error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "MistralForCausalLM"), "gpt2": ("GPT2LMHeadModel",)}
"""model_type -> the HF architecture names that load as it (Mistral is Llama with GQA and no biases)."""

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class ModelConfig:
    """Shapes: hidden `dim` = n_heads * head_dim (usually); GQA when n_kv_heads < n_heads."""
    arch: str                      # "llama" or "gpt2"
    vocab_size: int
    dim: int                       # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int               # max_position_embeddings: the longest context accepted
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)   # {"rope_type": ..., "factor": ..., ...}; {} = default
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_key_value_heads {self.n_kv_heads} must divide num_attention_heads {self.n_heads}")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From the dict of a Hugging Face config.json."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        for name, hf_archs in SUPPORTED_ARCHITECTURES.items():
            if model_type in (name, "mistral") or any(a in hf_archs for a in archs):
                break
        else:
            supported = sorted(a for archs_ in SUPPORTED_ARCHITECTURES.values() for a in archs_)
            raise ValueError(f"unsupported architecture: model_type {model_type!r}, architectures {archs} "
                             f"(supported: {', '.join(supported)})")
        if name == "gpt2":
            return cls._from_hf_gpt2(cfg)
        try:
            n_heads = cfg["num_attention_heads"]
            dim = cfg["hidden_size"]
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
            if rope.get("rope_type", rope.get("type")) == "default":
                rope = {}
            eos = cfg.get("eos_token_id")
            return cls(arch=name, vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"],
                       n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                       head_dim=cfg.get("head_dim") or dim // n_heads,
                       intermediate_size=cfg["intermediate_size"],
                       max_seq_len=cfg.get("max_position_embeddings", 2048),
                       norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=rope,
                       tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                       attention_bias=bool(cfg.get("attention_bias", False)),
                       mlp_bias=bool(cfg.get("mlp_bias", False)), bos_token_id=cfg.get("bos_token_id"),
                       eos_token_ids=_ids(eos), pad_token_id=cfg.get("pad_token_id"))
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def _from_hf_gpt2(cls, cfg: dict) -> "ModelConfig":
        """GPT-2's config.json names (n_embd, n_layer, ...): learned positions, biases everywhere, tied head."""
        try:
            dim, n_heads = cfg["n_embd"], cfg["n_head"]
            act = cfg.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"GPT-2 activation_function {act!r} is not supported (gelu_new is)")
            return cls(arch="gpt2", vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["n_layer"], n_heads=n_heads,
                       n_kv_heads=n_heads, head_dim=dim // n_heads, intermediate_size=cfg.get("n_inner") or 4 * dim,
                       max_seq_len=cfg.get("n_positions", 1024), norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                       tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                       bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_ids(cfg.get("eos_token_id")))
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelConfig":
        """From <path>/config.json, with eos ids from generation_config.json when it names them."""
        cfg = read_json(os.path.join(path, "config.json"))
        config = cls.from_hf(cfg)
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            gen = read_json(gen_path)
            if gen.get("eos_token_id") is not None:
                config.eos_token_ids = _ids(gen["eos_token_id"])
        return config


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def read_json(path: str) -> dict:
    """A JSON file's contents, or a ValueError naming the file when it is missing or malformed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
