"""fastllm.kernels: hand-written Triton kernels and their launchers (imported lazily by fastllm,
since importing triton is slow; see fastllm/_backend.py)."""
from . import softmax

__all__ = ["softmax"]
