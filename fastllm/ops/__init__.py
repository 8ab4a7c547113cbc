"""Public ops: validate -> torch.library custom op (+ fake) -> autograd -> dispatch."""
from .attention import attention
from .attention_varlen import attention_varlen
from .layer_norm import layer_norm
from .qmatmul import qmatmul
from .rms_norm import add_rms_norm, rms_norm
from .softmax import softmax

__all__ = ["attention", "attention_varlen", "softmax", "layer_norm", "rms_norm", "add_rms_norm", "qmatmul"]
