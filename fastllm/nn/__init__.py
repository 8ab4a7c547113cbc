"""Modules on fastllm ops, state_dict-compatible with their torch counterparts."""
from .norms import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
