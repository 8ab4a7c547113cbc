"""fastllm.train.finetune: fine-tune a loaded decoder on a text or JSONL file through fastllm's kernels.

Per optimizer step: `accum` micro-batches of `batch_size` blocks, each
    h    = model.hidden(inputs)                         (B, L, dim): fastllm attention and RMSNorm, fwd + bwd
    loss = fastllm.linear_cross_entropy(h, lm_head.weight, targets) / accum     (no (B L, vocab) logits)
then gradient clipping (global norm), AdamW (torch.optim) and a cosine learning-rate schedule with linear warmup.
bf16 autocast on CUDA (parameters stay in their dtype: load the model in float32 to train it). The order of
the blocks is a function of (seed, step) alone, so a run resumed from a checkpoint sees the same batches and,
on CPU, reproduces the uninterrupted run's losses bit for bit.

Data parallel: when torch.distributed is initialised (torchrun, or init_process_group with gloo on CPU / nccl on
GPUs) with W processes, each micro-batch of batch_size blocks is split into W equal shards, one per rank, and the
model runs under DistributedDataParallel (gradients averaged across ranks, synchronised on the last micro-batch
only). The update is then that of one process taking the whole batch (up to the order of the sums); the
reported loss is averaged over the ranks; rank 0 alone writes checkpoints, the plot and the progress bar.
parallel="fsdp" shards instead (torch.distributed.fsdp.fully_shard, FSDP2: each block, then the rest of the
model): every rank keeps 1/W of the parameters, gradients and AdamW moments, gathering a block's weights only
for its forward and backward; same batches, same update as DDP. Checkpoints hold the whole (gathered) model;
the trained model itself stays sharded (DTensor parameters): load out_dir/final to generate with it. Resuming
an FSDP run is not supported yet.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch

import fastllm

from . import checkpoint


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)   # one per optimizer step, from step 0
    step: int = 0                                        # optimizer steps done
    plot: str | None = None                              # the loss-curve PNG, when written


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup over `warmup` steps, then a cosine decay to
    min_ratio at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _batch(blocks: torch.Tensor, step: int, micro: int, accum: int, batch_size: int, seed: int) -> torch.Tensor:
    """The micro-batch `micro` of optimizer step `step`: blocks taken in a per-epoch permutation drawn from seed."""
    n = blocks.shape[0]
    start = (step * accum + micro) * batch_size
    idx = []
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        idx.append(int(perm[pos]))
    return blocks[idx]


class _Loss(torch.nn.Module):
    """The training loss as a module's forward, so that DistributedDataParallel sees the whole computation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, block: torch.Tensor) -> torch.Tensor:
        h = self.model.hidden(block[:, :-1])                                         # (B, L, dim)
        w = self.model.lm_head.weight
        return fastllm.linear_cross_entropy(h, w.to(h.dtype), block[:, 1:])


def _distribute(loss_fn: _Loss, parallel: str, world: int) -> torch.nn.Module:
    """loss_fn wrapped for data parallelism over the process group (unchanged for one process under "ddp")."""
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in loss_fn.model.layers:
            fully_shard(block)
        return fully_shard(loss_fn)  # the root: embeddings, final norm, LM head (tied weights stay one)
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(loss_fn)
    return loss_fn


def _sync_context(loss_fn, parallel: str, sync: bool):
    """Gradient synchronisation only on a step's last micro-batch (DDP no_sync; FSDP2's switch)."""
    if parallel == "fsdp":
        loss_fn.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync or not hasattr(loss_fn, "no_sync") else loss_fn.no_sync()


def _world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step")


def plot_losses(losses: list[float], path: str) -> str | None:
    """Write the loss curve to a PNG (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finetune(model, data, tokenizer=None, *, steps: int = 100, batch_size: int = 4, seq_len: int = 256,
             accum: int = 1, lr: float = 1e-4, weight_decay: float = 0.0, warmup: int = 10, min_lr_ratio: float = 0.1,
             clip: float = 1.0, seed: int = 0, out_dir: str | None = None, save_every: int = 0,
             resume: str | None = None, progress: bool = True, plot: bool = True,
             parallel: str = "ddp") -> TrainResult:
    """Train `model` (a fastllm decoder, e.g. fastllm.LLM.load(dtype=torch.float32).model) in place.

    data: a .txt / .jsonl path (tokenised with `tokenizer`, packed into blocks of seq_len + 1; train/data.py) or an
    int64 tensor of blocks (num_blocks, seq_len + 1). steps: optimizer steps in all (a resumed run continues up to
    it); each takes accum micro-batches of batch_size blocks. lr: the peak of the schedule (lr_factor).
    out_dir: where checkpoints (every save_every steps, and at the end) and loss.png go. resume: a checkpoint
    directory to continue from. parallel: "ddp" or "fsdp", how several torch.distributed processes share the
    work (see the module docstring; "fsdp" needs torch.distributed initialised). Returns the losses per step
    (the mean over the step's micro-batches).
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    for name, val in (("steps", steps), ("batch_size", batch_size), ("accum", accum)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    if model.lm_head.bias is not None:
        raise ValueError("finetune needs an lm_head without bias (fastllm.linear_cross_entropy takes its weight)")
    if isinstance(data, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("tokenizer is needed to read a data file")
        from .data import load_blocks

        eos = model.cfg.eos_token_ids[0] if getattr(model.cfg, "eos_token_ids", None) else None
        data = load_blocks(data, tokenizer, seq_len, eos)
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.long or data.shape[1] < 2:
        raise TypeError("data must be a file path or an int64 tensor of token blocks (num_blocks, seq_len + 1)")
    rank, world = _world()
    if parallel == "fsdp" and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("parallel='fsdp' needs torch.distributed initialised (torchrun + init_process_group)")
    if parallel == "fsdp" and resume is not None:
        raise ValueError("resuming is not supported with parallel='fsdp' yet (use parallel='ddp')")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {world} data-parallel processes")
    progress, plot = progress and rank == 0, plot and rank == 0
    device = model.lm_head.weight.device
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    loss_fn = _distribute(_Loss(model), parallel, world)  # before the optimizer: FSDP replaces the parameters
    params = [p for p in model.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=False, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, steps, min_lr_ratio))
    result = TrainResult()
    if resume is not None:
        result.step, result.losses = checkpoint.load(resume, model, optimizer, scheduler)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    shard = batch_size // world
    bar = _progress(steps, result.step, progress)
    while result.step < steps:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(accum):
            block = _batch(data, result.step, micro, accum, batch_size, seed)[rank * shard:(rank + 1) * shard]
            sync = world == 1 or micro == accum - 1
            with _sync_context(loss_fn, parallel, sync):
                with autocast:
                    loss = loss_fn(block.to(device)) / accum
                loss.backward()
            total += loss.detach().float()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
            total /= world
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        result.step += 1
        result.losses.append(total.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        elif progress and (result.step % 10 == 0 or result.step == steps):
            print(f"step {result.step}/{steps}  loss {result.losses[-1]:.4f}", flush=True)
        if out_dir and save_every and result.step % save_every == 0 and result.step < steps:
            checkpoint.save(os.path.join(out_dir, f"step{result.step}"), model, optimizer, scheduler, result.step,
                            result.losses, write=rank == 0)
    if bar is not None:
        bar.close()
    model.eval()
    if out_dir:
        checkpoint.save(os.path.join(out_dir, "final"), model, optimizer, scheduler, result.step, result.losses,
                        write=rank == 0)
        if plot:
            result.plot = plot_losses(result.losses, os.path.join(out_dir, "loss.png"))
    return result
