"""Training checkpoints in safetensors: the model's parameters (model.safetensors) and everything needed to
continue identically (state.safetensors: AdamW's moment tensors, the RNG states; its metadata holds the step,
the optimizer's hyper-parameters, the scheduler and the losses so far as JSON)."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE, STATE_FILE = "model.safetensors", "state.safetensors"


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP shard (a DTensor: gathered, a collective every rank must join), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save(path: str, model, optimizer, scheduler, step: int, losses: list[float], write: bool = True) -> None:
    """Write a checkpoint (when `write`; every rank of a sharded run calls this, rank 0 writes)."""
    params = {k: _whole(v.detach()).contiguous() for k, v in model.named_parameters()}  # tied weights once
    opt = optimizer.state_dict()
    tensors, per_param = {}, {}
    for idx, st in opt["state"].items():
        per_param[idx] = {}
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{idx}.{key}"] = _whole(val.detach()).contiguous()
            else:
                per_param[idx][key] = val
    if not write:
        return
    os.makedirs(path, exist_ok=True)
    save_file(params, os.path.join(path, MODEL_FILE))
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "param_groups": opt["param_groups"], "scalars": per_param,
            "scheduler": scheduler.state_dict(), "losses": losses}
    save_file(tensors, os.path.join(path, STATE_FILE), metadata={"train": json.dumps(meta)})


def load(path: str, model, optimizer, scheduler) -> tuple[int, list[float]]:
    """Restore a checkpoint written by `save` into model, optimizer and scheduler; returns (step, losses)."""
    files = [os.path.join(path, f) for f in (MODEL_FILE, STATE_FILE)]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} is missing: {path} is not a fastllm training checkpoint")
    params = dict(model.named_parameters())
    weights = load_file(files[0])
    if set(weights) != set(params):
        raise ValueError(f"the checkpoint's parameters do not match the model's (e.g. "
                         f"{sorted(set(weights) ^ set(params))[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    from safetensors import safe_open

    with safe_open(files[1], framework="pt") as f:
        meta = json.loads(f.metadata()["train"])
    tensors = load_file(files[1])
    state = {}
    for idx, scalars in meta["scalars"].items():
        st = dict(scalars)
        prefix = f"opt.{idx}."
        st.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        state[int(idx)] = st
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta["step"], list(meta["losses"])
