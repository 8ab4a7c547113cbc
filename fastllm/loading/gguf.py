"""Load a GGUF file (llama.cpp's format) with the `gguf` package: the hyper-parameters from its metadata,
the tokenizer embedded in it (tokenizer.ggml.* and tokenizer.chat_template, rebuilt by
gguf_tokenizer.py), and the tensors, renamed through fastllm/loading/names.py.

Tensors: F32/F16 are read from the memory map. Linear weights in Q8_0/Q4_0/Q4_1 stay quantised (converted
exactly into fastllm's packed layout, run by fastllm.qmatmul) on CPU, and on CUDA with float activations
when the Triton kernels are available (the CUDA GEMV takes decode's few rows, the Triton GEMM prefill's
many); other quantised blocks (K-quants, ...), embeddings and the rest are dequantised to the model dtype
by `dequantized`. GGUF lists
dims innermost first; the numpy arrays are (rows, cols) as
torch's Linear weight (out_features, in_features).

llama.cpp's converter permutes the rows of attn_q / attn_k within each head, from the "rotate_half" layout
of HF checkpoints (pairs (i, i + D/2)) to interleaved pairs (2i, 2i + 1) for ggml's rope; `_unpermute`
undoes it so that fastllm's model (rotate_half) reads GGUF and HF weights alike.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import _backend
from ..models import ModelConfig, build_model
from ..models.config import positive_float, positive_int
from .gguf_header import check_header, check_tensor_ranges
from .gguf_tokenizer import tokenizer_from_metadata
from .names import check_layer_count, name_map, parameter_shapes
from .progress import progress
from .tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama",)
PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
"""Hyper-parameters llama.cpp may store as an array, one per layer (OpenELM-style models)."""


def _open(path: str):
    """GGUFReader on `path` once gguf_header.py found its header and tensor data within bounds."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    check_header(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on bad files
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    check_tensor_ranges(reader, path)
    return reader


def _meta(reader, key: str, default=None, path: str = ""):
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: GGUF metadata {key} is not valid UTF-8 ({e})") from None


def _uniform(values: list, key: str, n_layers: int):
    """The one value of a per-layer array whose entries are all equal (fastllm's Llama has uniform layers)."""
    if len(values) != n_layers:
        raise ValueError(f"{key} has {len(values)} per-layer values for block_count {n_layers} layers")
    if any(v != values[0] for v in values):
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise ValueError(f"{key} differs between layers ([{shown}]): fastllm's Llama needs the same in every layer")
    return values[0]


def config_from_gguf(reader, path: str = "") -> ModelConfig:
    """The ModelConfig of a llama-architecture GGUF file; ValueError naming the key for a missing or bad value. The
    PER_LAYER_KEYS may be arrays of one value per layer: all equal, they stand for that value; else refused."""
    arch = _meta(reader, "general.architecture", path=path)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: per-frequency rope factors (rope_freqs, Llama 3.1 scaling) are not supported yet")

    def g(key, default=None, check=positive_int, **kw):
        value = _meta(reader, f"{arch}.{key}", default, path)
        if value is None:
            raise ValueError(f"the GGUF metadata lacks the required key {arch}.{key}")
        if key in PER_LAYER_KEYS and isinstance(value, list):
            value = _uniform(value, f"{arch}.{key}", g("block_count"))
        return check(value, f"{arch}.{key}", **kw)

    def tok_id(key):
        value = _meta(reader, f"tokenizer.ggml.{key}", path=path)
        return None if value is None else positive_int(value, f"tokenizer.ggml.{key}", minimum=0)

    try:
        dim, n_heads = g("embedding_length"), g("attention.head_count")
        scaling = _meta(reader, f"{arch}.rope.scaling.type", "none", path)
        rope = {}
        if scaling == "linear":
            rope = {"rope_type": "linear", "factor": g("rope.scaling.factor", check=positive_float)}
        elif scaling not in ("none", None):
            raise ValueError(f"rope scaling {scaling!r} is not supported (supported: linear)")
        eos_ids = [i for i in (tok_id("eos_token_id"), tok_id("eot_token_id")) if i is not None]
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        return ModelConfig(
            arch=arch, vocab_size=g("vocab_size", len(tokens.data) if tokens is not None else None), dim=dim,
            n_layers=g("block_count"), n_heads=n_heads, n_kv_heads=g("attention.head_count_kv", n_heads),
            head_dim=g("attention.key_length", dim // n_heads), intermediate_size=g("feed_forward_length"),
            max_seq_len=g("context_length"),
            norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5, positive_float, allow_zero=True),
            rope_theta=g("rope.freq_base", 10000.0, positive_float), rope_scaling=rope,
            tie_word_embeddings="output.weight" not in names, bos_token_id=tok_id("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)), pad_token_id=tok_id("padding_token_id"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def tokenizer_from_gguf(reader, path: str = "") -> Tokenizer:
    """The tokenizer embedded in the file (fastllm/loading/gguf_tokenizer.py builds it from tokenizer.*)."""
    meta = {k: _meta(reader, k, path=path) for k in reader.fields if k.startswith("tokenizer.")}
    return tokenizer_from_metadata(meta, path)


def dequantized(tensor, dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor as a dense torch tensor (rows, cols) in `dtype` (quantised blocks expanded)."""
    from gguf import GGMLQuantizationType, quants

    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = np.array(tensor.data)  # a copy: the memory map is read-only
    else:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(data)).to(dtype)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a (n_heads * D, ...) q/k weight from ggml's interleaved rope order back to rotate_half order."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


KEPT_QUANTISED = ("Q8_0", "Q4_0", "Q4_1")
"""GGUF block types fastllm's qmatmul reads as they are (fastllm/quant/gguf.py converts them exactly)."""


def _runs_quantised(device, act: str) -> bool:
    """Whether qmatmul has kernels for quantised layers on `device` in mode `act`: the C++ kernels on CPU
    (both modes); on CUDA the GEMV and the Triton GEMM, float activations only (elsewhere qmatmul would
    dequantise the weight on every call, so the weights are expanded once at load instead)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and act == "float" and _backend.why_not("triton", device) is None


def _keep_quantised(tensor, ours: str, device, act: str = "float") -> bool:
    """Whether this GGUF tensor becomes a QuantLinear weight: a linear layer's weight in one of the block
    types fastllm's kernels run as they are, on a device and mode with such kernels (_runs_quantised)."""
    return (tensor.tensor_type.name in KEPT_QUANTISED and ours.endswith(".weight")
            and not ours.startswith("tok_embeddings") and _runs_quantised(device, act))


def _rows_unpermuted(q, n_heads: int):
    """A QuantizedWeight with _unpermute's row order (rows move whole: the permutation is exact)."""
    from ..quant import QuantizedWeight

    idx = _unpermute(torch.arange(q.shape[0]), n_heads)
    return QuantizedWeight(q.data[idx], q.scales[idx], None if q.mins is None else q.mins[idx], q.scheme,
                           q.group_size, q.shape)


def load_gguf(path: str, device, dtype: torch.dtype, act: str = "float"):
    """(model, tokenizer, config) from a GGUF file. Q8_0/Q4_0/Q4_1 linear weights stay quantised
    (fastllm.nn.QuantLinear, activation mode `act`) on CPU, and on CUDA for act="float" (_runs_quantised);
    a quantised token embedding tied to the output head
    gives the head its own QuantLinear on the same blocks and a dense copy for the embedding lookup."""
    reader = _open(path)
    cfg = config_from_gguf(reader, path)
    tokenizer = tokenizer_from_gguf(reader, path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
                         f"{cfg.vocab_size} rows")
    check_layer_count(cfg, [t.name for t in reader.tensors], path)
    names = name_map(cfg, "gguf")
    shapes = parameter_shapes(cfg, path)
    tensors, quantized = {}, {}
    for t in progress(reader.tensors, len(reader.tensors), f"loading {os.path.basename(path)}"):
        if t.name not in names:
            raise ValueError(f"{path} holds tensor {t.name!r}, which the {cfg.arch} model does not have")
        ours = names[t.name]
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        expected = shapes.get(ours)
        if expected is None:
            raise ValueError(f"{path} holds tensor {t.name!r}, which the {cfg.arch} config does not have")
        if shape != expected:
            raise ValueError(f"{path}: tensor {t.name!r} has shape {shape}, the config implies {expected}")
        try:
            _convert(t, ours, cfg, device, dtype, act, tensors, quantized)
        except (ValueError, NotImplementedError) as e:
            raise ValueError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}): {e}") from None
    with torch.no_grad():
        return build_model(cfg, tensors, device, dtype, quantized, act), tokenizer, cfg


def _convert(t, ours: str, cfg: ModelConfig, device, dtype, act: str, tensors: dict, quantized: dict) -> None:
    """GGUF tensor `t` into tensors[ours] (dense, rows unpermuted for q/k) and/or quantized[module] (kept blocks)."""
    from ..quant import from_gguf

    heads = cfg.n_heads if ours.endswith(("wq.weight", "wq.bias")) else \
        cfg.n_kv_heads if ours.endswith(("wk.weight", "wk.bias")) else None
    tied_head = ours == "tok_embeddings.weight" and cfg.tie_word_embeddings
    matrix = len(t.shape) == 2  # a 1-D norm weight in Q8_0 blocks is expanded like any vector
    if matrix and (_keep_quantised(t, ours, device, act) or (tied_head and _keep_quantised(t, "lm_head.weight",
                                                                                          device, act))):
        rows, cols = int(t.shape[1]), int(t.shape[0])
        q = from_gguf(np.array(t.data), t.tensor_type.name, shape=(rows, cols))
        quantized["lm_head" if tied_head else ours[:-len(".weight")]] = _rows_unpermuted(q, heads) if heads else q
        if not tied_head:
            return
    w = dequantized(t, dtype)
    if heads:
        w = _unpermute(w, heads)
    tensors[ours] = w.to(device)
