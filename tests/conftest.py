"""Shared test set-up. Without a GPU the Triton kernels run in the interpreter on CPU tensors; the
variable must be set before triton is first imported, which fastllm does lazily."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
