"""The decode step under a CUDA graph: one capture per generation (fixed batch and cache), one replay per token.

A decode step launches a few kernels per layer (norms, projections, kv_cache_append, decode_attention); for a
small model at batch 1 the launches cost more than the kernels, and replaying a captured graph removes them.
What makes model.decode capturable: the static cache keeps its addresses, kv_cache_append and
decode_attention neither synchronise with the host nor size anything by value (their value checks are skipped
while capturing), and every other op runs on the current stream. The host-side bookkeeping (cache.longest)
is done here around each replay.

Checked on first use: the first step runs both eagerly and replayed (a decode step rewrites the same cache
slots with the same values, so running it twice is harmless) and the graph is kept only if both agree to
rounding; otherwise, or when capture fails, a warning says why and generation goes on eagerly.
Rotary "dynamic" (NTK) scaling recomputes its tables on the host each step, so it is never captured; nor is a
tensor-parallel model's step (fastllm/parallel: capturing its NCCL all-reduces is not verified on several GPUs).
FASTLLM_CUDA_GRAPHS=0 switches graphs off.
"""
from __future__ import annotations

import os
import warnings

import torch


def graphs_enabled(model) -> str | None:
    """None when model.decode may be captured on its device, else the reason it is not."""
    device = model.tok_embeddings.weight.device
    if device.type != "cuda":
        return "CUDA graphs are for CUDA devices"
    if os.environ.get("FASTLLM_CUDA_GRAPHS", "1").strip() in ("0", "false", "off", "no"):
        return "switched off by FASTLLM_CUDA_GRAPHS=0"
    if model.rotary is not None and model.cfg.rope_type == "dynamic":
        return "dynamic rotary scaling recomputes its tables on the host every step"
    if getattr(model, "tensor_parallel", None) is not None:
        return "tensor-parallel decode is not captured (NCCL all-reduces in graphs are not verified yet)"
    return None


class GraphedDecode:
    """step(tokens (B,)) -> logits (B, vocab), as model.decode(tokens, cache), replayed from a CUDA graph.
    The returned logits tensor is overwritten by the next step: use it before calling again."""

    def __init__(self, model, cache, warmup_steps: int = 2):
        self.model, self.cache = model, cache
        dev = cache.lengths.device
        self.tokens = torch.zeros(cache.lengths.shape[0], dtype=torch.long, device=dev)
        lengths, longest = cache.lengths.clone(), cache.longest
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up (Triton compiles, cuBLAS picks kernels) off the capture
            for _ in range(warmup_steps):
                model.decode(self.tokens, cache)
                self._rewind(lengths, longest)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode(self.tokens, cache)
        self._rewind(lengths, longest)  # capture does not run the kernels, but decode's host code ran once

    def _rewind(self, lengths: torch.Tensor, longest: int) -> None:
        self.cache.lengths.copy_(lengths)
        self.cache.longest = longest

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.check_room(1)
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.longest += 1
        return self.logits


class _CheckedStep:
    """The first call runs the step eagerly and replayed and compares them; later calls use the one kept."""

    def __init__(self, model, cache, graphed: GraphedDecode):
        self.model, self.cache, self.graphed, self.fn = model, cache, graphed, None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.fn is not None:
            return self.fn(tokens)
        cache = self.cache
        lengths, longest = cache.lengths.clone(), cache.longest
        expected = self.model.decode(tokens, cache)
        cache.lengths.copy_(lengths)
        cache.longest = longest
        got = self.graphed(tokens)
        if torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2):
            self.fn = self.graphed
            return got
        warnings.warn("fastllm: the CUDA-graph decode step disagreed with the eager one; decoding eagerly")
        self.fn = lambda t: self.model.decode(t, cache)
        cache.lengths.copy_(lengths)  # the replay rewrote this step's cache slots: write the eager ones again
        cache.longest = longest
        return self.fn(tokens)


def decode_stepper(model, cache):
    """The function to call for each decode step: a checked GraphedDecode when graphs apply, else model.decode."""
    if graphs_enabled(model) is not None:
        return lambda tokens: model.decode(tokens, cache)
    try:
        graphed = GraphedDecode(model, cache)
    except Exception as e:  # capture refused by some op: generation still works, eagerly
        warnings.warn(f"fastllm: decode runs without CUDA graphs (capture failed: {type(e).__name__}: {e})")
        return lambda tokens: model.decode(tokens, cache)
    return _CheckedStep(model, cache, graphed)
