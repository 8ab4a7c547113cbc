"""Choosing the next token from the logits: greedy, or sampling with temperature, top-k and top-p, after
a repetition penalty; the same order and rules as transformers' logits processors.

    repetition penalty r: for every token already seen (prompt or generated), s -> s / r if s > 0 else s * r
    temperature T:        s -> s / T                   (T = 0 means greedy: argmax, no randomness)
    top-k k:              keep the k highest scores    (0 = all)
    top-p p:              keep the smallest set of highest-probability tokens whose mass reaches p (1 = all)
    then draw from softmax(s) with a torch.Generator seeded by `seed` (None = torch's global generator).
sample() applies one SamplingParams to a whole batch; sample_rows() gives every row its own (a server's
requests), drawing each sampled row alone so that a seeded request draws what it would draw by itself.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        def number(name, v):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(v).__name__}")

        number("temperature", self.temperature)
        number("top_p", self.top_p)
        number("repetition_penalty", self.repetition_penalty)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = none), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")

    def generator(self, device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: (B, V) float32; seen: (B, V) bool, tokens already in each row."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) float32 -> next tokens (B,) int64."""
    if seen is not None:
        logits = penalize(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs        # probability of the tokens ranked above
        drop = mass_before >= params.top_p                 # never drops the top token (mass_before = 0)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: (B, V) float32; params[i] and generators[i] are row i's -> next tokens (B,) int64. Greedy rows
    take one batched argmax; each sampling row is drawn as the batch of one it would be alone (no repetition
    penalty: there is no `seen` per row)."""
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"params ({len(params)}) and generators ({len(generators)}) must give one entry per "
                         f"row of logits ({logits.shape[0]})")
    out = logits.argmax(dim=-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature != 0:
            out[i] = sample(logits[i:i + 1], p, None, g)[0]
    return out
