"""fastllm.kernels: hand-written Triton kernels and their launchers (imported lazily by fastllm,
since importing triton is slow; see fastllm/_backend.py)."""
from . import attention, decode_attention, kv_cache_append, linear_cross_entropy, qmatmul, silu_mul, softmax

__all__ = ["attention", "decode_attention", "kv_cache_append", "linear_cross_entropy", "qmatmul", "silu_mul", "softmax"]
