"""fastllm.kernels: hand-written Triton kernels and their launchers (imported lazily by fastllm,
since importing triton is slow; see fastllm/_backend.py)."""
from . import attention, softmax

__all__ = ["attention", "softmax"]
