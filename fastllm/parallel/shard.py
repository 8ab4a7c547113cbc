"""shard_model: split a loaded fastllm decoder (Llama family, GPT-2) across the ranks of a torch.distributed group
for tensor-parallel inference, in place.

With W ranks and rank r, each block keeps
    attention   q heads [r Hq/W, (r+1) Hq/W) and kv heads [r Hkv/W, (r+1) Hkv/W) (column-parallel q/k/v:
                contiguous head ranges keep every local q head with its own GQA kv head, since head i reads
                kv head i // (Hq/Hkv)); the output projection is row-parallel over the same heads -> all-reduce
    MLP         intermediate features [r I/W, (r+1) I/W) of gate/up (column-parallel) and of down (row-parallel)
                -> all-reduce
so a block costs two all-reduces of (tokens, dim). Norms, embeddings and the LM head are replicated (every
rank holds vocab x dim twice at most, and the logits come out whole on every rank: no gather, and sampling
sees the same logits everywhere). Hkv and I must divide by W (a clear ValueError otherwise).

Afterwards model.cfg describes this rank's shard (n_heads, n_kv_heads, intermediate_size per rank), so
model.new_cache() holds only the rank's kv heads and prefill / decode / LLM.generate run unchanged; the whole
model's config is model.tensor_parallel.config. torch's global random state is made equal on every rank (a
seed drawn on rank 0), so unseeded sampling draws the same tokens everywhere. Every rank must then run the
same calls (SPMD, as under torchrun).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..models import gpt2, llama
from ..models.config import ModelConfig
from .linear import ColumnParallelLinear, RowParallelLinear


@dataclass(frozen=True)
class TensorParallel:
    """How a model was sharded: this process's rank among `world`, the process group, the unsharded config."""
    rank: int
    world: int
    group: Any
    config: ModelConfig


def _range(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop)


def _shard_llama(block: llama.Block, rank: int, world: int, group) -> None:
    d, hq, hkv = block.head_dim, block.n_heads // world, block.n_kv // world
    q0, q1, kv0, kv1 = rank * hq * d, (rank + 1) * hq * d, rank * hkv * d, (rank + 1) * hkv * d
    inter = block.w_gate.out_features // world
    i0, i1 = rank * inter, (rank + 1) * inter
    block.wq = ColumnParallelLinear(block.wq, _range(q0, q1))
    block.wk = ColumnParallelLinear(block.wk, _range(kv0, kv1))
    block.wv = ColumnParallelLinear(block.wv, _range(kv0, kv1))
    block.wo = RowParallelLinear(block.wo, q0, q1, group)
    block.w_gate = ColumnParallelLinear(block.w_gate, _range(i0, i1))
    block.w_up = ColumnParallelLinear(block.w_up, _range(i0, i1))
    block.w_down = RowParallelLinear(block.w_down, i0, i1, group)
    block.n_heads, block.n_kv = hq, hkv


def _shard_gpt2(block: gpt2.Block, rank: int, world: int, group) -> None:
    d, h = block.head_dim, block.n_heads // world
    dim = block.n_heads * d
    h0, h1 = rank * h * d, (rank + 1) * h * d
    inter = block.c_fc.out_features // world
    i0, i1 = rank * inter, (rank + 1) * inter
    qkv_rows = torch.cat([_range(part * dim + h0, part * dim + h1) for part in range(3)])  # fused q, k, v
    block.c_attn = ColumnParallelLinear(block.c_attn, qkv_rows)
    block.c_proj = RowParallelLinear(block.c_proj, h0, h1, group)
    block.c_fc = ColumnParallelLinear(block.c_fc, _range(i0, i1))
    block.mlp_proj = RowParallelLinear(block.mlp_proj, i0, i1, group)
    block.n_heads = h


_SHARDERS = {llama.Block: _shard_llama, gpt2.Block: _shard_gpt2}


def _sync_random_state(group, device: torch.device) -> None:
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long).to(device)
    dist.broadcast(seed, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    torch.manual_seed(int(seed.item()))


def shard_model(model, group=None):
    """Shard `model` (a fastllm Llama or GPT2, e.g. fastllm.LLM.load(...).model) across `group` (None: the default
    process group, which must be initialised: torchrun + torch.distributed.init_process_group with "nccl" on
    GPUs, one per rank, or "gloo" on CPU). In place; returns the model, frozen (inference only)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs torch.distributed initialised (launch with torchrun and call "
                           "torch.distributed.init_process_group)")
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("model is already sharded (model.tensor_parallel is set)")
    blocks = list(getattr(model, "layers", []))
    if not blocks or any(type(b) not in _SHARDERS for b in blocks):
        raise TypeError(f"model must be a fastllm Llama or GPT2, got {type(model).__name__}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cfg = model.cfg
    for name in ("n_kv_heads", "intermediate_size"):
        if getattr(cfg, name) % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs the model's {name} "
                             f"({getattr(cfg, name)}) to be a multiple of {world}")
    for block in blocks:
        _SHARDERS[type(block)](block, rank, world, group)
    for p in model.parameters():
        p.requires_grad_(False)
    model.cfg = dataclasses.replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=cfg.n_kv_heads // world,
                                    intermediate_size=cfg.intermediate_size // world)
    model.tensor_parallel = TensorParallel(rank, world, group, cfg)
    _sync_random_state(group, model.tok_embeddings.weight.device)
    return model
