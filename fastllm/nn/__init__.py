"""Modules on fastllm ops, state_dict-compatible with their torch counterparts (QuantLinear: its own
quantised state_dict, see quant_linear.py)."""
from .norms import LayerNorm, RMSNorm
from .quant_linear import QuantLinear, quantize_model

__all__ = ["LayerNorm", "RMSNorm", "QuantLinear", "quantize_model"]
