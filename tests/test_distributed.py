"""Data-parallel fine-tuning on torch.distributed: 2 processes (gloo, CPU) under DistributedDataParallel, and
under FSDP2 (fully_shard: parameters, gradients and AdamW state sharded), give the losses and the parameters of
one process taking the whole batch; the FSDP run's checkpoint holds the whole trained model."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import fastllm
from fastllm.train import finetune
from helpers import free_port
from tiny_models import tiny_llama

SETTINGS = dict(steps=3, batch_size=4, seq_len=16, accum=2, lr=3e-3, warmup=1, seed=0, progress=False, plot=False)
MODES = ("ddp", "fsdp")


def _blocks(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (24, SETTINGS["seq_len"] + 1), generator=torch.Generator().manual_seed(0))


def _train(model_dir: str, **kwargs) -> tuple[list[float], dict]:
    llm = fastllm.LLM.load(model_dir, device="cpu", dtype=torch.float32)
    out = finetune(llm.model, _blocks(llm.config.vocab_size), **SETTINGS, **kwargs)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in llm.model.state_dict().items()}
    return out.losses, {k: v.detach().clone() for k, v in state.items()}


def _worker(rank: int, world: int, port: int, model_dir: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for mode in MODES:
            out_dir = os.path.join(result_dir, mode)
            losses, state = _train(model_dir, parallel=mode, out_dir=out_dir if mode == "fsdp" else None)
            torch.save({"losses": losses, "state": state}, os.path.join(result_dir, f"{mode}{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_ddp_and_fsdp_equal_one_process(tmp_path):
    tiny_llama(tmp_path / "model")
    torch.set_num_threads(1)
    ref_losses, ref_state = _train(str(tmp_path / "model"))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "model"), str(tmp_path)), nprocs=2, join=True)
    assert ref_losses[-1] != ref_losses[0]  # it trained
    for mode in MODES:
        results = [torch.load(tmp_path / f"{mode}{r}.pt") for r in range(2)]
        for res in results:
            torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
            for name, ref in ref_state.items():
                torch.testing.assert_close(res["state"][name], ref, rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")
        for name in ref_state:  # the two ranks hold (or gather) the very same parameters
            assert torch.equal(results[0]["state"][name], results[1]["state"][name]), f"{mode} {name}"
    saved = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    for name, ref in saved.items():
        torch.testing.assert_close(ref, ref_state[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_needs_torch_distributed(tmp_path):
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    tiny_llama(tmp_path)
    model = fastllm.LLM.load(str(tmp_path), device="cpu", dtype=torch.float32).model
    with pytest.raises(ValueError, match="parallel='fsdp' needs torch.distributed"):
        finetune(model, _blocks(10), parallel="fsdp")
    with pytest.raises(ValueError, match="parallel must be 'ddp' or 'fsdp'"):
        finetune(model, _blocks(10), parallel="zero3")
