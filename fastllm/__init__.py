"""fastllm: hand-written GPU/CPU kernels for LLMs, as drop-ins for their PyTorch counterparts.

    import fastllm
    y = fastllm.softmax(x, dim=-1)
    y = fastllm.layer_norm(x, (D,), weight, bias)
    y = fastllm.rms_norm(x, (D,), weight)
    y, s = fastllm.add_rms_norm(x, residual, weight)
    out = fastllm.attention(q, k, v, is_causal=True)   # as F.scaled_dot_product_attention
    out = fastllm.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)  # packed sequences
    q = fastllm.kv_cache_append(k_cache, v_cache, k, v, lens, cos=cos, sin=sin, q=q)  # rotary + write
    out = fastllm.decode_attention(q, k_cache, v_cache, lens + 1)   # generation: new tokens vs the cache
    qw = fastllm.quantize(linear.weight, scheme="int4", group_size=128)
    y = fastllm.qmatmul(x, qw, bias)                    # as F.linear with the quantised weight
    loss = fastllm.linear_cross_entropy(h, lm_head.weight, targets)   # LM loss without the logits
    fastllm.quantize_model(model, scheme="int8")        # nn.Linear -> fastllm.nn.QuantLinear
    fastllm.backends()        # which backends run here and, for each missing one, why
    fastllm.dispatch_log()    # which backend each op took last, and why faster ones were not
    llm = fastllm.LLM.load()  # a model (default: the bundled SmolLM2-135M-Instruct); llm.generate("Hi")
"""
from . import nn, reference
from ._backend import backends
from ._dispatch import dispatch_log, use_backend
from .llm import LLM
from .nn import quantize_model
from .ops import (add_rms_norm, attention, attention_varlen, decode_attention, kv_cache_append, layer_norm,
                  linear_cross_entropy, qmatmul, rms_norm, silu_mul, softmax)
from .patch import patch_sdpa, sdpa_is_patched, unpatch_sdpa
from .quant import QuantizedWeight, quantize

__version__ = "0.1.0"
__all__ = ["attention", "attention_varlen", "decode_attention", "kv_cache_append", "softmax", "layer_norm",
           "rms_norm", "add_rms_norm", "nn", "reference", "backends", "dispatch_log", "use_backend", "quantize",
           "QuantizedWeight", "qmatmul", "quantize_model", "patch_sdpa", "unpatch_sdpa", "sdpa_is_patched", "LLM",
           "linear_cross_entropy", "silu_mul", "__version__"]
