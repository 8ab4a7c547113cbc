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
from .gguf_tokenizer import tokenizer_from_metadata
from .names import name_map
from .progress import progress
from .tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama",)


def _open(path: str):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on bad files
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    return reader


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, path: str = "") -> ModelConfig:
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: per-frequency rope factors (rope_freqs, Llama 3.1 scaling) are not supported yet")
    g = lambda key, default=None: _meta(reader, f"{arch}.{key}", default)  # noqa: E731
    try:
        dim, n_heads = int(g("embedding_length")), int(g("attention.head_count"))
        scaling = g("rope.scaling.type", "none")
        rope = {}
        if scaling == "linear":
            rope = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
        elif scaling not in ("none", None):
            raise ValueError(f"{path}: rope scaling {scaling!r} is not supported (supported: linear)")
        bos, eos = _meta(reader, "tokenizer.ggml.bos_token_id"), _meta(reader, "tokenizer.ggml.eos_token_id")
        eos_ids = tuple(int(i) for i in (eos, _meta(reader, "tokenizer.ggml.eot_token_id")) if i is not None)
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        return ModelConfig(
            arch=arch, vocab_size=int(g("vocab_size", len(tokens.data) if tokens is not None else 0)), dim=dim,
            n_layers=int(g("block_count")), n_heads=n_heads, n_kv_heads=int(g("attention.head_count_kv", n_heads)),
            head_dim=int(g("attention.key_length", dim // n_heads)), intermediate_size=int(g("feed_forward_length")),
            max_seq_len=int(g("context_length")), norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=rope,
            tie_word_embeddings="output.weight" not in names, bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)), pad_token_id=_meta(reader, "tokenizer.ggml.padding_token_id"))
    except TypeError as e:  # int(None): a required key is missing
        raise ValueError(f"{path}: the GGUF metadata lacks a required {arch}.* key ({e})") from None


def tokenizer_from_gguf(reader, path: str = "") -> Tokenizer:
    """The tokenizer embedded in the file (fastllm/loading/gguf_tokenizer.py builds it from tokenizer.*)."""
    return tokenizer_from_metadata({k: _meta(reader, k) for k in reader.fields if k.startswith("tokenizer.")}, path)


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
    from ..quant import from_gguf

    reader = _open(path)
    cfg = config_from_gguf(reader, path)
    tokenizer = tokenizer_from_gguf(reader, path)
    names = name_map(cfg, "gguf")
    tensors, quantized = {}, {}
    for t in progress(reader.tensors, len(reader.tensors), f"loading {os.path.basename(path)}"):
        if t.name not in names:
            raise ValueError(f"{path} holds tensor {t.name!r}, which the {cfg.arch} model does not have")
        ours = names[t.name]
        heads = cfg.n_heads if ours.endswith(("wq.weight", "wq.bias")) else \
            cfg.n_kv_heads if ours.endswith(("wk.weight", "wk.bias")) else None
        tied_head = ours == "tok_embeddings.weight" and cfg.tie_word_embeddings
        if _keep_quantised(t, ours, device, act) or (tied_head and _keep_quantised(t, "lm_head.weight", device, act)):
            rows, cols = int(t.shape[1]), int(t.shape[0])
            q = from_gguf(np.array(t.data), t.tensor_type.name, shape=(rows, cols))
            quantized["lm_head" if tied_head else ours[:-len(".weight")]] = \
                _rows_unpermuted(q, heads) if heads else q
            if not tied_head:
                continue
        w = dequantized(t, dtype)
        if heads:
            w = _unpermute(w, heads)
        tensors[ours] = w.to(device)
    with torch.no_grad():
        return build_model(cfg, tensors, device, dtype, quantized, act), tokenizer, cfg
