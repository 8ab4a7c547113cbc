"""Training: tokens/s (and, on CUDA, peak memory) of one fine-tuning step of fastllm's model against the same loop
on transformers' own LlamaForCausalLM, built from the same config and weights, on the same batch, same run.

    step = forward + backward of the LM loss on B blocks of L + 1 tokens, gradient clipping (norm 1), AdamW
    fastllm:      fastllm.linear_cross_entropy(model.hidden(x), lm_head.weight, y)   (fastllm.train.finetune's loss:
                  fastllm attention and RMSNorm, the logits never formed)
    transformers: F.cross_entropy(hf(x).logits, y)                                    (default "sdpa" attention)
    work = B * L tokens per step
Both optimizers are torch.optim.AdamW(foreach=False), as finetune builds it; on CUDA both steps run under bf16
autocast with float32 weights, as finetune does. The first step's two losses are recorded (the same model: they
agree to rounding). GPU: the SmolLM2-135M shape (vocab 49152); CPU: a tiny model and SmolLM2's shape cut to 4
layers (CI runs the tiny one with --benchmark-disable). Random weights (std 0.02).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.models import Llama, ModelConfig, build_model
from fastllm.runtime.bench import transformers_model
from harness import DEVICE, compare, peak_bytes

MODELS = {  # name -> ModelConfig fields
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                         intermediate_size=1536, tie_word_embeddings=True, rope_theta=100000.0),
    "smollm2-4layers": dict(vocab_size=49152, dim=576, n_layers=4, n_heads=9, n_kv_heads=3, head_dim=64,
                            intermediate_size=1536, tie_word_embeddings=True, rope_theta=100000.0),
    "tiny": dict(vocab_size=2048, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=256),
}
# (model, batch B, sequence length L)
CASES = ([("smollm2-135m", 8, 512), ("smollm2-135m", 4, 2048)] if DEVICE == "cuda"
         else [("tiny", 4, 64), ("smollm2-4layers", 2, 128)])
LR = 1e-4


def _models(name: str):
    """(fastllm model, transformers model): same random weights, float32, in training mode."""
    cfg = ModelConfig(arch="llama", max_seq_len=4096, **MODELS[name])
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Llama(cfg).named_parameters()}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    tensors = {n: torch.randn(s, generator=g, device=DEVICE) * 0.02 for n, s in shapes.items()}
    model = build_model(cfg, tensors, DEVICE, torch.float32)
    hf = transformers_model(model)
    for m in (model, hf):
        m.train()
        m.requires_grad_(True)
    return model, hf


def _fastllm_loss(model, block):
    h = model.hidden(block[:, :-1])                                                  # (B, L, dim)
    return fastllm.linear_cross_entropy(h, model.lm_head.weight.to(h.dtype), block[:, 1:])


def _hf_loss(hf, block):
    logits = hf(input_ids=block[:, :-1]).logits                                      # (B, L, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), block[:, 1:].flatten())


def _stepper(module, loss_fn, block):
    """One training step of `module` on `block` (a no-argument callable), and its first loss."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=LR, foreach=False, fused=False)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext())

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(module, block)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    return step


@pytest.mark.parametrize("name,b,l", CASES, ids=lambda x: str(x))
def test_train_step(benchmark, name, b, l):
    if benchmark.disabled and DEVICE == "cpu" and name != "tiny":
        pytest.skip("the tiny case is CI's smoke run; this one is for timing")
    model, hf = _models(name)
    block = torch.randint(0, MODELS[name]["vocab_size"], (b, l + 1), device=DEVICE,
                          generator=torch.Generator(device=DEVICE).manual_seed(1))
    ours, theirs = _stepper(model, _fastllm_loss, block), _stepper(hf, _hf_loss, block)
    first = {"fastllm": float(ours()), "transformers": float(theirs())}  # also creates the AdamW state
    torch.testing.assert_close(first["fastllm"], first["transformers"], rtol=2e-2, atol=0)  # same model and data
    compare(benchmark, ours, {"transformers": lambda: contextlib.nullcontext(theirs)}, group=f"train-{name}-{b}x{l}",
            suite="train", case={"op": "train_step", "model": name, "batch": b, "seq_len": l,
                                 "dtype": "bf16 autocast" if DEVICE == "cuda" else "float32"},
            work=b * l, unit="tok/s", counted="B * L tokens per optimizer step (forward, backward, clip, AdamW)")
    if not benchmark.disabled:
        peaks = {"fastllm": peak_bytes(ours), "transformers": peak_bytes(theirs)}
        benchmark.extra_info.update(first_step_loss=first, peak_bytes=peaks)
        if peaks["transformers"]:
            benchmark.extra_info["peak_ratio_vs_transformers"] = peaks["fastllm"] / peaks["transformers"]
