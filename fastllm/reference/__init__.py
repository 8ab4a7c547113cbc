"""Pure-torch references: the math every kernel is tested against, and the last-resort backend.

They compute in float32 (float64 stays float64) and round the result once to the input dtype,
which is what the kernels do too. Inputs are 2-D (rows, cols) views, as the kernels see them.
"""
from .attention import attention_bwd, attention_fwd, attention_varlen_bwd, attention_varlen_fwd, dropout_keep
from .layer_norm import layer_norm_bwd, layer_norm_fwd
from .qmatmul import dequantize_activations, qmatmul_fwd, quantize_activations
from .rms_norm import add_rms_norm_fwd, rms_norm_bwd, rms_norm_fwd
from .silu_mul import silu_mul_bwd, silu_mul_fwd
from .softmax import softmax_bwd, softmax_fwd

__all__ = ["attention_fwd", "attention_bwd", "attention_varlen_fwd", "attention_varlen_bwd", "dropout_keep", "softmax_fwd", "softmax_bwd", "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd",
           "rms_norm_bwd", "add_rms_norm_fwd", "qmatmul_fwd", "quantize_activations",
           "dequantize_activations", "silu_mul_fwd", "silu_mul_bwd"]
