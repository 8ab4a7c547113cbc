"""Tensor-parallel inference on torch.distributed: column- and row-parallel linears (linear.py) and shard_model
(shard.py), which splits a loaded model's heads and MLP across the ranks of a process group.

    torchrun --nproc-per-node 2 -m fastllm.cli generate --tp "Once upon a time"
    # or, in a script under torchrun:
    dist.init_process_group("nccl")            # "gloo" on CPU
    llm = fastllm.LLM.load(path, device=f"cuda:{local_rank}", tensor_parallel=True)
    llm.generate("Hi")                         # every rank runs it and gets the same text

Data-parallel and FSDP training live in fastllm.train.finetune (parallel=...).
"""
from .linear import ColumnParallelLinear, RowParallelLinear, slice_linear
from .shard import TensorParallel, shard_model

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "slice_linear", "TensorParallel", "shard_model"]
