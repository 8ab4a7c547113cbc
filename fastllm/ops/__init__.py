"""Public ops: validate -> torch.library custom op (+ fake) -> autograd -> dispatch."""
from .attention import attention
from .attention_varlen import attention_varlen
from .decode_attention import decode_attention
from .kv_cache_append import kv_cache_append
from .layer_norm import layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .qmatmul import qmatmul
from .rms_norm import add_rms_norm, rms_norm
from .silu_mul import silu_mul
from .softmax import softmax

__all__ = ["attention", "attention_varlen", "decode_attention", "kv_cache_append", "softmax", "layer_norm", "rms_norm",
           "add_rms_norm", "qmatmul", "linear_cross_entropy", "silu_mul"]
