"""Public ops: validate -> torch.library custom op (+ fake) -> autograd -> dispatch."""
from .layer_norm import layer_norm
from .rms_norm import add_rms_norm, rms_norm
from .softmax import softmax

__all__ = ["softmax", "layer_norm", "rms_norm", "add_rms_norm"]
