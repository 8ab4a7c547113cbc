"""ModelConfig: the hyper-parameters of a decoder-only Transformer, read from a Hugging Face config.json
or from GGUF metadata (fastllm/loading/gguf.py fills it), in one dataclass the model files take.

Rotary scaling follows config.json's `rope_scaling` (transformers < 5) or `rope_parameters` (transformers
>= 5, which also carries rope_theta): rope_type "default", "linear", "dynamic" (NTK-aware) and "llama3" are
implemented (fastllm/models/rope.py); any other type is refused here with a clear error.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "MistralForCausalLM"), "gpt2": ("GPT2LMHeadModel",)}
"""model_type -> the HF architecture names that load as it (Mistral is Llama with GQA and no biases)."""

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
"""The rope_scaling entries each rope type reads (fastllm/models/rope.py)."""
SILU = ("silu", "swish")
"""hidden_act values of the Llama MLP fastllm runs (transformers' ACT2FN maps both to SiLU)."""


def positive_int(value, key: str, minimum: int = 1) -> int:
    """`value` as an int >= minimum, else ValueError naming `key` (bools, floats and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_float(value, key: str, allow_zero: bool = False) -> float:
    """`value` as a finite float > 0 (>= 0 with allow_zero), else ValueError naming `key`."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > 0 or (allow_zero and value == 0)))
    if not ok:
        raise ValueError(f"{key} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def boolean(value, key: str) -> bool:
    """`value` if it is a bool (JSON true/false), else ValueError naming `key` (the string "false" is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def token_ids(value, key: str) -> tuple[int, ...]:
    """A token id or a list of them (None: none) as a tuple of ints >= 0, else ValueError naming `key`."""
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(positive_int(v, key, minimum=0) for v in values)


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
        if not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be an object (a dict), got {self.rope_scaling!r}")
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        self.rope_theta = positive_float(self.rope_theta, "rope_theta")
        for key in ROPE_KEYS.get(rope_type, ()):
            if key not in self.rope_scaling:
                raise ValueError(f"rope_scaling of type {rope_type!r} lacks {key!r}")
            check = positive_int if key == "original_max_position_embeddings" else positive_float
            check(self.rope_scaling[key], f"rope_scaling[{key!r}]")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_key_value_heads {self.n_kv_heads} must divide num_attention_heads {self.n_heads}")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        """From the dict of a Hugging Face config.json (`source` names the file in errors). Settings that
        change the math and that fastllm does not implement are refused, naming the key."""
        if not isinstance(cfg, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"{source}: architectures must be a list of strings, got {archs!r}")
        for name, hf_archs in SUPPORTED_ARCHITECTURES.items():
            if model_type in (name, "mistral") or any(a in hf_archs for a in archs):
                break
        else:
            supported = sorted(a for archs_ in SUPPORTED_ARCHITECTURES.values() for a in archs_)
            raise ValueError(f"{source}: unsupported architecture: model_type {model_type!r}, architectures {archs} "
                             f"(supported: {', '.join(supported)})")
        try:
            return cls._from_hf_gpt2(cfg) if name == "gpt2" else cls._from_hf_llama(cfg, name)
        except KeyError as e:
            raise ValueError(f"{source} lacks the field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _from_hf_llama(cls, cfg: dict, name: str) -> "ModelConfig":
        """Llama / Mistral names (hidden_size, num_hidden_layers, ...). Mistral's sliding_window caps the context:
        within the window, sliding-window attention is full causal attention, which fastllm runs."""
        act = cfg.get("hidden_act", "silu")
        if act not in SILU:
            raise ValueError(f"hidden_act {act!r} is not supported (the Llama MLP runs silu)")
        n_heads = positive_int(cfg["num_attention_heads"], "num_attention_heads")
        dim = positive_int(cfg["hidden_size"], "hidden_size")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_scaling must be an object, got {rope!r}")
        rope = dict(rope)
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type")) == "default":
            rope = {}
        head_dim = cfg.get("head_dim")
        max_len = positive_int(cfg.get("max_position_embeddings", 2048), "max_position_embeddings")
        window = cfg.get("sliding_window") if (cfg.get("model_type") == "mistral" or "MistralForCausalLM" in
                                              (cfg.get("architectures") or [])) else None
        if window is not None and positive_int(window, "sliding_window") < max_len:
            import warnings

            warnings.warn(f"sliding_window {window} < max_position_embeddings {max_len}: the context is capped at "
                          f"{window} tokens (within the window, sliding-window attention equals full attention)")
            max_len = window
        n_kv = cfg.get("num_key_value_heads")
        return cls(arch=name, vocab_size=positive_int(cfg["vocab_size"], "vocab_size"), dim=dim,
                   n_layers=positive_int(cfg["num_hidden_layers"], "num_hidden_layers"), n_heads=n_heads,
                   n_kv_heads=n_heads if n_kv is None else positive_int(n_kv, "num_key_value_heads"),
                   head_dim=dim // n_heads if head_dim is None else positive_int(head_dim, "head_dim"),
                   intermediate_size=positive_int(cfg["intermediate_size"], "intermediate_size"),
                   max_seq_len=max_len, norm_eps=positive_float(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps", True),
                   rope_theta=positive_float(theta, "rope_theta"), rope_scaling=rope,
                   tie_word_embeddings=boolean(cfg.get("tie_word_embeddings", False), "tie_word_embeddings"),
                   attention_bias=boolean(cfg.get("attention_bias", False), "attention_bias"),
                   mlp_bias=boolean(cfg.get("mlp_bias", False), "mlp_bias"),
                   bos_token_id=_one_id(cfg.get("bos_token_id"), "bos_token_id"),
                   eos_token_ids=token_ids(cfg.get("eos_token_id"), "eos_token_id"),
                   pad_token_id=_one_id(cfg.get("pad_token_id"), "pad_token_id"))

    @classmethod
    def _from_hf_gpt2(cls, cfg: dict) -> "ModelConfig":
        """GPT-2's config.json names (n_embd, n_layer, ...): learned positions, biases everywhere, tied head."""
        dim, n_heads = positive_int(cfg["n_embd"], "n_embd"), positive_int(cfg["n_head"], "n_head")
        if dim % n_heads:
            raise ValueError(f"n_head {n_heads} must divide n_embd {dim}")
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation_function {act!r} is not supported (gelu_new is)")
        for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if boolean(cfg.get(key, supported), key) != supported:
                raise ValueError(f"{key} = {not supported} is not supported (fastllm's GPT-2 scales attention "
                                 "scores by 1/sqrt(head_dim) only)")
        inner = cfg.get("n_inner")
        inner = 4 * dim if inner is None else positive_int(inner, "n_inner")
        return cls(arch="gpt2", vocab_size=positive_int(cfg["vocab_size"], "vocab_size"), dim=dim,
                   n_layers=positive_int(cfg["n_layer"], "n_layer"), n_heads=n_heads, n_kv_heads=n_heads,
                   head_dim=dim // n_heads, intermediate_size=inner,
                   max_seq_len=positive_int(cfg.get("n_positions", 1024), "n_positions"),
                   norm_eps=positive_float(cfg.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon", True),
                   tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                   bos_token_id=_one_id(cfg.get("bos_token_id"), "bos_token_id"),
                   eos_token_ids=token_ids(cfg.get("eos_token_id"), "eos_token_id"))

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelConfig":
        """From <path>/config.json, with eos ids from generation_config.json when it names them."""
        file = os.path.join(path, "config.json")
        config = cls.from_hf(read_json(file), file)
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            gen = read_json(gen_path)
            if gen.get("eos_token_id") is not None:
                try:
                    config.eos_token_ids = token_ids(gen["eos_token_id"], "eos_token_id")
                except ValueError as e:
                    raise ValueError(f"{gen_path}: {e}") from None
                if any(i >= config.vocab_size for i in config.eos_token_ids):
                    raise ValueError(f"{gen_path}: eos_token_id {gen['eos_token_id']} is outside the vocabulary of "
                                     f"{config.vocab_size} (config.json vocab_size)")
        return config


def _one_id(value, key: str) -> int | None:
    """An optional single token id (bos/pad): None or an int >= 0."""
    return None if value is None else positive_int(value, key, minimum=0)


def read_json(path: str) -> dict:
    """A JSON file's object, or a ValueError naming the file when it is missing, malformed or not an object."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
