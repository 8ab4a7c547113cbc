"""Choosing the next token from the logits: greedy, or sampling with temperature, top-k and top-p, after
a repetition penalty (transformers' rule) and OpenAI's presence and frequency penalties (vLLM's rule).

    repetition penalty r: for every token already seen (prompt or generated), s -> s / r if s > 0 else s * r
    presence a, frequency f: s_j -> s_j - f * c_j - a * [c_j > 0], c_j = times token j was generated so far
                          (the prompt does not count, as in OpenAI's and vLLM's definition)
    temperature T:        s -> s / T                   (T = 0 means greedy: argmax, no randomness)
    top-k k:              keep the k highest scores    (0 = all)
    top-p p:              keep the smallest set of highest-probability tokens whose mass reaches p (1 = all)
    then draw from softmax(s) with a torch.Generator seeded by `seed` (None = torch's global generator).
sample() applies one SamplingParams to a whole batch; sample_rows() gives every row its own (a server's
requests), drawing each sampled row alone so that a seeded request draws what it would draw by itself.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

MAX_COUNT_PENALTY = 2.0
"""presence_penalty and frequency_penalty lie in [-2, 2], OpenAI's range."""
SEED_RANGE = (-2 ** 63, 2 ** 64)
"""torch.Generator.manual_seed takes seeds in [-2**63, 2**64) (a negative seed wraps to seed + 2**64)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        def number(name, v):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(v).__name__}")
            if not isinstance(v, numbers.Integral) and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")

        number("temperature", self.temperature)
        number("top_p", self.top_p)
        number("repetition_penalty", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            number(name, getattr(self, name))
            if not abs(getattr(self, name)) <= MAX_COUNT_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_COUNT_PENALTY}, {MAX_COUNT_PENALTY}] (0 = none), "
                                 f"got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = none), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64) (torch.Generator's range), got {self.seed}")

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs the counts of generated tokens (a presence or frequency penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def generator(self, device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def _per_row(value, logits: torch.Tensor):
    """A penalty as a (B, 1) column (one value per row) or a float for all rows."""
    return value[:, None].to(logits) if isinstance(value, torch.Tensor) else value


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """Repetition penalty. logits: (B, V) float32; seen: (B, V) bool, tokens already in each row;
    penalty: a float or a (B,) tensor (one per row)."""
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
        return logits
    penalty = _per_row(penalty, logits)
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def penalize_counts(logits: torch.Tensor, counts: torch.Tensor, presence, frequency) -> torch.Tensor:
    """Presence and frequency penalties: logits - frequency * counts - presence * (counts > 0).
    logits: (B, V) float32; counts: (B, V) integer, times each token was generated in each row;
    presence, frequency: floats or (B,) tensors (one per row)."""
    c = counts.to(logits.dtype)
    return logits - _per_row(frequency, logits) * c - _per_row(presence, logits) * (c > 0).to(logits.dtype)


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits: (B, V) float32 -> next tokens (B,) int64. seen: (B, V) bool for the repetition penalty,
    counts: (B, V) generated-token counts for the presence/frequency penalties (None: not applied)."""
    if seen is not None:
        logits = penalize(logits, seen, params.repetition_penalty)
    if counts is not None and params.counts_tokens:
        logits = penalize_counts(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so that the best logit is 0, and T at least the dtype's smallest normal (below it T would round to
    # 0 in the logits' dtype): a tiny temperature sends the other logits to -inf, never to 0 / 0 or inf - inf.
    t = max(params.temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / t
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs        # probability of the tokens ranked above
        drop = mass_before >= params.top_p
        drop[:, 0] = False  # the top token always stays (a top_p below float32's smallest value rounds to 0)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits: (B, V) float32; params[i] and generators[i] are row i's -> next tokens (B,) int64. The
    penalties are applied first, each row with its own values (seen: (B, V) bool, tokens of the prompt and
    output, for repetition penalties; counts: (B, V) generated-token counts, for presence/frequency; None
    skips them). Then greedy rows take one batched argmax; each sampling row is drawn as the batch of one it
    would be alone."""
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"params ({len(params)}) and generators ({len(generators)}) must give one entry per "
                         f"row of logits ({logits.shape[0]})")
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        logits = penalize(logits, seen, torch.tensor([p.repetition_penalty for p in params]))
    if counts is not None and any(p.counts_tokens for p in params):
        logits = penalize_counts(logits, counts, torch.tensor([p.presence_penalty for p in params]),
                                 torch.tensor([p.frequency_penalty for p in params]))
    out = logits.argmax(dim=-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature != 0:
            out[i] = sample(logits[i:i + 1], p, None, g)[0]
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """The model's log-probabilities, log_softmax of the raw logits (before penalties and temperature, as
    OpenAI and vLLM report them). logits: (B, V); tokens: (B,) chosen ids -> (chosen (B,), top values (B, k),
    top ids (B, k)), the top k in decreasing order."""
    logp = logits.float().log_softmax(dim=-1)
    top = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return logp.gather(1, tokens[:, None]).squeeze(1), top[0], top[1]
