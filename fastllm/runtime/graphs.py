"""The decode step generation calls: replayed from a CUDA graph on CUDA (cuda_graph.py) or from a CPU graph on
the CPU (cpu_graph.py) where they apply, else model.decode as it is."""
from __future__ import annotations

from . import cpu_graph, cuda_graph


def decode_stepper(model, cache):
    """step(tokens (B,)) -> logits (B, vocab) for each decode step of `cache`, as model.decode(tokens, cache). On
    CUDA a replayed step's logits are overwritten by the next step: use them before calling again."""
    if model.tok_embeddings.weight.device.type == "cpu":
        if cpu_graph.cpu_graphs_enabled(model) is None:
            return cpu_graph.CpuGraphStep(model, cache)
        return lambda tokens: model.decode(tokens, cache)
    return cuda_graph.decode_stepper(model, cache)
